"""Shared fixtures: the embedded model loaded once per session, and request factories."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernels run under Triton's interpreter; this must precede their definition
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHAT_PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Describe your ideal vacation in under 100 words.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip, one line each.",
    "Explain in two sentences why the sky is blue, as you would to a ten-year-old child "
    "who keeps asking why.",
    "Translate 'good morning, how are you today?' into French and Spanish.",
    "You are planning a small garden on a balcony that gets four hours of sun a day. Which "
    "vegetables and herbs would you grow, how would you arrange the pots, and how often "
    "would you water them in summer? Answer in under 80 words.",
]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="session")
def llm():
    from sloserve import LLM

    return LLM()


@pytest.fixture(scope="session")
def hf_smollm(llm):
    """HF transformers' own Llama implementation on the same weights: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from sloserve.model.loader import embedded_gguf, gguf_to_hf_folder

    model = AutoModelForCausalLM.from_pretrained(gguf_to_hf_folder(embedded_gguf()),
                                                 dtype=torch.float32)
    return model.eval()
