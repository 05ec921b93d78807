"""Model shape, read from an HF config.json, plus real shapes for dummy-weight benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # the HF model_type: a name in model/families.py runs it
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # llama3-style scaling, as (key, value)
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # attention window in tokens; None: full attention

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        arch = hf.get("model_type", "llama")
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = {}
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            rope_scaling=tuple(sorted(scaling.items())),
            eos_token_ids=eos_ids,
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True)
            else None,
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @property
    def num_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + embed


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=8192, eos_token_id=128009)

# Real shapes, for `dummy:NAME` (random weights: speed does not depend on them).
NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         eos_token_id=2),
    "llama-3-8b": _LLAMA3_8B,
    "llama-3.1-8b": {**_LLAMA3_8B, "rope_scaling": _LLAMA3_ROPE,
                     "max_position_embeddings": 131072},
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=32768, eos_token_id=151645),
    "qwen2-tiny": dict(model_type="qwen2", vocab_size=49152, hidden_size=128,
                       intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                       max_position_embeddings=2048, eos_token_id=2),
}
