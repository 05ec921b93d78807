"""Every setting of an engine, a scheduler and a cluster: one frozen dataclass each.

This module sits at the bottom of the tree (it imports nothing of sloserve), so the model
loader, the rank processes, the simulator and the CLI all read the same definitions. Each
field's default and help text are the one source of truth: the CLI builds its flags from
them (`sloserve.cli_args`), and `LLM(**kwargs)` sorts keyword arguments into them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where sloserve keeps what it builds once: de-quantized models, CPU kernels."""
    return Path(os.environ.get("SLOSERVE_CACHE") or Path.home() / ".cache" / "sloserve")


DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int4")


def setting(default: Any, help: str, **cli: Any) -> Any:
    """A field with its help text (and CLI hints: choices, aliases, flag) for the CLI."""
    if isinstance(default, (dict, list)):  # mutable: each instance gets its own copy
        return field(default_factory=lambda: type(default)(default),
                     metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = setting(256, "requests running at once")
    max_num_batched_tokens: int = setting(2048, "tokens computed in one step")
    max_model_len: int | None = setting(
        None, "prompt + output tokens of one request (default: the model's context; "
              "in the simulator: no limit)")
    policy: str = setting("fcfs", "scheduling policy (see Policies in the README)")
    policy_options: Mapping[str, Any] = setting({}, "the policy's own knobs", cli=False)
    slo_on_miss: str = setting("reject", "a request whose objective admission control finds "
                                         "out of reach (slice, edf): reject (HTTP 503) or "
                                         "best_effort; a request's slo.on_miss overrides it",
                               choices=("reject", "best_effort"))

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError("max_model_len must be at least 2")
        if self.slo_on_miss not in ("reject", "best_effort"):
            raise ValueError("slo_on_miss must be reject or best_effort")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = setting(None, "HF folder, .gguf file or dummy:SHAPE "
                                      "(default: the embedded SmolLM2-135M-Instruct)")
    dtype: str = setting("auto", "auto: float32 on the CPU, bfloat16 on a GPU", choices=DTYPES)
    device: str = setting("auto", "auto: cuda when available, else cpu")
    quantization: str = setting("none", "int4: 4-bit projection weights in groups of 32, "
                                        "bfloat16 activations (CPU only)",
                                choices=QUANTIZATIONS)
    threads: int | None = setting(None, "CPU threads for the model's kernels (default: "
                                        "torch's, one per physical core)")
    block_size: int = setting(16, "tokens per KV block")
    num_kv_blocks: int | None = setting(None, "KV blocks (default: from the memory settings)")
    kv_cache_memory_gb: float = setting(1.0, "KV cache size on the CPU")
    gpu_memory_utilization: float = setting(
        0.9, "on a GPU: share of its memory for weights, KV cache and activations")
    attention_backend: str = setting("auto", "auto: Triton kernels on CUDA, pure torch "
                                             "elsewhere (or a registered backend's name)")
    enforce_eager: bool = setting(False, "on CUDA: no CUDA graphs for decode steps")
    tensor_parallel_size: int = setting(1, "shard the model over this many processes "
                                           "(GPUs on CUDA)", aliases=("-tp",))
    enable_prefix_caching: bool = setting(True, "reuse the KV of shared prompt prefixes")
    log_stats_interval_s: float = setting(10.0, "seconds between the engine's stats lines in "
                                                "the log (0: none)")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        if self.block_size <= 0 or self.tensor_parallel_size <= 0:
            raise ValueError("block_size and tensor_parallel_size must be positive")
        if self.threads is not None and self.threads <= 0:
            raise ValueError("threads must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    @property
    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Sort flat keyword arguments into this config and its scheduler config; every
        name belongs to exactly one of them."""
        mine = {f.name for f in dataclasses.fields(cls)}
        sched = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = set(kwargs) - mine - sched
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        scheduler = kwargs.pop("scheduler", None) or SchedulerConfig()
        scheduler = dataclasses.replace(
            scheduler, **{k: kwargs.pop(k) for k in list(kwargs) if k in sched})
        return cls(scheduler=scheduler, **kwargs)

    def with_scheduler(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, scheduler=dataclasses.replace(self.scheduler,
                                                                       **changes))


MODES = ("colocated", "disagg", "tropical")
KV_TRANSFERS = ("direct", "object-store")


@dataclass(frozen=True)
class ClusterConfig:
    """Several engine instances behind one front end (sloserve.cluster)."""

    mode: str = setting("disagg", "colocated: identical replicas; disagg: prefill and decode "
                                  "instances; tropical: disagg, decode instances may prefill",
                        choices=MODES)
    replica_spec: tuple[tuple[int, int], ...] = ((1, 1), (1, 1))  # (tp, pp) per instance
    partition_id: int = setting(1, "instances [0, partition-id) prefill, the rest decode")
    engine: EngineConfig = field(default_factory=EngineConfig)  # every instance
    prefill: Mapping[str, Any] = field(default_factory=dict)  # overrides, prefill instances
    decode: Mapping[str, Any] = field(default_factory=dict)  # overrides, decode instances
    ray_address: str | None = setting(None, "join this Ray cluster (default: a local one)")
    latency_profile: str | None = None  # tropical routing's step-time model; None: shipped
    resume_timeout_s: float = 120.0  # how long a dead instance's requests wait to resume
    kv_transfer: str = setting("direct", "direct: a link per prefill/decode pair (NCCL "
                                         "between GPUs, gloo on CPUs); object-store: through "
                                         "host memory and Ray's object store",
                               choices=KV_TRANSFERS)
    router: str = setting("least_queued", "where prompts go (core/router.py)")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.kv_transfer not in KV_TRANSFERS:
            raise ValueError(f"kv transfer must be one of {', '.join(KV_TRANSFERS)}")
        n = len(self.replica_spec)
        if not n:
            raise ValueError("--replica-spec needs at least one instance")
        if self.mode != "colocated" and not 0 < self.partition_id < n:
            raise ValueError(f"--partition-id must be in [1, {n - 1}] for {n} instances "
                             "(at least one prefill and one decode instance)")

    def roles(self) -> list[str]:
        return roles(self.mode, len(self.replica_spec), self.partition_id)

    def instance_engine(self, index: int) -> EngineConfig:
        """Instance `index`'s engine: the shared one with its role's overrides and tp."""
        role = self.roles()[index]
        overrides = {"prefill": self.prefill, "decode": self.decode}.get(role, {})
        engine = dataclasses.replace(self.engine,
                                     tensor_parallel_size=self.replica_spec[index][0])
        sched = {k: v for k, v in overrides.items()
                 if k in {f.name for f in dataclasses.fields(SchedulerConfig)}}
        rest = {k: v for k, v in overrides.items() if k not in sched}
        return dataclasses.replace(engine, **rest).with_scheduler(**sched)


def roles(mode: str, num_instances: int, partition_id: int) -> list[str]:
    """colocated x n, or prefill for [0, partition_id) and decode for the rest."""
    if mode == "colocated":
        return ["colocated"] * num_instances
    return ["prefill" if i < partition_id else "decode" for i in range(num_instances)]


def parse_replica_spec(items: list[str]) -> tuple[tuple[int, int], ...]:
    """["1,1", "1,1"] -> ((1, 1), (1, 1)) (tp, pp per instance)."""
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
    return tuple(spec)
