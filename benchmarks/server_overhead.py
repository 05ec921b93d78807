"""Server overhead: output tokens/s through the HTTP API vs LLM.generate, same 32 prompts.

The offline engine runs first in this process; then a real `sloserve serve` process gets all
32 chat requests at once (streaming, as clients do). Target: the server keeps >= 85%.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import save  # noqa: E402

from sloserve import LLM, SamplingParams  # noqa: E402
from sloserve.workload.datasets import vicuna_questions  # noqa: E402
from tests.server.conftest import ServerProcess  # noqa: E402


def offline(questions: list[str], out_len: int) -> float:
    llm = LLM()
    chats = [[{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    llm.generate(chats[:2], SamplingParams(max_tokens=4))
    start = time.perf_counter()
    results = llm.generate(chats, params)
    elapsed = time.perf_counter() - start
    return sum(len(r.token_ids) for r in results) / elapsed


async def through_http(url: str, questions: list[str], out_len: int) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

    async def one(question: str) -> int:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": question}],
            max_tokens=out_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    await one(questions[0])  # warm-up
    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(q) for q in questions))
    return sum(tokens) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    questions = vicuna_questions()[: args.num_prompts]
    ours_offline = offline(questions, args.output_len)
    server = ServerProcess()
    try:
        ours_http = asyncio.run(through_http(server.url, questions, args.output_len))
    finally:
        server.stop()
    ratio = ours_http / ours_offline
    print(f"LLM.generate: {ours_offline:8.1f} output tokens/s")
    print(f"HTTP server:  {ours_http:8.1f} output tokens/s")
    print(f"server keeps {ratio:.0%} of offline throughput (target >= 85%)")
    save("server_overhead", {"num_prompts": len(questions), "output_len": args.output_len,
                             "offline_tokens_per_s": round(ours_offline, 1),
                             "http_tokens_per_s": round(ours_http, 1), "ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()
