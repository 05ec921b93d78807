"""What the tuner searches: a Candidate is one complete serving configuration (policy and its
knobs, batch limits, layout); the coarse grid spans the space, `neighbours` refines it."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sloserve.config import SchedulerConfig
from sloserve.core.policies import policy_names

# Each policy's knobs worth trying, as (argument, values); the first value is the default.
POLICY_KNOBS: dict[str, tuple[tuple[str, tuple[float, ...]], ...]] = {
    "delay": (("delay_factor", (0.5, 0.1, 2.0)),),
    "slice": (("ratio", (0.9, 0.75)), ("period_ms", (1000.0, 500.0))),
}
MAX_NUM_SEQS = (16, 32, 64, 128, 256)
MAX_NUM_BATCHED_TOKENS = (512, 1024, 2048, 8192)


@dataclass(frozen=True, order=True)
class Candidate:
    policy: str
    options: tuple[tuple[str, Any], ...] = ()  # the policy's knobs, sorted
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    mode: str = "colocated"  # colocated | disagg | tropical
    num_instances: int = 1
    partition_id: int = 1  # disagg / tropical: instances [0, partition_id) prefill

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               policy=self.policy, policy_options=dict(self.options))

    def describe(self) -> str:
        knobs = "".join(f" {k}={v:g}" for k, v in self.options)
        layout = "" if self.num_instances == 1 else (
            f" {self.mode} x{self.num_instances}" if self.mode == "colocated"
            else f" {self.mode} {self.partition_id}P+{self.num_instances - self.partition_id}D")
        return (f"{self.policy}{knobs} seqs={self.max_num_seqs} "
                f"tokens={self.max_num_batched_tokens}{layout}")

    def flags(self) -> list[str]:
        """`sloserve serve` flags that run this candidate."""
        out = ["--policy", self.policy, "--max-num-seqs", str(self.max_num_seqs),
               "--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        for key, value in self.options:
            out += ["--policy-option", f"{key}={value:g}"]
        if self.num_instances > 1:
            out += ["--mode", self.mode, "--replica-spec", *["1,1"] * self.num_instances]
            if self.mode != "colocated":
                out += ["--partition-id", str(self.partition_id)]
        return out

    def config_file(self) -> dict[str, Any]:
        """What `sloserve serve --config FILE` reads (flag names, underscores)."""
        body: dict[str, Any] = {"policy": self.policy, "max_num_seqs": self.max_num_seqs,
                                "max_num_batched_tokens": self.max_num_batched_tokens}
        if self.options:
            body["policy_options"] = dict(self.options)
        if self.num_instances > 1:
            body.update(mode=self.mode, replica_spec=["1,1"] * self.num_instances)
            if self.mode != "colocated":
                body["partition_id"] = self.partition_id
        return body


def default_candidate() -> Candidate:
    """What `sloserve serve` runs when given nothing."""
    return Candidate(SchedulerConfig.policy)


def layouts(num_gpus: int) -> list[tuple[str, int, int]]:
    """(mode, instances, partition) for this many GPUs, one instance per GPU."""
    if num_gpus == 1:
        return [("colocated", 1, 1)]
    split = [(mode, num_gpus, p) for mode in ("disagg", "tropical") for p in range(1, num_gpus)]
    return [("colocated", num_gpus, 1), *split]


def policy_variants(policies: Iterable[str]) -> Iterator[tuple[str, tuple]]:
    for policy in policies:
        knobs = POLICY_KNOBS.get(policy, ())
        names = [name for name, _ in knobs]
        for values in itertools.product(*(v for _, v in knobs)):
            yield policy, tuple(sorted(zip(names, values)))


def coarse_grid(policies: Iterable[str] | None = None, num_gpus: int = 1,
                max_num_seqs: Iterable[int] = MAX_NUM_SEQS,
                max_num_batched_tokens: Iterable[int] = MAX_NUM_BATCHED_TOKENS
                ) -> list[Candidate]:
    policies = list(policies or policy_names())
    grid = itertools.product(policy_variants(policies), max_num_seqs, max_num_batched_tokens,
                             layouts(num_gpus))
    return [Candidate(policy, options, seqs, tokens, mode, n, p)
            for (policy, options), seqs, tokens, (mode, n, p) in grid]


def neighbours(c: Candidate) -> list[Candidate]:
    """One step along each axis: batch limits halved and doubled, each knob's other values,
    and, with several instances, the split moved by one."""
    out = [dataclasses.replace(c, max_num_seqs=s) for s in (c.max_num_seqs // 2,
                                                              c.max_num_seqs * 2) if s >= 1]
    out += [dataclasses.replace(c, max_num_batched_tokens=t)
            for t in (c.max_num_batched_tokens // 2, c.max_num_batched_tokens * 2) if t >= 64]
    options = dict(c.options)
    for name, values in POLICY_KNOBS.get(c.policy, ()):
        for value in values:
            if value != options.get(name):
                out.append(dataclasses.replace(
                    c, options=tuple(sorted({**options, name: value}.items()))))
    if c.mode != "colocated":
        out += [dataclasses.replace(c, partition_id=p) for p in (c.partition_id - 1,
                                                                 c.partition_id + 1)
                if 0 < p < c.num_instances]
    return out
