"""The simulator: same Plans as the engine, no torch, routers, CLI and goodput search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sloserve.config import SchedulerConfig
from sloserve.core.latency import LatencyModel
from sloserve.core.plan import Plan, ScheduledChunk
from sloserve.core.policies import make_policy
from sloserve.request import SLO, SamplingParams
from sloserve.sim.cluster import SAMPLED_TOKEN, Cluster, InstanceConfig, SimInstance, VirtualClock
from sloserve.sim.run import (
    Deployment,
    latency_model,
    plan_log,
    simulate,
    with_policy_latency,
)
from sloserve.worker.model_runner import PendingTokens
from sloserve.workload.spec import RequestSpec, build, load
from tests.core.factories import make_request

LATENCY = LatencyModel((1, 8, 64), (0.02, 0.03, 0.09), (64, 512), (0.03, 0.12))


def specs(n: int = 24) -> list[RequestSpec]:
    out = []
    for i in range(n):
        slo = SLO(tpot_ms=60 if i % 3 == 0 else 200, realtime=i % 3 == 0, ttft_ms=2000)
        out.append(RequestSpec(i, 20 + 37 * i % 150, 8 + 5 * i % 30, "c", slo,
                               arrival=0.013 * i * (i % 4)))
    return out


class StandInRunner:
    """Runs no model: advances the virtual clock by the latency model, samples a fixed token."""

    def __init__(self, clock: VirtualClock, log: list):
        self.clock, self.log = clock, log

    def execute(self, plan):
        if plan.is_empty:
            return {}
        self.log.append(plan.signature())
        self.clock.now += LATENCY.step_time(plan)
        return {c.request.request_id: SAMPLED_TOKEN for c in plan.chunks if c.sample}

    def launch(self, plan):
        return PendingTokens(list(tokens := self.execute(plan)), torch.tensor(
            list(tokens.values()), dtype=torch.long))

    def release(self, request_id):
        pass


def engine_plans(config: SchedulerConfig, requests: list[RequestSpec], num_blocks: int):
    """Drive the real LLMEngine through the simulator's event rules, on a virtual clock."""
    from sloserve.config import EngineConfig
    from sloserve.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="dummy:qwen2-tiny", num_kv_blocks=num_blocks,
                                    enable_prefix_caching=False, scheduler=config))
    clock, log = VirtualClock(), []
    engine.clock, engine.runner = clock, StandInRunner(clock, log)
    pending = sorted(requests, key=lambda s: s.arrival)
    i = 0
    while i < len(pending) or engine.has_unfinished():
        if i < len(pending) and (not engine.has_unfinished() or pending[i].arrival <= clock.now):
            spec = pending[i]
            if not engine.has_unfinished():
                clock.now = max(clock.now, spec.arrival)
            params = SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True)
            engine.add_request(list(range(spec.prompt_len)), params, spec.slo,
                               f"sim-{spec.index}", arrival_time=spec.arrival)
            i += 1
            continue
        engine.step()
    return log


@pytest.mark.parametrize("policy, budget", [("fcfs", 2048), ("chunked", 64), ("slice", 2048)])
def test_engine_and_simulator_make_identical_plans(policy, budget):
    options = {"latency": LATENCY} if policy == "slice" else {}
    config = SchedulerConfig(max_num_batched_tokens=budget, max_model_len=2048, policy=policy,
                             policy_options=options)
    requests = specs()
    log, record = plan_log()
    # 40 blocks of 16 tokens: too few for everyone, so preemption is part of the story
    instance = SimInstance(config, InstanceConfig(40, 16), LATENCY, record)
    records, _ = Cluster([instance], max_model_len=2048).run(requests)
    assert all(r.ok for r in records) and len(log) > 20
    assert any(preempted for _, preempted in log) or policy == "slice"
    assert engine_plans(config, requests, 40) == log


@pytest.mark.parametrize("policy", ["fcfs", "chunked", "edf"])
def test_fast_forward_changes_nothing_but_speed(policy):
    # edf prices steps for admission control: with the simulator's own model (as simulate()
    # gives it) the steps it learns from are the ones fast-forward skips, unchanged.
    config = with_policy_latency(SchedulerConfig(max_num_batched_tokens=256, max_model_len=2048,
                                                 policy=policy), LATENCY)
    requests = [RequestSpec(i, 30 + 7 * i, 40 + 13 * i % 50, "c", SLO(ttft_ms=500, tpot_ms=40),
                            arrival=0.4 * i) for i in range(30)]
    results = []
    for fast in (False, True):
        instance = SimInstance(config, InstanceConfig(60, 16), LATENCY, fast_forward=fast)
        results.append(Cluster([instance]).run(requests))
    (slow, slow_end), (fast, fast_end) = results
    assert fast_end == pytest.approx(slow_end)
    for a, b in zip(slow, fast):
        assert (a.output_tokens, a.slo_class) == (b.output_tokens, b.slo_class)
        assert a.error == b.error  # e.g. rejected by admission control in both
        for field in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
            expected = getattr(a, field)
            assert getattr(b, field) == (expected if expected is None else
                                         pytest.approx(expected, rel=1e-9, abs=1e-6))


def test_sim_and_core_import_without_torch():
    code = ("import sys, sloserve.sim, sloserve.core, sloserve.sim.command; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("router", ["least_queued", "round_robin", "least_loaded"])
def test_instances_share_the_load(router):
    instances = [SimInstance(SchedulerConfig(), InstanceConfig(400), LATENCY) for _ in range(2)]
    served = {0: 0, 1: 0}
    for k, x in enumerate(instances):
        x.scheduler.add = (lambda add, k: lambda r: (served.__setitem__(k, served[k] + 1),
                                                     add(r)))(x.scheduler.add, k)
    records, _ = Cluster(instances, router).run(specs(20))
    assert all(r.ok for r in records) and served[0] + served[1] == 20
    assert abs(served[0] - served[1]) <= 4


def sloserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sloserve.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_sim_cli_sweep_and_goodput_search(tmp_path):
    done = sloserve("sim", "--workload", "edge", "--num-requests", "60", "--policy", "slice",
                    "--goodput-search", "--request-rate", "1", "--out", str(tmp_path / "search"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    best = summary["max_rate_meeting_target"]
    rates = {float(r): s["slo_attainment"] for r, s in summary["rates"].items()}
    assert best is not None and rates[best] >= 0.9
    assert any(r > best and a < 0.9 for r, a in rates.items())
    sweep = sloserve("sim", "--workload", "mooncake", "--num-requests", "200", "--gpu", "h200",
                     "--time-scale", "1.0", "--out", str(tmp_path / "trace"))
    assert sweep.returncode == 0, sweep.stderr
    both = sloserve("bench", "compare", str(tmp_path / "search"), str(tmp_path / "trace"),
                    "--out", str(tmp_path / "cmp"))
    assert both.returncode == 0 and (tmp_path / "cmp" / "attainment_vs_rate.png").exists()


def test_workload_reuses_mooncake_timestamps_in_laps():
    requests = build(load("mooncake"), 12100, with_text=False, time_scale=0.5)
    assert requests[12031].arrival > requests[12030].arrival > requests[0].arrival == 0.0


def test_disaggregated_topology_hands_kv_over_after_the_first_token():
    """1 prefill + 1 decode instance: every request gets its first token on the prefill side,
    the rest on the decode side after the transfer time; blocks come back on both."""
    roles = ["prefill", "decode"]
    instances = [SimInstance(SchedulerConfig(), InstanceConfig(400), LATENCY, role=role)
                 for role in roles]
    decoded = []
    add_remote = instances[1].scheduler.add_remote
    instances[1].scheduler.add_remote = lambda r: (
        decoded.append((r.request_id, r.num_output_tokens, r.num_computed_tokens)),
        add_remote(r))[1]
    transfer = 0.5  # seconds: large, so that it shows in every TPOT
    records, _ = Cluster(instances, "round_robin", transfer=lambda r: transfer).run(specs(12))
    assert all(r.ok for r in records)
    multi = [s for s in specs(12) if s.max_tokens > 1]
    assert sorted(d[0] for d in decoded) == sorted(f"sim-{s.index}" for s in multi)
    assert all(out == 1 and computed == s.prompt_len
               for (_, out, computed), s in zip(sorted(decoded), sorted(
                   multi, key=lambda s: f"sim-{s.index}")))
    by_index = {r.index: r for r in records}
    # the second token waits for the KV: at least the transfer time after the first
    assert all(by_index[s.index].e2e_ms - by_index[s.index].ttft_ms >= transfer * 1e3
               for s in multi)
    assert all(x.scheduler.blocks.num_used_blocks == 0 and not x.scheduler.remote
               for x in instances)


@pytest.mark.parametrize("tpot_ms,takes_second_wave", [(200, True), (20, False)])
def test_tropical_decode_instance_takes_prompts_within_its_tpot_slack(tpot_ms, takes_second_wave):
    latency = LatencyModel((1, 8, 64), (0.02, 0.03, 0.09), (64, 4096), (0.03, 1.0))
    instances = [SimInstance(SchedulerConfig(), InstanceConfig(400), latency, role=role)
                 for role in ("prefill", "decode")]
    direct = []
    add = instances[1].scheduler.add  # a prompt added to the decode instance, not a handoff
    instances[1].scheduler.add = lambda r: (direct.append(r.arrival_time), add(r))[1]
    slo = SLO(tpot_ms=tpot_ms)  # 20 ms: below the decode step, no slack to give
    first = [RequestSpec(i, 150, 60, "c", slo, arrival=0.0) for i in range(4)]
    second = [RequestSpec(4 + i, 150, 10, "c", slo, arrival=0.5) for i in range(16)]
    records, _ = Cluster(instances, "round_robin", tropical=True).run(first + second)
    assert not any(r.error for r in records)
    assert all(x.scheduler.blocks.num_used_blocks == 0 for x in instances)
    from_second = [t for t in direct if t >= 0.5]
    if takes_second_wave:  # sooner than queueing behind the prefill instance, but not all
        assert 0 < len(from_second) < len(second)
        assert all(r.ok for r in records)
    else:
        assert from_second == []


def test_slice_prices_a_mixed_step_as_the_simulated_gpu_charges_it():
    d = Deployment(gpu="h200", scheduler=SchedulerConfig(policy="slice"))
    latency, _ = latency_model(d)
    policy = make_policy("slice", **with_policy_latency(d.scheduler, latency).policy_options)
    assert policy.steps.latency is latency
    prompt = make_request("p", 2048)
    decodes = [make_request(f"d{i}", latency.decode_context - 1) for i in range(64)]
    for r in decodes:
        r.output_token_ids = [1]
    plan = Plan(0.0, [ScheduledChunk(r, r.num_prompt_tokens, 1, True) for r in decodes]
                + [ScheduledChunk(prompt, 0, 512, False)])
    predicted = policy.steps.mixed_step_time(64, 64 * 1024, 512)
    assert predicted == pytest.approx(latency.step_time(plan), rel=0.02)


def test_sim_caps_requests_in_flight_as_the_bench_client_does():
    specs = [RequestSpec(i, 64, 8, "c", SLO(), arrival=0.0) for i in range(5)]
    records, _ = simulate(Deployment(), specs, max_concurrency=1)
    spans = sorted((r.send_time, r.send_time + r.e2e_ms / 1e3) for r in records)
    assert all(r.ok for r in records)
    assert all(start >= end - 1e-9 for (_, end), (start, _) in zip(spans, spans[1:]))


def test_sim_takes_per_role_limits_as_serve_does():
    specs = [RequestSpec(i, 64, 16, "c", SLO(), arrival=0.01 * i) for i in range(8)]
    plans = []
    d = Deployment(num_instances=2, mode="disagg", decode={"max_num_seqs": 1})
    records, _ = simulate(d, specs, on_plan=lambda plan: plans.append(plan))
    decode_steps = [p for p in plans if all(c.is_decode for c in p.chunks)]
    assert all(r.ok for r in records) and decode_steps
    assert max(len(p.chunks) for p in decode_steps) == 1


def test_an_all_at_once_run_is_labelled_a_burst_with_its_duration(tmp_path):
    done = sloserve("sim", "--workload", "edge", "--num-requests", "20", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()[:2]
    assert "duration" in header and "20 at once" in row and "req/s" not in row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["max_rate_meeting_target"] is None  # a burst is not a rate
