"""Each policy's defining behaviour, with a fake clock and no model."""

from __future__ import annotations

import pytest

from sloserve.core.latency import LatencyModel
from sloserve.core.policies import make_policy
from sloserve.core.policies.slice import SlicePolicy, cycle_time
from sloserve.request import SLO, RequestStatus
from tests.core.factories import make_request, make_scheduler, run_step


def test_unknown_policy_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown policy 'nope'.*fcfs"):
        make_policy("nope")


def test_fcfs_breaks_arrival_ties_by_priority():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add(make_request("low", 4, arrival=1.0, priority=5))
    scheduler.add(make_request("high", 4, arrival=1.0, priority=0))
    plan = run_step(scheduler, 2.0)
    assert [c.request.request_id for c in plan.chunks] == ["high"]


def test_delay_holds_prompts_until_threshold_then_admits_the_batch():
    scheduler = make_scheduler(policy="delay", policy_options={"delay_factor": 1.0})
    scheduler.add(make_request("first", 4, max_tokens=50, arrival=0.0))
    plan = run_step(scheduler, 0.0)  # nothing running: admitted at once
    scheduler.policy.observe(plan, step_time=2.0)  # that prompt step took 2 s
    scheduler.add(make_request("a", 4, arrival=1.0))
    assert [c.request.request_id for c in run_step(scheduler, 2.0).chunks] == ["first"]
    scheduler.add(make_request("b", 4, arrival=2.5))
    assert [c.request.request_id for c in run_step(scheduler, 2.9).chunks] == ["first"]
    admitted = [c.request.request_id for c in run_step(scheduler, 3.0).chunks]
    assert admitted == ["first", "a", "b"]  # a waited 2 s = 1.0 x 2 s: both go together


@pytest.mark.parametrize("policy", ["fcfs", "delay"])
def test_preempted_resume_before_new_ones_in_preemption_order(policy):
    # 9 blocks of 4: three 8-token prompts growing to 28 tokens cannot all stay.
    scheduler = make_scheduler(num_blocks=9, block_size=4, policy=policy, prefix_caching=False)
    for i, name in enumerate("ABC"):
        scheduler.add(make_request(name, 8, max_tokens=20, arrival=float(i)))
    preempted, now = [], 0.0
    while len(preempted) < 2:
        plan = run_step(scheduler, now)
        preempted += plan.preempted
        now += 1
    scheduler.add(make_request("new", 4, max_tokens=2, arrival=now))
    order = {}
    while scheduler.has_unfinished():
        plan = run_step(scheduler, now)
        for c in plan.chunks:
            if c.start == 0 and c.request.request_id not in order:
                order[c.request.request_id] = now
        now += 1
    first, second = preempted[:2]
    assert order[first] <= order[second] < order["new"]
    assert scheduler.blocks.num_used_blocks == 0


def test_chunked_keeps_every_decode_and_splits_long_prompts():
    scheduler = make_scheduler(policy="chunked", max_num_batched_tokens=8)
    for name in ("x", "y"):
        scheduler.add(make_request(name, 3, max_tokens=30))
    run_step(scheduler, 0.0)
    scheduler.add(make_request("long", 40, max_tokens=2))
    chunks_of_long = []
    for step in range(1, 9):
        plan = run_step(scheduler, float(step))
        ids = [c.request.request_id for c in plan.chunks]
        assert ids[:2] == ["x", "y"]  # the running decodes, every step, first
        chunks_of_long += [c.num_tokens for c in plan.chunks if c.request.request_id == "long"]
    assert chunks_of_long[:6] == [6, 6, 6, 6, 6, 6] and sum(chunks_of_long) >= 40


def linear_latency(base: float = 0.01, per_request: float = 0.01, n: int = 64) -> LatencyModel:
    batches = tuple(range(1, n + 1))
    return LatencyModel(batches, tuple(base + per_request * b for b in batches), (1,), (0.01,))


def test_slice_selects_realtime_first_and_rejects_an_infeasible_set():
    # Each task needs 10 tokens/s; l(b) = 0.01 + 0.01 b, so b tasks keep the decoder busy
    # 10 x l(b) of each second: 0.2, 0.3, 0.4 ... With ratio 0.35 only two fit.
    policy = SlicePolicy(ratio=0.35, latency=linear_latency())
    slo = SLO(tpot_ms=100)
    tasks = [make_request(f"n{i}", 4, arrival=i, slo=slo) for i in range(3)]
    realtime = make_request("rt", 4, arrival=9.0, slo=SLO(tpot_ms=100, realtime=True))
    selected = policy.select([*tasks, realtime])
    assert [r.request_id for r in selected] == ["rt", "n0"]
    rates = [policy.rate(r) for r in selected]
    assert cycle_time(rates, policy.latency) <= 0.35 < cycle_time(rates + [10.0], policy.latency)


def test_slice_decodes_a_50ms_task_twice_as_often_as_a_100ms_one():
    # l(1) = 30 ms, l(2) = 55 ms: the pair is feasible at these rates (0.85 s of decoding per
    # second), but the slow task never fits into the fast one's columns for free.
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": linear_latency(0.005, 0.025), "period_ms": 1000.0})
    fast = make_request("fast", 4, max_tokens=500, slo=SLO(tpot_ms=50, realtime=True))
    slow = make_request("slow", 4, max_tokens=500, slo=SLO(tpot_ms=100))
    scheduler.add(fast)
    scheduler.add(slow)
    run_step(scheduler, 0.0)  # both prefills
    policy = scheduler.policy
    assert policy.num_columns == 20 and len(policy.rows["slow"]) == 10
    counts = {"fast": 0, "slow": 0}
    for step in range(policy.num_columns):  # exactly one cycle
        for c in run_step(scheduler, 1.0 + step).chunks:
            counts[c.request.request_id] += 1
    assert counts == {"fast": 20, "slow": 10}


def test_slice_fills_spare_room_in_a_step_with_unmarked_tasks():
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": linear_latency(0.001, 0.001)})  # fast steps: room for everyone
    for name, tpot in (("fast", 50), ("slow", 100)):
        scheduler.add(make_request(name, 4, max_tokens=500, slo=SLO(tpot_ms=tpot)))
    run_step(scheduler, 0.0)
    counts = {"fast": 0, "slow": 0}
    for step in range(20):  # 10 ms steps: both tasks stay ahead of their pace
        for c in run_step(scheduler, 0.01 * (step + 1)).chunks:
            counts[c.request.request_id] += 1
    assert counts == {"fast": 20, "slow": 20}


def test_slice_pauses_unselected_tasks_and_resumes_them_when_capacity_frees():
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": linear_latency(), "ratio": 0.25})  # room for one 10 token/s task
    scheduler.add(make_request("rt", 4, max_tokens=3, slo=SLO(tpot_ms=100, realtime=True)))
    scheduler.add(make_request("bg", 4, max_tokens=3, slo=SLO(tpot_ms=100)))
    first = run_step(scheduler, 0.0)
    assert [c.request.request_id for c in first.chunks] == ["rt"]
    assert scheduler.get("bg").status == RequestStatus.WAITING
    now = 1.0
    while scheduler.has_unfinished():
        run_step(scheduler, now)
        now += 0.1
    assert scheduler.blocks.num_used_blocks == 0


def test_edf_serves_the_tightest_deadline_first_and_preempts_the_most_slack():
    scheduler = make_scheduler(policy="edf", max_num_seqs=1)
    for name, ttft in (("loose", 500), ("tight", 100), ("middle", 300)):
        scheduler.add(make_request(name, 4, max_tokens=1, slo=SLO(ttft_ms=ttft)))
    served = []
    for step in range(3):
        served += [c.request.request_id for c in run_step(scheduler, step * 0.01).chunks]
    assert served == ["tight", "middle", "loose"]
    policy = scheduler.policy
    relaxed = make_request("relaxed", 4, slo=SLO(ttft_ms=900))
    urgent = make_request("urgent", 4, slo=SLO(ttft_ms=50))
    assert policy.pick_victim([urgent, relaxed], 0.0) is relaxed
