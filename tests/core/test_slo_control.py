"""SLO control under load: the token mask across arrivals, the pacing margin, prompts beside
late decodes, admission control. Fake clock, no model."""

from __future__ import annotations

import itertools
import random

import pytest

from sloserve.core.latency import LatencyModel
from sloserve.core.policies.pacing import StepErrorMargin
from sloserve.core.policies.selection import TaskType, busy_time, choose
from sloserve.request import SLO, RequestStatus
from tests.core.factories import make_request, make_scheduler, run_step


def linear_latency(base: float, per_request: float, n: int = 512) -> LatencyModel:
    batches = tuple(range(1, n + 1))
    return LatencyModel(batches, tuple(base + per_request * b for b in batches),
                        (1, 1000), (base, base + per_request * 1000))


def test_selection_finds_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(200):
        types = [TaskType(rng.choice([4.0, 10.0, 20.0, 40.0]), rng.choice([1.0, 3.5, 10.0, 100.0]),
                          rng.randint(0, 6)) for _ in range(rng.randint(1, 4))]
        limit = rng.randint(1, 20)
        base, slope, power = rng.uniform(0.005, 0.05), rng.uniform(5e-4, 0.01), rng.choice([0.7, 1])
        steps = [0.0] + [base + slope * b ** power for b in range(1, limit + 1)]
        capacity = rng.uniform(0.2, 1.0)

        def value(counts):
            return sum(n * t.utility for t, n in zip(types, counts))

        def feasible(counts):
            return sum(counts) <= limit and busy_time(
                [(t.rate, n) for t, n in zip(types, counts)], steps) <= capacity

        best = max(value(c) for c in itertools.product(*(range(t.count + 1) for t in types))
                   if feasible(c))
        got = choose(types, steps, capacity, limit)
        assert feasible(got) and value(got) == pytest.approx(best)


def test_the_mask_holds_a_250ms_task_to_its_share_with_an_arrival_every_step():
    scheduler = make_scheduler(num_blocks=256, policy="slice", policy_options={
        "latency": linear_latency(0.040, 0.0005), "work_conserving": False})  # ~42 ms steps
    scheduler.add(make_request("bg", 4, max_tokens=1000, slo=SLO(tpot_ms=250)))
    run_step(scheduler, 0.0)
    decoded, now = 0, 0.0
    for step in range(42):  # 2.1 s of 50 ms steps, each with a new short real-time task
        now += 0.05
        scheduler.add(make_request(f"rt{step}", 4, max_tokens=3, arrival=now,
                                   slo=SLO(tpot_ms=50, realtime=True)))
        decoded += sum(c.request.request_id == "bg" for c in run_step(scheduler, now).chunks)
    # its share: 4 tok/s plus the margin (5 ones per cycle of ~21 columns), not every step
    assert 8 <= decoded <= 11
    assert scheduler.get("bg").tpot < 0.25


def test_the_pacing_margin_is_the_p90_of_recent_prediction_errors():
    margin = StepErrorMargin(quantile=0.9, window=100, floor=0.0)
    for i in range(100):
        margin.observe(predicted=0.010, measured=0.010 * (1 + i / 1000))  # 0% .. 9.9% over
    assert margin.value == pytest.approx(0.090, abs=2e-3)
    for _ in range(100):  # the window forgets: steps now run exactly as predicted
        margin.observe(0.010, 0.010)
    assert margin.value == pytest.approx(0.0, abs=1e-9)


def test_slice_paces_tokens_ahead_of_the_objective_by_its_margin():
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": linear_latency(0.005, 0.001)})
    policy = scheduler.policy
    request = make_request("rt", 4, max_tokens=100, slo=SLO(tpot_ms=100, realtime=True))
    request.first_token_time, request.output_token_ids = 0.0, [7] * 5
    run_step(scheduler, 0.0)  # each step reads the margin once
    assert policy.pace_deadline(request) == pytest.approx(5 * 0.100 * 0.98)  # the floor: 2%
    for _ in range(50):  # steps run 20% over the model's prediction
        policy.steps.margin.observe(0.010, 0.012)
    run_step(scheduler, 0.1)
    assert policy.pace_deadline(request) == pytest.approx(5 * 0.100 * 0.80)


def test_a_prompt_gets_room_beside_a_decode_that_is_already_late():
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": linear_latency(0.005, 0.001)})
    scheduler.add(make_request("late", 4, max_tokens=100, slo=SLO(tpot_ms=50, realtime=True)))
    run_step(scheduler, 0.0)
    run_step(scheduler, 3.0)  # a stall: 'late' is now 3 s behind its 50 ms pace
    scheduler.add(make_request("new", 64, max_tokens=4, arrival=3.0,
                               slo=SLO(ttft_ms=500, tpot_ms=100)))
    plan = run_step(scheduler, 3.01)
    chunks = {c.request.request_id: c.num_tokens for c in plan.chunks}
    assert chunks["late"] == 1 and chunks.get("new", 0) > 0
    # the chunk keeps the step within one pace of the tightest task in it
    assert scheduler.policy.steps.latency.step_time(plan) <= 0.050


@pytest.mark.parametrize("policy", ["edf", "slice"])
def test_admission_control_turns_away_what_the_queue_cannot_serve_in_time(policy):
    # One seat; each request holds it for 10 steps of ~15 ms: ~6 requests/s leave the queue.
    # Arrivals come at 20/s with a 1 s TTFT: most must be refused, at once, and every
    # admitted one meets its TTFT.
    scheduler = make_scheduler(num_blocks=512, policy=policy, max_num_seqs=1,
                               policy_options={"latency": linear_latency(0.014, 0.001)})
    requests, now = [], 0.0
    while now < 3.0 or scheduler.has_unfinished():
        while len(requests) < 60 and 0.05 * len(requests) <= now:
            request = make_request(f"r{len(requests)}", 4, max_tokens=10,
                                   arrival=0.05 * len(requests), slo=SLO(ttft_ms=1000))
            scheduler.add(request)
            requests.append((request, request.status == RequestStatus.FINISHED_REJECTED))
        run_step(scheduler, now)
        now += 0.015
    served = [r for r, _ in requests if r.status != RequestStatus.FINISHED_REJECTED]
    assert sum(at_once for _, at_once in requests) >= 20
    assert len(served) >= 15 and all(r.ttft <= 1.0 for r in served)
    assert scheduler.blocks.num_used_blocks == 0


def test_best_effort_is_served_after_on_time_work_instead_of_rejected():
    scheduler = make_scheduler(num_blocks=64, policy="edf", max_num_seqs=1,
                               policy_options={"latency": linear_latency(0.014, 0.001)})
    hopeless = make_request("hopeless", 4, max_tokens=2, arrival=0.0,
                            slo=SLO(ttft_ms=1, on_miss="best_effort"))
    scheduler.add(hopeless)
    scheduler.add(make_request("on-time", 4, max_tokens=2, arrival=0.0, slo=SLO(ttft_ms=500)))
    assert hopeless.best_effort and hopeless.status == RequestStatus.WAITING
    order = []
    now = 0.0
    while scheduler.has_unfinished():
        order += [c.request.request_id for c in run_step(scheduler, now).chunks
                  if c.start == 0]
        now += 0.015
    assert order == ["on-time", "hopeless"]


def test_no_request_is_refused_while_capacity_is_free():
    scheduler = make_scheduler(num_blocks=512, policy="slice", max_num_seqs=64,
                               policy_options={"latency": linear_latency(0.005, 0.0005)})
    now = 0.0
    for i in range(200):  # 10 requests/s, each done in well under a second
        scheduler.add(make_request(f"r{i}", 8, max_tokens=8, arrival=now,
                                   slo=SLO(ttft_ms=200, tpot_ms=50, realtime=i % 3 == 0)))
        for _ in range(10):
            assert not run_step(scheduler, now).rejected
            now += 0.01


def test_prompts_still_move_where_decoding_nearly_fills_every_pace():
    # two real-time decodes take 98 ms of their 100 ms pace on this (slow) machine; a prompt
    # token costs ~1 ms: without a floor the newcomer's prompt would never get room
    batches = tuple(range(1, 9))
    latency = LatencyModel(batches, tuple(0.035 + 0.0315 * b for b in batches), (1, 512),
                           (0.035, 0.547))
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": latency, "admission_control": False, "ratio": 1.0})
    for i in range(2):
        scheduler.add(make_request(f"rt{i}", 4, max_tokens=100,
                                   slo=SLO(tpot_ms=100, realtime=True)))
    run_step(scheduler, 0.0)
    scheduler.add(make_request("new", 64, max_tokens=4, arrival=0.1,
                               slo=SLO(ttft_ms=2000, tpot_ms=2000)))
    now, first_token = 0.1, None
    while first_token is None and now < 5.0:
        run_step(scheduler, now)
        now += 0.1
        first_token = scheduler.get("new").first_token_time
    assert first_token is not None and first_token < 1.0


def test_slice_never_idles_with_work_queued_even_when_no_task_fits_the_cycle():
    # one decode step takes 100 ms: no 20 tok/s task fits, best effort or not
    scheduler = make_scheduler(policy="slice", policy_options={
        "latency": linear_latency(0.095, 0.005), "admission_control": False})
    requests = [make_request(f"r{i}", 4, max_tokens=3, slo=SLO(tpot_ms=50)) for i in range(3)]
    requests[2].best_effort = True
    for r in requests:
        scheduler.add(r)
    now = 0.0
    while scheduler.has_unfinished() and now < 10:
        run_step(scheduler, now)
        now += 0.1
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in requests)
