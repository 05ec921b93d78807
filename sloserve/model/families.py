"""Model families, picked by the config's `model_type`. A family names the decoder class that
runs it and refuses what that class would get wrong; adding a family is a line here (and a
decoder file when DecoderLM does not fit)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sloserve.model.config import ModelConfig
from sloserve.model.decoder import DecoderLM


def _full_attention_only(config: ModelConfig) -> None:
    """DecoderLM attends to the whole context: a window shorter than it would be ignored."""
    window = config.sliding_window
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(f"{config.architecture} with a sliding window of {window} tokens is "
                         "not supported (sloserve attends to the whole context)")


@dataclass(frozen=True)
class Family:
    decoder: type[DecoderLM]
    check: Callable[[ModelConfig], None] = _full_attention_only


FAMILIES: dict[str, Family] = {
    "llama": Family(DecoderLM),  # Llama 2/3, SmolLM2
    "qwen2": Family(DecoderLM),  # q/k/v biases (ModelConfig.attention_bias)
    "mistral": Family(DecoderLM),  # Llama's layout; refused with a sliding window
}


def family(config: ModelConfig) -> Family:
    """The family that runs `config`; ValueError naming the supported ones otherwise."""
    found = FAMILIES.get(config.architecture)
    if found is None:
        raise ValueError(f"unsupported model type {config.architecture!r}; sloserve runs "
                         f"{', '.join(sorted(FAMILIES))}")
    found.check(config)
    return found
