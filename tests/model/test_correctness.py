"""Greedy outputs equal HF transformers' generate, token for token."""

from __future__ import annotations

import pytest
import torch

from sloserve import LLM, SLO, SamplingParams
from sloserve.config import EngineConfig
from sloserve.engine import LLMEngine
from tests.conftest import CHAT_PROMPTS, chat

MAX_TOKENS = 24


def hf_greedy(model, prompt_ids: list[int], max_tokens: int, eos: int | None) -> list[int]:
    """One prompt at a time, so no padding can blur the reference."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos)
    tokens = out[0, len(prompt_ids):].tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def references(llm, hf_smollm):
    eos = llm.engine.eos_token_id
    prompts = [llm.engine.apply_chat_template(chat(p)) for p in CHAT_PROMPTS]
    return prompts, [hf_greedy(hf_smollm, p, MAX_TOKENS, eos) for p in prompts]


def test_batched_greedy_matches_hf(llm, references):
    prompts, expected = references
    results = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [r.token_ids for r in results] == expected
    assert llm.engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("policy", ["delay", "chunked", "slice", "edf"])
def test_greedy_matches_hf_under_every_policy(references, policy):
    prompts, expected = references
    options = {"max_num_batched_tokens": 64} if policy == "chunked" else {}
    llm = LLM(policy=policy, **options)  # chunked: prompts split over several steps
    # best effort: on a busy machine admission control could turn these away (tokens, not
    # timing, are under test here)
    slos = [SLO(tpot_ms=50, realtime=i % 3 == 0, ttft_ms=1000, on_miss="best_effort")
            for i in range(len(prompts))]
    engine = llm.engine
    requests = [engine.add_request(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), s)
                for p, s in zip(prompts, slos)]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_token_ids for r in requests] == expected
    assert engine.blocks.num_used_blocks == 0


def test_greedy_matches_hf_under_preemption(llm, references):
    prompts, expected = references
    # 20 blocks x 16 tokens hold about 4 of the 8 requests: the newest get preempted.
    config = EngineConfig(num_kv_blocks=20, enable_prefix_caching=False)
    engine = LLMEngine(config)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    requests = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert sum(r.num_preemptions for r in requests) > 0
    assert [r.output_token_ids for r in requests] == expected
    assert engine.blocks.num_used_blocks == 0


def test_prefix_cache_reuse_keeps_outputs(llm, references):
    prompts, expected = references
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    first = llm.generate(prompts[-1], params)[0]
    request = llm.engine.add_request(prompts[-1], params)
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert request.num_cached_tokens >= 16 * (len(prompts[-1]) // 16 - 1) > 0
    assert request.output_token_ids == first.token_ids == expected[-1]


def test_random_qwen2_matches_hf(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.3,
                         tie_word_embeddings=False, eos_token_id=None)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(config).eval()
    for name, param in hf.named_parameters():  # HF zero-inits biases; give them weight
        if name.endswith("bias"):
            torch.nn.init.normal_(param, std=0.3)
    hf.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist()
               for n in (3, 17, 40, 64, 9)]
    expected = [hf_greedy(hf, p, 20, None) for p in prompts]
    ours = LLM(model=str(tmp_path)).generate(
        prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert [r.token_ids for r in ours] == expected
