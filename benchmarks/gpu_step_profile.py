"""Where a GPU decode step's time goes: kernels by time, and the attention kernel's launch
settings swept (GPU).

Llama-3-8B shape, bf16, dummy weights, decode-only steps at context C. Part 1 profiles eager
steps (torch.profiler: CUDA time per kernel name, summed per step; the step's wall time beside
it shows the gaps between kernels). Part 2 times the attention of one layer alone for each
(block_n, num_warps, num_stages), CUDA events, median of 50.

    python benchmarks/gpu_step_profile.py [--batches 1,64,256] [--context 1024]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402
from gpu_decode_roofline import BLOCK, decode_plan  # noqa: E402

from sloserve.config import EngineConfig, SchedulerConfig  # noqa: E402
from sloserve.model.attention import AttentionMetadata  # noqa: E402
from sloserve.worker.model_runner import ModelRunner, pad_tables  # noqa: E402
from sloserve.worker.step_inputs import order_chunks, pack  # noqa: E402


def kernel_table(runner: ModelRunner, plan, steps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        runner.execute(plan)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            runner.execute(plan)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_time_total > 0:
            per_kernel[event.key[:70]] += event.device_time_total / steps / 1e3
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_ms": round(wall * 1e3, 3), "kernel_ms": round(sum(per_kernel.values()), 3),
            "top": [(name, round(ms, 3)) for name, ms in top]}


def attention_meta(runner: ModelRunner, plan) -> AttentionMetadata:
    step = pack(order_chunks(plan), BLOCK)
    i32 = dict(dtype=torch.int32, device="cuda")
    return AttentionMetadata(
        slot_mapping=torch.tensor(step.slots, **i32),
        query_start_loc=torch.arange(len(step.seq_lens) + 1, **i32),
        seq_lens=torch.tensor(step.seq_lens, **i32),
        block_tables=pad_tables(step.tables).cuda(), num_decodes=len(step.seq_lens),
        max_query_len=1, prefills=[])


def attention_sweep(runner: ModelRunner, plan) -> list[dict]:
    attn = runner.model.layers[0].self_attn
    backend, cfg = attn.backend, runner.model.config
    meta = attention_meta(runner, plan)
    b = meta.seq_lens.shape[0]
    q = torch.randn(b, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(b, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    rows = []
    backend.small_decode_programs = 0  # every launch with the settings below
    for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
        backend.block_n, backend.num_warps, backend.num_stages = block_n, warps, stages
        try:
            times = []
            for i in range(60):
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                backend.forward(q, k, v, runner.kv_caches[0], meta, 0.088)
                end.record()
                end.synchronize()
                if i >= 10:
                    times.append(start.elapsed_time(end))
            rows.append({"block_n": block_n, "warps": warps, "stages": stages,
                         "us": round(statistics.median(times) * 1e3, 1)})
        except Exception as e:  # out of shared memory etc.
            rows.append({"block_n": block_n, "warps": warps, "stages": stages,
                         "error": str(e)[:80]})
    for name in ("block_n", "num_warps", "num_stages", "small_decode_programs"):
        delattr(backend, name)
    return sorted((r for r in rows if "us" in r), key=lambda r: r["us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    num_blocks = max(batches) * -(-(args.context + 1) // BLOCK)
    runner = ModelRunner(EngineConfig(
        model=args.model, dtype="bfloat16", device="cuda", block_size=BLOCK,
        num_kv_blocks=num_blocks, attention_backend="triton", enforce_eager=True,
        scheduler=SchedulerConfig(max_num_seqs=max(batches))))
    result = {}
    for batch in batches:
        plan = decode_plan(batch, args.context, num_blocks)
        table = kernel_table(runner, plan)
        sweep = attention_sweep(runner, plan)
        default = next(r for r in sweep if (r["block_n"], r["warps"], r["stages"]) == (64, 4, 3))
        result[str(batch)] = {"eager_step": table, "attention_64_4_3_us": default["us"],
                              "attention_best": sweep[:5]}
        print(f"batch {batch}: {table}\n  attention (64, 4, 3) {default['us']} us, best "
              f"{sweep[:5]}", flush=True)
    save("gpu_step_profile", {"model": args.model, "context": args.context, "rows": result})


if __name__ == "__main__":
    main()
