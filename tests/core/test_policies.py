"""Each policy's defining behaviour, with a fake clock and no model."""

from __future__ import annotations

import math

import pytest

from sloserve.core.latency import LatencyModel
from sloserve.core.policies import make_policy
from sloserve.core.policies.slice import SlicePolicy
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


def test_slice_serves_the_set_of_highest_utility_not_the_greedy_one():
    # One 25 ms task (40 tok/s) worth 30 or twelve 250 ms tasks (4 tok/s) worth 10 each:
    # l(b) = 0.01 + 0.01 b, so the fast one alone keeps the decoder busy 0.8 s of each
    # second and no slow one fits beside it; the twelve together take 0.52 s. Greedy by
    # utility x rate took the fast one (30); the optimum is the twelve (120).
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": linear_latency(), "admission_control": False})
    scheduler.add(make_request("fast", 4, slo=SLO(tpot_ms=25, utility=30)))
    for i in range(12):
        scheduler.add(make_request(f"slow{i}", 4, slo=SLO(tpot_ms=250, utility=10)))
    run_step(scheduler, 0.0)
    assert scheduler.policy.quota == {(40.0, 30.0, math.inf): 0, (4.0, 10.0, math.inf): 12}
    assert scheduler.get("fast").status == RequestStatus.WAITING


@pytest.mark.parametrize("realtime_utility, served_realtime", [(1, 0), (10, 3), (100, 3)])
def test_slice_realtime_utility_decides_between_realtime_and_background(
        realtime_utility, served_realtime):
    # Three real-time tasks at 20 tok/s and twenty background ones at 4 tok/s cannot all
    # be decoded at their rates (l(b) = 0.01 + 0.01 b, ratio 0.9): all 20 background ones fit
    # (worth 20), or 3 real-time + 2 background (3u + 2). At u = 1 the background set wins;
    # at the seed's 10-100x the real-time tasks do.
    policy = SlicePolicy(realtime_utility=realtime_utility, latency=linear_latency(),
                         admission_control=False)
    for i in range(3):
        policy.on_arrival(make_request(f"rt{i}", 4, slo=SLO(tpot_ms=50, realtime=True)))
    for i in range(20):
        policy.on_arrival(make_request(f"bg{i}", 4, slo=SLO(tpot_ms=250)))
    quota = policy.solve(limit=64)
    assert quota[(20.0, float(realtime_utility), math.inf)] == served_realtime


def test_slice_never_selects_a_task_the_cycle_cannot_hold_and_still_tries_the_rest():
    # l(1) = 55 ms: a 25 ms task would need 2.2 s of decoding per second. Of forty real-time
    # tasks at 10 tok/s, four fit (10 x l(4) = 0.85 s); five background tasks at 1 tok/s
    # fill what they leave (0.01 s each).
    latency = linear_latency(0.045, 0.01)
    policy = SlicePolicy(latency=latency, admission_control=False)
    policy.on_arrival(make_request("impossible", 4, slo=SLO(tpot_ms=25, realtime=True)))
    for i in range(40):
        policy.on_arrival(make_request(f"rt{i}", 4, slo=SLO(tpot_ms=100, realtime=True)))
    for i in range(10):
        policy.on_arrival(make_request(f"bg{i}", 4, slo=SLO(tpot_ms=1000)))
    quota = policy.solve(limit=64)
    assert quota[(40.0, 10.0, math.inf)] == 0
    assert quota[(10.0, 10.0, math.inf)] == 4 and quota[(1.0, 1.0, math.inf)] == 5


def test_slice_decodes_a_50ms_task_twice_as_often_as_a_100ms_one():
    # l(1) = 30 ms, l(2) = 55 ms: the pair is feasible at these rates (0.85 s of decoding per
    # second), but the slow task never fits into the fast one's columns for free. The mask
    # carries each rate plus the 2% pacing margin: 21 and 11 tokens per 1 s cycle.
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": linear_latency(0.005, 0.025), "period_ms": 1000.0})
    fast = make_request("fast", 4, max_tokens=500, slo=SLO(tpot_ms=50, realtime=True))
    slow = make_request("slow", 4, max_tokens=500, slo=SLO(tpot_ms=100))
    scheduler.add(fast)
    scheduler.add(slow)
    run_step(scheduler, 0.0)  # both prefills
    mask = scheduler.policy.mask
    counts = {"fast": 0, "slow": 0}
    for step in range(21):  # exactly one cycle of 47.6 ms steps; the first makes the mask
        for c in run_step(scheduler, (step + 1) / 21).chunks:
            counts[c.request.request_id] += 1
        assert mask.num_columns == 21 and len(mask.rows["slow"]) == 11
    assert counts == {"fast": 21, "slow": 11}


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
