"""The quality cost of 4-bit weights: greedy replies of the quantized embedded model against
the float32 one (which matches HF float32 token for token: tests/model/test_correctness.py).

For each of the first --prompts Vicuna questions, one at a time (chat template, greedy,
--max-tokens tokens, EOS ignored so that every reply has the same length): the share of
replies identical to float32's, and how far they agree before the first different token.
Paths: `int4` as served (native q4 kernels and the fused decode where the C++ extension
builds), and `int4-torch` (SLOSERVE_CPU_KERNELS=0: torch's int4 kernel, bfloat16
activations), each in its own process. Writes benchmarks/results/quant_agreement.json:

    python benchmarks/quant_agreement.py [--prompts 40] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

PATHS = {"float32": ("none", "1"), "int4": ("int4", "1"), "int4-torch": ("int4", "0")}


def replies(quantization: str, prompts: int, max_tokens: int) -> list[list[int]]:
    from sloserve import LLM, SamplingParams
    from sloserve.workload.datasets import vicuna_questions

    llm = LLM(quantization=quantization)
    chats = [[{"role": "user", "content": q}] for q in vicuna_questions()[:prompts]]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    # one at a time: a step of more than 32 rows multiplies by the dense copy of the 4-bit
    # grid, on which the weights of a Q4_1 GGUF already lie (float32's own weights)
    return [llm.generate([chat], params)[0].token_ids for chat in chats]


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    prefix = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r))
              for r, o in zip(reference, other)]
    length = len(reference[0])
    return {"identical_replies": sum(p == length for p in prefix) / len(prefix),
            "first_difference_median": statistics.median(prefix),
            "tokens_before_first_difference": sum(prefix) / (len(prefix) * length)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # one child's part
    args = parser.parse_args()
    if args.path:
        print(json.dumps(replies(PATHS[args.path][0], args.prompts, args.max_tokens)))
        return
    tokens = {}
    for name, (_, kernels) in PATHS.items():  # a process each: the kernels switch at load
        out = subprocess.run([sys.executable, __file__, "--path", name, "--prompts",
                              str(args.prompts), "--max-tokens", str(args.max_tokens)],
                             env={**os.environ, "SLOSERVE_CPU_KERNELS": kernels},
                             capture_output=True, text=True, check=True).stdout
        tokens[name] = json.loads(out.strip().splitlines()[-1])
    result = {name: agreement(tokens["float32"], tokens[name]) for name in PATHS
              if name != "float32"}
    path = save("quant_agreement", {"prompts": f"first {args.prompts} Vicuna questions",
                                    "max_tokens": args.max_tokens, "vs_float32": result})
    print(json.dumps(result, indent=1), f"\nwrote {path}")


if __name__ == "__main__":
    main()
