"""The direct KV link on the CPU (gloo): ordered transfers, and a broken link fails its
transfers through their error callbacks instead of leaving them waiting."""

from __future__ import annotations

import gc
import socket
import threading

import torch

from sloserve.cluster.kv_transfer.link import KVLink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_link_moves_kv_in_order_and_a_dead_peer_fails_what_waits():
    port, cpu = free_port(), torch.device("cpu")
    sender, receiver = KVLink(0, "127.0.0.1", port, cpu), KVLink(1, "127.0.0.1", port, cpu)
    kvs = [torch.randn(2, 3, 4) * (i + 1) for i in range(3)]
    got, errors, done = {}, [], threading.Semaphore(0)

    def receive(seq: int):
        def job():
            got[seq] = receiver.receive((2, 3, 4), torch.float32)
            done.release()
        return job

    def failed(error: Exception) -> None:
        errors.append(error)
        done.release()

    for seq in (2, 0, 1):  # posted out of order, run in order: else they land crosswise
        receiver.post(seq, receive(seq), failed)
        sender.post(seq, lambda kv=kvs[seq]: sender.send(kv, None), failed)
    for _ in range(3):
        assert done.acquire(timeout=60)
    assert not errors and all(torch.equal(got[i], kvs[i]) for i in range(3))

    sender.close(RuntimeError("prefill instance gone"))  # and its process group with it
    sender._group = None
    gc.collect()
    receiver.post(3, receive(3), failed)  # its sender never comes
    receiver.post(4, receive(4), failed)  # queued behind it
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert len(errors) == 2 and 3 not in got and 4 not in got
    receiver.post(5, receive(5), failed)  # a broken link fails at once
    assert done.acquire(timeout=5) and len(errors) == 3


def test_a_transfer_past_its_timeout_breaks_the_link_once():
    """A peer that joined but never sends (as a stuck NCCL peer looks): the waiting transfer
    fails after the link's job timeout, once, and the link takes nothing more."""
    port, cpu = free_port(), torch.device("cpu")
    links = [KVLink(0, "127.0.0.1", port, cpu),  # joins, never sends
             KVLink(1, "127.0.0.1", port, cpu, job_timeout_s=0.5)]
    receiver = links[1]
    errors, failed = [], threading.Event()

    def on_error(error: Exception) -> None:
        errors.append(error)
        failed.set()

    receiver.post(0, lambda: receiver.receive((4,), torch.float32), on_error)
    assert failed.wait(timeout=30)
    assert isinstance(errors[0], TimeoutError)
    receiver.post(1, lambda: None, on_error)
    assert len(errors) == 2  # failed at once: the link is broken
