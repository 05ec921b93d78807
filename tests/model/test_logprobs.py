"""Log-probabilities of output tokens: the model's raw distribution, checked against HF."""

import torch

from sloserve import SamplingParams


def test_logprobs_match_hf_forward_pass(llm, hf_smollm):
    prompt = llm.tokenizer.encode("The capital of France is", add_special_tokens=False)
    greedy, sampled = llm.generate([prompt, prompt], [
        SamplingParams(max_tokens=8, temperature=0, logprobs=5, ignore_eos=True),
        # sampled and penalised: the reported value is still the raw model's, of the token
        # that was drawn (often not the likeliest)
        SamplingParams(max_tokens=8, temperature=1.5, seed=3, logprobs=0,
                       repetition_penalty=1.5, ignore_eos=True)])
    for result in (greedy, sampled):
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            reference = hf_smollm(ids).logits[0].float().log_softmax(-1)
        assert len(result.logprobs) == len(result.token_ids) == 8
        for j, (token, lp) in enumerate(zip(result.token_ids, result.logprobs)):
            expected = reference[len(prompt) - 1 + j]
            assert abs(lp.logprob - expected[token].item()) < 1e-3
            top = expected.topk(5)
            want = list(zip(top.indices.tolist(), top.values.tolist()))[: len(lp.top)]
            assert [t for t, _ in lp.top] == [t for t, _ in want]
            assert all(abs(v - w) < 1e-3 for (_, v), (_, w) in zip(lp.top, want))
    assert len(greedy.logprobs[0].top) == 5 and sampled.logprobs[0].top == ()
    assert all(lp.logprob == lp.top[0][1] for lp in greedy.logprobs)  # greedy: the likeliest
    assert any(lp.logprob < -1e-2 for lp in sampled.logprobs)  # drew unlikely tokens too
