"""sloserve serve | generate: the command line."""

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
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--no-prefix-caching", action="store_true")


def engine_config(args: argparse.Namespace):
    from sloserve.core.policies import policy_names
    from sloserve.core.scheduler import SchedulerConfig
    from sloserve.engine import EngineConfig

    if args.policy not in policy_names():
        raise CLIError(f"unknown policy {args.policy!r}; choose one of {', '.join(policy_names())}")
    try:
        scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    policy=args.policy)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                        kv_cache_memory_gb=args.kv_cache_memory_gb,
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
        engine = LLMEngine(engine_config(args))
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    try:
        serve(engine, config)
    except OSError as e:
        raise CLIError(str(e)) from None


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
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CLIError as e:
        print(f"sloserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
