"""The front end of a multi-instance deployment: engine instances as Ray actors behind the
router of core/router.py, and the EngineClient interface (sloserve/interface.py), so
`sloserve serve --mode disagg` is the usual server on top.

Modes: colocated (N identical replicas, least queued prompt tokens), disagg (instances
[0, partition_id) prefill, the rest decode; KV moves over direct links or Ray's object store),
tropical (disagg, and a decode instance also takes a prompt when it would start it sooner than
the prefill instances and its running decodes have the TPOT slack to wait for it).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sloserve.cluster.kv_transfer import Handoff, transfer_class
from sloserve.cluster.worker import InstanceStats, InstanceWorker, PollResult
from sloserve.config import ClusterConfig
from sloserve.core.latency import LatencyModel
from sloserve.core.router import InstanceLoad, Router
from sloserve.engine import RequestIntake
from sloserve.interface import EngineStats, RequestOutput
from sloserve.model import loader
from sloserve.model.loader import eos_token_id
from sloserve.request import Request

log = logging.getLogger("sloserve.cluster")


@dataclass
class Parked:
    request: Request
    deadline: float  # clock time after which it fails with `reason`
    reason: str


@dataclass
class Instance:
    index: int
    role: str
    actor: Any
    stats: InstanceStats
    poll: Any = None  # the outstanding poll's ObjectRef
    alive: bool = True
    sent_tokens: int = 0  # prompt tokens routed here since its last stats
    sent_requests: int = 0  # requests routed or handed here since its last stats
    sent_blocks: int = 0  # KV blocks handed here since its last stats

    def load(self) -> InstanceLoad:
        """Its last stats, plus what was sent to it since."""
        load = self.stats.load
        return dataclasses.replace(
            load, queued_prompt_tokens=load.queued_prompt_tokens + self.sent_tokens,
            num_unfinished=load.num_unfinished + self.sent_requests,
            free_blocks=load.free_blocks - self.sent_blocks, alive=self.alive)


class ClusterEngine(RequestIntake):
    def __init__(self, config: ClusterConfig):
        import ray

        self.config = config
        self.model_name, self.model_config, self.tokenizer = loader.load_frontend(
            config.engine.model)
        context = self.model_config.max_position_embeddings
        self.max_model_len = min(config.engine.scheduler.max_model_len or context, context)
        self.eos_token_id = eos_token_id(self.tokenizer, self.model_config)
        self.clock: Callable[[], float] = time.monotonic
        self._ids = itertools.count()
        latency = (LatencyModel.from_file(config.latency_profile)
                   if config.latency_profile else LatencyModel.default())
        self.router = Router(config.mode, config.router, latency)
        if not ray.is_initialized():
            ray.init(address=config.ray_address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self.instances = self._start_instances(ray)
        self._pair_seq: dict[tuple[int, int], int] = {}  # last handoff numbered per pair
        for instance in self.instances:
            if instance.role == "prefill":
                self._open_links(instance)
        self.placement: dict[str, int] = {}  # request id -> instance it is on now
        self.parked: dict[str, Parked] = {}  # lost with an instance, waiting to resume
        self._submitted: dict[str, Request] = {}  # as the client sent them, until they end
        self._latest: dict[str, RequestOutput] = {}  # the last output each one streamed
        self._failures: list[RequestOutput] = []  # ended with an error since the last step
        self.last_step_time = 0.0

    def _start_instances(self, ray) -> list[Instance]:
        has_gpus = bool(ray.cluster_resources().get("GPU", 0))
        instances = []
        for index, role in enumerate(self.config.roles()):
            engine = self.config.instance_engine(index)
            tp = engine.tensor_parallel_size
            actor = ray.remote(InstanceWorker).options(  # tp ranks: the actor + tp-1 children
                num_cpus=1, num_gpus=tp if has_gpus else 0, max_restarts=-1,
                max_task_retries=0, max_concurrency=4).remote(
                    role, engine, self.config.kv_transfer, self.config.latency_profile)
            instances.append(Instance(index, role, actor, None))
        for instance in instances:  # fails here, with the instance's error, if one cannot load
            instance.stats = ray.get(instance.actor.stats.remote())
            instance.poll = instance.actor.poll.remote()
        return instances

    def _open_links(self, instance: Instance) -> None:
        """Direct transfer: (re)open the links between `instance` and every live instance of
        the other role (at start, and when a restarted actor answers again: a peer that is
        down does the same once it is back)."""
        import ray

        if not transfer_class(self.config.kv_transfer).pairwise or instance.role == "colocated":
            return
        other = "decode" if instance.role == "prefill" else "prefill"
        for peer in (i for i in self.instances if i.role == other and i.alive):
            prefill, decode = (instance, peer) if instance.role == "prefill" else (peer, instance)
            host, port = ray.get(prefill.actor.kv_link_address.remote())
            prefill.actor.open_link.remote(decode.index, 0, host, port)
            decode.actor.open_link.remote(prefill.index, 1, host, port)
            self._pair_seq.pop((prefill.index, decode.index), None)

    # ---- the engine interface (sloserve/interface.py) -------------------------------------
    def check(self, request: Request) -> None:
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {request.num_prompt_tokens} tokens, which leaves no "
                             f"room to generate within {self.max_model_len}")

    def submit(self, request: Request) -> Request:
        instance = self._route_prompt(request)
        if instance is None:
            raise ValueError("no engine instance is up to take the request; retry shortly")
        self._send(request, instance)
        self._submitted[request.request_id] = request
        return request

    def _send(self, request: Request, instance: Instance) -> None:
        instance.sent_tokens += request.num_tokens
        instance.sent_requests += 1
        instance.actor.submit.remote(request)
        self.placement[request.request_id] = instance.index

    def abort(self, request_id: str) -> None:
        index = self.placement.pop(request_id, None)
        if index is not None:
            self.instances[index].actor.abort.remote(request_id)
        self.parked.pop(request_id, None)
        self._forget(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.placement or self.parked or self._failures)

    def stats(self) -> EngineStats:
        stats = [i.stats for i in self.instances]
        total = sum(s.num_blocks for s in stats)
        free = sum(s.load.free_blocks for s in stats)
        return EngineStats(num_running=sum(s.num_running for s in stats),
                           num_waiting=sum(s.num_waiting for s in stats) + len(self.parked),
                           num_preempted=sum(s.num_preempted for s in stats),
                           kv_cache_usage=1.0 - free / total if total else 0.0)

    def step(self, timeout: float = 0.05) -> list[RequestOutput]:
        """Collect what the instances did since the last call (waits up to `timeout`)."""
        import ray

        start = self.clock()
        outputs, self._failures = self._failures, []
        by_ref = {i.poll: i for i in self.instances}
        ready, rest = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if ready and rest:  # whatever else is ready too, without waiting for it
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            instance = by_ref[ref]
            try:
                result: PollResult = ray.get(ref)
            except ray.exceptions.RayError as e:
                self._instance_failed(instance, e)
            else:
                self._absorb(instance, result, outputs)
            instance.poll = instance.actor.poll.remote()
        if self.parked:  # lost with an instance or a link just now, or still waiting
            self._resume_parked()
        self.last_step_time = self.clock() - start
        return outputs

    # ---- results ---------------------------------------------------------------------------
    def _absorb(self, instance: Instance, result: PollResult,
                outputs: list[RequestOutput]) -> None:
        if not instance.alive:
            log.info("engine instance %d (%s) is back", instance.index, instance.role)
            self._open_links(instance)  # its old links died with it
        instance.alive, instance.stats = True, result.stats
        instance.sent_tokens = instance.sent_requests = instance.sent_blocks = 0
        for out in result.outputs:
            if self.placement.get(out.request_id) is None:
                continue  # aborted meanwhile
            if out.finished:
                del self.placement[out.request_id]
                self._forget(out.request_id)
            else:
                self._latest[out.request_id] = out
            outputs.append(out)
        for request_id, message in result.failures:
            if self.placement.pop(request_id, None) is not None:
                self._fail(request_id, message)
        for handoff in result.handoffs:
            self._hand_off(instance, handoff)
        for request_id in result.lost:  # its prefill instance died while sending its KV
            if self.placement.pop(request_id, None) is not None:
                self._park(request_id, f"the KV of this request was lost on its way to engine "
                                       f"instance {instance.index}")

    def _hand_off(self, source: Instance, handoff: Handoff) -> None:
        """Name the decode instance: it expects the request at once, and the pair's sends and
        receives are numbered in this order (kv_transfer/)."""
        request_id = handoff.request.request_id
        target = self._pick_decode() if request_id in self.placement else None
        if target is None:
            source.actor.drop_kv.remote(request_id)  # the KV may wait there: let it go
            if self.placement.pop(request_id, None) is not None:
                self._fail(request_id, "no decode instance is up")
            return  # else: aborted while it was prefilled
        target.sent_blocks += -(-handoff.request.num_tokens // self._block_size)
        target.sent_requests += 1
        pair = source.index, target.index
        seq = self._pair_seq[pair] = self._pair_seq.get(pair, -1) + 1
        source.actor.send_kv.remote(target.index, seq, request_id)
        target.actor.receive_kv.remote(source.index, seq, handoff)
        self.placement[request_id] = target.index

    def _instance_failed(self, instance: Instance, error: Exception) -> None:
        """Its requests wait to resume elsewhere (or on it, once Ray has restarted it: routing
        skips it until a poll answers again)."""
        if instance.alive:
            log.error("engine instance %d (%s) died: %s", instance.index, instance.role,
                      type(error).__name__)
        instance.alive = False
        lost = [r for r, i in self.placement.items() if i == instance.index]
        for request_id in lost:
            del self.placement[request_id]
            self._park(request_id, f"engine instance {instance.index} ({instance.role}) died "
                                   "while serving this request")

    def _park(self, request_id: str, what_happened: str) -> None:
        self.parked[request_id] = Parked(
            self._resumable(request_id), self.clock() + self.config.resume_timeout_s,
            f"{what_happened}, and no instance could take it over")

    def _resumable(self, request_id: str) -> Request:
        """The request as the client has it so far: its prompt and the tokens already
        streamed, which the next instance computes again (as for a preempted request) before
        it samples the next token; its first-token time stays the one the client saw."""
        request, latest = self._submitted[request_id], self._latest.get(request_id)
        if latest is None:
            return request  # no token out yet: it starts over
        resumed = request.handoff_copy()
        resumed.output_token_ids = list(latest.token_ids)
        resumed.first_scheduled_time = latest.timings.first_scheduled
        resumed.first_token_time = latest.timings.first_token
        return resumed

    def _resume_parked(self) -> None:
        for request_id, parked in list(self.parked.items()):
            target = self._resume_target(parked.request)
            if target is not None:
                del self.parked[request_id]
                self._send(parked.request, target)
            elif self.clock() > parked.deadline:
                del self.parked[request_id]
                self._fail(request_id, parked.reason)

    def _resume_target(self, request: Request) -> Instance | None:
        return self._instance(self.router.resume_target(
            request.num_prompt_tokens, bool(request.output_token_ids), self._loads()))

    def _fail(self, request_id: str, message: str) -> None:
        request = self._submitted.get(request_id)
        if request is not None:
            self._failures.append(RequestOutput.failure(request, message, self.clock()))
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._submitted.pop(request_id, None)
        self._latest.pop(request_id, None)

    # ---- routing (core/router.py) -------------------------------------------------------
    @property
    def _block_size(self) -> int:
        return self.config.engine.block_size

    def _loads(self) -> list[InstanceLoad]:
        return [i.load() for i in self.instances]

    def _instance(self, index: int | None) -> Instance | None:
        return None if index is None else self.instances[index]

    def _route_prompt(self, request: Request) -> Instance | None:
        return self._instance(self.router.route_prompt(request.num_prompt_tokens,
                                                       self._loads()))

    def _pick_decode(self) -> Instance | None:
        return self._instance(self.router.pick_decode(self._loads()))

    def shutdown(self) -> None:
        import ray

        for instance in self.instances:
            ray.kill(instance.actor, no_restart=True)
