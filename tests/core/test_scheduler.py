"""The scheduler mechanism with the fcfs policy, a fake clock and no model."""

from __future__ import annotations

import pytest

from sloserve.request import RequestStatus
from tests.core.factories import make_request, make_scheduler, run_step


def run_to_end(scheduler, start: float = 0.0, limit: int = 1000) -> list:
    plans, now = [], start
    while scheduler.has_unfinished() and len(plans) < limit:
        plans.append(run_step(scheduler, now))
        now += 1.0
    assert not scheduler.has_unfinished()
    return plans


def test_admits_in_arrival_order_within_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    for i, arrival in enumerate([0.2, 0.1, 0.3]):
        scheduler.add(make_request(f"r{i}", prompt_len=4, arrival=arrival))
    plan = run_step(scheduler, now=1.0)
    # By arrival time, whatever the order of add(); 4 + 4 fit in 10 tokens, the third not.
    assert [c.request.request_id for c in plan.chunks] == ["r1", "r0"]
    assert plan.num_batched_tokens == 8
    plan = run_step(scheduler, now=2.0)
    # Running decodes go first, then the waiting prompt fills the budget.
    assert [(c.request.request_id, c.num_tokens) for c in plan.chunks] == [
        ("r1", 1), ("r0", 1), ("r2", 4)]
    assert scheduler.get("r2").queueing_time == pytest.approx(2.0 - 0.3)


def test_max_num_seqs_caps_running():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add(make_request(f"r{i}", prompt_len=2))
    run_step(scheduler, 0.0)
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 1


def test_prompt_longer_than_a_step_is_split():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add(make_request("long", prompt_len=20, max_tokens=2))
    plans = run_to_end(scheduler)
    assert [c.num_tokens for c in plans[0].chunks] == [8]
    assert [(c.start, c.num_tokens, c.sample) for p in plans[:3] for c in p.chunks] == [
        (0, 8, False), (8, 8, False), (16, 4, True)]


def test_preempts_newest_and_resumes_it_before_new_arrivals():
    # 6 blocks of 4 tokens: two requests of 8 prompt tokens + 8 outputs cannot both finish.
    scheduler = make_scheduler(num_blocks=6, block_size=4, prefix_caching=False)
    old = make_request("old", prompt_len=8, max_tokens=8, arrival=0.0)
    new = make_request("new", prompt_len=8, max_tokens=8, arrival=1.0)
    scheduler.add(old)
    scheduler.add(new)
    plans, now = [], 0.0
    while not any(p.preempted for p in plans):
        plans.append(run_step(scheduler, now))
        now += 1
    assert plans[-1].preempted == ["new"]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    late = make_request("late", prompt_len=4, arrival=now)
    scheduler.add(late)
    admitted = []
    while scheduler.has_unfinished():
        plan = run_step(scheduler, now)
        admitted += [c.request.request_id for c in plan.chunks if c.start == 0]
        now += 1
    assert admitted.index("new") < admitted.index("late")
    assert new.num_output_tokens == 8 and new.num_preemptions >= 1
    assert scheduler.blocks.num_used_blocks == 0


def test_recompute_chunk_covers_prompt_and_outputs():
    scheduler = make_scheduler(num_blocks=6, block_size=4, prefix_caching=False)
    a = make_request("a", prompt_len=8, max_tokens=8, arrival=0.0)
    b = make_request("b", prompt_len=8, max_tokens=8, arrival=1.0)
    scheduler.add(a)
    scheduler.add(b)
    now = 0.0
    while b.status != RequestStatus.PREEMPTED:
        run_step(scheduler, now)
        now += 1
    generated = b.num_output_tokens
    while b.status != RequestStatus.RUNNING:
        plan = run_step(scheduler, now)
        now += 1
    resumed = [c for c in plan.chunks if c.request is b][0]
    assert resumed.start == 0 and resumed.num_tokens == 8 + generated and resumed.sample


def test_every_block_returns_after_finish_and_abort():
    scheduler = make_scheduler(num_blocks=32)
    for i in range(6):
        scheduler.add(make_request(f"r{i}", prompt_len=5 + i, max_tokens=3 + i))
    run_step(scheduler, 0.0)
    scheduler.abort("r0", 0.5)  # running
    scheduler.abort("r5", 0.5)
    assert scheduler.get("r0") is None
    run_to_end(scheduler, start=1.0)
    assert scheduler.blocks.num_used_blocks == 0


def test_abort_while_step_runs_drops_its_results():
    scheduler = make_scheduler()
    request = make_request("r", prompt_len=4)
    scheduler.add(request)
    plan = scheduler.schedule(0.0)
    scheduler.abort("r", 0.1)
    assert scheduler.update(plan, {"r": 5}, 0.2) == []
    assert request.status == RequestStatus.FINISHED_ABORTED and request.output_token_ids == []
    assert scheduler.blocks.num_used_blocks == 0


def test_stops_on_eos_stop_ids_and_length_respecting_min_tokens():
    from sloserve.request import SamplingParams

    scheduler = make_scheduler()
    request = make_request("r", prompt_len=3)
    request.sampling_params = SamplingParams(max_tokens=10, stop_token_ids=(9,), min_tokens=2)
    scheduler.add(request)
    run_step(scheduler, 0.0, token=9)  # below min_tokens: keeps going
    assert not request.is_finished
    run_step(scheduler, 1.0, token=9)
    assert request.status == RequestStatus.FINISHED_STOPPED
    eos = make_request("e", prompt_len=3)
    eos.sampling_params = SamplingParams(max_tokens=10)
    scheduler.add(eos)
    run_step(scheduler, 2.0, token=0)
    assert eos.status == RequestStatus.FINISHED_STOPPED
    capped = make_request("c", prompt_len=3, max_tokens=2)
    scheduler.add(capped)
    run_to_end(scheduler, 3.0)
    assert capped.status == RequestStatus.FINISHED_LENGTH and capped.num_output_tokens == 2
    assert capped.first_token_time == 3.0 and capped.tpot == 1.0


def test_rejects_what_can_never_run():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add(make_request("huge", prompt_len=20))
    with pytest.raises(ValueError, match="context"):
        scheduler.add(make_request("long", prompt_len=64))
    scheduler.add(make_request("ok", prompt_len=3))
    with pytest.raises(ValueError, match="duplicate"):
        scheduler.add(make_request("ok", prompt_len=3))


def prefilled_elsewhere(request_id: str, prompt_len: int, deadline_ms: float | None = None):
    """A request as a decode instance receives it: prompt computed, first token sampled."""
    from sloserve.request import SLO

    request = make_request(request_id, prompt_len, max_tokens=3, first_token=len(request_id),
                           slo=SLO(tpot_ms=deadline_ms) if deadline_ms else None)
    request.output_token_ids = [9]
    request.num_computed_tokens = prompt_len
    request.first_token_time = 0.0
    return request


def test_a_request_waits_for_its_remote_kv_inside_the_scheduler():
    """WAITING_FOR_REMOTE_KV: counted as unfinished, holds no blocks and cannot run until its
    KV arrives; then it gets blocks for its computed tokens and decodes in that same step."""
    scheduler = make_scheduler(num_blocks=8, block_size=4)
    scheduler.add_remote(prefilled_elsewhere("r", prompt_len=6))
    assert scheduler.has_unfinished() and not scheduler.has_runnable()
    assert scheduler.remote_blocks() == 2 and scheduler.blocks.num_used_blocks == 0
    assert run_step(scheduler, 1.0).is_empty
    assert scheduler.kv_arrived("r") and not scheduler.kv_arrived("r")
    plan = run_step(scheduler, 2.0)
    assert [r.request_id for r in plan.imported] == ["r"]
    assert [(c.request.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("r", 6, 1)]
    assert scheduler.get("r").status == RequestStatus.RUNNING and not scheduler.remote
    run_to_end(scheduler, start=3.0)
    assert scheduler.blocks.num_used_blocks == 0


def test_arrived_kv_is_admitted_in_the_policys_order_and_waits_for_blocks():
    scheduler = make_scheduler(num_blocks=4, block_size=4, policy="edf")
    for rid, tpot in (("loose", 500.0), ("tighter", 10.0)):
        scheduler.add_remote(prefilled_elsewhere(rid, prompt_len=7, deadline_ms=tpot))
        scheduler.kv_arrived(rid)
    plan = run_step(scheduler, 0.0)  # 2 blocks each (7 computed + 1): room for both
    assert [r.request_id for r in plan.imported] == ["tighter", "loose"]
    scheduler.add_remote(prefilled_elsewhere("latest", prompt_len=7))
    scheduler.kv_arrived("latest")
    assert not run_step(scheduler, 1.0).imported  # the pool is full: it waits, unharmed
    assert scheduler.get("latest").status == RequestStatus.WAITING_FOR_REMOTE_KV
    run_to_end(scheduler, start=2.0)
    assert scheduler.blocks.num_used_blocks == 0


def test_aborting_a_request_whose_kv_is_on_its_way_forgets_it():
    scheduler = make_scheduler()
    scheduler.add_remote(prefilled_elsewhere("r", prompt_len=5))
    scheduler.abort("r", 1.0)
    assert not scheduler.has_unfinished() and not scheduler.kv_arrived("r")


def test_a_request_that_outgrows_the_whole_cache_ends_instead_of_hanging():
    scheduler = make_scheduler(num_blocks=4, block_size=4, prefix_caching=False)
    request = make_request("long", 10, max_tokens=50)  # 16 tokens of KV, at most
    scheduler.add(request)
    now = 0.0
    while scheduler.has_unfinished() and now < 100:
        run_step(scheduler, now)
        now += 1
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.num_tokens == 17  # its last token needed no KV of its own
    assert scheduler.blocks.num_used_blocks == 0
