"""Settings have one source (sloserve/config.py) and arrive where they act, whether given to
LLM(...) or on any command line; registries refuse what they cannot run, by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sloserve
from sloserve.cli import build_parser
from sloserve.config import EngineConfig, SchedulerConfig
from sloserve.errors import UsageError
from sloserve.flags import engine_config
from sloserve.model.config import NAMED_SHAPES, ModelConfig
from sloserve.model.families import family


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_max_model_len_given_to_llm_bounds_every_request():
    from sloserve import LLM, SamplingParams

    llm = LLM(model="dummy:qwen2-tiny", max_model_len=40, num_kv_blocks=32)
    assert llm.engine.max_model_len == 40 == llm.engine.scheduler.config.max_model_len
    with pytest.raises(ValueError, match="40"):
        llm.generate([[5] * 40], SamplingParams(max_tokens=4))
    [out] = llm.generate([[5] * 30], SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_command_line_defaults_are_the_dataclass_defaults():
    for command in (["serve"], ["generate", "hi"], ["profile"]):
        assert engine_config(parse(*command)) == EngineConfig()
    sim = parse("sim")
    from sloserve.sim.command import deployment
    from sloserve.sim.run import Deployment

    assert deployment(sim) == Deployment()


def test_command_line_settings_land_in_the_configs():
    args = ["--max-model-len", "128", "--max-num-seqs", "3", "--block-size", "32",
            "--no-enable-prefix-caching", "-tp", "2", "--policy", "delay",
            "--delay-factor", "0.25", "--policy-option", "delay_factor=0.5"]
    config = engine_config(parse("serve", *args))
    assert config.scheduler == SchedulerConfig(max_num_seqs=3, max_model_len=128,
                                               policy="delay",
                                               policy_options={"delay_factor": 0.5})
    assert (config.block_size, config.enable_prefix_caching, config.tensor_parallel_size) \
        == (32, False, 2)
    from sloserve.sim.command import deployment

    profile = str(next((Path(sloserve.__file__).parent / "core" / "profiles").glob("*.json")))
    sim = deployment(parse("sim", "--max-num-seqs", "3", "--policy", "slice", "--slice-ratio",
                           "0.5", "--latency-profile", profile, "--num-instances", "2"))
    assert sim.scheduler.max_num_seqs == 3 and sim.num_instances == 2
    assert sim.scheduler.policy_options == {"ratio": 0.5, "latency": profile}
    assert sim.latency_profile == profile


@pytest.mark.parametrize("argv,message", [
    (["--policy", "fcfs", "--slice-ratio", "0.5"], "does not apply to --policy fcfs"),
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--policy", "delay", "--policy-option", "speed=2"], "unexpected keyword"),
    (["--policy", "delay", "--delay-factor", "-1"], "delay_factor must be >= 0"),
])
def test_bad_policy_settings_are_one_line_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        engine_config(parse("serve", *argv))


def test_model_families_refuse_what_they_would_run_wrongly():
    mistral = {**NAMED_SHAPES["llama-3-8b"], "model_type": "mistral"}
    assert family(ModelConfig.from_hf(mistral)).decoder.__name__ == "DecoderLM"
    with pytest.raises(ValueError, match="sliding window of 4096"):
        family(ModelConfig.from_hf({**mistral, "sliding_window": 4096}))
    qwen = {**NAMED_SHAPES["qwen2-tiny"], "sliding_window": 64, "use_sliding_window": False}
    assert family(ModelConfig.from_hf(qwen)) is not None  # declared off: full attention
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'.*llama"):
        family(ModelConfig.from_hf({**mistral, "model_type": "gpt2"}))


def test_backends_and_transfers_are_picked_by_name():
    from sloserve.cluster.kv_transfer import transfer_class
    from sloserve.model.attention import backend_class

    assert backend_class("auto", "cpu").__name__ == "TorchPagedAttention"
    assert backend_class("triton", "cpu").supports_cuda_graphs
    with pytest.raises(ValueError, match="auto, torch, triton, flash"):
        backend_class("flashinfer", "cuda")
    from sloserve.model.attention import flash_paged

    installed = flash_paged.flash_attn_varlen_func is not None
    if not installed:  # no vLLM kernels: refused by name
        with pytest.raises(ValueError, match="needs vLLM's FlashAttention"):
            backend_class("flash", "cuda")(16)
    # auto: FA3 only for 16-bit dtypes where it is installed
    assert backend_class("auto", "cuda", torch.float32).__name__ == "TritonPagedAttention"
    assert backend_class("auto", "cuda", torch.bfloat16).__name__ == (
        "FlashPagedAttention" if installed else "TritonPagedAttention")
    assert transfer_class("direct").pairwise and not transfer_class("object-store").pairwise
    with pytest.raises(ValueError, match="direct, object-store"):
        transfer_class("rdma")
