"""The collectives of a tensor-parallel engine's ranks (torch.distributed)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as torch_dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, port: int, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                  init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                  world_size=size)


def agree_on_blocks(num_blocks: int, device: torch.device) -> int:
    """Every rank sized its own cache; all take the smallest."""
    t = torch.tensor([num_blocks], device=device if device.type == "cuda" else "cpu")
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    return int(t.item())


def broadcast(message=None):
    """Rank 0 sends `message` to every rank; the others receive and return it."""
    box = [message]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_heads(local: torch.Tensor, size: int) -> torch.Tensor | None:
    """Rank 0 gets every rank's KV heads side by side (dim 4); the others get None."""
    if torch_dist.get_rank() != 0:
        torch_dist.gather(local, dst=0)
        return None
    shards = [torch.empty_like(local) for _ in range(size)]
    torch_dist.gather(local, shards, dst=0)
    return torch.cat(shards, dim=4)


def scatter_heads(shards: list[torch.Tensor] | None, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Rank 0 passes one shard per rank; each rank gets its own (into `out` off rank 0)."""
    if shards is not None:
        out = torch.empty_like(shards[0])
    torch_dist.scatter(out, shards, src=0)
    return out


def destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
