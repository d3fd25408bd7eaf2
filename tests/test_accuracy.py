"""The check-accuracy pass rule on hand-made rows (the HTTP side is tested end to end)."""

from __future__ import annotations

from vllm_kimi_neuron.accuracy import Greedy, Report, Row, Thresholds


def _row(
    golden_top1: int, served_top1: int, gap: float, diff: float = 0.01, margin: float | None = 0.1
) -> Row:
    return Row(sequence=0, position=1, token=7, golden_logprob=-1.0, served_logprob=-1.0 + diff,
               golden_top1=golden_top1, served_top1=served_top1, gap=gap, router_margin=margin)


def test_near_tie_flips_pass_but_a_decisive_flip_fails() -> None:
    t = Thresholds()
    top2_tie = _row(1, 2, gap=0.1)
    router_tie = _row(1, 2, gap=3.0, diff=-3.8, margin=0.0004)  # an expert swap moves a lot
    ties = Report([_row(1, 1, 3.0), top2_tie, router_tie], [], t)
    assert ties.failures() == []
    assert "all positions: 1/3; decisive positions: 1/1" in ties.summary()
    assert "1 by golden top-2 gap <= 0.2 nats, 1 by router margin <= 0.005" in ties.summary()
    assert "top-2-tie flip (near-tie)" in ties.table() and "router-tie flip (near-tie)" in ties.table()
    assert ties.summary().endswith("PASS")
    decisive_flip = Report([_row(1, 1, 3.0), _row(1, 2, 0.5)], [], t)
    assert decisive_flip.failures() == ["top-1 match on decisive positions 50.0% < 100.0%"]
    assert "MISMATCH" in decisive_flip.table() and "FAIL" in decisive_flip.summary()
    assert Report([_row(1, 2, 0.5)], [], Thresholds(min_match=0.0)).failures() == []
    assert Report([_row(1, 1, 2.0, margin=None)], [], t).failures() == []  # a dense model: no margin
    assert Report([top2_tie], [], t).failures()[0].startswith("no decisive positions")


def test_logprob_differences_beyond_thresholds_fail() -> None:
    t = Thresholds(max_mean_diff=0.05, max_diff=1.0)
    assert Report([_row(1, 1, 2.0, diff=0.04)] * 3, [], t).failures() == []
    assert Report([_row(1, 1, 2.0, diff=-0.06)] * 3, [], t).failures() == [
        "mean |logprob diff| 0.0600 > 0.05"]
    spike = Report([_row(1, 1, 2.0, diff=0.0)] * 99 + [_row(1, 1, 2.0, diff=1.5)], [], t)
    assert spike.failures() == ["max |logprob diff| 1.5000 > 1.0"]


def test_greedy_may_diverge_only_at_a_near_tie() -> None:
    rows = [_row(1, 1, 2.0)]
    assert Report(rows, [Greedy(0, [1, 2, 3], [1, 2, 3], [False] * 3)], Thresholds()).failures() == []
    flip_at_tie = Greedy(0, [1, 2, 3], [1, 9, 8], [False, True, False])
    assert Report(rows, [flip_at_tie], Thresholds()).failures() == []
    late = Report(rows, [Greedy(0, [1, 2, 3], [1, 2, 8], [False, True, False])], Thresholds())
    assert late.failures() == ["sequence 0: greedy continuation differs at new token 2 where the golden "
                               "choice was not a near-tie"]
    stopped = Report(rows, [Greedy(0, [1, 2, 3], [1], [False] * 3)], Thresholds())
    assert len(stopped.failures()) == 1


def test_a_flip_is_exempt_only_when_both_tokens_agree_within_the_tie_gap() -> None:
    t = Thresholds()
    within = Row(0, 1, 7, -1.0, -1.18, golden_top1=7, served_top1=9, gap=0.21, router_margin=0.06,
                 flip_error=0.18)
    beyond = Row(0, 2, 7, -1.0, -1.3, golden_top1=7, served_top1=9, gap=0.21, router_margin=0.06,
                 flip_error=0.3)
    unknown = Row(0, 3, 7, -1.0, -1.1, golden_top1=7, served_top1=9, gap=0.21, router_margin=0.06)
    assert [r.tie(t) for r in (within, beyond, unknown)] == ["tolerance", None, None]
    report = Report([_row(1, 1, 3.0), within], [], t)
    assert report.failures() == []
    assert "1 flips between two tokens whose logprobs both agree" in report.summary()
    assert "tolerance-tie flip (near-tie)" in report.table()
    assert Report([_row(1, 1, 3.0), beyond, unknown], [], t).failures()[0] == (
        "top-1 match on decisive positions 33.3% < 100.0%")
