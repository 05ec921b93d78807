"""One router for the Ray front end and the simulator: for the same burst of prompts, the
real cluster (Ray actors, random-weight engines on the CPU) and the simulated one place every
request on the same instance."""

from __future__ import annotations

import pytest

from sloserve.config import ClusterConfig, EngineConfig, SchedulerConfig
from sloserve.core.latency import LatencyModel
from sloserve.request import SLO, SamplingParams
from sloserve.sim.cluster import Cluster, InstanceConfig, SimInstance
from sloserve.workload.spec import RequestSpec

pytest.importorskip("ray")

LENGTHS = [10, 20, 30, 10, 10, 50, 5, 40, 20, 20, 5, 35, 300, 8]  # ties on queued tokens too
BLOCKS = 64


def real_placement(mode: str, roles: list[str]) -> list[int]:
    from sloserve.cluster.frontend import ClusterEngine

    partition = roles.count("prefill") or 1
    cluster = ClusterEngine(ClusterConfig(
        mode=mode, replica_spec=((1, 1),) * len(roles), partition_id=partition,
        engine=EngineConfig(model="dummy:qwen2-tiny", num_kv_blocks=BLOCKS)))
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        requests = [cluster.make_request([7] * n, params) for n in LENGTHS]
        for request in requests:  # a burst: no poll comes back in between
            cluster.submit(request)
        placed = [cluster.placement[r.request_id] for r in requests]
        while cluster.has_unfinished():
            assert not any(out.error for out in cluster.step())
        return placed
    finally:
        cluster.shutdown()


def simulated_placement(mode: str, roles: list[str]) -> list[int]:
    instances = [SimInstance(SchedulerConfig(), InstanceConfig(BLOCKS), LatencyModel.default(),
                             role=role) for role in roles]
    sim = Cluster(instances, tropical=mode == "tropical")
    sim.run([RequestSpec(i, n, 4, "c", SLO(), arrival=0.0) for i, n in enumerate(LENGTHS)])
    first: dict[str, int] = {}
    for request_id, index in sim.decisions:  # a handoff's decision comes after the prompt's
        first.setdefault(request_id, index)
    return [first[f"sim-{i}"] for i in range(len(LENGTHS))]


@pytest.mark.parametrize("mode,roles", [
    ("colocated", ["colocated"] * 3),
    ("tropical", ["prefill", "prefill", "decode"]),
])
def test_front_end_and_simulator_route_a_burst_alike(local_ray, mode, roles):
    real = real_placement(mode, roles)
    assert real == simulated_placement(mode, roles)
    assert len(set(real)) == len(roles)  # the burst spreads: not a trivial agreement
