"""sloserve serve | generate | profile | bench | sim: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from sloserve.config import ClusterConfig, EngineConfig, parse_replica_spec
from sloserve.errors import UsageError
from sloserve.flags import (
    add_dataclass_flags,
    add_engine_flags,
    add_role_limit_flags,
    engine_config,
    role_overrides,
)
from sloserve.request import SamplingParams


def cmd_generate(args: argparse.Namespace) -> None:
    from sloserve.llm import LLM

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = engine_config(args)
    try:
        llm = LLM(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
        result = llm.generate(prompt, params)[0]
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    print(result.text)


def cmd_serve(args: argparse.Namespace) -> None:
    from sloserve.model.generation_config import generation_defaults
    from sloserve.request import SLO
    from sloserve.server import ServerConfig, serve
    from sloserve.server.engine_process import EngineProcess

    try:
        slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms,
                  deadline_ms=args.slo_deadline_ms)
        if min(args.max_waiting, args.request_timeout, args.max_tokens_default) <= 0:
            raise ValueError("--max-waiting, --request-timeout and --max-tokens-default must "
                             "be positive")
        config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                              max_waiting=args.max_waiting,
                              request_timeout_s=args.request_timeout,
                              max_tokens_default=args.max_tokens_default,
                              generation_defaults=generation_defaults(args.generation_config,
                                                                      args.model),
                              served_model_name=args.served_model_name, default_slo=slo,
                              policy=args.policy)
        if args.mode:
            engine = cluster_engine(args)
        else:  # in a process of its own, as vLLM's engine core: no GIL shared with HTTP
            engine = EngineProcess(calibrated_engine, engine_config(args))
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    try:
        serve(engine, config)
    except OSError as e:
        raise UsageError(str(e)) from None
    finally:
        engine.shutdown()  # tensor-parallel ranks, Ray actors


def calibrated_engine(config: EngineConfig):
    """The engine `serve` runs (in its engine process), with a latency profile if its policy
    prices steps."""
    from sloserve.engine import LLMEngine
    from sloserve.profiler import calibrate

    engine = LLMEngine(config)
    calibrate(engine)
    return engine


def cluster_engine(args: argparse.Namespace):
    """--mode colocated | disagg | tropical: engine instances as Ray actors."""
    from sloserve.cluster.frontend import ClusterEngine

    engine = engine_config(args)
    if args.enable_chunked_prefill and engine.scheduler.policy == "fcfs":
        engine = engine.with_scheduler(policy="chunked")

    return ClusterEngine(ClusterConfig(
        mode=args.mode, replica_spec=parse_replica_spec(args.replica_spec),
        partition_id=args.partition_id, engine=engine, prefill=role_overrides(args, "prefill"),
        decode=role_overrides(args, "decode"), ray_address=args.ray_address,
        latency_profile=args.latency_profile, kv_transfer=args.kv_transfer,
        router=args.router))


def cmd_profile(args: argparse.Namespace) -> None:
    import json
    import platform

    from sloserve.engine import LLMEngine
    from sloserve.profiler import profile

    try:
        batches = _int_list(args.batch_sizes, "--batch-sizes")
        tokens = _int_list(args.prefill_tokens, "--prefill-tokens")
        engine = LLMEngine(engine_config(args))
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    model = profile(engine, batches, tokens, context=args.context)
    data = {"model": engine.model_name, "device": str(engine.runner.device),
            "machine": platform.machine(), **model.to_dict()}
    with open(args.out, "w") as f:
        json.dump(data, f, indent=2)
    for b, t in zip(model.decode_batch, model.decode_s):
        print(f"decode batch {b:4d}: {t * 1e3:8.1f} ms")
    for n, t in zip(model.prefill_tokens, model.prefill_s):
        print(f"prefill {n:5d} tokens: {t * 1e3:8.1f} ms")
    print(f"wrote {args.out}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0 or values != sorted(values):
        raise ValueError(f"{flag} must be positive and increasing, got {text!r}")
    return values


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several engine instances over Ray (--mode)")
    add_dataclass_flags(g, ClusterConfig)
    g.set_defaults(mode=None)  # unset: one engine in this process
    g.add_argument("--replica-spec", nargs="+", metavar="TP,PP",
                   default=[f"{tp},{pp}" for tp, pp in ClusterConfig.replica_spec],
                   help="one tp,pp per engine instance")
    add_role_limit_flags(g)
    g.add_argument("--enable-chunked-prefill", action="store_true",
                   help="chunked prefill on every instance (the chunked policy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sloserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    parser.commands = sub.choices
    gen = sub.add_parser("generate", help="reply to one prompt and print it")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    add_engine_flags(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    from sloserve.server.app import ServerConfig

    srv.add_argument("--host", default=ServerConfig.host)
    srv.add_argument("--port", type=int, default=ServerConfig.port)
    srv.add_argument("--api-key", default=None, help="require this Bearer token on /v1/*")
    srv.add_argument("--max-waiting", type=int, default=ServerConfig.max_waiting,
                     help="waiting requests beyond this are refused with 429")
    srv.add_argument("--request-timeout", type=float, default=ServerConfig.request_timeout_s,
                     help="seconds")
    srv.add_argument("--max-tokens-default", type=int,
                     default=ServerConfig.max_tokens_default,
                     help="output cap of a request that sends no max_tokens")
    srv.add_argument("--generation-config", default="auto", metavar="auto|none|FILE",
                     help="temperature / top_p / top_k for requests that send none: the "
                          "model's generation_config.json or shipped defaults (auto), OpenAI's "
                          "(none), or a JSON file's")
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--slo-ttft-ms", type=float, default=None, help="default TTFT objective")
    srv.add_argument("--slo-tpot-ms", type=float, default=None, help="default TPOT objective")
    srv.add_argument("--slo-deadline-ms", type=float, default=None,
                     help="default end-to-end objective")
    add_engine_flags(srv)
    add_cluster_args(srv)
    srv.set_defaults(func=cmd_serve)

    prof = sub.add_parser("profile", help="measure step latency, write a latency profile")
    prof.add_argument("--out", default="latency-profile.json")
    prof.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    prof.add_argument("--prefill-tokens", default="16,64,256,1024")
    prof.add_argument("--context", type=int, default=128, help="context of decode requests")
    add_engine_flags(prof)
    prof.set_defaults(func=cmd_profile)

    from sloserve.bench import command as bench

    run = sub.add_parser("bench", help="load an OpenAI-compatible endpoint and measure SLOs "
                                       "(`sloserve bench compare RUN...` overlays runs)")
    bench.add_run_args(run)
    run.set_defaults(func=bench.cmd_bench)
    compare = sub.add_parser("bench-compare", help="overlay results folders")
    compare.add_argument("runs", nargs="+")
    compare.add_argument("--out", default="bench-compare")
    compare.set_defaults(func=bench.cmd_compare)

    from sloserve.sim import command as sim

    simulate = sub.add_parser("sim", help="simulate a workload on the real scheduler")
    sim.add_sim_args(simulate)
    simulate.set_defaults(func=sim.cmd_sim)

    from sloserve.tune import command as tune

    tuner = sub.add_parser("tune", help="search the configuration that meets an SLO at the "
                                        "highest load (by simulation)")
    tune.add_tune_args(tuner)
    tuner.set_defaults(func=tune.cmd_tune)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; with --config FILE, the file's settings are the defaults that the
    flags given override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        command = parser.commands[args.command]
        command.set_defaults(**config_file_defaults(args.config, command))
        args = parser.parse_args(argv)
    return args


def config_file_defaults(path: str, command: argparse.ArgumentParser) -> dict:
    """A YAML or JSON mapping of setting names (flag names with underscores, as `sloserve
    tune` writes) to values; `policy_options` is a mapping of the policy's knobs."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: {e}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of settings")
    options = values.pop("policy_options", None) or {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    if options:
        values["policy_option"] = [f"{k}={v}" for k, v in options.items()]
    known = {a.dest for a in command._actions} - {"help", "config", "func"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown setting {unknown[0]!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "compare"]:
        argv = ["bench-compare", *argv[2:]]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = parse_args(argv)
        args.func(args)
    except UsageError as e:
        print(f"sloserve {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
