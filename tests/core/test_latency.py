from __future__ import annotations

import pytest

from sloserve.core.latency import LatencyModel
from sloserve.core.plan import Plan, ScheduledChunk
from tests.core.factories import make_request


def test_interpolates_through_the_profile_and_prices_a_mixed_step():
    model = LatencyModel((1, 4), (0.010, 0.016), (100, 200), (0.05, 0.09), decode_context=8,
                         context_s_per_token=0.001)
    assert model.decode_time(0) == 0.0
    assert model.decode_time(2) == pytest.approx(0.012)
    assert model.decode_time(8) == pytest.approx(0.024)  # extrapolated along the last segment
    assert model.prefill_time(50) == pytest.approx(0.025)  # from (0, 0)
    decode = make_request("d", 8)
    prompt = make_request("p", 100)
    plan = Plan(0.0, [ScheduledChunk(decode, 9, 1, True), ScheduledChunk(prompt, 0, 100, True)])
    # one decode at context 10 (2 past the profile's 8), alone and carrying a 100-token
    # prompt, which adds its prefill time beyond one pass over the weights (l(1))
    assert model.step_time(Plan(0.0, plan.chunks[:1])) == pytest.approx(0.010 + 0.002)
    assert model.step_time(plan) == pytest.approx(0.010 + 0.002 + 0.05 - 0.010)
    assert model.step_time(Plan(0.0, plan.chunks[1:])) == pytest.approx(0.05)


def test_measured_mixed_steps_price_prompt_tokens_by_batch():
    model = LatencyModel((1, 4), (0.010, 0.016), (100,), (0.05,), decode_context=8,
                         mixed_batch=(1, 4), mixed_s_per_token=(0.001, 0.002))
    decode = make_request("d", 8)
    prompt = make_request("p", 100)
    plan = Plan(0.0, [ScheduledChunk(decode, 8, 1, True), ScheduledChunk(prompt, 0, 100, True)])
    assert model.step_time(plan) == pytest.approx(0.010 + 100 * 0.001)
    assert LatencyModel.from_dict(model.to_dict()) == model


def test_shipped_profile_loads_and_grows_with_batch():
    model = LatencyModel.default()
    times = [model.decode_time(b) for b in (1, 8, 32)]
    assert times == sorted(times) and times[0] > 0
    with pytest.raises(ValueError, match="malformed"):
        LatencyModel.from_dict({"decode": {}})
