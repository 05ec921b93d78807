"""Decode step time against the memory-bandwidth bound (GPU).

Llama-3-8B shape, bf16, dummy weights. For each batch b (context C tokens each) one decode step
must read every weight the step uses once plus b x C tokens of KV; the bound is those bytes over
the bandwidth a device-to-device copy reaches in the same run (bytes read + written / time).
A step is ModelRunner.execute of a decode-only Plan: CUDA graph replay, sampling and the host
work included. Also timed: the same step without graphs, and with the pure-torch attention.
Targets: batch 1 within 1.3x of the bound, batch 256 within 1.6x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve.config import EngineConfig, SchedulerConfig  # noqa: E402
from sloserve.core.plan import Plan, ScheduledChunk  # noqa: E402
from sloserve.model.attention.torch_paged import TorchPagedAttention  # noqa: E402
from sloserve.request import Request, SamplingParams  # noqa: E402
from sloserve.worker.model_runner import ModelRunner  # noqa: E402

BLOCK = 16


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes per second a device copy moves, counting reads and writes."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / seconds


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Every parameter is read once per step except the embedding table (b rows of it)."""
    embed = model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p is not embed or model.config.tie_word_embeddings)


def decode_plan(batch: int, context: int, num_blocks: int) -> Plan:
    """batch requests whose KV blocks are scattered over the cache, each decoding at `context`."""
    pages = -(-(context + 1) // BLOCK)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    chunks = []
    for i in range(batch):
        request = Request(request_id=str(i), prompt_token_ids=[7] * (context + 1),
                          sampling_params=SamplingParams(temperature=0), arrival_time=0.0)
        request.block_ids = order[i * pages:(i + 1) * pages]
        chunks.append(ScheduledChunk(request, context, 1, True))
    return Plan(now=0.0, chunks=chunks)


def step_ms(runner: ModelRunner, plan: Plan, iters: int) -> float:
    for _ in range(3):
        runner.execute(plan)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.execute(plan)  # ends with reading the sampled tokens: a full sync
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = copy_bandwidth()
    num_blocks = max(batches) * -(-(args.context + 1) // BLOCK)
    runner = ModelRunner(EngineConfig(
        model=args.model, dtype="bfloat16", device="cuda", block_size=BLOCK,
        num_kv_blocks=num_blocks, attention_backend="triton",
        scheduler=SchedulerConfig(max_num_seqs=max(batches))))
    model, config = runner.model, runner.loaded.config
    weights = weight_bytes_per_step(model)
    kv_per_token = config.kv_bytes_per_token(2)
    rows = []
    for batch in batches:
        plan = decode_plan(batch, args.context, num_blocks)
        bound_ms = (weights + batch * (args.context + 1) * kv_per_token) / bandwidth * 1e3
        graphs = step_ms(runner, plan, args.iters)
        eager = _without_graphs(runner, lambda: step_ms(runner, plan, args.iters))
        torch_attn = _torch_attention(runner, lambda: step_ms(runner, plan, args.iters))
        rows.append({"batch": batch, "bound_ms": round(bound_ms, 3),
                     "step_ms": round(graphs, 3), "ratio_to_bound": round(graphs / bound_ms, 3),
                     "eager_step_ms": round(eager, 3), "torch_attention_eager_ms":
                     round(torch_attn, 3)})
        print(f"batch {batch:4d}: step {graphs:7.2f} ms  bound {bound_ms:7.2f} ms  "
              f"ratio {graphs / bound_ms:5.2f}x   (no graphs {eager:7.2f} ms, "
              f"torch attention {torch_attn:7.2f} ms)", flush=True)
    save("gpu_decode_roofline", {
        "model": args.model, "dtype": "bfloat16", "context": args.context,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_bytes": weights,
        "kv_bytes_per_token": kv_per_token, "rows": rows,
        "targets": {"batch_1_ratio": 1.3, "batch_256_ratio": 1.6}})


def _without_graphs(runner: ModelRunner, measure):
    graphs, runner.graphs = runner.graphs, None
    try:
        return measure()
    finally:
        runner.graphs = graphs


def _torch_attention(runner: ModelRunner, measure):
    layers = runner.model.layers
    backends = [layer.self_attn.backend for layer in layers]
    for layer in layers:
        layer.self_attn.backend = TorchPagedAttention(BLOCK)
    try:
        return _without_graphs(runner, measure)
    finally:
        for layer, backend in zip(layers, backends):
            layer.self_attn.backend = backend


if __name__ == "__main__":
    main()
