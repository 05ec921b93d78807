"""Tensor parallelism: tp=2 against tp=1 in one run (Llama-3-8B shape, dummy weights).

Decode step time (a decode-only Plan through ModelRunner.execute, context 1,024, sampling
included) at each batch size, and offline throughput on --requests requests of
--input-len / --output-len tokens. Both sizes run eagerly (CUDA graphs are single-rank for now);
tp=1 with graphs is timed too, for reference.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402
from gpu_decode_roofline import decode_plan, step_ms  # noqa: E402

from sloserve import LLM, SamplingParams  # noqa: E402


def measure(model: str, tp: int, eager: bool, batches: list[int], context: int,
            args: argparse.Namespace) -> dict:
    blocks = max(batches) * -(-(context + 1) // 16) + 64
    llm = LLM(model=model, tensor_parallel_size=tp, enforce_eager=eager, num_kv_blocks=blocks,
              max_num_seqs=max(batches), max_num_batched_tokens=8192,
              enable_prefix_caching=False)
    try:
        runner = llm.engine.runner
        steps = {b: round(step_ms(runner, decode_plan(b, context, blocks), 10), 3)
                 for b in batches}
        prompts = torch.randint(100, 30000, (args.requests, args.input_len),
                                generator=torch.Generator().manual_seed(0)).tolist()
        params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - start
    finally:
        llm.engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    row = {"tp": tp, "eager": eager, "decode_step_ms": steps,
           "output_tokens_per_s": round(args.requests * args.output_len / seconds, 1)}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for tp, eager in ((1, True), (2, True), (1, False)):
        rows.append(measure(args.model, tp, eager, batches, args.context, args))
        save("tp_scaling", {"model": args.model, "context": args.context,
                            "requests": args.requests, "input_len": args.input_len,
                            "output_len": args.output_len, "rows": rows})


if __name__ == "__main__":
    main()
