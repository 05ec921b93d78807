"""Stall-free batching (Sarathi-Serve / SplitFuse): decodes first, prefill chunks fill the rest."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sloserve.core.policies.base import Policy, register
from sloserve.request import Request


@register("chunked")
class ChunkedPrefillPolicy(Policy):
    """Every running decode goes into each step before any prefill work; what is left of the
    token budget takes chunks of prompts (partial ones first), so a long prompt is spread over
    steps and never stalls decoding. Pair it with a modest --max-num-batched-tokens."""

    steady_decode = True

    def running_order(self, running: Sequence[Request], now: float) -> Iterable[Request]:
        # one token to compute: decodes (and the rare prompt with one token left)
        single = [r for r in running if r.num_pending_tokens == 1]
        return single + [r for r in running if r.num_pending_tokens > 1]

    def chunk_size(self, request: Request, num_pending: int, budget: int, step_budget: int) -> int:
        return min(num_pending, budget)
