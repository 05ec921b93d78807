"""LLMEngine: one engine (its ranks included) behind the EngineClient interface."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sloserve.config import EngineConfig
from sloserve.core.kv_blocks import BlockManager
from sloserve.core.latency import PROFILES, LatencyModel
from sloserve.core.plan import Plan
from sloserve.core.policies import prices_steps
from sloserve.core.scheduler import Scheduler
from sloserve.detokenizer import IncrementalDetokenizer
from sloserve.interface import EngineStats, Prompt, RequestOutput, RequestTimings
from sloserve.model import structured
from sloserve.model.loader import eos_token_id
from sloserve.request import SLO, Request, RequestStatus, SamplingParams
from sloserve.step_log import StepLog
from sloserve.worker.model_runner import PendingTokens
from sloserve.worker.ranks import start_runner


class RequestIntake:
    """Prompt -> validated Request: shared by LLMEngine and the cluster front end. Needs
    tokenizer, model_config, max_model_len, eos_token_id, clock, _ids and check()."""

    tokenizer: Any

    def check(self, request: Request) -> None:
        """Raise ValueError if the request could never run here. No side effects."""
        raise NotImplementedError

    # ---- intake ------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, str) or isinstance(prompt[0], dict):
            self._check_text_size(prompt)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt[0], dict):
            return self.apply_chat_template(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in prompt):
            raise ValueError("prompt token ids must be integers within the vocabulary")
        return list(prompt)

    def _check_text_size(self, prompt: str | Sequence[dict]) -> None:
        """Refuse text that cannot fit the context before tokenizing it (a 10 MB prompt took
        16 s to tokenize only to be refused): no token spells more characters than the
        longest in the vocabulary, so text longer than that many per token of context is
        too long for sure."""
        chars = len(prompt) if isinstance(prompt, str) else sum(
            len(m.get("content") or "") for m in prompt if isinstance(m, dict))
        limit = self.max_model_len * max_chars_per_token(self.tokenizer)
        if chars > limit:
            raise ValueError(f"prompt of {chars} characters cannot fit the context of "
                             f"{self.max_model_len} tokens")

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
        self._check_params(params)
        token_ids = self.tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the context is "
                             f"{self.max_model_len} tokens, so nothing can be generated")
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=token_ids, sampling_params=params, slo=slo or SLO(),
            arrival_time=self.clock() if arrival_time is None else arrival_time,
            priority=priority, eos_token_id=self.eos_token_id)
        self.check(request)
        return request

    def _check_params(self, params: SamplingParams) -> None:
        structured.check(params.structured)
        vocab = self.model_config.vocab_size
        if any(token >= vocab for token, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {vocab}")

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    slo: SLO | None = None, request_id: str | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> Request:
        """Validate and queue a request; raises ValueError naming the bad field."""
        return self.submit(self.make_request(prompt, params, slo, request_id, arrival_time,
                                             priority))


class LLMEngine(RequestIntake):
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = start_runner(config)
        loaded = self.runner.loaded
        self.model_name, self.model_config, self.tokenizer = (
            loaded.name, loaded.config, loaded.tokenizer)
        context = loaded.config.max_position_embeddings
        self.max_model_len = min(config.scheduler.max_model_len or context, context)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size,
                                   config.enable_prefix_caching)
        self.scheduler = Scheduler(
            dataclasses.replace(config.scheduler, max_model_len=self.max_model_len), self.blocks)
        self.needs_latency_profile = False
        if prices_steps(config.scheduler.policy) \
                and "latency" not in config.scheduler.policy_options:
            self._price_steps_for_this_hardware()
        self.eos_token_id = eos_token_id(self.tokenizer, self.model_config)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._arrived_kv: dict[str, torch.Tensor] = {}  # remote KV not yet in blocks
        self._ids = itertools.count()
        self.clock: Callable[[], float] = time.monotonic
        self.last_step_time = 0.0
        self.step_log = StepLog(config.log_stats_interval_s)

    def _price_steps_for_this_hardware(self) -> None:
        """A policy that prices steps gets this machine's latency profile: a shipped one made
        on the same hardware for the same model; failing that, `needs_latency_profile` asks
        whoever starts the engine to measure one (profiler.calibrate): never another
        machine's, which would misjudge every step."""
        latency = shipped_profile(self.runner.device, self.config.model)
        if latency is None:
            self.needs_latency_profile = True
        else:
            self.use_latency_profile(latency)

    def use_latency_profile(self, latency: LatencyModel) -> None:
        """Price steps with `latency` from now on (a fresh scheduler: call before requests)."""
        assert not self.scheduler.has_unfinished()
        s = self.scheduler.config
        self.scheduler = Scheduler(dataclasses.replace(
            s, policy_options={**s.policy_options, "latency": latency}), self.blocks)
        self.needs_latency_profile = False

    def reset_scheduler(self) -> None:
        """A fresh scheduler of the same settings, e.g. after warm-up steps that no policy
        should learn from (call with no request in flight)."""
        assert not self.scheduler.has_unfinished()
        self.scheduler = Scheduler(self.scheduler.config, self.blocks)

    def shutdown(self) -> None:
        self.runner.shutdown()

    def check(self, request: Request) -> None:
        self.scheduler.check(request)

    def submit(self, request: Request) -> Request:
        """Queue a request built by make_request (ValueError if it could never run here)."""
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

    def expect_remote(self, request: Request) -> None:
        """Take over a request another engine prefilled (its first token sampled there): it
        waits in the scheduler until kv_arrived() brings that engine's KV."""
        self.scheduler.add_remote(request)
        detok = IncrementalDetokenizer(self.tokenizer, request.sampling_params.stop)
        detok.push(request.output_token_ids)  # the text the client already has
        self._detokenizers[request.request_id] = detok

    def kv_arrived(self, request_id: str, kv: torch.Tensor) -> None:
        """The KV of an expected request, on this engine's device; the step that admits it
        writes it into its blocks. Ignored for a request aborted meanwhile."""
        if self.scheduler.kv_arrived(request_id):
            self._arrived_kv[request_id] = kv

    def has_runnable(self) -> bool:
        return self.scheduler.has_runnable()

    def abort(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id, self.clock())
        if request is not None:
            self._forget(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(num_running=len(s.running),
                           num_waiting=len(s.waiting) + len(s.preempted) + len(s.remote),
                           num_preempted=len(s.preempted), kv_cache_usage=self.blocks.usage)

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        launched = self.launch()
        touched = self.complete(launched)
        return self.outputs(launched.rejected, touched, self.clock())

    # The step in three parts, so that a driver (OverlappedSteps) can build one step's
    # outputs while the device runs the next.
    def launch(self) -> LaunchedStep:
        """Schedule a step and enqueue it on the device; returns without waiting for it."""
        start = self.clock()
        plan = self.scheduler.schedule(start)
        for request in plan.imported:
            kv = self._arrived_kv.pop(request.request_id)
            self.runner.import_blocks(request.block_ids[: kv.shape[2]], kv)
        rejected = [self._rejection(r) for r in plan.rejected]
        pending = None if plan.is_empty else self.runner.launch(plan)
        return LaunchedStep(start, plan, pending, rejected)

    def complete(self, launched: LaunchedStep) -> list[Request]:
        """Wait for a launched step's tokens and apply them to the requests; returns those
        that got a token or finished."""
        if launched.pending is None:
            return []
        sampled = launched.pending.get()
        now = self.clock()
        self.last_step_time = now - launched.start
        policy = self.scheduler.policy
        policy.observe(launched.plan, self.last_step_time)
        touched = self.scheduler.update(launched.plan, sampled, now)
        logprobs = launched.pending.logprobs()
        if logprobs:
            for request in touched:
                if request.request_id in logprobs:
                    request.output_logprobs.append(logprobs[request.request_id])
        self.step_log.record(launched.plan, self.last_step_time, len(launched.rejected))
        if self.step_log.due(now):
            self.step_log.log(now, self.stats(), policy.state())
        return touched

    def outputs(self, rejected: list[RequestOutput], touched: list[Request], now: float
                ) -> list[RequestOutput]:
        """Detokenize and report what a completed step did (stop strings end requests
        here: a step launched meanwhile computed one token too many for them, dropped).
        Requests aborted since they were touched are left out."""
        return rejected + [self._output(r, now) for r in touched
                           if r.request_id in self._detokenizers]

    def _rejection(self, request: Request) -> RequestOutput:
        """Admission control turned it away: an output that ends it with the reason."""
        self._forget(request)
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids, text="",
            delta_text="", token_ids=[], finished=True, finish_reason="rejected",
            timings=RequestTimings.of(request), slo=request.slo, error=request.reject_reason)

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
            finished=request.is_finished, finish_reason=request.status.finish_reason,
            timings=RequestTimings.of(request), slo=request.slo,
            logprobs=request.output_logprobs[: request.num_output_tokens]
            if request.sampling_params.logprobs is not None else None)

    def _forget(self, request: Request) -> None:
        self._detokenizers.pop(request.request_id, None)
        self._arrived_kv.pop(request.request_id, None)
        self.runner.release(request.request_id)


@dataclass
class LaunchedStep:
    start: float
    plan: Plan
    pending: PendingTokens | None  # None: nothing to run
    rejected: list[RequestOutput]


class OverlappedSteps:
    """Drives an engine so that the host detokenizes and reports step N while the device
    runs step N+1 (on a GPU the host's part took ~2-4 ms of a ~10-20 ms step at batch
    100-256, the device idle meanwhile). Each call returns the outputs of the step before;
    call while has_work()."""

    def __init__(self, engine: LLMEngine, overlap: bool | None = None):
        """overlap None: on CUDA only (a CPU step runs inside launch(): nothing to overlap,
        and each output would only come a step later)."""
        self.engine = engine
        self.overlap = engine.runner.device.type == "cuda" if overlap is None else overlap
        self._done: tuple[list[RequestOutput], list[Request], float] | None = None

    def has_work(self) -> bool:
        return self._done is not None or self.engine.has_unfinished()

    def step(self) -> list[RequestOutput]:
        engine = self.engine
        if not self.overlap:
            return engine.step()
        launched = engine.launch() if engine.has_unfinished() else None
        outputs = engine.outputs(*self._done) if self._done is not None else []
        self._done = None
        if launched is not None:
            touched = engine.complete(launched)
            self._done = (launched.rejected, touched, engine.clock())
        return outputs

    def abandon(self) -> None:
        """Forget the step whose outputs are not built yet (after a failed step)."""
        self._done = None


# shapes whose steps cost the same as a profiled one (Llama-3.1 differs from Llama-3 only in
# its rope scaling and context length)
SAME_STEP_COSTS = {"llama-3.1-8b": "llama-3-8b"}


def shipped_profile(device: torch.device, model: str | None) -> LatencyModel | None:
    """The shipped profile measured on this kind of device with this model, if any."""
    if device.type == "cpu":
        return LatencyModel.default() if model is None else None  # the embedded model's
    if device.type != "cuda" or not (model or "").startswith("dummy:"):
        return None
    gpu = torch.cuda.get_device_name(device).lower()
    shape = model.removeprefix("dummy:")
    shape = SAME_STEP_COSTS.get(shape, shape)
    for name in ("h100", "h200"):
        path = PROFILES / f"gpu-{name}-{shape}.json"
        if name in gpu and path.exists():
            return LatencyModel.from_file(path)
    return None


@functools.cache
def max_chars_per_token(tokenizer: Any) -> int:
    """The most characters one token of this vocabulary can stand for (byte-level pieces
    spell each byte with one character, so it bounds decoded characters too)."""
    return max(len(piece) for piece in tokenizer.get_vocab())
