"""`ember bench collectives`: the all-reduce latency tensor parallel pays per layer, between two real
processes on this machine: gloo over loopback (torch.distributed) against ember's shared-memory one,
alternating in one invocation."""

from __future__ import annotations

import multiprocessing as mp
import secrets
import socket
import statistics
import time

import torch
import torch.distributed as dist

from ember.models.shm_collectives import SharedMemoryComm


def _timed(reduce, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        reduce(x)
    return (time.perf_counter() - start) / calls


def _rank(rank: int, port: int, name: str, shape: tuple, calls: int, rounds: int, out) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    shm = SharedMemoryComm(name, 0, 2, create=True) if rank == 0 else None
    dist.barrier()  # rank 0 has created the segment
    if shm is None:
        shm = SharedMemoryComm(name, 1, 2)
    x = torch.randn(shape).bfloat16()
    times = {"gloo": [], "shared memory": []}
    for _ in range(rounds):  # A B A B: drift hits both alike
        times["gloo"].append(_timed(lambda t: dist.all_reduce(t.clone()), x, calls))
        times["shared memory"].append(_timed(lambda t: shm.all_reduce(t.clone()), x, calls))
    if rank == 0:
        out.put({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()
    shm.close()


def run(shape: tuple[int, ...], calls: int, rounds: int) -> dict[str, float]:
    """Median seconds per all-reduce of a bf16 tensor of `shape` between two processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    name = f"ember-bench-{secrets.token_hex(4)}"
    procs = [context.Process(target=_rank, args=(r, port, name, shape, calls, rounds, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join()
    return result
