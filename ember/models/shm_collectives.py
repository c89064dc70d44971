"""All-reduce and all-gather between the tensor-parallel ranks of one machine through shared memory.

Gloo's TCP loopback round trip costs ~1.2 ms per all-reduce on a 2-core host (BENCHMARKS.md, issue 27):
33 of them per decode step made TP=2 nine times slower than one process. Here each rank copies its tensor
into its own slot of a shared segment and raises its flag; every rank waits until all flags are up, then
sums the slots in rank order, so every rank gets the same bits whatever the arrival order. Two sets of
slots alternate between calls: a rank can only start call g after seeing every flag at g-1, by which time
every rank has finished reading call g-2's slots, the ones it is about to overwrite. x86's store order
makes a slot's data visible before its flag. Tensors larger than a slot go through torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time

import torch

SHM_DIR = "/dev/shm"
_LINE = 64  # one flag per cache line: ranks never write the same line
# Waiting: spin first (a peer at the same point arrives within microseconds), then nap, growing to
# _MAX_NAP, so a rank whose peer is still computing (or was descheduled by other work) gives its core away.
_SPINS = 200
_MAX_NAP = 2e-4


class SharedMemoryComm:
    def __init__(self, name: str, rank: int, size: int, slot_bytes: int = 4 << 20, create: bool = False,
                 peers_alive=None):
        """`peers_alive()`: False once a peer process has gone (checked while waiting, so a dead peer ends
        the wait with an error instead of a spin forever)."""
        self.rank, self.size, self.slot_bytes = rank, size, slot_bytes
        self.peers_alive = peers_alive
        total = _LINE * size + 2 * size * slot_bytes
        self.path = os.path.join(SHM_DIR, name)
        if create:
            with open(self.path, "wb") as f:
                f.truncate(total)  # sparse: zeros, pages taken as they are written
        # torch maps the file shared and unmaps it when the last view goes (no buffer bookkeeping to get wrong)
        raw = torch.from_file(self.path, shared=True, size=total, dtype=torch.uint8)
        # numpy for the flags: reading one costs ~0.1 us where a torch op costs several
        self.flags = raw[:_LINE * size].view(torch.int64)[::_LINE // 8].numpy()
        self.slots = raw[_LINE * size:].view(2, size, slot_bytes)
        self._views: dict[tuple, torch.Tensor] = {}  # (parity, rank, dtype, shape) -> a typed view of a slot
        self.generation = 0
        self.owner = create

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.slot_bytes

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape and dtype on each), as views of the shared slots."""
        self.generation += 1
        generation, parity = self.generation, self.generation % 2
        views = self._views
        key = (parity, x.dtype, x.shape)
        slots = views.get(key)
        if slots is None:
            if len(views) > 512:  # prompt chunks of many lengths: keep the dict small
                views.clear()
            nbytes = x.numel() * x.element_size()
            slots = views[key] = [self.slots[parity, r, :nbytes].view(x.dtype).view(x.shape) for r in range(self.size)]
        slots[self.rank].copy_(x)
        flags = self.flags
        flags[self.rank] = generation
        spins = 0
        while min(flags) < generation:
            spins += 1
            if spins > _SPINS:  # the peer is late (still computing, or sharing our core): stop taking the CPU
                time.sleep(min(_MAX_NAP, 1e-5 * (spins - _SPINS)))
                if spins % 64 == 0 and self.peers_alive is not None and not self.peers_alive():
                    raise RuntimeError("shared-memory all-reduce: a tensor-parallel peer exited")
        return slots

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        x.copy_(parts[0])
        for part in parts[1:]:
            x.add_(part)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(x.contiguous()), dim=-1)

    def unlink(self) -> None:
        """Remove the segment's name once every rank has mapped it: the mappings live on, and a crash can no
        longer leave the file behind."""
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close(self) -> None:
        self.flags = self.slots = None
        self._views.clear()
        self.unlink()


def available() -> bool:
    """Whether this machine can use these collectives: a shared-memory file system for the segment (Linux's
    /dev/shm), and x86's store order, which the flags rely on (elsewhere a flag could be seen before its data)."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)
