"""sloserve: an LLM serving engine whose scheduler is built to meet per-request SLOs."""

from sloserve.request import SLO, Request, RequestStatus, SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SLO", "Request", "RequestStatus",
           "SamplingParams"]


def __getattr__(name: str):
    # Lazy, so `import sloserve.core` and the simulator never pull in torch.
    if name == "LLM":
        from sloserve.llm import LLM
        return LLM
    if name == "LLMEngine":
        from sloserve.engine import LLMEngine
        return LLMEngine
    if name == "EngineConfig":
        from sloserve.config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
