"""`sloserve tune`: a search whose optimum is known finds it, its winner round-trips through
`serve --config`, and bad inputs end in one line or a clear report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from sloserve.cli import main, parse_args
from sloserve.core.latency import LatencyModel
from sloserve.core.policies.pacing import CalibratedSteps
from sloserve.flags import engine_config
from sloserve.sim.run import Deployment
from sloserve.tune.calibrate import scaled, served_speeds
from sloserve.tune.search import Problem, RunLength, Tuner
from sloserve.tune.space import Candidate
from sloserve.workload import spec as workloads

WORKLOAD = {"name": "fixed", "dataset": "synthetic", "input_len": 64, "output_len": 20,
            "classes": [{"name": "c", "share": 1.0, "slo": {"ttft_ms": 2000, "tpot_ms": 50}}]}


@pytest.fixture
def flat_profile(tmp_path) -> Path:
    """Every decode step costs 10 ms whatever its batch: throughput grows with the batch, so
    the largest max_num_seqs tried is the optimum."""
    flat = LatencyModel((1, 256), (0.01, 0.01), (1, 4096), (0.001, 0.01))
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(flat.to_dict()))
    return path


def test_a_search_with_a_known_optimum_finds_it(flat_profile):
    problem = Problem(workloads.parse(WORKLOAD), Deployment(latency_profile=str(flat_profile),
                                                           num_kv_blocks=4096))
    space = [Candidate("fcfs", max_num_seqs=n, max_num_batched_tokens=2048) for n in (1, 4, 16)]
    tuner = Tuner(problem, screen=RunLength(10, 100), sustained=RunLength(15, 200),
                  refine_rounds=0, finalists=1)
    ranked = tuner.run(space)
    assert ranked[0].candidate.max_num_seqs == 16 and ranked[0].sustained
    # 16 sequences x one token per 10 ms, 19 decode steps a request (the first token comes
    # with the prompt): ~84 requests/s; a short run tolerates a little more before queues grow
    assert 60 <= ranked[0].capacity <= 100
    assert all(e.capacity < ranked[0].capacity for e in ranked[1:])


def test_the_winner_round_trips_through_serve_config(tmp_path, flat_profile):
    winner = Candidate("slice", (("period_ms", 500.0), ("ratio", 0.75)), 64, 512)
    problem = Problem(workloads.parse(WORKLOAD), Deployment(latency_profile=str(flat_profile)),
                      quantization="int4")
    path = tmp_path / "tuned.yaml"
    path.write_text("# a comment\n" + yaml.safe_dump({**winner.config_file(),
                                                      **problem.engine()}))
    # slice prices steps with the profile tuned on
    expected = dataclasses.replace(winner.scheduler(), policy_options={
        **dict(winner.options), "latency": str(flat_profile)})
    for argv in (["--config", str(path)], [*winner.flags(), *problem.serve_flags()]):
        config = engine_config(parse_args(["serve", *argv]))
        assert config.quantization == "int4"
        assert config.scheduler == expected


def test_a_served_calibration_scales_the_profile_by_what_pacing_learned():
    """The factors come from the stats line slice's pacing writes (its own format)."""
    quiet = LatencyModel((1, 64), (0.01, 0.02), (16, 1024), (0.02, 0.5))
    steps = CalibratedSteps(quiet)
    steps.decode_speed, steps.prompt_speed = 1.3, 1.6
    log = ("INFO sloserve.engine: 9.0 steps/s; steps take x1.00 (decode) / x1.00 (with prompts)"
           f" the profile's\nINFO sloserve.engine: 12.0 steps/s; {steps.state()}\n")
    assert served_speeds(log) == (1.3, 1.6) and served_speeds("no pacing here") is None
    served = scaled(quiet, 1.3, 1.6)
    assert served.decode_time(8) == pytest.approx(1.3 * quiet.decode_time(8))
    assert served.prefill_time(1000) == pytest.approx(1.6 * quiet.prefill_time(1000))


def test_bad_tune_inputs_are_one_line_errors(capsys):
    assert main(["tune", "--policies", "fcfs,nope", "--gpu", "h100"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["tune", "--gpu", "b200"]) == 2
    assert "unknown GPU 'b200'" in capsys.readouterr().err


def test_an_slo_nothing_can_meet_gets_the_closest_candidate(tmp_path, flat_profile, capsys):
    impossible = {**WORKLOAD, "classes": [{"name": "c", "share": 1.0,
                                           "slo": {"ttft_ms": 0.5, "tpot_ms": 50}}]}
    workload = tmp_path / "impossible.yaml"
    workload.write_text(yaml.safe_dump(impossible))
    code = main(["tune", "--workload", str(workload), "--latency-profile", str(flat_profile),
                 "--policies", "fcfs", "--workers", "1", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "nothing meets 90% attainment at any rate; closest is fcfs" in out
    assert not (tmp_path / "tuned.yaml").exists()
