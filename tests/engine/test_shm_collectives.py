"""The shared-memory all-reduce / all-gather of tensor parallel on CPU, between two real processes:
sums and gathers equal to computing them in one place (rank order, so the same bits on every rank), over
many calls of changing shapes and dtypes (the alternating slots), and a dead peer ends a wait with an error."""

from __future__ import annotations

import multiprocessing as mp
import secrets

import pytest
import torch

from ember.models import shm_collectives
from ember.models.shm_collectives import SharedMemoryComm

pytestmark = pytest.mark.skipif(not shm_collectives.available(), reason="no /dev/shm on this machine")


def tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    shapes = [(1, 64), (7, 64), (3, 5, 32), (64, 512), (1,)] * 8
    return [torch.randn(shape, generator=g, dtype=torch.float32 if i % 2 else torch.bfloat16)
            for i, shape in enumerate(shapes)]


def _peer(name: str, out) -> None:
    comm = SharedMemoryComm(name, 1, 2, slot_bytes=1 << 18)
    results = []
    for x in tensors(1):
        results.append((comm.all_reduce(x.clone()), comm.all_gather_last(x)))
    out.put([(a.float().tolist(), b.float().tolist()) for a, b in results[:3]])


def test_two_processes_reduce_and_gather_as_one_would():
    name = f"ember-test-{secrets.token_hex(4)}"
    ctx = mp.get_context("spawn")
    peer_out = ctx.Queue()
    peer = ctx.Process(target=_peer, args=(name, peer_out))
    comm = SharedMemoryComm(name, 0, 2, slot_bytes=1 << 18, create=True, peers_alive=lambda: peer.is_alive())
    try:
        peer.start()
        mine, theirs = tensors(0), tensors(1)
        firsts = []
        for a, b in zip(mine, theirs):
            reduced, gathered = comm.all_reduce(a.clone()), comm.all_gather_last(a)
            assert torch.equal(reduced, a + b)  # rank order: a + b, on both ranks
            assert torch.equal(gathered, torch.cat((a, b), dim=-1))
            firsts.append((reduced, gathered))
        got = peer_out.get(timeout=120)
        for (reduced, gathered), (peer_reduced, peer_gathered) in zip(firsts, got):
            assert reduced.float().tolist() == peer_reduced and gathered.float().tolist() == peer_gathered
        peer.join(60)
        assert peer.exitcode == 0
    finally:
        if peer.is_alive():
            peer.kill()
        comm.close()


def test_a_dead_peer_ends_the_wait_with_an_error():
    name = f"ember-test-{secrets.token_hex(4)}"
    comm = SharedMemoryComm(name, 0, 2, slot_bytes=1 << 12, create=True, peers_alive=lambda: False)
    try:
        with pytest.raises(RuntimeError, match="peer exited"):
            comm.all_reduce(torch.ones(4))
    finally:
        comm.close()
