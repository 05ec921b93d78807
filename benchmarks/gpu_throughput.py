"""Offline throughput on a GPU: sloserve vs HF transformers, same device, same run.

Llama-3-8B shape, bf16, random weights (speed does not depend on them). N requests of
`--input-len` random prompt tokens and `--output-len` output tokens each (EOS ignored).
Baselines: HF `generate` on static batches of `--hf-batch`, and HF continuous batching
(`generate_batch` with paged SDPA). The HF runs may take a subset of the requests
(`--hf-requests`): their figure is a rate, output tokens per second. Target: sloserve >= 5x
HF's better figure.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sloserve import LLM, SamplingParams  # noqa: E402
from sloserve.model.config import NAMED_SHAPES  # noqa: E402


def make_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab - 100, (n, length), generator=generator).tolist()


def run_sloserve(shape: str, prompts: list[list[int]], out_len: int, max_num_seqs: int) -> dict:
    llm = LLM(model=f"dummy:{shape}", dtype="bfloat16", max_num_seqs=max_num_seqs,
              max_num_batched_tokens=8192, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == out_len for r in results)
    blocks = llm.engine.blocks.num_blocks
    del llm, results
    _free()
    return {"requests": len(prompts), "seconds": round(elapsed, 2),
            "output_tokens_per_s": round(len(prompts) * out_len / elapsed, 1),
            "kv_blocks": blocks}


def hf_model(shape: str, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(NAMED_SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation=attn)
    return model.eval()


def run_hf_static(shape: str, prompts: list[list[int]], out_len: int, batch: int) -> dict:
    model = hf_model(shape, "sdpa")
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch], device="cuda")  # equal lengths: no padding
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=out_len, min_new_tokens=out_len,
                                 pad_token_id=0)
            assert out.shape[1] == ids.shape[1] + out_len
    elapsed = time.perf_counter() - start
    del model
    _free()
    return {"requests": len(prompts), "batch": batch, "seconds": round(elapsed, 2),
            "output_tokens_per_s": round(len(prompts) * out_len / elapsed, 1)}


def run_hf_continuous(shape: str, prompts: list[list[int]], out_len: int) -> dict:
    from transformers import GenerationConfig

    model = hf_model(shape, "paged|sdpa")
    config = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                              eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    with torch.no_grad():
        outputs = model.generate_batch(inputs=prompts, generation_config=config,
                                       progress_bar=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    del model
    _free()
    return {"requests": len(prompts), "seconds": round(elapsed, 2),
            "output_tokens": tokens, "output_tokens_per_s": round(tokens / elapsed, 1)}


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--hf-requests", type=int, default=256)
    parser.add_argument("--hf-batch", type=int, default=128)
    args = parser.parse_args()
    prompts = make_prompts(args.num_requests, args.input_len, NAMED_SHAPES[args.shape]
                           ["vocab_size"])
    result = {"shape": args.shape, "dtype": "bfloat16", "input_len": args.input_len,
              "output_len": args.output_len}
    result["sloserve"] = run_sloserve(args.shape, prompts, args.output_len, args.max_num_seqs)
    print("sloserve:", result["sloserve"], flush=True)
    subset = prompts[: args.hf_requests]
    for name, run in (("hf_static", lambda: run_hf_static(args.shape, subset, args.output_len,
                                                           args.hf_batch)),
                      ("hf_continuous", lambda: run_hf_continuous(args.shape, subset,
                                                                  args.output_len))):
        try:
            result[name] = run()
        except Exception as e:  # a baseline that breaks is reported, not fatal
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            _free()
        print(f"{name}:", result[name], flush=True)
    best = max((result[k].get("output_tokens_per_s", 0) for k in ("hf_static", "hf_continuous")))
    if best:
        result["speedup_vs_best_hf"] = round(
            result["sloserve"]["output_tokens_per_s"] / best, 2)
        print(f"sloserve / best HF = {result['speedup_vs_best_hf']}x (target >= 5x)")
    save("gpu_throughput", result)


if __name__ == "__main__":
    main()
