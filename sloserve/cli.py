"""sloserve serve | generate | profile | bench | sim: the command line."""

from __future__ import annotations

import argparse
import sys

from sloserve.request import SamplingParams


class CLIError(Exception):
    """A bad argument: printed as one line, exit code 2."""


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF folder, .gguf file or dummy:SHAPE (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0,
                   help="KV cache size on the CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="on a GPU: share of its memory for weights, KV cache and activations")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over this many processes (GPUs on CUDA)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--policy", default="fcfs", help="fcfs, delay, chunked, slice or edf")
    p.add_argument("--delay-factor", type=float, default=None, help="delay: x last prompt latency")
    p.add_argument("--slice-period-ms", type=float, default=None, help="slice: decode cycle")
    p.add_argument("--slice-ratio", type=float, default=None,
                   help="slice: share of each cycle for decoding (the rest: prefills)")
    p.add_argument("--realtime-utility", type=float, default=None,
                   help="slice: utility of a real-time task (others: 1)")
    p.add_argument("--latency-profile", default=None,
                   help="slice: JSON from `sloserve profile` (default: the shipped CPU one)")
    p.add_argument("--no-prefix-caching", action="store_true")


POLICY_FLAGS = {"delay": {"delay_factor": "delay_factor"},
                "slice": {"slice_period_ms": "period_ms", "slice_ratio": "ratio",
                          "realtime_utility": "realtime_utility",
                          "latency_profile": "latency"}}


def policy_options(args: argparse.Namespace) -> dict:
    """The policy's own knobs from its flags; a flag for another policy is an error."""
    options = {}
    for policy, flags in POLICY_FLAGS.items():
        for flag, option in flags.items():
            value = getattr(args, flag)
            if value is None:
                continue
            if policy != args.policy:
                raise CLIError(f"--{flag.replace('_', '-')} applies to --policy {policy}")
            options[option] = value
    return options


def engine_config(args: argparse.Namespace):
    from sloserve.core.policies import make_policy, policy_names
    from sloserve.core.scheduler import SchedulerConfig
    from sloserve.engine import EngineConfig

    if args.policy not in policy_names():
        raise CLIError(f"unknown policy {args.policy!r}; choose one of {', '.join(policy_names())}")
    try:
        scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    policy=args.policy, policy_options=policy_options(args))
        make_policy(args.policy, **scheduler.policy_options)  # bad knob values fail here
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                        kv_cache_memory_gb=args.kv_cache_memory_gb,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        attention_backend=args.attention_backend,
                        enforce_eager=args.enforce_eager,
                        tensor_parallel_size=args.tensor_parallel_size,
                        max_model_len=args.max_model_len,
                        enable_prefix_caching=not args.no_prefix_caching, scheduler=scheduler)


def cmd_generate(args: argparse.Namespace) -> None:
    from sloserve.llm import LLM

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None
    config = engine_config(args)
    try:
        llm = LLM(**{f: getattr(config, f) for f in config.__dataclass_fields__})
        prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
        result = llm.generate(prompt, params)[0]
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    print(result.text)


def cmd_serve(args: argparse.Namespace) -> None:
    from sloserve.engine import LLMEngine
    from sloserve.request import SLO
    from sloserve.server import ServerConfig, serve

    try:
        slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms,
                  deadline_ms=args.slo_deadline_ms)
        if args.max_waiting <= 0 or args.request_timeout <= 0:
            raise ValueError("--max-waiting and --request-timeout must be positive")
        config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                              max_waiting=args.max_waiting,
                              request_timeout_s=args.request_timeout,
                              served_model_name=args.served_model_name, default_slo=slo)
        engine = cluster_engine(args) if args.mode else LLMEngine(engine_config(args))
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    try:
        serve(engine, config)
    except OSError as e:
        raise CLIError(str(e)) from None
    finally:
        engine.shutdown()  # tensor-parallel ranks, Ray actors


def cluster_engine(args: argparse.Namespace):
    """--mode colocated | disagg | tropical: engine instances as Ray actors."""
    import dataclasses

    from sloserve.disagg.cluster import ClusterEngine, cluster_config

    config = engine_config(args)
    if args.enable_chunked_prefill and config.scheduler.policy == "fcfs":
        config = dataclasses.replace(config, scheduler=dataclasses.replace(
            config.scheduler, policy="chunked"))
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}

    def role_kwargs(role: str) -> dict:
        scheduler = dataclasses.replace(config.scheduler, **{
            k: v for k, v in (("max_num_seqs", getattr(args, f"{role}_max_num_seqs")),
                              ("max_num_batched_tokens",
                               getattr(args, f"{role}_max_num_batched_tokens"))) if v})
        util = getattr(args, f"{role}_gpu_memory_utilization")
        return {"scheduler": scheduler, **({"gpu_memory_utilization": util} if util else {})}

    return ClusterEngine(cluster_config(
        args.mode, args.replica_spec, args.partition_id, shared,
        prefill_kwargs=role_kwargs("prefill"), decode_kwargs=role_kwargs("decode"),
        ray_address=args.ray_address, latency_profile=args.latency_profile,
        kv_transfer=args.kv_transfer))


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
        raise CLIError(str(e)) from None
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
    g.add_argument("--mode", choices=["colocated", "disagg", "tropical"], default=None,
                   help="unset: one engine in this process")
    g.add_argument("--replica-spec", nargs="+", default=["1,1", "1,1"], metavar="TP,PP",
                   help="one tp,pp per engine instance")
    g.add_argument("--partition-id", type=int, default=1,
                   help="instances [0, partition-id) prefill, the rest decode")
    for role in ("prefill", "decode"):
        g.add_argument(f"--{role}-max-num-seqs", type=int, default=None)
        g.add_argument(f"--{role}-max-num-batched-tokens", type=int, default=None)
        g.add_argument(f"--{role}-gpu-memory-utilization", type=float, default=None)
    g.add_argument("--enable-chunked-prefill", action="store_true",
                   help="chunked prefill on every instance (the chunked policy)")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster; default: local")
    g.add_argument("--kv-transfer", choices=["direct", "object-store"], default="direct",
                   help="direct: prefill-to-decode links (NCCL between GPUs, gloo on CPUs); "
                        "object-store: through host memory and Ray's object store")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sloserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="reply to one prompt and print it")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require this Bearer token on /v1/*")
    srv.add_argument("--max-waiting", type=int, default=1024,
                     help="waiting requests beyond this are refused with 429")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--slo-ttft-ms", type=float, default=None, help="default TTFT objective")
    srv.add_argument("--slo-tpot-ms", type=float, default=None, help="default TPOT objective")
    srv.add_argument("--slo-deadline-ms", type=float, default=None,
                     help="default end-to-end objective")
    add_engine_args(srv)
    add_cluster_args(srv)
    srv.set_defaults(func=cmd_serve)

    prof = sub.add_parser("profile", help="measure step latency, write a latency profile")
    prof.add_argument("--out", default="latency-profile.json")
    prof.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    prof.add_argument("--prefill-tokens", default="16,64,256,1024")
    prof.add_argument("--context", type=int, default=128, help="context of decode requests")
    add_engine_args(prof)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from sloserve.bench.command import BenchError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "compare"]:
        argv = ["bench-compare", *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, BenchError) as e:
        print(f"sloserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
