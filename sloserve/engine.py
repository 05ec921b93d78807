"""LLMEngine (add_request / step / abort / has_unfinished) and the offline LLM front door."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sloserve.core.kv_blocks import BlockManager
from sloserve.core.scheduler import Scheduler, SchedulerConfig
from sloserve.detokenizer import IncrementalDetokenizer
from sloserve.model import loader
from sloserve.model.gpu_memory import kv_blocks_for_gpu
from sloserve.request import SLO, Request, RequestStatus, SamplingParams
from sloserve.runner import ModelRunner

Prompt = str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder, .gguf file, dummy:SHAPE; None: embedded SmolLM2
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto: cuda when available
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: from the memory settings below
    kv_cache_memory_gb: float = 1.0  # KV cache size on CPU when num_kv_blocks is None
    gpu_memory_utilization: float = 0.9  # on GPU: share of its memory for weights + KV + steps
    attention_backend: str = "auto"  # auto: Triton kernels on CUDA, pure torch elsewhere
    enforce_eager: bool = False  # on CUDA: no graphs for decode steps
    tensor_parallel_size: int = 1  # ranks (processes, one GPU each on CUDA) of this engine
    max_model_len: int | None = None  # None: the model's own context
    enable_prefix_caching: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[self.dtype]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Sort flat keyword arguments into this config and its scheduler config."""
        mine = {f.name for f in dataclasses.fields(cls)}
        sched = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = set(kwargs) - mine - sched
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        scheduler = kwargs.pop("scheduler", None) or SchedulerConfig(
            **{k: kwargs.pop(k) for k in list(kwargs) if k in sched})
        return cls(scheduler=scheduler, **kwargs)


@dataclass
class RequestOutput:
    """What one step produced for one request; `text` and `token_ids` are cumulative."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    delta_text: str
    token_ids: list[int]
    num_new_tokens: int
    finished: bool
    finish_reason: str | None
    timings: dict[str, float | None]
    slo: SLO


class RequestIntake:
    """Prompt -> validated Request: shared by LLMEngine and the disaggregated front end.
    Needs tokenizer, model_config, max_model_len, eos_token_id, clock, _ids and a
    `scheduler` whose check() raises ValueError for a request that could never run."""

    tokenizer: Any
    scheduler: Any

    # ---- intake ------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt[0], dict):
            return self.apply_chat_template(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in prompt):
            raise ValueError("prompt token ids must be integers within the vocabulary")
        return list(prompt)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a 'role' and a string 'content'")
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def make_request(self, prompt: Prompt, params: SamplingParams | None = None,
                     slo: SLO | None = None, request_id: str | None = None,
                     arrival_time: float | None = None, priority: int = 0) -> Request:
        """Validate and build a request without touching engine state (safe from any thread);
        raises ValueError naming the bad field."""
        params = params or SamplingParams()
        token_ids = self.tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the context is "
                             f"{self.max_model_len} tokens, so nothing can be generated")
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=token_ids, sampling_params=params, slo=slo or SLO(),
            arrival_time=self.clock() if arrival_time is None else arrival_time,
            priority=priority, eos_token_id=self.eos_token_id)
        self.scheduler.check(request)
        return request

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    slo: SLO | None = None, request_id: str | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> Request:
        """Validate and queue a request; raises ValueError naming the bad field."""
        return self.submit(self.make_request(prompt, params, slo, request_id, arrival_time,
                                             priority))


class LLMEngine(RequestIntake):
    def __init__(self, config: EngineConfig):
        self.config = config
        size = config.tensor_parallel_size
        self.ranks = None
        if size > 1:
            from sloserve.model.tensor_parallel import TensorParallelRanks, init_group
            self.ranks = TensorParallelRanks(config, size)
            init_group(0, size, self.ranks.port, config.torch_device)
        model, num_blocks, loaded = build_model_and_blocks(config, 0, size)
        self.model_name, self.model_config, self.tokenizer = (
            loaded.name, loaded.config, loaded.tokenizer)
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        scheduler_config = dataclasses.replace(config.scheduler, max_model_len=self.max_model_len)
        self.scheduler = Scheduler(scheduler_config, self.blocks)
        # CUDA graphs are single-rank for now: NCCL inside captured graphs is not wired up
        graphs = (config.torch_device.type == "cuda" and not config.enforce_eager
                  and config.attention_backend != "torch" and size == 1)
        self.runner = ModelRunner(model, num_blocks, config.block_size,
                                  cuda_graph_max_batch=scheduler_config.max_num_seqs * graphs)
        self.runner.ranks = self.ranks
        self.eos_token_id = eos_token_id(self.tokenizer, self.model_config)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.clock: Callable[[], float] = time.monotonic
        self.last_step_time = 0.0

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one)."""
        if self.ranks is not None:
            self.ranks.shutdown()
            self.ranks = None

    def submit(self, request: Request) -> Request:
        """Queue a request built by make_request."""
        self.scheduler.add(request)
        detok = IncrementalDetokenizer(self.tokenizer, request.sampling_params.stop)
        detok.push(request.output_token_ids)  # resumed from a dead instance: text already out
        self._detokenizers[request.request_id] = detok
        return request

    # ---- disaggregation: hand a prefilled request's KV to another engine ---------------
    def export_kv(self, request: Request) -> torch.Tensor:
        """A copy of the KV of the tokens the request has computed (one tensor, every layer,
        on the engine's device): the request's blocks can be freed right after."""
        blocks = request.block_ids[: self.blocks.blocks_for(request.num_computed_tokens)]
        return self.runner.export_blocks(blocks)

    def import_prefilled(self, request: Request, kv: torch.Tensor) -> bool:
        """Continue a request another engine prefilled (its first token sampled there) with
        that engine's KV. False when this engine has no room for it yet."""
        if not self.scheduler.add_prefilled(request, self.clock()):
            return False
        self.runner.import_blocks(request.block_ids[: kv.shape[2]], kv)
        detok = IncrementalDetokenizer(self.tokenizer, request.sampling_params.stop)
        detok.push(request.output_token_ids)  # the text the client already has
        self._detokenizers[request.request_id] = detok
        return True

    def take_failures(self) -> list[tuple[str, Exception]]:
        """Requests that ended with an error outside a step (none in one process)."""
        return []

    def abort(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id, self.clock())
        if request is not None:
            self._forget(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = self.clock()
        plan = self.scheduler.schedule(start)
        sampled = self.runner.execute(plan)
        now = self.clock()
        self.last_step_time = now - start
        self.scheduler.policy.observe(plan, self.last_step_time)
        touched = self.scheduler.update(plan, sampled, now)
        return [self._output(r, now) for r in touched]

    def _output(self, request: Request, now: float) -> RequestOutput:
        detok = self._detokenizers[request.request_id]
        delta = detok.push(request.output_token_ids[-1:])
        if detok.stopped and not request.is_finished:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED, now)
        if request.is_finished:
            self._forget(request)
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            text=detok.text, delta_text=delta, token_ids=request.output_token_ids,
            num_new_tokens=1, finished=request.is_finished,
            finish_reason=request.status.finish_reason, timings=timings(request),
            slo=request.slo)

    def _forget(self, request: Request) -> None:
        self._detokenizers.pop(request.request_id, None)
        self.runner.release(request.request_id)


def build_model_and_blocks(config: EngineConfig, rank: int, size: int):
    """Load this rank's model and size its KV cache (every rank runs this, in step: the GPU
    sizing runs a forward, which all-reduces across the ranks). Returns the model, the number
    of blocks all ranks agree on, and the loader's result (tokenizer, full config)."""
    loaded = loader.load(config.model, config.torch_dtype, config.torch_device,
                         config.block_size, config.attention_backend, rank, size)
    model = loaded.model
    if config.num_kv_blocks:
        num_blocks = config.num_kv_blocks
    elif config.torch_device.type == "cuda":
        s = config.scheduler
        num_blocks = kv_blocks_for_gpu(model, config.block_size, s.max_num_batched_tokens,
                                       s.max_num_seqs, config.gpu_memory_utilization)
    else:  # the shard's own KV heads
        per_token = model.config.kv_bytes_per_token(config.torch_dtype.itemsize)
        tokens = int(config.kv_cache_memory_gb * 2**30) // per_token
        num_blocks = max(1, tokens // config.block_size)
    if size > 1:
        from sloserve.model.tensor_parallel import agree_on_blocks
        num_blocks = agree_on_blocks(num_blocks, config.torch_device)
    return model, num_blocks, loaded


def eos_token_id(tokenizer: Any, model_config: Any) -> int | None:
    eos = tokenizer.eos_token_id
    if eos is None and model_config.eos_token_ids:
        eos = model_config.eos_token_ids[0]
    return eos


def timings(request: Request) -> dict[str, float | None]:
    return {"arrival_time": request.arrival_time,
            "first_scheduled_time": request.first_scheduled_time,
            "first_token_time": request.first_token_time,
            "finish_time": request.finish_time,
            "queueing_time": request.queueing_time,
            "ttft": request.ttft,
            "tpot": request.tpot,
            "kv_transfer_time": request.kv_transfer_time}
