"""A workload may bring its own dataset file, with its own column names."""

from __future__ import annotations

import json

import pytest

from sloserve.workload.spec import build, load


def write_workload(folder, body: str):
    path = folder / "mine.yaml"
    path.write_text(body)
    return path


def test_text_prompts_and_caps_come_from_the_users_csv(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer_tokens\nWhat is 2+2?,5\nName a fruit.,9\n")
    path = write_workload(tmp_path, """
name: mine
dataset: file
file: qa.csv
columns: {prompt: question, output_len: answer_tokens}
classes: [{name: rt, slo: {tpot_ms: 50, realtime: true}}]
""")
    requests = build(load(str(path)), 4, seed=1, rate=2.0)
    assert sorted({(r.text, r.max_tokens) for r in requests}) == [
        ("Name a fruit.", 9), ("What is 2+2?", 5)]
    assert all(r.slo_class == "rt" and r.slo.realtime for r in requests)


def test_a_jsonl_trace_replays_its_own_timestamps(tmp_path):
    rows = [{"t": 0.0, "in": 100, "out": 7}, {"t": 2.0, "in": 300, "out": 9}]
    (tmp_path / "trace.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    path = write_workload(tmp_path, """
name: mine
dataset: file
file: trace.jsonl
columns: {input_len: in, output_len: out, timestamp: t}
""")
    requests = build(load(str(path)), 2, with_text=False, time_scale=1.0)
    assert [(r.prompt_len, r.max_tokens, r.arrival) for r in requests] == [
        (100, 7, 0.0), (300, 9, 2.0)]


@pytest.mark.parametrize("columns, words", [
    ("{prompt: nope}", "no column nope"),
    ("{answer: question}", "unknown answer"),
    ("{output_len: answer_tokens}", "map 'prompt'"),
])
def test_a_bad_column_map_is_named_when_the_workload_loads(tmp_path, columns, words):
    (tmp_path / "qa.csv").write_text("question,answer_tokens\nWhat is 2+2?,5\n")
    path = write_workload(tmp_path, f"name: mine\ndataset: file\nfile: qa.csv\n"
                                    f"columns: {columns}\n")
    with pytest.raises(ValueError, match=words):
        load(str(path))
