"""The processes of a tensor-parallel engine: rank 0 (the engine's own process) starts ranks
1..size-1, each of which builds its own ModelRunner and follows rank 0's broadcasts."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import torch

from sloserve.config import EngineConfig
from sloserve.worker import dist
from sloserve.worker.model_runner import ModelRunner


class RankGroup:
    """Rank 0's handle on the other ranks: starts them, feeds them each step, stops them."""

    def __init__(self, config: EngineConfig):
        size = config.tensor_parallel_size
        port = dist.free_port()
        context = multiprocessing.get_context("spawn")
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or size) // size))}
        self.processes = [context.Process(target=rank_main, daemon=True,
                                          args=(rank, port, config, env))
                          for rank in range(1, size)]
        for p in self.processes:
            p.start()
        dist.init_group(0, size, port, config.torch_device)

    def broadcast(self, message: Any) -> None:
        dist.broadcast(message)

    def shutdown(self) -> None:
        self.broadcast(("stop",))
        for p in self.processes:
            p.join(timeout=30)
        dist.destroy()


def start_runner(config: EngineConfig) -> ModelRunner:
    """Rank 0's runner, with the other ranks started behind it when tp > 1."""
    peers = RankGroup(config) if config.tensor_parallel_size > 1 else None
    return ModelRunner(config, 0, peers)


def rank_main(rank: int, port: int, config: EngineConfig, env: dict[str, str]) -> None:
    """Ranks > 0: load the shard, size the cache with the others, then run what rank 0
    broadcasts until it says stop."""
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    dist.init_group(rank, config.tensor_parallel_size, port, config.torch_device)
    runner = ModelRunner(config, rank)
    while runner.follow(dist.broadcast()):
        pass
    dist.destroy()
