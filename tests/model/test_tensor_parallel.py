"""Tensor parallelism on the CPU: two processes over gloo give the single-process tokens."""

from __future__ import annotations

import pytest

from sloserve import LLM, SamplingParams
from sloserve.model.config import NAMED_SHAPES, ModelConfig
from sloserve.model.tensor_parallel import local_config


@pytest.mark.parametrize("policy", ["fcfs", "chunked"])
def test_two_ranks_generate_what_one_does(policy):
    prompts = [[(11 * i + j) % 3000 + 7 for j in range(5 + 23 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    options = dict(model="dummy:qwen2-tiny", num_kv_blocks=64, policy=policy,
                   max_num_batched_tokens=64)  # prompts chunked, steps mixed
    expected = [r.token_ids for r in LLM(**options).generate(prompts, params)]
    llm = LLM(tensor_parallel_size=2, **options)
    try:
        assert [r.token_ids for r in llm.generate(prompts, params)] == expected
        assert llm.engine.blocks.num_used_blocks == 0
        assert llm.engine.runner.model.config.num_heads == 2  # half of qwen2-tiny's 4
    finally:
        llm.engine.shutdown()


def test_shapes_that_do_not_split_are_refused_by_name():
    smollm = ModelConfig.from_hf(dict(NAMED_SHAPES["smollm2-135m"]))  # 9 heads, 3 KV heads
    with pytest.raises(ValueError, match="num_heads"):
        local_config(smollm, 2)
