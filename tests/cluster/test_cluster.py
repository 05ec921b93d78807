"""Disaggregated prefill/decode over Ray on the CPU: one prefill and one decode actor, each
with its own SmolLM2 engine, behind the same engine interface the server drives."""

from __future__ import annotations

import time

import pytest

from sloserve import SamplingParams
from tests.conftest import CHAT_PROMPTS, chat

ray = pytest.importorskip("ray")

from sloserve.cluster.frontend import ClusterEngine  # noqa: E402
from sloserve.config import ClusterConfig, EngineConfig  # noqa: E402


@pytest.fixture(scope="module", params=["object-store", "direct"])
def cluster(local_ray, request):
    engine = ClusterEngine(ClusterConfig(mode="disagg", replica_spec=((1, 1), (1, 1)),
                                         partition_id=1, engine=EngineConfig(num_kv_blocks=256),
                                         kv_transfer=request.param))
    yield engine
    engine.shutdown()


def drive(cluster: ClusterEngine, requests, until=None, timeout: float = 180.0):
    """Step until every request ended; `until(outputs so far)` may act in between."""
    for request in requests:
        cluster.submit(request)
    tokens, errors, deadline = {}, {}, time.monotonic() + timeout
    while cluster.has_unfinished():
        assert time.monotonic() < deadline, "requests did not finish"
        for out in cluster.step():
            if out.error is not None:
                errors[out.request_id] = out.error
            else:
                tokens[out.request_id] = list(out.token_ids)
        if until is not None:
            until(tokens)
    return tokens, errors


def wait_for_idle_blocks(cluster: ClusterEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.step()
        if all(i.alive and i.stats.load.free_blocks == i.stats.num_blocks
               and not i.stats.num_running
               for i in cluster.instances):
            return
    pytest.fail(f"KV blocks still held: {[i.stats for i in cluster.instances]}")


def test_prefill_then_decode_equals_colocated_engine(cluster, llm):
    params = SamplingParams(max_tokens=20, temperature=0)
    prompts = [chat(p) for p in CHAT_PROMPTS[:5]]
    expected = [r.token_ids for r in llm.generate(prompts, params)]
    requests = [cluster.make_request(p, params) for p in prompts]
    tokens, errors = drive(cluster, requests)
    assert not errors
    assert [tokens[r.request_id] for r in requests] == expected
    wait_for_idle_blocks(cluster)  # on both sides: the prefill gave its blocks back at handoff


def test_killed_decode_instance_resumes_its_requests_once_back(cluster, llm):
    """Ray restarts a decode actor killed mid-stream; its requests wait, are prefilled again
    there with the tokens already streamed, and end with the tokens of an uninterrupted run;
    every block comes back on both sides."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [chat(p) for p in CHAT_PROMPTS[:3]]
    expected = [r.token_ids for r in llm.generate(prompts, params)]
    requests = [cluster.make_request(p, params) for p in prompts]
    decode = cluster.instances[1]
    killed = []

    def kill_mid_stream(tokens):
        if not killed and any(len(t) >= 5 for t in tokens.values()):
            ray.kill(decode.actor, no_restart=False)  # Ray restarts it
            killed.append({k: len(t) for k, t in tokens.items()})

    tokens, errors = drive(cluster, requests, until=kill_mid_stream)
    assert killed and not errors
    assert any(0 < n < 40 for n in killed[0].values())  # it did die mid-stream
    assert [tokens[r.request_id] for r in requests] == expected
    wait_for_idle_blocks(cluster)


def test_while_the_prefill_instance_is_down_a_decode_instance_prefills(cluster):
    prefill = cluster.instances[0]
    ray.kill(prefill.actor, no_restart=False)
    deadline = time.monotonic() + 30
    while prefill.alive and time.monotonic() < deadline:
        cluster.step()
    assert not prefill.alive
    request = cluster.make_request(chat("Hi!"), SamplingParams(max_tokens=8, temperature=0))
    cluster.submit(request)
    assert cluster.placement[request.request_id] == 1
    tokens, errors = drive(cluster, [])
    assert not errors and len(tokens[request.request_id]) == 8
    wait_for_idle_blocks(cluster)  # the prefill instance is back, links reopened


def assert_cluster_gives_one_engines_tokens(options: dict, replica_spec, prompts, max_tokens):
    """Greedy tokens of a 1 prefill + 1 decode cluster equal one engine's; blocks come back."""
    import torch

    from sloserve import LLM

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm = LLM(**options)
    expected = [r.token_ids for r in llm.generate(prompts, params)]
    del llm  # its GPU memory, before the instances take theirs
    torch.cuda.empty_cache()
    cluster = ClusterEngine(ClusterConfig(mode="disagg", replica_spec=replica_spec,
                                          partition_id=1, engine=EngineConfig.from_kwargs(
                                              **options)))
    try:
        requests = [cluster.make_request(p, params) for p in prompts]
        tokens, errors = drive(cluster, requests)
        assert not errors
        assert [tokens[r.request_id] for r in requests] == expected
        wait_for_idle_blocks(cluster)
    finally:
        cluster.shutdown()


def test_tensor_parallel_instances_hand_kv_over_rank_to_rank(local_ray):
    """tp=2 prefill and tp=2 decode instances (2 processes each), direct link between their
    rank-0 processes: rank i's KV heads reach rank i on the other side."""
    prompts = [[(11 * i + j) % 3000 + 7 for j in range(5 + 23 * i)] for i in range(4)]
    assert_cluster_gives_one_engines_tokens(dict(model="dummy:qwen2-tiny", num_kv_blocks=64),
                                            ((2, 1), (2, 1)), prompts, max_tokens=12)


@pytest.mark.skipif(not __import__("torch").cuda.device_count() >= 2, reason="needs two GPUs")
def test_direct_link_between_two_gpus_gives_one_engines_tokens(local_ray):
    """A prefill and a decode instance on two GPUs, KV over their NCCL link on side streams
    (float32, so that the tokens can be compared; passed on two H200s)."""
    prompts = [[(13 * i + j) % 3000 + 7 for j in range(40 + 90 * i)] for i in range(12)]
    options = dict(model="dummy:qwen2-tiny", num_kv_blocks=1024, dtype="float32")
    assert_cluster_gives_one_engines_tokens(options, ((1, 1), (1, 1)), prompts, max_tokens=24)
