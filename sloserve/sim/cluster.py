"""Simulated engine instances behind a router, advanced by a discrete-event loop.

Each instance owns the real Scheduler and BlockManager; a step's duration comes from the
latency model instead of a GPU. Every instance keeps its own clock (when it is next free); the
loop always handles the earliest event: the next arrival, or the step of the instance that is
free first. One instance and an engine stepping back to back make the same Plans.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable
from dataclasses import dataclass

from sloserve.config import SchedulerConfig
from sloserve.core.kv_blocks import BlockManager
from sloserve.core.plan import Plan
from sloserve.core.router import InstanceLoad, Router, instance_load
from sloserve.core.scheduler import Scheduler
from sloserve.request import Request, SamplingParams
from sloserve.sim.fastforward import fast_forward, steady_steps
from sloserve.workload.metrics import RequestRecord
from sloserve.workload.spec import RequestSpec

SAMPLED_TOKEN = 1  # the simulator "samples" this token; requests stop by length
IDLE_TICK_S = 1e-3  # how far an instance whose policy held everything back skips ahead


class VirtualClock:
    """A clock the simulator (or a test) moves by hand."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class InstanceConfig:
    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = False  # needs real token lists: slow on long traces


class SimInstance:
    def __init__(self, scheduler: SchedulerConfig, config: InstanceConfig, latency,
                 on_plan: Callable[[Plan], None] | None = None, fast_forward: bool = True,
                 role: str = "colocated"):
        self.role = role  # colocated | prefill | decode
        self.last_step_time = 0.0
        blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler, blocks)
        self.latency = latency
        self.clock = 0.0  # when this instance can start its next step
        self.on_plan = on_plan
        self.fast_forward = fast_forward and on_plan is None  # a plan log wants every step

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    @property
    def busy(self) -> bool:
        return self.scheduler.has_runnable()

    def load(self) -> InstanceLoad:
        """What the router reads: what the Ray worker reports of its own scheduler."""
        return instance_load(self.role, self.scheduler, self.clock,
                             self.latency.decode_time(len(self.scheduler.running)),
                             self.last_step_time)

    def step(self, next_arrival: float) -> list[Request]:
        """One step at self.clock (or a run of identical decode steps); returns the requests
        that got a token and may have finished."""
        steady = steady_steps(self.scheduler) if self.fast_forward else 0
        if steady:
            clock = fast_forward(self.scheduler, self.latency, self.clock, next_arrival, steady,
                                 SAMPLED_TOKEN)
            if clock != self.clock:
                self.clock = clock
                return []
        plan = self.scheduler.schedule(self.clock)
        if plan.is_empty:  # the policy is holding work back (delay): let time pass
            if not plan.rejected:
                self.clock = min(next_arrival, self.clock + IDLE_TICK_S)
            return plan.rejected
        if self.on_plan:
            self.on_plan(plan)
        step_time = self.latency.step_time(plan)
        self.clock += step_time
        self.last_step_time = step_time
        self.scheduler.policy.observe(plan, step_time)
        sampled = {c.request.request_id: SAMPLED_TOKEN for c in plan.chunks if c.sample}
        return plan.rejected + self.scheduler.update(plan, sampled, self.clock)


def make_request(spec: RequestSpec, max_model_len: int | None) -> Request:
    # A range stands in for the prompt's token ids: the scheduler needs only its length
    # unless prefix caching reads the tokens, so a 100k-token prompt costs no memory.
    prompt = spec.extra.get("tokens") or range(spec.prompt_len)
    room = spec.max_tokens if max_model_len is None else max_model_len - spec.prompt_len
    max_tokens = max(1, min(spec.max_tokens, room))
    return Request(f"sim-{spec.index}", prompt, SamplingParams(max_tokens=max_tokens,
                                                               ignore_eos=True),
                   spec.slo, arrival_time=spec.arrival)


class Cluster:
    """Prompts go to the instance core/router.py's Router picks, as in the Ray front end; a
    prefill instance's request leaves after its first token for the decode instance the
    router picks then, where its KV arrives `transfer(request)` seconds later."""

    def __init__(self, instances: list[SimInstance], router: str = "least_queued",
                 max_model_len: int | None = None,
                 transfer: Callable[[Request], float] = lambda request: 0.0,
                 tropical: bool = False):
        roles = {x.role for x in instances}
        mode = "colocated" if roles == {"colocated"} else ("tropical" if tropical else "disagg")
        self.router = Router(mode, router, instances[0].latency)
        self.instances = instances
        self.max_model_len = max_model_len
        self.transfer = transfer
        self.decisions: list[tuple[str, int]] = []  # (request id, instance), in order
        self._handoffs: list[tuple[float, int, str, int]] = []  # heap: KV arrives, seq, ...
        self._seq = 0

    def run(self, specs: list[RequestSpec], max_misses: int | None = None,
            max_concurrency: int | None = None) -> tuple[list[RequestRecord], float]:
        """Records in spec order and the end time. With `max_misses`, the run stops once more
        requests than that have finished without attaining their SLO (the records of the
        rest are then missing): a search only needs to know the target was missed. With
        `max_concurrency`, as the bench client: a request is sent only when fewer than that
        are in flight, else when one finishes (its clock starts then)."""
        pending = sorted(specs, key=lambda s: s.arrival)
        records: dict[str, RequestRecord] = {}
        i, end, misses = 0, 0.0, 0
        in_flight, slot_free_at = 0, 0.0
        while max_misses is None or misses <= max_misses:
            busy = [x for x in self.instances if x.busy]
            next_arrival = float("inf")
            if i < len(pending) and (max_concurrency is None or in_flight < max_concurrency):
                next_arrival = max(pending[i].arrival, slot_free_at)
            next_kv = self._handoffs[0][0] if self._handoffs else float("inf")
            first = min(busy, key=lambda x: x.clock) if busy else None
            if first is None and i == len(pending) and not self._handoffs:
                break
            first_clock = first.clock if first is not None else float("inf")
            if next_kv <= min(next_arrival, first_clock):
                self._import(*heapq.heappop(self._handoffs))
                continue
            if next_arrival <= first_clock:
                spec = pending[i]
                if spec.arrival < next_arrival:  # waited for a free slot at the client
                    spec = dataclasses.replace(spec, arrival=next_arrival)
                in_flight += self._dispatch(spec, records)
                i += 1
                continue
            for request in first.step(min(next_arrival, next_kv)):
                if request.is_finished:
                    record = _record(request, records[request.request_id])
                    records[request.request_id] = record
                    misses += not record.attained
                    in_flight -= 1
                    slot_free_at = first.clock
                elif first.role == "prefill":
                    self._hand_off(first, request)
            end = max(end, first.clock)
        return sorted(records.values(), key=lambda r: r.index), end

    def _loads(self) -> list[InstanceLoad]:
        return [x.load() for x in self.instances]

    def _hand_off(self, source: SimInstance, request: Request) -> None:
        """As the Ray front end: the decode instance is chosen at once and expects the
        request (WAITING_FOR_REMOTE_KV) until its KV arrives."""
        copy = request.handoff_copy()
        source.scheduler.abort(request.request_id, source.clock)  # frees its blocks there
        target = self.router.pick_decode(self._loads())
        self.decisions.append((request.request_id, target))
        copy.kv_transfer_time = self.transfer(copy)
        self.instances[target].scheduler.add_remote(copy)
        self._seq += 1
        heapq.heappush(self._handoffs, (source.clock + copy.kv_transfer_time, self._seq,
                                        copy.request_id, target))

    def _import(self, ready: float, _seq: int, request_id: str, index: int) -> None:
        target = self.instances[index]
        if not target.busy:
            target.clock = max(target.clock, ready)
        target.scheduler.kv_arrived(request_id)

    def _dispatch(self, spec: RequestSpec, records: dict[str, RequestRecord]) -> bool:
        """Hand a request to an instance; False if it could never run there."""
        request = make_request(spec, self.max_model_len)
        # one instance: no choice to make (and no queue to sum per arrival)
        index = 0 if len(self.instances) == 1 else self.router.route_prompt(
            request.num_prompt_tokens, self._loads())
        self.decisions.append((request.request_id, index))
        instance = self.instances[index]
        if not instance.busy:
            instance.clock = max(instance.clock, spec.arrival)
        record = RequestRecord.start(spec.index, spec.slo_class, spec.slo, spec.arrival)
        record.prompt_tokens = spec.prompt_len
        try:
            instance.add(request)
        except ValueError as e:  # could never run here (too long): an error, as a server says
            record.error = str(e)
        records[request.request_id] = record
        return not record.error


def _record(request: Request, record: RequestRecord) -> RequestRecord:
    if request.reject_reason is not None:  # as the server's 503 reads in a bench record
        record.error = f"rejected: {request.reject_reason}"
        return record
    record.output_tokens = request.num_output_tokens
    s = 1e3
    record.ttft_ms = (request.first_token_time - request.arrival_time) * s
    record.e2e_ms = (request.finish_time - request.arrival_time) * s
    record.queue_ms = (request.first_scheduled_time - request.arrival_time) * s
    tpot = request.tpot
    record.tpot_ms = None if tpot is None else tpot * s
    return record
