"""Build a simulated deployment from plain settings and run a workload through it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sloserve.config import MODES, EngineConfig, SchedulerConfig, roles, setting
from sloserve.core.latency import GPUS, LatencyModel, ModelShape, RooflineModel
from sloserve.core.plan import Plan
from sloserve.core.policies import prices_steps
from sloserve.sim.cluster import Cluster, InstanceConfig, SimInstance
from sloserve.workload.metrics import RequestRecord
from sloserve.workload.spec import RequestSpec

CPU_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M in float32, the CPU profile's model


@dataclass(frozen=True)
class Deployment:
    """What to simulate: hardware (a measured profile, or a GPU + model shape), the
    scheduler and its policy, and how many instances behind which router."""

    latency_profile: str | None = None  # JSON from `sloserve profile`; None: shipped CPU one
    gpu: str | None = setting(None, "h100 | h200 | a100: an analytic roofline (with a "
                                    "latency profile: the GPU's memory, the profile's times)")
    model_shape: str = setting("llama-3-8b", "with --gpu: a named model shape")
    num_instances: int = setting(1, "simulated engine instances")
    router: str = setting("least_queued", "least_queued | round_robin | least_loaded "
                                          "(core/router.py, as the Ray front end)")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_kv_blocks: int | None = setting(None, "KV blocks per instance (default: from the "
                                              "GPU's memory, or 1 GiB on the CPU)")
    block_size: int = EngineConfig.block_size
    gpu_memory_utilization: float = EngineConfig.gpu_memory_utilization
    mode: str = setting("colocated", "disagg: instances [0, --partition-id) prefill, the rest "
                                     "decode; tropical: disagg, and decode instances may take "
                                     "prompts", choices=MODES)
    partition_id: int = setting(1, "instances [0, partition-id) prefill, the rest decode")
    prefill: Mapping[str, Any] = field(default_factory=dict)  # limits, prefill instances
    decode: Mapping[str, Any] = field(default_factory=dict)  # limits, decode instances
    transfer_gb_s: float = setting(25.0, "disagg: KV handoff bandwidth, GB/s")

    def roles(self) -> list[str]:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}")
        if self.mode != "colocated" and not 0 < self.partition_id < self.num_instances:
            raise ValueError(f"--partition-id must be in [1, {self.num_instances - 1}]")
        return roles(self.mode, self.num_instances, self.partition_id)

    def kv_bytes_per_token(self) -> int:
        return model_shape(self.model_shape).kv_bytes_per_token if self.gpu \
            else CPU_KV_BYTES_PER_TOKEN


def latency_model(d: Deployment) -> tuple[Any, int]:
    """The step-latency model and the KV capacity in blocks."""
    if d.gpu is None:
        latency = LatencyModel.from_file(d.latency_profile) if d.latency_profile \
            else LatencyModel.default()
        blocks = d.num_kv_blocks or (1 << 30) // CPU_KV_BYTES_PER_TOKEN // d.block_size
        return latency, blocks
    if d.gpu not in GPUS:
        raise ValueError(f"unknown GPU {d.gpu!r}; choose one of {', '.join(GPUS)}")
    shape = model_shape(d.model_shape)
    gpu = GPUS[d.gpu]
    free = gpu.memory * d.gpu_memory_utilization - 2 * (shape.params + shape.vocab * shape.hidden)
    blocks = d.num_kv_blocks or int(free // (shape.kv_bytes_per_token * d.block_size))
    if blocks <= 0:
        raise ValueError(f"{d.model_shape} does not fit on one {gpu.name}")
    # a profile measured on that GPU prices steps better than the roofline; the KV cache is
    # still the GPU's (a 1 GiB CPU cache would hold one long prompt)
    latency = LatencyModel.from_file(d.latency_profile) if d.latency_profile \
        else RooflineModel(gpu, shape)
    return latency, blocks


def model_shape(name: str) -> ModelShape:
    from sloserve.model.config import NAMED_SHAPES, ModelConfig  # plain data, no torch

    if name not in NAMED_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
    c = ModelConfig.from_hf(dict(NAMED_SHAPES[name]))
    lm_head = c.vocab_size * c.hidden_size
    linear = c.num_params - lm_head * (1 if c.tie_word_embeddings else 2) + lm_head
    return ModelShape(linear, c.num_layers, c.num_heads, c.head_dim, c.num_kv_heads,
                      c.vocab_size, c.hidden_size)


def simulate(d: Deployment, specs: list[RequestSpec], on_plan=None,
             max_misses: int | None = None, max_concurrency: int | None = None
             ) -> tuple[list[RequestRecord], float]:
    """Records and duration (see Cluster.run for `max_misses` and `max_concurrency`)."""
    latency, _ = latency_model(d)
    instances = []
    for role in d.roles():  # each role with its own limits, as `serve --prefill-...` gives
        limits = {"prefill": d.prefill, "decode": d.decode}.get(role, {})
        memory = {k: v for k, v in limits.items() if k == "gpu_memory_utilization"}
        role_d = dataclasses.replace(d, **memory)
        scheduler = dataclasses.replace(d.scheduler, **{k: v for k, v in limits.items()
                                                        if k not in memory})
        instances.append(SimInstance(with_policy_latency(scheduler, latency),
                                     InstanceConfig(latency_model(role_d)[1], d.block_size),
                                     latency, on_plan, role=role))
    per_token = d.kv_bytes_per_token()

    def transfer(request) -> float:
        return request.num_computed_tokens * per_token / (d.transfer_gb_s * 1e9)

    return Cluster(instances, d.router, d.scheduler.max_model_len, transfer,
                   tropical=d.mode == "tropical").run(specs, max_misses, max_concurrency)


def with_policy_latency(scheduler: SchedulerConfig, latency) -> SchedulerConfig:
    """A policy that prices steps (slice) prices them with the simulated hardware's model,
    unless told otherwise: the steps it plans are the ones the simulator charges."""
    if "latency" in scheduler.policy_options or not prices_steps(scheduler.policy):
        return scheduler
    return dataclasses.replace(scheduler,
                               policy_options={**scheduler.policy_options, "latency": latency})


def plan_log() -> tuple[list[tuple], Any]:
    """A list and a callback that appends each Plan's signature to it (for tests)."""
    log: list[tuple] = []

    def record(plan: Plan) -> None:
        log.append(plan.signature())

    return log, record
