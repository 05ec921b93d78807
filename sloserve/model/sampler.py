"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens."""

from __future__ import annotations

from collections import Counter

import torch

from sloserve.model.structured import apply_masks
from sloserve.request import Request, TokenLogprob


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without waiting for the GPU: torch.tensor(values,
    device=cuda) synchronizes the stream, which would end the overlap of host and GPU."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


NUCLEUS_CANDIDATES = 512  # likeliest tokens that top-p / top-k sampling looks at first


class Logprobs:
    """A step's log-probabilities, on the device until read: the sampled token's and the
    top-k alternatives of each asking request."""

    def __init__(self, request_ids: list[str], ks: list[int], chosen: torch.Tensor,
                 top: torch.return_types.topk | None):
        self.request_ids, self.ks, self.chosen, self.top = request_ids, ks, chosen, top

    def read(self) -> dict[str, TokenLogprob]:
        chosen = self.chosen.tolist()
        ids = self.top.indices.tolist() if self.top is not None else None
        values = self.top.values.tolist() if self.top is not None else None
        return {rid: TokenLogprob(chosen[i], tuple(zip(ids[i][:k], values[i][:k])) if k else ())
                for i, (rid, k) in enumerate(zip(self.request_ids, self.ks))}


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._generators: dict[str, torch.Generator] = {}  # seeded requests

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    # the logits are the model's inference tensors: penalties edit them in place, which
    # torch allows only in inference mode (outside it, every penalised request failed)
    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request],
               masks: tuple[list[int], torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, Logprobs | None]:
        """logits: [N, vocab] float32, one row per request. One token per row, as a device
        tensor enqueued without waiting for the GPU, and the log-probabilities of the rows
        whose requests ask for them (None if none does). `masks`: the grammar-constrained
        rows and their allowed-token bitmasks (GrammarMasks.masks)."""
        asking = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        raw = None
        if asking:  # the model's own distribution, before penalties and temperature
            rows = to_device(asking, torch.long, logits.device)
            raw = (rows, logits[rows].float().log_softmax(dim=-1))
        self._apply_penalties(logits, requests)
        self._apply_logit_bias(logits, requests)
        self._suppress_early_stops(logits, requests)
        if masks is not None:  # last: nothing may lift a token the grammar rules out
            apply_masks(logits, *masks)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if random_rows:
            rows = to_device(random_rows, torch.long, logits.device)
            probs, order = self._probs(logits[rows], [requests[i] for i in random_rows])
            picks = self._draw(probs, [requests[i] for i in random_rows])
            tokens[rows] = order.gather(1, picks)[:, 0]
        if raw is None:
            return tokens, None
        rows, logprobs = raw
        k = max(requests[i].sampling_params.logprobs for i in asking)
        chosen = logprobs.gather(1, tokens[rows][:, None])[:, 0]
        top = logprobs.topk(k, dim=-1) if k else None
        return tokens, Logprobs([requests[i].request_id for i in asking],
                                [requests[i].sampling_params.logprobs for i in asking],
                                chosen, top)

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Repetition, frequency and presence penalties, in place, on the rows that ask."""
        device = logits.device
        for i, r in enumerate(requests):
            params = r.sampling_params
            if not params.has_penalties:
                continue
            row = logits[i]
            if params.repetition_penalty != 1.0:
                seen = to_device(sorted({*r.prompt_token_ids, *r.output_token_ids}),
                                 torch.long, device)
                values = row[seen]
                row[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                        values * params.repetition_penalty)
            if r.output_token_ids and (params.frequency_penalty or params.presence_penalty):
                counts = Counter(r.output_token_ids)
                ids = to_device(list(counts), torch.long, device)
                times = to_device(list(counts.values()), logits.dtype, device)
                row[ids] -= params.frequency_penalty * times + params.presence_penalty

    def _apply_logit_bias(self, logits: torch.Tensor, requests: list[Request]) -> None:
        for i, r in enumerate(requests):
            if r.sampling_params.logit_bias:
                ids, biases = zip(*r.sampling_params.logit_bias)
                logits[i, to_device(list(ids), torch.long, logits.device)] += to_device(
                    list(biases), logits.dtype, logits.device)

    def _suppress_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Before min_tokens, EOS and stop ids cannot be sampled (as vLLM does)."""
        for i, r in enumerate(requests):
            params = r.sampling_params
            if r.num_output_tokens >= params.min_tokens:
                continue
            banned = list(params.stop_token_ids)
            if r.eos_token_id is not None and not params.ignore_eos:
                banned.append(r.eos_token_id)
            if banned:
                logits[i, banned] = float("-inf")

    def _draw(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One candidate index a row ([R, 1]): one draw for the unseeded rows together
        (a draw a row over the whole vocabulary took 1.3 ms each), seeded rows from their
        own generators."""
        picks = torch.multinomial(probs, 1)
        for row, request in enumerate(requests):
            generator = self._generator(request)
            if generator is not None:
                picks[row] = torch.multinomial(probs[row], 1, generator=generator)
        return picks

    def _probs(self, logits: torch.Tensor, requests: list[Request]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's sampling distribution over its candidates ([R, C], C <= vocab) and
        the candidates' token ids ([R, C])."""
        temps = to_device([r.sampling_params.temperature for r in requests], torch.float32,
                          logits.device)
        # a tiny temperature or penalty overflows to inf (a fuzzer's 1e-161 failed the
        # whole step): keep the order, drop what is not a number
        logits = torch.nan_to_num(logits / temps[:, None], nan=float("-inf"),
                                  posinf=torch.finfo(torch.float32).max)
        vocab = logits.shape[-1]
        ks = [r.sampling_params.top_k if r.sampling_params.top_k > 0 else vocab
              for r in requests]
        top_k = to_device(ks, torch.long, logits.device)
        top_p = to_device([r.sampling_params.top_p for r in requests], torch.float32,
                          logits.device)
        sorted_probs, order = self._nucleus_candidates(logits, ks, top_k, top_p)
        # Drop a token when the tokens ranked above it already reach top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs[mass_before >= top_p[:, None]] = 0.0
        probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        # a row with nothing left to draw (every token banned or overflowed): its likeliest,
        # the first candidate
        broken = ~torch.isfinite(probs).all(dim=-1)
        probs[broken] = 0.0
        probs[broken, 0] = 1.0
        return probs, order

    @staticmethod
    def _nucleus_candidates(logits: torch.Tensor, ks: list[int], top_k: torch.Tensor,
                            top_p: torch.Tensor, everything: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's probabilities after its top-k cut, in descending order, and the token
        ids in that order: only the NUCLEUS_CANDIDATES likeliest when they hold the whole
        nucleus (sorting a 49k vocabulary took 3.5 ms a step on this CPU: 14% of an int4
        decode step), else all of them. The probabilities stay those of the whole (top-k
        cut) distribution, so the nucleus is exactly the same either way."""
        vocab = logits.shape[-1]
        few = min(vocab, NUCLEUS_CANDIDATES)
        if not everything and few < vocab and all(k <= few or k == vocab for k in ks):
            values, order = logits.topk(few, dim=-1)
        else:
            values, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(values.shape[-1], device=logits.device)[None, :]
        values = values.masked_fill(ranks >= top_k[:, None], float("-inf"))
        cut = (top_k < vocab)[:, None]  # normalised over their top k, the rest over all
        total = torch.where(cut, _logsumexp(values), _logsumexp(logits))
        probs = (values - total).exp()
        if values.shape[-1] < vocab and not bool((probs.sum(dim=-1) >= top_p).all()):
            return Sampler._nucleus_candidates(logits, ks, top_k, top_p, everything=True)
        return probs, order

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request.request_id] = generator
        return generator


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, terms below e^-80 of the largest taken as e^-80
    (49k of them move the sum by < 1e-30 relative): torch's CPU exp takes a slow path for
    arguments far below zero, and a sampled row (logits / temperature 0.2) spans hundreds,
    which made logsumexp 27 ms at 32 rows instead of 4."""
    top = x.amax(dim=-1, keepdim=True)
    shifted = (x - top).clamp_(min=-80.0)
    return top + shifted.exp_().sum(dim=-1, keepdim=True).log_()
