"""The engine's front door: bad input, sampling, stop strings, resumed requests."""

from __future__ import annotations

import pytest

from sloserve import LLM, SamplingParams
from tests.conftest import CHAT_PROMPTS, chat


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_leave_nothing_allocated(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="prompt"):
        llm.generate("")
    with pytest.raises(ValueError, match="context"):
        llm.generate([1] * engine.max_model_len)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2], [10**9]])
    assert not engine.has_unfinished() and engine.blocks.num_used_blocks == 0


def test_seeded_sampling_is_reproducible_and_varies_by_seed(llm):
    prompt = chat("Tell me a short story about a robot.")
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=s)
              for s in (1, 1, 2)]
    a, b, c = llm.generate([prompt] * 3, params)
    assert a.token_ids == b.token_ids != c.token_ids


def test_top_k_one_is_greedy(llm):
    prompt = chat("Name a color.")
    greedy = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0]
    top1 = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.8, top_k=1))[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_string_cuts_text_and_frees_blocks(llm):
    prompt = chat("Write a short poem about the moon.")
    full = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0))[0]
    stop = full.text.strip().split()[2]  # a word that appears mid-reply
    cut = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.token_ids) < len(full.token_ids)
    assert llm.engine.blocks.num_used_blocks == 0


def test_timings_are_ordered(llm):
    r = llm.generate("Once upon a time", SamplingParams(max_tokens=5, ignore_eos=True))[0]
    t = r.timings
    assert t.arrival <= t.first_scheduled <= t.first_token <= t.finish
    assert 0 <= t.queueing <= t.ttft <= t.e2e and t.tpot > 0 and len(r.token_ids) == 5


def test_a_request_resumed_from_its_streamed_tokens_continues_the_same_text(llm):
    """What a disaggregated front end does when an instance dies: the prompt plus the tokens
    already streamed are prefilled again; the text goes on from where the client is."""
    from sloserve.request import Request

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    [whole] = llm.generate([chat(CHAT_PROMPTS[3])], params)
    engine = llm.engine
    original = engine.make_request(chat(CHAT_PROMPTS[3]), params)
    resumed = Request.handoff_copy(original)
    resumed.output_token_ids = list(whole.token_ids[:10])
    engine.submit(resumed)
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert len(outputs) == 24 - 10 and outputs[-1].finished  # one output per new token
    assert outputs[-1].token_ids == whole.token_ids
    assert outputs[-1].text == whole.text
    streamed_before = llm.tokenizer.decode(whole.token_ids[:10])
    assert streamed_before + "".join(o.delta_text for o in outputs) == whole.text
    assert engine.blocks.num_used_blocks == 0


def test_a_policy_that_prices_steps_gets_this_machines_profile():
    from sloserve.core.latency import LatencyModel

    embedded = LLM(policy="slice")  # the shipped profile was measured with it on this CPU
    assert embedded.engine.scheduler.policy.steps.latency == LatencyModel.default()
    other = LLM(model="dummy:qwen2-tiny", policy="edf", num_kv_blocks=64)  # measured now
    latency = other.engine.scheduler.policy.steps.latency
    assert "qwen2-tiny" in latency.source and latency.decode_batch == (1, 8, 32)
    assert other.generate("Hi", SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids


@pytest.mark.parametrize("fast", [True, False])
def test_incremental_text_equals_one_decode_and_stops_at_a_stop_string(llm, fast):
    from sloserve.detokenizer import IncrementalDetokenizer

    tokenizer = llm.engine.tokenizer
    text = "Héllo wörld! 日本語 🙂 def f(x): return x**2\nSTOP here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    if not fast:
        detok._stream = None  # the window decode, for tokenizers without a Rust backend
    pieces = [detok.push([t]) for t in ids]
    assert "".join(pieces) == detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # half characters are held back
    stopping = IncrementalDetokenizer(tokenizer, stop=("STOP",))
    if not fast:
        stopping._stream = None
    for t in ids:
        stopping.push([t])
        if stopping.stopped:
            break
    assert stopping.stopped and stopping.text == text[:text.index("STOP")]


def test_overlapped_steps_give_the_same_outputs_and_survive_an_abort(llm):
    """OverlappedSteps (on by default on CUDA) forced on: the same texts as plain steps, stop
    strings included, and a request aborted between its step and its outputs is left out."""
    from sloserve.engine import OverlappedSteps

    engine = llm.engine
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0, stop=("the",))]

    def run(overlap: bool, abort_after: int | None = None) -> dict[str, str]:
        ids = [engine.add_request(chat(p), params[i % 2]).request_id
               for i, p in enumerate(CHAT_PROMPTS[:4])]
        steps, texts, n = OverlappedSteps(engine, overlap), {}, 0
        while steps.has_work():
            for out in steps.step():
                texts[out.request_id] = out.text
            n += 1
            if n == abort_after:
                engine.abort(ids[0])
        assert engine.blocks.usage == 0
        return {ids.index(k): v for k, v in texts.items()}

    assert run(overlap=True) == run(overlap=False)
    aborted = run(overlap=True, abort_after=3)
    assert aborted[0] != run(overlap=False)[0]  # it stopped early, and nothing failed


def test_overflowing_temperature_or_penalty_samples_the_likeliest_token():
    """1e-30 as a temperature or 1e-161 as a penalty overflows logits to inf; the step used to
    fail (for every request in it) with "probability tensor contains inf or nan"."""
    import torch

    from sloserve.model.sampler import Sampler
    from sloserve.request import Request

    for params in (SamplingParams(temperature=1e-30),
                   SamplingParams(temperature=0.5, repetition_penalty=7e-161)):
        request = Request("r", prompt_token_ids=[0], sampling_params=params)
        logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
        assert Sampler(torch.device("cpu")).sample(logits, [request])[0].tolist() in ([3], [0])


@pytest.mark.parametrize("scale", [3.0, 0.3])  # peaked: 512 candidates hold the nucleus
def test_top_p_top_k_keep_exactly_the_nucleus_of_a_full_sort(scale):
    import torch

    from sloserve.model.sampler import Sampler
    from sloserve.request import Request

    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(0)) * scale
    params = [SamplingParams(temperature=0.2, top_p=0.9), SamplingParams(top_p=0.95),
              SamplingParams(top_k=50, top_p=0.9), SamplingParams(top_k=2000, top_p=0.5)]
    requests = [Request(str(i), prompt_token_ids=[0], sampling_params=p)
                for i, p in enumerate(params)]
    candidates, order = Sampler(torch.device("cpu"))._probs(logits.clone(), requests)
    probs = torch.zeros_like(logits).scatter_(-1, order, candidates)
    for row, p in zip(range(4), params):  # the definition: sort all, cut k, cut the mass
        ranked = (logits[row] / p.temperature).sort(descending=True)
        kept = ranked.values[: p.top_k if p.top_k > 0 else None].softmax(-1)
        kept[kept.cumsum(-1) - kept >= p.top_p] = 0
        want = torch.zeros(49152).index_copy_(0, ranked.indices[: len(kept)], kept)
        torch.testing.assert_close(probs[row], want / want.sum(), atol=1e-7, rtol=1e-5)


def test_penalties_follow_vllms_formulas():
    import torch

    from sloserve.model.sampler import Sampler
    from sloserve.request import Request

    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5,
                            presence_penalty=0.25)
    request = Request("r", prompt_token_ids=[0], sampling_params=params)
    request.output_token_ids = [1, 3, 3]
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    assert Sampler(torch.device("cpu")).sample(logits, [request])[0].tolist() == [0]
    # prompt token 0: 2 / 2; output 1: -1 * 2 - (0.5 + 0.25); unseen 2; output 3 (twice):
    # 3 / 2 - (2 * 0.5 + 0.25)
    torch.testing.assert_close(logits, torch.tensor([[1.0, -2.75, 0.5, 0.25]]))
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3)
