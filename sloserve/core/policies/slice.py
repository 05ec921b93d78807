"""SLICE: utility-maximising task selection plus per-task decode-rate control by a token mask.

Stage 1 (selection.py) picks how many tasks of each type (rate, utility) to serve so that
total utility is highest while decoding each at its rate fits `ratio` of every second under
the step-latency model l(b) (the rest is left for prefills), within the seats. It is re-solved
whenever a task arrives or finishes; tasks of a type are taken running first, then in arrival
order, so a re-plan never churns the running set for nothing.

Stage 2 controls each task's rate with a token mask: rows are the selected tasks, columns the
decode steps of one cycle of `period_ms` (as many as the step model says fit in it, and at
least the fastest task's tokens per cycle); a task that needs k tokens per cycle has k ones
spread evenly over the columns, each row at the offset that keeps the columns' loads even.
Each step scans the next column and decodes the rows marked there. The mask survives
arrivals and finishes (rows are added to and removed from the current cycle); its width is
re-derived only when a cycle ends.

Two guards keep the objectives: a task about to fall behind its pace decodes whatever the
mask says (its pace is its TPOT shortened by a safety margin learned from the latency
model's errors, pacing.py), and prompts get room in every step, chunked to fit within the
pace of the tightest task decoding in it, so a late decode never starves a newcomer's TTFT.
Requests that cannot meet their objectives are rejected at once (admission.py).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence

from sloserve.core.latency import LatencyModel
from sloserve.core.plan import Plan
from sloserve.core.policies.admission import AdmissionControl
from sloserve.core.policies.base import Policy, SchedulerView, register
from sloserve.core.policies.pacing import CalibratedSteps
from sloserve.core.policies.selection import TaskType, choose
from sloserve.request import Request, RequestStatus

BEST_EFFORT_UTILITY = 1e-6
PROMPT_SHARE = 0.25  # of a decode step that a prompt chunk may always add
TypeKey = tuple[float, float, float]  # (rate, utility, TTFT objective in ms)


@functools.lru_cache(maxsize=4096)
def mask_columns(tokens_per_cycle: int, num_columns: int, offset: int = 0) -> frozenset[int]:
    """k ones spread evenly over the columns of one cycle, shifted by `offset`."""
    return frozenset((i * num_columns // tokens_per_cycle + offset) % num_columns
                     for i in range(tokens_per_cycle))


class TokenMask:
    """Rows (task -> the columns it decodes in) over `num_columns` decode steps."""

    def __init__(self) -> None:
        self.steps_per_cycle = 1  # set by the policy: decode steps one cycle is expected to take
        self.num_columns = 1
        self.column = 0
        self.rows: dict[str, frozenset[int]] = {}
        self.per_cycle: dict[str, int] = {}  # task -> tokens it needs per cycle
        self.loads = [0]  # rows marked in each column

    def on(self, request_id: str) -> bool:
        return self.column in self.rows.get(request_id, ())

    def sync(self, tasks: Sequence[Request], per_cycle: Callable[[Request], int]) -> None:
        """Make the rows those of `tasks`: finished or deselected tasks leave, new ones join
        the current cycle at the least loaded offset with per_cycle(task) ones."""
        wanted = {r.request_id for r in tasks}
        for rid in [rid for rid in self.rows if rid not in wanted]:
            self._remove(rid)
        was_empty = not self.rows
        for r in tasks:
            if r.request_id not in self.rows:
                k = self.per_cycle[r.request_id] = per_cycle(r)
                self._place(r.request_id, k)
        if was_empty and self.rows:  # nothing to merge into: start a cycle of their width
            self.column = 0
            self._rebuild()

    def advance(self) -> None:
        """The next column; at the end of a cycle, re-derive the width from the rows."""
        self.column += 1
        if self.column >= self.num_columns:
            self.column = 0
            self._rebuild()

    def _rebuild(self) -> None:
        self.num_columns = max(self.steps_per_cycle, max(self.per_cycle.values(), default=1))
        self.loads = [0] * self.num_columns
        self.rows = {}
        for rid, k in sorted(self.per_cycle.items(), key=lambda kv: -kv[1]):
            self._place(rid, k)

    def _place(self, rid: str, k: int) -> None:
        k = min(k, self.num_columns)
        stride = max(1, self.num_columns // k)
        best = min(range(stride), key=lambda off: max(
            self.loads[c] for c in mask_columns(k, self.num_columns, off)))
        row = mask_columns(k, self.num_columns, best)
        for c in row:
            self.loads[c] += 1
        self.rows[rid] = row

    def _remove(self, rid: str) -> None:
        for c in self.rows.pop(rid):
            self.loads[c] -= 1
        del self.per_cycle[rid]


@register("slice")
class SlicePolicy(Policy):
    steady_decode = False  # the mask decodes different rows each step
    cli_options = {
        "slice-period-ms": ("period_ms", float, "length of one decode cycle"),
        "slice-ratio": ("ratio", float, "share of each cycle for decoding (the rest: prefills)"),
        "realtime-utility": ("realtime_utility", float, "utility of a real-time task "
                                                        "(others: 1)"),
        "pacing-quantile": ("margin_quantile", float, "pace with a margin of this quantile "
                                                      "of the latency model's recent errors"),
    }

    def __init__(self, realtime_utility: float = 10.0, utility: float = 1.0,
                 period_ms: float = 1000.0, ratio: float = 0.9,
                 best_effort_tpot_ms: float = 250.0,
                 latency: LatencyModel | str | None = None, work_conserving: bool = True,
                 margin_quantile: float = 0.9, admission_control: bool = True):
        if not 0 < ratio <= 1 or period_ms <= 0 or best_effort_tpot_ms <= 0:
            raise ValueError("slice needs 0 < ratio <= 1, period_ms > 0, best_effort_tpot_ms > 0")
        if realtime_utility <= 0 or utility <= 0:
            raise ValueError("utilities must be positive")
        self.realtime_utility, self.utility = realtime_utility, utility
        self.period_s, self.ratio = period_ms / 1e3, ratio
        self.best_effort_tpot_ms = best_effort_tpot_ms
        self.work_conserving = work_conserving  # spare room in a step goes to unmarked tasks
        self.steps = CalibratedSteps(latency, margin_quantile)
        self.margin = self.steps.margin
        self.admission = AdmissionControl(
            self.utility_of, self.steps.prefill_time, lambda: self.steps.decode_time(1),
            lambda: self.margin.value) if admission_control else None
        self._profile_steps: list[float] = []  # latency.decode_time(b) at index b
        self._types: dict[TypeKey, dict[str, Request]] = {}  # unfinished, arrival order
        self._key_of: dict[str, TypeKey] = {}  # request id -> its type
        self._version = -1  # the scheduler's version the quotas were solved for
        self.quota: dict[TypeKey, int] = {}  # stage 1's answer: tasks to serve per type
        self.selected: list[Request] = []  # running tasks within their type's quota
        self._admit_quota: dict[TypeKey, int] = {}  # quota left for queued tasks
        self._candidates: list[Request] = []  # queued tasks to admit this step, in order
        self.mask = TokenMask()
        self._prefill_room = 1 << 30  # prefill tokens left in this step
        self._pace_factor = 1.0  # 1 - margin, as of this step

    # ---- the step model ---------------------------------------------------------------------
    def decode_time(self, batch: int) -> float:
        """l(b) from the profile, corrected by how fast steps have really been running."""
        return self.steps.decode_time(batch)

    def observe(self, plan: Plan, step_time: float) -> None:
        self.steps.observe(plan, step_time)

    def state(self) -> str:
        return self.steps.state()

    # ---- tasks ------------------------------------------------------------------------------
    def rate(self, request: Request) -> float:
        """Required decode rate in tokens per second, from the TPOT objective."""
        tpot_ms = request.slo.tpot_ms or self.best_effort_tpot_ms
        return 1e3 / tpot_ms

    def utility_of(self, request: Request) -> float:
        if request.best_effort:
            return BEST_EFFORT_UTILITY  # worth less than any on-time task, more than nothing
        if request.slo.utility is not None:
            return request.slo.utility
        return self.realtime_utility if request.slo.realtime else self.utility

    def _key(self, request: Request) -> TypeKey:
        return self.rate(request), self.utility_of(request), request.slo.ttft_ms or math.inf

    def on_arrival(self, request: Request) -> None:
        key = self._key_of[request.request_id] = self._key(request)
        self._types.setdefault(key, {})[request.request_id] = request

    def on_finished(self, request: Request) -> None:
        key = self._key_of.pop(request.request_id, None)
        if key is not None:
            self._types[key].pop(request.request_id, None)

    def rejection(self, scheduler: SchedulerView, request: Request, now: float) -> str | None:
        return None if self.admission is None else self.admission.rejection(request, now)

    def expired(self, scheduler: SchedulerView, now: float) -> Iterable[tuple[Request, str]]:
        return () if self.admission is None else self.admission.expired(now)

    # ---- stage 1: selection -----------------------------------------------------------------
    def solve(self, limit: int) -> dict[TypeKey, int]:
        keys = [k for k, tasks in self._types.items() if tasks]
        types = [TaskType(rate, utility, len(self._types[key]), ttft)
                 for key in keys for rate, utility, ttft in [key]]
        counts = choose(types, self._steps(limit + 1), self.ratio, limit)
        if types and not any(counts):  # not even one task fits the cycle: never idle,
            best = max(range(len(types)), key=lambda i: (types[i].utility, -types[i].rate))
            counts[best] = 1  # serve the most valuable one (admission control sheds the rest)
        return dict(zip(keys, counts))

    def _steps(self, n: int) -> list[float]:
        """decode_time(b) for b < n (the profile's part cached; the speed factor moves)."""
        while len(self._profile_steps) < n:
            self._profile_steps.append(self.steps.latency.decode_time(len(self._profile_steps)))
        return [t * self.steps.decode_speed for t in self._profile_steps[:n]]

    def prepare(self, scheduler: SchedulerView, now: float) -> None:
        self._pace_factor = 1 - self.margin.value  # read once a step: a sorted-window lookup
        if self.admission is not None:
            self.admission.note(now)
        if scheduler.version != self._version:  # a task arrived or finished: re-solve
            self._version = scheduler.version
            self.quota = self.solve(scheduler.config.max_num_seqs)
        self.mask.advance()  # every step scans the next column, arrivals or not
        self._split_running(scheduler.running)

    def _split_running(self, running: Sequence[Request]) -> None:
        """Running tasks within their type's quota are selected (earliest first); the quota
        left over goes to queued tasks."""
        left = dict(self.quota)
        self.selected = []
        for r in running:
            key = self._key_of[r.request_id]
            if left.get(key, 0) > 0:
                left[key] -= 1
                self.selected.append(r)
        self._admit_quota = left
        # Columns are the decode steps of one cycle: as many as fit in the period.
        self.mask.steps_per_cycle = max(1, int(self.period_s / self.decode_time(
            max(1, len(self.selected)))))
        cycle = self.period_s * (1 + self.margin.value)  # the pace keeps this margin
        self.mask.sync(self.selected, lambda r: max(1, math.ceil(self.rate(r) * cycle)))

    # ---- stage 2 and the mechanism's questions ------------------------------------------------
    def pace_deadline(self, request: Request) -> float:
        """When its next token falls due at its TPOT pace shortened by the margin (its TTFT
        before the first token)."""
        slo = request.slo
        if request.first_token_time is None:
            return request.arrival_time + slo.ttft_ms / 1e3 if slo.ttft_ms else math.inf
        if slo.tpot_ms is None or request.best_effort:
            return math.inf
        pace = slo.tpot_ms / 1e3 * self._pace_factor
        return request.first_token_time + request.num_output_tokens * pace

    def running_order(self, running: Sequence[Request], now: float) -> Iterable[Request]:
        """Selected tasks marked in this column, then any whose next token falls due before
        the step can end (the pace guard), then selected prompts in progress; while the step
        still ends within the pace of those, unmarked selected tasks and paused ones
        (work-conserving fill). Everything else pauses this step, keeping its KV."""
        slack = 1 + self.margin.value
        deadline = {r.request_id: self.pace_deadline(r) for r in self.selected}
        decodes, unmarked, prompts = [], [], []
        for r in self.selected:
            if r.num_pending_tokens > 1:
                prompts.append(r)
            else:
                (decodes if self.mask.on(r.request_id) else unmarked).append(r)
        # The step may last until the first selected task's next token falls due (at least
        # one pace). A task whose token falls due before the end of the step after this one
        # decodes now, whatever the mask says: skipped now, its token could come no sooner.
        limit = self._step_limit(decodes + unmarked, deadline, now)
        due, later = [], []
        for r in unmarked:
            (due if deadline[r.request_id] <= now + 2 * limit else later).append(r)
        decodes, unmarked = decodes + due, later
        # prompts in progress take the room in TTFT order, after the decodes; one whose
        # deadline is later than a queued prompt's yields the room to it (admitted next)
        self._candidates = self._queued_candidates()
        urgent = min(((-self.utility_of(r), self.pace_deadline(r)) for r in self._candidates
                      if r.first_token_time is None), default=(0.0, math.inf))
        prompts = [r for r in sorted(prompts, key=lambda r: (-self.utility_of(r),
                                                             deadline[r.request_id]))
                   if (-self.utility_of(r), deadline[r.request_id]) <= urgent]
        context = sum(r.num_tokens for r in decodes)  # long contexts make long steps
        start = prompts[0].num_computed_tokens if prompts else 0  # deep chunks cost more
        self._prefill_room = self._room_for_prefill(len(decodes), context, start,
                                                    limit / slack)
        if (prompts or self._candidates) and limit < math.inf:
            # Where decoding alone nearly fills every pace (a slow machine), prompts still
            # move: a chunk may stretch the step by up to PROMPT_SHARE of it, so TTFT
            # deadlines are weighed against paces instead of losing to them every step.
            step = self.steps.mixed_step_time(len(decodes), context, 0)
            floor = self._room_for_prefill(len(decodes), context, start,
                                           step * (1 + PROMPT_SHARE))
            self._prefill_room = max(self._prefill_room, floor)
        fill = []
        if self.work_conserving:  # decodes ahead of their pace take what prompts leave
            spare = unmarked
            if len(running) > len(self.selected):  # paused tasks: decoded if room is left
                chosen = {r.request_id for r in self.selected}
                spare = unmarked + [r for r in running
                                    if r.request_id not in chosen and r.num_pending_tokens == 1]
            wanted = sum(r.num_pending_tokens for r in prompts) + sum(
                r.num_tokens for r in self._candidates if r.first_token_time is None)
            tokens = min(wanted, self._prefill_room)
            fill = spare[: self._rows_that_fit(len(decodes), context, tokens, start, spare,
                                               limit / slack)]
        return decodes + prompts + fill

    def _rows_that_fit(self, base: int, context: int, prompt_tokens: int, start: int,
                       spare: Sequence[Request], limit: float) -> int:
        """How many of `spare` (in order) a step of `base` decodes attending to `context`
        tokens beside `prompt_tokens` prompt tokens can take and still end within `limit`
        (step times grow: bisect)."""
        contexts = list(itertools.accumulate((r.num_tokens for r in spare), initial=context))
        lo, hi = 0, len(spare)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = self.steps.mixed_step_time(base + mid, contexts[mid], prompt_tokens,
                                              start) <= limit
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return lo

    def _step_limit(self, decodes: Sequence[Request], deadline: dict[str, float],
                    now: float) -> float:
        """How long this step may last: until the first of these tasks' next token falls due,
        but never less than the tightest of their paces: a task already behind cannot
        make every later step shorter than one token of its pace (prompts would starve)."""
        if not decodes:
            return math.inf
        due = min(deadline[r.request_id] for r in decodes) - now
        paces = [r.slo.tpot_ms / 1e3 * self._pace_factor for r in decodes
                 if r.slo.tpot_ms is not None and not r.best_effort]
        return max(due, min(paces, default=math.inf if due == math.inf else 0.0))

    def _room_for_prefill(self, num_decodes: int, context: int, start: int,
                          limit: float) -> int:
        """Prefill tokens this step may carry so that it still ends within `limit` seconds,
        priced by the same step model the engine or simulator runs under."""
        if limit == math.inf:
            return 1 << 30
        lo, hi = 0, 1 << 13  # in 8-token steps: the first step that no longer fits
        while lo < hi:  # step times grow with the tokens: bisect
            mid = (lo + hi) // 2
            if self.steps.mixed_step_time(num_decodes, context, 8 * mid + 8, start) <= limit:
                lo = mid + 1
            else:
                hi = mid
        return 8 * lo

    def _queued_candidates(self) -> list[Request]:
        """Queued tasks within their type's quota (preempted ones and earlier arrivals
        first), earliest deadline first."""
        chosen = []
        for key, n in self._admit_quota.items():
            if n <= 0:
                continue
            for r in self._types.get(key, {}).values():
                if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                    chosen.append(r)
                    n -= 1
                    if n == 0:
                        break
        return sorted(chosen, key=lambda r: (-self.utility_of(r), self.pace_deadline(r),
                                             r.arrival_time))

    def admission_order(self, preempted: Sequence[Request], waiting: Sequence[Request],
                        now: float) -> Iterable[Request]:
        return self._candidates

    def import_order(self, arrived: Sequence[Request], now: float) -> Iterable[Request]:
        return sorted(arrived, key=lambda r: (-self.utility_of(r), self.pace_deadline(r)))

    def chunk_size(self, request: Request, num_pending: int, budget: int, step_budget: int) -> int:
        if num_pending == 1:
            return 1
        size = min(num_pending, budget, self._prefill_room)
        self._prefill_room -= size
        return size

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        chosen = {r.request_id for r in self.selected}
        return min(candidates, key=lambda r: (r.request_id in chosen,
                                              self.utility_of(r) * self.rate(r),
                                              -r.arrival_time))
