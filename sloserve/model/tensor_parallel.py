"""Tensor parallelism inside one engine instance (Megatron-style), one process per rank.

Attention heads and MLP columns are split over the ranks: q/k/v and gate/up projections by
output rows, o_proj and down_proj by input columns, each followed by an all-reduce; every rank
keeps the KV cache of its own KV heads. Embeddings, norms and lm_head are replicated. Rank 0
owns the engine (scheduler, sampler, detokenizer) and broadcasts each step's inputs; the other
ranks only run the same forward on their shard (`worker_main`). The scheduler runs once.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sloserve.model.config import ModelConfig

if TYPE_CHECKING:
    from sloserve.engine import EngineConfig
    from sloserve.model.decoder import DecoderLM
    from sloserve.runner import StepInputs


def local_config(config: ModelConfig, size: int) -> ModelConfig:
    """The shape one rank holds; raises ValueError when the model cannot be split so."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % size:
            raise ValueError(f"tensor parallel size {size} does not divide the model's "
                             f"{name} ({getattr(config, name)})")
    return dataclasses.replace(config, num_heads=config.num_heads // size,
                               num_kv_heads=config.num_kv_heads // size,
                               intermediate_size=config.intermediate_size // size)


def shard_state(full: dict[str, torch.Tensor], config: ModelConfig, rank: int,
                size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a full (fused-name) state dict."""
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    out = {}
    for name, t in full.items():
        if ".qkv_proj." in name:  # rows: [q | k | v], each split by heads
            parts = t.split([q, kv, kv])
            out[name] = torch.cat([p.chunk(size)[rank] for p in parts]).clone()
        elif ".gate_up_proj." in name:  # rows: [gate | up], each split
            out[name] = torch.cat([p.chunk(size)[rank] for p in t.chunk(2)]).clone()
        elif name.endswith(("o_proj.weight", "down_proj.weight")):  # split the input columns
            out[name] = t.chunk(size, dim=1)[rank].clone()
        else:
            out[name] = t
    return out


def shard_model(full: DecoderLM, rank: int, size: int) -> DecoderLM:
    """A model of this rank's shape holding its slice of `full`'s weights."""
    from sloserve.model.loader import empty_model

    backend = full.layers[0].self_attn.backend
    weight = next(full.parameters())
    model = empty_model(local_config(full.config, size), weight.dtype, weight.device, backend)
    model.load_state_dict(shard_state(full.state_dict(), full.config, rank, size))
    for layer in model.layers:
        layer.self_attn.all_reduce = layer.mlp.all_reduce = True
    return model.eval()


# ---- processes -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, port: int, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)


def agree_on_blocks(num_blocks: int, device: torch.device) -> int:
    """Every rank sized its own cache; all take the smallest."""
    t = torch.tensor([num_blocks], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class TensorParallelRanks:
    """Rank 0's handle on ranks 1..size-1: starts them and feeds them each step."""

    def __init__(self, config: EngineConfig, size: int):
        self.size = size
        self.port = free_port()
        context = multiprocessing.get_context("spawn")
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or size) // size))}
        self.processes = [context.Process(target=worker_main, daemon=True,
                                          args=(rank, size, self.port, config, env))
                          for rank in range(1, size)]
        for p in self.processes:
            p.start()

    def broadcast(self, message: Any) -> None:
        dist.broadcast_object_list([message], src=0)

    def shutdown(self) -> None:
        if dist.is_initialized():
            self.broadcast(("stop",))
            for p in self.processes:
                p.join(timeout=30)
            dist.destroy_process_group()


def worker_main(rank: int, size: int, port: int, config: EngineConfig,
                env: dict[str, str]) -> None:
    """Ranks > 0: load the shard, size the cache with the others, then run what rank 0
    broadcasts until it says stop."""
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    from sloserve.engine import build_model_and_blocks
    from sloserve.runner import ModelRunner

    device = config.torch_device
    init_group(rank, size, port, device)
    model, num_blocks, _ = build_model_and_blocks(config, rank, size)
    runner = ModelRunner(model, num_blocks, config.block_size)
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        kind, *payload = message[0]
        if kind == "stop":
            break
        if kind == "step":
            step: StepInputs = payload[0]
            runner.forward(step, torch.zeros(0, dtype=torch.long, device=runner.device))
        elif kind == "read_kv":  # disaggregation: rank 0 gathers every rank's KV heads
            dist.gather(runner.read_blocks(payload[0]), dst=0)
        elif kind == "write_kv":  # ...and scatters them on the importing side
            block_ids, shape = payload
            mine = torch.empty(shape, dtype=runner.dtype, device=runner.device)
            dist.scatter(mine, src=0)
            runner.write_blocks(block_ids, mine)
    dist.destroy_process_group()
