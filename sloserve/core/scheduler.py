"""The scheduler mechanism: queues, the per-step token budget and KV blocks.

`schedule(now) -> Plan` and `update(plan, sampled, now)`; the clock is always an argument, so
the simulator can drive it with virtual time. Decisions are delegated to a Policy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from sloserve.config import SchedulerConfig
from sloserve.core.kv_blocks import BlockManager
from sloserve.core.plan import Plan, ScheduledChunk
from sloserve.core.policies import Policy, make_policy
from sloserve.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 policy: Policy | None = None):
        self.config = config
        self.blocks = block_manager
        self.policy = policy or make_policy(config.policy, **config.policy_options)
        # deques: admission mostly takes from the front, which a deque removes in O(1)
        self.waiting: deque[Request] = deque()
        self.preempted: deque[Request] = deque()  # in preemption order
        self.running: list[Request] = []
        # Prefilled elsewhere, waiting for their KV (vLLM's WAITING_FOR_REMOTE_KVS), and of
        # those, the ones whose KV has arrived, in arrival order.
        self.remote: dict[str, Request] = {}
        self.arrived: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self.rejected: list[Request] = []  # by admission control, not yet in a Plan
        self.version = 0  # bumped whenever a request arrives or finishes

    # ---- intake ------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise ValueError if the request could never run here. No side effects."""
        limit = self.config.max_model_len
        if limit is not None and request.num_prompt_tokens >= limit:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens, which leaves no room to "
                f"generate within the context of {limit} tokens")
        if self.blocks.blocks_for(request.num_prompt_tokens + 1) > self.blocks.num_blocks:
            raise ValueError(f"prompt of {request.num_prompt_tokens} tokens needs more KV "
                             f"blocks than the cache has ({self.blocks.num_blocks})")

    def add(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.check(request)
        request.status = RequestStatus.WAITING
        self._enqueue(request)
        self.version += 1
        self._by_id[request.request_id] = request
        self.policy.on_arrival(request)
        reason = self.policy.rejection(self, request, request.arrival_time)
        if reason is not None:
            self._out_of_reach(request, reason, request.arrival_time)

    def add_remote(self, request: Request) -> None:
        """Expect a request whose first num_computed_tokens tokens were computed on another
        instance (disaggregated prefill): it waits here without blocks until kv_arrived(),
        then admission gives it blocks for those tokens and it decodes."""
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.check(request)
        request.block_ids = []
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.remote[request.request_id] = request
        self._by_id[request.request_id] = request
        self.version += 1
        self.policy.on_arrival(request)

    def kv_arrived(self, request_id: str) -> bool:
        """The KV of a remote request is here (False: no such request, e.g. aborted)."""
        request = self.remote.get(request_id)
        if request is None or request in self.arrived:
            return False
        self.arrived.append(request)
        return True

    def remote_blocks(self) -> int:
        """Blocks the remote requests will take when their KV arrives."""
        return sum(self.blocks.blocks_for(r.num_tokens) for r in self.remote.values())

    def _enqueue(self, request: Request) -> None:
        """Keep `waiting` in (arrival, priority) order; arrivals almost always come last."""
        key = (request.arrival_time, request.priority)
        i = len(self.waiting)
        while i and (self.waiting[i - 1].arrival_time, self.waiting[i - 1].priority) > key:
            i -= 1
        self.waiting.insert(i, request)

    def abort(self, request_id: str, now: float) -> Request | None:
        request = self._by_id.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED, now)
        return request

    def finish(self, request: Request, status: RequestStatus, now: float) -> None:
        """End a request (stop, length, abort, error) and give its blocks back."""
        assert status.finished
        if request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.remote[request.request_id]
            if request in self.arrived:
                self.arrived.remove(request)
        else:
            queue = {RequestStatus.WAITING: self.waiting, RequestStatus.RUNNING: self.running,
                     RequestStatus.PREEMPTED: self.preempted}.get(request.status)
            if queue is None:
                return  # already finished
            queue.remove(request)
            self.blocks.free(request)
        request.status = status
        request.finish_time = now
        del self._by_id[request.request_id]
        self.version += 1
        self.policy.on_finished(request)

    def _out_of_reach(self, request: Request, reason: str, now: float) -> None:
        """Admission control's verdict on a queued request: rejected (the server answers
        503 at once) unless its SLO asks to be served best effort."""
        on_miss = request.slo.on_miss or self.config.slo_on_miss
        if on_miss == "best_effort":
            if not request.best_effort:  # the policy re-files it in its best-effort class
                self.policy.on_finished(request)
                request.best_effort = True
                self.policy.on_arrival(request)
            return
        request.reject_reason = reason
        self.finish(request, RequestStatus.FINISHED_REJECTED, now)
        self.rejected.append(request)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self, now: float) -> Plan:
        plan = Plan(now=now)
        for request, reason in list(self.policy.expired(self, now)):
            self._out_of_reach(request, reason, now)
        plan.rejected, self.rejected = self.rejected, []
        self.policy.prepare(self, now)
        if self.arrived:
            self._admit_arrived(plan, now)
        budget = self._schedule_running(plan, self.config.max_num_batched_tokens, now)
        # After a preemption the pool is full: admitting now would only thrash (as vLLM v1).
        if (self.waiting or self.preempted) and not plan.preempted \
                and self.policy.should_admit(self, now):
            self._admit(plan, budget, now)
        return plan

    def _schedule_running(self, plan: Plan, budget: int, now: float) -> int:
        step_budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        for request in list(self.policy.running_order(self.running, now)):
            if budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted as a victim earlier in this loop
            n = self.policy.chunk_size(request, request.num_pending_tokens, budget, step_budget)
            if n <= 0 or not self._make_room(request, n, scheduled, plan, now):
                continue
            self.blocks.append(request, n)
            self._add_chunk(plan, request, n)
            scheduled.add(request.request_id)
            budget -= n
        return budget

    def _make_room(self, request: Request, n: int, scheduled: set[str], plan: Plan,
                   now: float) -> bool:
        """Preempt until `request` can grow by `n` tokens; False if it was the victim, or if
        it alone outgrew the whole cache (it then ends, as if at its length limit: preempted,
        it could never be admitted again)."""
        while not self.blocks.can_append(request, n):
            if self.running == [request]:
                self.finish(request, RequestStatus.FINISHED_LENGTH, now)
                return False
            candidates = [r for r in self.running if r.request_id not in scheduled]
            victim = self.policy.pick_victim(candidates, now)
            self._preempt(victim)
            plan.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _admit(self, plan: Plan, budget: int, now: float) -> None:
        step_budget = self.config.max_num_batched_tokens
        admitted: list[Request] = []
        # Candidates are read lazily (a long queue is not copied each step) and leave their
        # queue after the loop, which must not change while it is being read.
        for request in self.policy.admission_order(self.preempted, self.waiting, now):
            if budget <= 0 or len(self.running) + len(admitted) >= self.config.max_num_seqs:
                break
            pending = request.num_tokens - self.blocks.num_cached_tokens(request)
            n = self.policy.chunk_size(request, pending, budget, step_budget)
            if n <= 0 or not self.blocks.can_allocate(request, n):
                break
            self.blocks.allocate(request, n)
            admitted.append(request)
            self._add_chunk(plan, request, n)
            budget -= n
        for request in admitted:
            (self.preempted if request.status == RequestStatus.PREEMPTED
             else self.waiting).remove(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)

    def _admit_arrived(self, plan: Plan, now: float) -> None:
        """Remote requests whose KV is here get blocks for their computed tokens and run
        (decoding in this very step): in the policy's order, while seats and blocks last."""
        ordered = list(self.policy.import_order(self.arrived, now))
        for request in ordered:
            if len(self.running) >= self.config.max_num_seqs:
                return
            computed, request.num_computed_tokens = request.num_computed_tokens, 0
            if not self.blocks.can_allocate(request, computed):
                request.num_computed_tokens = computed
                return
            self.blocks.allocate(request, computed)
            request.num_computed_tokens = computed
            self.blocks.cache_full_blocks(request)
            self.arrived.remove(request)
            del self.remote[request.request_id]
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)
            plan.imported.append(request)

    def _add_chunk(self, plan: Plan, request: Request, n: int) -> None:
        start = request.num_computed_tokens
        plan.chunks.append(ScheduledChunk(request, start, n, start + n == request.num_tokens))

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, keep the tokens, requeue ahead of new work."""
        self.running.remove(request)
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.preempted.append(request)
        self.policy.on_requeued(request)

    def update(self, plan: Plan, sampled: Mapping[str, int], now: float) -> list[Request]:
        """Apply a step's results; returns the requests that got a token or finished."""
        touched = []
        for chunk in plan.chunks:
            request = chunk.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += chunk.num_tokens
            self.blocks.cache_full_blocks(request)
            if chunk.sample:
                self._append_token(request, sampled[request.request_id], now)
                touched.append(request)
        return touched

    def _append_token(self, request: Request, token: int, now: float) -> None:
        request.output_token_ids.append(token)
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        status = self._stop_status(request, token)
        if status is not None:
            self.finish(request, status, now)

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        n = request.num_output_tokens
        if n >= params.min_tokens and (
            token in params.stop_token_ids
            or (token == request.eos_token_id and not params.ignore_eos)
        ):
            return RequestStatus.FINISHED_STOPPED
        limit = self.config.max_model_len
        if n >= params.max_tokens or (limit is not None and request.num_tokens >= limit):
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- figures -----------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """Rejected requests count until a Plan has carried them out."""
        return bool(self._by_id or self.rejected)

    def has_runnable(self) -> bool:
        """Whether a step could do anything (remote requests without their KV cannot)."""
        return bool(self.waiting or self.preempted or self.running or self.arrived
                    or self.rejected)

    def unfinished_ids(self) -> list[str]:
        return list(self._by_id)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._by_id)

    def queued_prompt_tokens(self) -> int:
        """Tokens still to compute of requests not yet running (what routing balances)."""
        return sum(r.num_tokens - r.num_computed_tokens for r in (*self.waiting, *self.preempted))
