"""The front end of a multi-instance deployment: engine instances as Ray actors, a router,
and the same engine interface the OpenAI server drives (make_request / submit / abort /
has_unfinished / step), so `sloserve serve --mode disagg` is the usual server on top.

Modes: colocated (N identical replicas, least queued prompt tokens), disagg (instances
[0, partition_id) prefill, the rest decode; KV moves over direct links or Ray's object store),
tropical (disagg, and a decode instance also takes a prompt when it would start it sooner than
the prefill instances and its running decodes have the TPOT slack to wait for it).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sloserve.core.latency import LatencyModel
from sloserve.core.routing import DecodeLoad, decode_with_slack
from sloserve.disagg.worker import Handoff, InstanceStats, InstanceWorker, PollResult
from sloserve.engine import RequestIntake, RequestOutput, eos_token_id
from sloserve.model import loader
from sloserve.request import Request

log = logging.getLogger("sloserve.disagg")

MODES = ("colocated", "disagg", "tropical")
KV_TRANSFERS = ("object-store", "direct")


def parse_replica_spec(items: list[str]) -> list[tuple[int, int]]:
    """["1,1", "1,1"] -> [(1, 1), (1, 1)] (tp, pp per instance)."""
    spec = []
    for item in items:
        try:
            tp, pp = (int(x) for x in item.split(","))
        except ValueError:
            raise ValueError(f"--replica-spec entries are 'tp,pp', got {item!r}") from None
        if pp != 1:
            raise ValueError(f"pipeline parallelism is not supported (pp={pp} in {item!r})")
        if tp < 1:
            raise ValueError(f"tp must be positive, got {item!r}")
        spec.append((tp, pp))
    if not spec:
        raise ValueError("--replica-spec needs at least one instance")
    return spec


@dataclass(frozen=True)
class ClusterConfig:
    mode: str = "disagg"
    replica_spec: tuple[tuple[int, int], ...] = ((1, 1), (1, 1))
    partition_id: int = 1  # instances [0, partition_id) prefill, the rest decode
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # every instance
    prefill_kwargs: dict[str, Any] = field(default_factory=dict)  # prefill instances only
    decode_kwargs: dict[str, Any] = field(default_factory=dict)  # decode instances only
    ray_address: str | None = None  # None: a local Ray instance
    latency_profile: str | None = None  # tropical's step-time model; None: the shipped one
    resume_timeout_s: float = 120.0  # how long a dead instance's requests wait to resume
    kv_transfer: str = "direct"  # a link per prefill/decode pair; or object-store

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.kv_transfer not in KV_TRANSFERS:
            raise ValueError(f"kv transfer must be one of {', '.join(KV_TRANSFERS)}")
        n = len(self.replica_spec)
        if self.mode != "colocated" and not 0 < self.partition_id < n:
            raise ValueError(f"--partition-id must be in [1, {n - 1}] for {n} instances "
                             "(at least one prefill and one decode instance)")

    def roles(self) -> list[str]:
        if self.mode == "colocated":
            return ["colocated"] * len(self.replica_spec)
        return ["prefill" if i < self.partition_id else "decode"
                for i in range(len(self.replica_spec))]


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
    sent_blocks: int = 0  # KV blocks handed here since its last stats


class _QueueView:
    """What the server's metrics and 429 logic read from `engine.scheduler`: only the sizes
    of the queues, summed over the instances' last stats."""

    preempted = ()  # the instances count their preempted requests as waiting

    def __init__(self, cluster: ClusterEngine):
        self._cluster = cluster

    @property
    def waiting(self) -> range:
        return range(sum(i.stats.num_waiting for i in self._cluster.instances))

    @property
    def running(self) -> range:
        return range(sum(i.stats.num_running for i in self._cluster.instances))

    def unfinished_ids(self) -> list[str]:
        return [*self._cluster.placement, *self._cluster.parked]

    def check(self, request: Request) -> None:
        if request.num_prompt_tokens >= self._cluster.max_model_len:
            raise ValueError(f"prompt has {request.num_prompt_tokens} tokens, which leaves no "
                             f"room to generate within {self._cluster.max_model_len}")


class _BlocksView:
    def __init__(self, cluster: ClusterEngine):
        self._cluster = cluster

    @property
    def usage(self) -> float:
        stats = [i.stats for i in self._cluster.instances]
        total = sum(s.num_blocks for s in stats)
        return 1.0 - sum(s.free_blocks for s in stats) / total if total else 0.0


class ClusterEngine(RequestIntake):
    def __init__(self, config: ClusterConfig):
        import ray

        self.config = config
        model = config.engine_kwargs.get("model")
        self.model_name, self.model_config, self.tokenizer = loader.load_frontend(model)
        self.max_model_len = min(config.engine_kwargs.get("max_model_len")
                                 or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.eos_token_id = eos_token_id(self.tokenizer, self.model_config)
        self.clock: Callable[[], float] = time.monotonic
        self._ids = itertools.count()
        self.latency = (LatencyModel.from_file(config.latency_profile)
                        if config.latency_profile else LatencyModel.default())
        if not ray.is_initialized():
            ray.init(address=config.ray_address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self.instances = self._start_instances(ray)
        self._link_seq: dict[tuple[int, int], int] = {}  # direct: next handoff per link
        for instance in self.instances:
            if instance.role == "prefill":
                self._open_links(instance)
        self.placement: dict[str, int] = {}  # request id -> instance it is on now
        self.parked: dict[str, Parked] = {}  # lost with an instance, waiting to resume
        self._submitted: dict[str, Request] = {}  # as the client sent them, until they end
        self._latest: dict[str, RequestOutput] = {}  # the last output each one streamed
        self._failures: list[tuple[str, Exception]] = []
        self.scheduler, self.blocks = _QueueView(self), _BlocksView(self)
        self.last_step_time = 0.0

    def _start_instances(self, ray) -> list[Instance]:
        has_gpus = bool(ray.cluster_resources().get("GPU", 0))
        instances = []
        for index, role in enumerate(self.config.roles()):
            tp = self.config.replica_spec[index][0]
            kwargs = {**self.config.engine_kwargs,
                      **{"prefill": self.config.prefill_kwargs,
                         "decode": self.config.decode_kwargs}.get(role, {}),
                      "tensor_parallel_size": tp}
            actor = ray.remote(InstanceWorker).options(  # tp ranks: the actor + tp-1 children
                num_cpus=1, num_gpus=tp if has_gpus else 0, max_restarts=-1,
                max_task_retries=0, max_concurrency=4).remote(
                    role, kwargs, self.config.kv_transfer, self.config.latency_profile)
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

        if self.config.kv_transfer != "direct" or instance.role == "colocated":
            return
        other = "decode" if instance.role == "prefill" else "prefill"
        for peer in (i for i in self.instances if i.role == other and i.alive):
            prefill, decode = (instance, peer) if instance.role == "prefill" else (peer, instance)
            host, port = ray.get(prefill.actor.kv_link_address.remote())
            prefill.actor.open_link.remote(decode.index, 0, host, port)
            decode.actor.open_link.remote(prefill.index, 1, host, port)
            self._link_seq[prefill.index, decode.index] = 0

    # ---- the engine interface the server drives -------------------------------------------
    def submit(self, request: Request) -> Request:
        instance = self._route_prompt(request)
        if instance is None:
            raise ValueError("no engine instance is up to take the request; retry shortly")
        self._send(request, instance)
        self._submitted[request.request_id] = request
        return request

    def _send(self, request: Request, instance: Instance) -> None:
        instance.sent_tokens += request.num_tokens
        instance.actor.submit.remote(request)
        self.placement[request.request_id] = instance.index

    def abort(self, request_id: str) -> None:
        index = self.placement.pop(request_id, None)
        if index is not None:
            self.instances[index].actor.abort.remote(request_id)
        self.parked.pop(request_id, None)
        self._forget(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.placement or self.parked)

    def take_failures(self) -> list[tuple[str, Exception]]:
        failures, self._failures = self._failures, []
        return failures

    def step(self, timeout: float = 0.05) -> list[RequestOutput]:
        """Collect what the instances did since the last call (waits up to `timeout`)."""
        import ray

        start = self.clock()
        by_ref = {i.poll: i for i in self.instances}
        ready, rest = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if ready and rest:  # whatever else is ready too, without waiting for it
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        outputs: list[RequestOutput] = []
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
        instance.sent_tokens = instance.sent_blocks = 0
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
        request_id = handoff.request.request_id
        direct = self.config.kv_transfer == "direct"
        target = self._pick_decode(handoff.request) if request_id in self.placement else None
        if target is None:
            if direct:  # the KV waits on the prefill's device: let it go
                source.actor.drop_kv.remote(request_id)
            if self.placement.pop(request_id, None) is not None:
                self._fail(request_id, "no decode instance is up")
            return  # else: aborted while it was prefilled
        target.sent_blocks += -(-handoff.request.num_tokens // self._block_size)
        if direct:
            link = source.index, target.index
            seq, self._link_seq[link] = self._link_seq[link], self._link_seq[link] + 1
            source.actor.send_kv.remote(target.index, seq, request_id)
            target.actor.receive_kv.remote(source.index, seq, handoff)
        else:
            target.actor.submit_prefilled.remote(handoff, handoff.kv)
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
        resumed.first_scheduled_time = latest.timings["first_scheduled_time"]
        resumed.first_token_time = latest.timings["first_token_time"]
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
        """A request past its first token goes straight to a decode instance (its prefill
        there replaces the handoff); one without goes where a new prompt would."""
        if not request.output_token_ids or self.config.mode == "colocated":
            return self._route_prompt(request)
        return self._pick_decode(request)

    def _fail(self, request_id: str, message: str) -> None:
        self._failures.append((request_id, RuntimeError(message)))
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._submitted.pop(request_id, None)
        self._latest.pop(request_id, None)

    # ---- routing ---------------------------------------------------------------------------
    @property
    def _block_size(self) -> int:
        return self.config.engine_kwargs.get("block_size", 16)

    def _live(self, *roles: str) -> list[Instance]:
        return [i for i in self.instances if i.alive and i.role in roles]

    def _route_prompt(self, request: Request) -> Instance | None:
        if self.config.mode == "colocated":
            return min(self._live("colocated"), key=self._queued, default=None)
        prefill = min(self._live("prefill"), key=self._queued, default=None)
        if self.config.mode == "tropical":
            decode = self._decode_with_slack(request, prefill)
            if decode is not None:
                return decode
        if prefill is None:  # every prefill instance is down: a decode instance prefills too
            return min(self._live("decode"), key=self._queued, default=None)
        return prefill

    def _queued(self, instance: Instance) -> int:
        return instance.stats.queued_prompt_tokens + instance.sent_tokens

    def _pick_decode(self, request: Request) -> Instance | None:
        free = lambda i: i.stats.free_blocks - i.sent_blocks  # noqa: E731
        return max(self._live("decode"), key=free, default=None)

    def _decode_with_slack(self, request: Request, prefill: Instance | None) -> Instance | None:
        """Tropical: a decode instance takes the prompt when it would start it sooner and its
        decodes have the TPOT slack (core/routing.py, which the simulator shares)."""
        decodes = self._live("decode")
        loads = [DecodeLoad(self._queued(d), d.stats.tpot_slack, d.stats.last_step_time)
                 for d in decodes]
        index = decode_with_slack(request.num_prompt_tokens,
                                  None if prefill is None else self._queued(prefill), loads,
                                  self.latency)
        return None if index is None else decodes[index]

    def shutdown(self) -> None:
        import ray

        for instance in self.instances:
            ray.kill(instance.actor, no_restart=True)


def cluster_config(mode: str, replica_spec: list[str], partition_id: int,
                   engine_kwargs: dict[str, Any], **rest: Any) -> ClusterConfig:
    """From the CLI's strings: `--replica-spec 1,1 1,1` -> ((1, 1), (1, 1))."""
    return ClusterConfig(mode=mode, replica_spec=tuple(parse_replica_spec(replica_spec)),
                         partition_id=partition_id, engine_kwargs=engine_kwargs, **rest)
