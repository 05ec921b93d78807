"""sloserve's GPU attention backends side by side (issue: pass vLLM on the same H200).

For each backend (`--backends`, default triton,flash: sloserve's Triton kernels and vLLM's
FlashAttention 3 kernels, which need `.whl/vllm` unpacked as vllm_compare.py describes), on
the Llama-3.1-8B shape with dummy weights in bf16: the decode step at batch 1 / 64 / 256
(context 1,024; (T(128 tokens) - T(1 token)) / 127, as ../shared/tools/vllm-h100 measures
both engines), a lone prefill of 4,096 / 16,384 / 28,672 tokens, and the greedy tokens of 8
prompts, whose agreement with the first backend's is reported (random weights make near-ties
common, so a few flips are expected). Writes benchmarks/results/attention_backends.json with
"ratios" of each later backend over the first (times: lower is better):

    PYTHONPATH=/tmp/site:$PWD python benchmarks/attention_backends.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve import LLM, SamplingParams  # noqa: E402

VOCAB = 128256


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, VOCAB - 100, (n, length), generator=generator).tolist()


def timed(llm: LLM, batch: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(batch, params)
    return time.perf_counter() - start


def measure(backend: str, args) -> dict:
    llm = LLM(model="dummy:llama-3.1-8b", dtype="bfloat16", attention_backend=backend,
              max_model_len=32768, max_num_seqs=256, max_num_batched_tokens=8192,
              enable_prefix_caching=False)
    result: dict = {"decode_step_ms": {}, "prefill_s": {}}
    seed = 0
    for batch in (1, 64, 256):
        timed(llm, prompts(batch, 1024, seed := seed + 1), 2)  # warm-up at this batch
        steps = []
        for _ in range(args.repeats):
            one = timed(llm, prompts(batch, 1024, seed := seed + 1), 1)
            many = timed(llm, prompts(batch, 1024, seed := seed + 1), 128)
            steps.append((many - one) / 127 * 1e3)
        result["decode_step_ms"][str(batch)] = round(statistics.median(steps), 3)
    for length in (4096, 16384, 28672):
        timed(llm, prompts(1, length, seed := seed + 1), 1)  # warm-up
        result["prefill_s"][str(length)] = round(statistics.median(
            timed(llm, prompts(1, length, seed := seed + 1), 1) for _ in range(args.repeats)), 4)
    outs = llm.generate(prompts(8, 300, 999), SamplingParams(max_tokens=16, temperature=0))
    result["greedy_tokens"] = [o.token_ids for o in outs]
    print(backend, {k: v for k, v in result.items() if k != "greedy_tokens"}, flush=True)
    return result


def in_own_process(backend: str, args) -> dict:
    """One engine per process: each takes 90% of the GPU's memory."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--one", backend, "--out", out.name,
                        "--repeats", str(args.repeats)], check=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="triton,flash")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # measure this backend into --out
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        Path(args.out).write_text(json.dumps(measure(args.one, args)))
        return
    backends = args.backends.split(",")
    runs = {b: in_own_process(b, args) for b in backends}
    base = runs[backends[0]]
    ratios = {}
    for name in backends[1:]:
        run = runs[name]
        for batch, ms in run["decode_step_ms"].items():
            ratios[f"{name}_over_{backends[0]}_decode_b{batch}"] = round(
                ms / base["decode_step_ms"][batch], 3)
        for length, s in run["prefill_s"].items():
            ratios[f"{name}_over_{backends[0]}_prefill_{length}"] = round(
                s / base["prefill_s"][length], 3)
        same = sum(a == b for x, y in zip(run["greedy_tokens"], base["greedy_tokens"])
                   for a, b in zip(x, y))
        run["greedy_agreement"] = round(same / sum(map(len, base["greedy_tokens"])), 3)
    for run in runs.values():
        run.pop("greedy_tokens")
    print(ratios)
    record = {"device": torch.cuda.get_device_name(0), "runs": runs, "ratios": ratios}
    print(f"-> {save('attention_backends', record)}")


if __name__ == "__main__":
    main()
