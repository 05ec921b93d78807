"""Offline throughput: sloserve LLM.generate vs HF transformers static-batch generate.

Same 32 chat prompts (Vicuna questions), 64 output tokens each (ignore EOS), same process,
same weights (the embedded SmolLM2, float32). Prints tokens/s of both and the ratio.
`--quantization int4` runs sloserve with 4-bit projection weights against the same float32 HF
baseline and writes offline_throughput_int4.json.
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

from sloserve import LLM, SamplingParams  # noqa: E402
from sloserve.workload.datasets import vicuna_questions  # noqa: E402


def run_sloserve(llm: LLM, prompts: list[list[int]], out_len: int) -> float:
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == out_len for r in results)
    return len(prompts) * out_len / elapsed


def run_hf(prompts: list[list[int]], out_len: int, pad_id: int) -> float:
    from transformers import AutoModelForCausalLM

    from sloserve.model.loader import embedded_gguf, gguf_to_hf_folder

    model = AutoModelForCausalLM.from_pretrained(gguf_to_hf_folder(embedded_gguf()),
                                                 dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False,
                       pad_token_id=pad_id)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=out_len,
                             min_new_tokens=out_len, do_sample=False, pad_token_id=pad_id)
        elapsed = time.perf_counter() - start
    assert out.shape[1] - width == out_len
    return len(prompts) * out_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--quantization", choices=("none", "int4"), default="none")
    parser.add_argument("--repeats", type=int, default=3,
                        help="both engines this many times, alternating; the median ratio")
    args = parser.parse_args()
    llm = LLM(quantization=args.quantization)
    questions = vicuna_questions()[: args.num_prompts]
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}])
               for q in questions]
    runs = []
    for _ in range(args.repeats):
        ours = run_sloserve(llm, prompts, args.output_len)
        hf = run_hf(prompts, args.output_len, llm.engine.eos_token_id)
        runs.append({"sloserve_tokens_per_s": round(ours, 1), "hf_tokens_per_s": round(hf, 1),
                     "ratio": round(ours / hf, 2)})
        print(f"sloserve {ours:8.1f}, HF generate (static batch) {hf:8.1f} output tokens/s: "
              f"{ours / hf:.2f}x", flush=True)
    ratios = sorted(r["ratio"] for r in runs)
    print(f"ratio min / median / max: {ratios[0]} / {statistics.median(ratios)} / "
          f"{ratios[-1]} (target >= 1.5)")
    name = "offline_throughput" + ("" if args.quantization == "none" else "_int4")
    path = save(name, {
        "quantization": args.quantization, "num_prompts": len(prompts),
        "output_len": args.output_len, "runs": runs,
        "ratio": {"min": ratios[0], "median": statistics.median(ratios), "max": ratios[-1]}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
