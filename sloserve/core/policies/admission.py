"""Admission control per SLO class: turn away, at once, work that cannot meet its objective.

Past capacity, a queue that keeps every request serves all of them late: attainment and
goodput collapse together. Admission control instead answers a request that cannot meet its
TTFT (or TPOT) even if it were admitted now, or whose estimated wait behind the work queued
ahead of it already breaks its TTFT, and sheds queued requests whose TTFT went out of reach
while they waited. Classes are served by the policy's priority (higher utility first), so the
queues of lower-utility classes move slowest and their requests are shed first.

The wait estimate is at least the prefill of every prompt queued ahead, each priced alone
(a lower bound: no queue, no wait, nothing refused; one prompt of their summed length
would overprice attention, which grows with the square of a prompt's length), and, behind
a real backlog, the backlog over the rate at which the request's class's queue has moved
while it stood (an exponentially weighted window).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator

from sloserve.request import Request, RequestStatus

WINDOW_S = 5.0  # memory of the admission-rate estimate
BACKLOG = 8  # queued ahead in its class before the class's measured rate is trusted


class _ClassQueue:
    """TTFT deadlines of one class's queued requests, in arrival (= deadline) order; entries
    admitted or finished are dropped lazily from the head. Also how fast the head moves: the
    decayed count of requests that left it admitted, over the decayed time it stood."""

    def __init__(self) -> None:
        self.deadlines: list[float] = []
        self.requests: list[Request] = []
        self.prefill = [0.0]  # prefill seconds of the entries before each index (prefix sums)
        self.head = 0
        self.served = 0.0
        self.stood = 0.0

    def push(self, request: Request, deadline: float, prefill: float) -> None:
        self.deadlines.append(deadline)
        self.requests.append(request)
        self.prefill.append(self.prefill[-1] + prefill)

    def trim(self) -> None:
        while self.head < len(self.requests) and not _queued(self.requests[self.head]):
            self.served += self.requests[self.head].status == RequestStatus.RUNNING
            self.head += 1
        if self.head > 64 and self.head * 2 > len(self.requests):
            del self.deadlines[: self.head], self.requests[: self.head]
            del self.prefill[: self.head]
            self.head = 0

    def advance(self, dt: float, decay: float) -> None:
        self.stood = self.stood * decay + (dt if len(self) else 0.0)
        self.served *= decay

    @property
    def rate(self) -> float | None:
        """Requests admitted per second while this queue stood; None until seen ~1 s."""
        return self.served / self.stood if self.stood > 1.0 and self.served > 0 else None

    def ahead(self, deadline: float = math.inf) -> tuple[int, float]:
        """(requests, prefill seconds) queued with an earlier deadline."""
        end = bisect.bisect_left(self.deadlines, deadline, lo=self.head)
        return end - self.head, self.prefill[end] - self.prefill[self.head]

    def __len__(self) -> int:
        return len(self.requests) - self.head


def _queued(request: Request) -> bool:
    return request.status == RequestStatus.WAITING and not request.best_effort


class AdmissionControl:
    """`utility(request)` ranks classes (higher goes first); `prefill_time(tokens)` and
    `decode_time()` are the policy's calibrated step model, `margin()` its safety margin."""

    def __init__(self, utility: Callable[[Request], float],
                 prefill_time: Callable[[int], float], decode_time: Callable[[], float],
                 margin: Callable[[], float]):
        self.utility, self.prefill_time = utility, prefill_time
        self.decode_time, self.margin = decode_time, margin
        self._classes: dict[tuple[float, float], _ClassQueue] = {}  # (utility, ttft) -> queue
        self._last: float | None = None  # time of the last note()

    # ---- bookkeeping ---------------------------------------------------------------------
    def _file(self, request: Request) -> None:
        """Index an accepted request in its class's queue (if it has a TTFT to meet)."""
        ttft = request.slo.ttft_ms
        if ttft is None or request.first_token_time is not None or request.best_effort:
            return
        key = (self.utility(request), ttft)
        self._classes.setdefault(key, _ClassQueue()).push(
            request, _ttft_deadline(request), self.prefill_time(request.num_prompt_tokens))

    def note(self, now: float) -> None:
        """Called once per step: drop admitted heads, advance each class's rate window."""
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        decay = math.exp(-dt / WINDOW_S)
        for queue in self._classes.values():
            queue.trim()
            queue.advance(dt, decay)
        self._last = now

    # ---- verdicts --------------------------------------------------------------------------
    def rejection(self, request: Request, now: float) -> str | None:
        """The verdict on a request that just arrived: why it is out of reach, or None
        (it is then counted in its class's queue)."""
        reason = self._verdict(request, now)
        if reason is None:
            self._file(request)
        return reason

    def _verdict(self, request: Request, now: float) -> str | None:
        slo = request.slo
        slack = 1 + self.margin()
        if slo.tpot_ms is not None and self.decode_time() * slack * 1e3 > slo.tpot_ms:
            return (f"its TPOT objective of {slo.tpot_ms:g} ms is below one decode step here "
                    f"(~{self.decode_time() * 1e3:.1f} ms)")
        if slo.ttft_ms is None:
            return None
        prefill = self.prefill_time(request.num_prompt_tokens) * slack
        if prefill * 1e3 > slo.ttft_ms:
            return (f"its prompt of {request.num_prompt_tokens} tokens needs ~{prefill * 1e3:.0f}"
                    f" ms of prefill, more than its TTFT objective of {slo.ttft_ms:g} ms")
        wait = self.estimated_wait(request)
        if now + wait + prefill > _ttft_deadline(request):
            return (f"~{wait:.1f} s of queued work ahead of it: its TTFT objective of "
                    f"{slo.ttft_ms:g} ms cannot be met")
        return None

    def estimated_wait(self, request: Request) -> float:
        """At least the prefill of every prompt queued ahead of it (its class's earlier
        ones and all of higher utility); where its class has a real backlog (BACKLOG
        requests or more), the backlog over the rate its class's queue has been moving at,
        if that is longer (seats, not prefills, may be what holds the queue)."""
        utility, deadline = self.utility(request), _ttft_deadline(request)
        wait, own, own_rate = 0.0, 0, None
        for (u, ttft), queue in self._classes.items():
            if u > utility or u == utility:
                n, seconds = queue.ahead(math.inf if u > utility else deadline)
                wait += seconds
                if (u, ttft) == (utility, request.slo.ttft_ms):
                    own, own_rate = n, queue.rate
        if own >= BACKLOG and own_rate is not None:
            wait = max(wait, own / own_rate)
        return wait

    def expired(self, now: float) -> Iterator[tuple[Request, str]]:
        """Queue heads that could no longer meet their TTFT even if admitted now."""
        slack = 1 + self.margin()
        for queue in self._classes.values():
            queue.trim()
            while len(queue):
                request = queue.requests[queue.head]
                prefill = self.prefill_time(request.num_prompt_tokens) * slack
                if now + prefill <= queue.deadlines[queue.head]:
                    break
                queue.head += 1
                yield request, (f"waited {now - request.arrival_time:.1f} s: its TTFT objective "
                                f"of {request.slo.ttft_ms:g} ms went out of reach")
                queue.trim()


def _ttft_deadline(request: Request) -> float:
    ttft = request.slo.ttft_ms
    return request.arrival_time + ttft / 1e3 if ttft is not None else math.inf
