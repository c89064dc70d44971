"""The tensor-parallel executor: one worker process per extra rank, driven by the engine process (rank 0).

The scheduler, the KV block manager, sampling and output processing stay in the engine process; each
step rank 0 sends the step's flat batch (token ids and the `BatchLayout`: positions, block tables, slot
mapping) to every worker down a pipe, then every rank runs the same forward over its shard of the
model (ember.models.tensor_parallel) and its share of the KV cache, meeting in the model's all-reduces
(gloo on CPU, NCCL on CUDA). Logits are vocabulary-parallel, so rank 0 sends the rows it wants logits
for as well. The pipe carries the commands (an idle server waits on it for hours, where a collective
would time out); torch.distributed carries only the model's own traffic.

A worker that dies ends the engine with `WorkerDiedError` naming the rank and its exit code, on the next
step or inside the current one (its collectives fail when the peer's sockets close), never a hang.
Workers die with the engine process (PR_SET_PDEATHSIG) and are told to stop on `shutdown()`.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import pickle
import secrets
import traceback
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from ember.engine.attention import BatchLayout
from ember.models import shm_collectives
from ember.models.shm_collectives import SharedMemoryComm
from ember.models.tensor_parallel import TensorParallelGroup, shard_hf_tensors, shard_model
from ember.process import die_with_parent

logger = logging.getLogger(__name__)

# Model loading on a loaded machine can take minutes; a collective that waits longer than this on a
# live peer is a bug, and one on a dead peer fails at once when its sockets close.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone: the engine cannot run another step."""


def rank_threads(size: int, threads: int | None) -> int:
    """Compute threads per rank: `threads` if given, else the cores this process may use split evenly."""
    if threads is not None:
        return threads
    return max(1, len(os.sched_getaffinity(0)) // size)


def rank_cores(rank: int, size: int, threads: int) -> set[int] | None:
    """The cores rank `rank` is pinned to (its own `threads` of them), or None when there are too few."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < size * threads:
        return None
    return set(cores[rank * threads:(rank + 1) * threads])


def _send(conn: Connection, message: tuple) -> None:
    # plain pickle: multiprocessing's would move tensors through shared-memory files, slower for small ones
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _pack(t: torch.Tensor) -> tuple:
    """A tensor for the pipe as a numpy array (which pickles ~100x faster than a tensor), bf16 as int16."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return "bf16", t.view(torch.int16).numpy()
    return None, t.numpy()


def _unpack(packed: tuple, device: torch.device) -> torch.Tensor:
    kind, array = packed
    t = torch.from_numpy(array)
    return (t.view(torch.bfloat16) if kind == "bf16" else t).to(device)


def _device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_group(store_port: int, rank: int, size: int, device: torch.device, shm_name: str | None,
               store=None, shm: SharedMemoryComm | None = None) -> TensorParallelGroup:
    """Rank `rank`'s process group; on CPU with the shared-memory collectives (segment `shm_name`, which rank 0
    created before starting the workers: `shm`) for the tensors that fit."""
    if store is None:
        store = dist.TCPStore("127.0.0.1", store_port, size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    if shm is None and shm_name is not None:
        shm = SharedMemoryComm(shm_name, rank, size)
    return TensorParallelGroup(rank, size, shm=shm)


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..size-1: start them, send each step, stop them."""

    def __init__(self, config, size: int, device: torch.device, threads: int):
        self.size = size
        self.threads = threads
        self.dead: str | None = None
        context = mp.get_context("spawn")  # a fresh interpreter: no copy of the parent's threads or model
        self.shm_name = self.shm = None
        self.processes, self.conns = [], []
        if device.type == "cpu" and shm_collectives.available():
            self.shm_name = f"ember-tp-{os.getpid()}-{secrets.token_hex(4)}"
            self.shm = SharedMemoryComm(self.shm_name, 0, size, create=True,
                                        peers_alive=lambda: all(p.is_alive() for p in self.processes))
        self.store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                                   wait_for_workers=False)
        for rank in range(1, size):
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, name=f"ember-tp{rank}", daemon=True,
                                      args=(config, rank, size, self.store.port, self.shm_name, device, threads,
                                            child))
            process.start()
            child.close()
            self.processes.append(process)
            self.conns.append(parent)
        logger.info("tensor parallel: %d ranks, %d thread(s) each; worker pids %s", size, threads,
                    " ".join(str(p.pid) for p in self.processes))
        for rank in range(1, size):
            self._expect(rank, "hello", "starting")
        self.group = init_group(self.store.port, 0, size, device, self.shm_name, self.store, self.shm)

    def _expect(self, rank: int, kind: str, doing: str):
        conn, process = self.conns[rank - 1], self.processes[rank - 1]
        ready = wait([conn, process.sentinel])
        if conn in ready:
            try:
                got, payload = pickle.loads(conn.recv_bytes())
            except EOFError:
                got, payload = None, None
            if got == kind:
                return payload
            if got == "error":
                self._fail(f"tensor-parallel worker {rank} failed while {doing}: {payload}")
        process.join(timeout=10)
        self._fail(f"tensor-parallel worker {rank} exited (code {process.exitcode}) while {doing}")

    def _fail(self, message: str):
        self.dead = message
        self.shutdown()
        raise WorkerDiedError(message)

    def start(self, num_blocks: int) -> None:
        """Every worker has its shard: size its KV cache as rank 0's and wait until each is ready."""
        for conn in self.conns:
            _send(conn, ("start", num_blocks))
        for rank in range(1, self.size):
            self._expect(rank, "ready", "loading the model")
        if self.shm is not None:
            self.shm.unlink()  # every rank has it mapped

    def _broadcast(self, message: tuple) -> None:
        if self.dead is not None:
            raise WorkerDiedError(self.dead)
        for rank, (conn, process) in enumerate(zip(self.conns, self.processes), start=1):
            if not process.is_alive():
                self._fail(f"tensor-parallel worker {rank} exited (code {process.exitcode})")
            try:
                _send(conn, message)
            except OSError:
                process.join(timeout=10)
                self._fail(f"tensor-parallel worker {rank} exited (code {process.exitcode})")

    def run(self, message: tuple, local):
        """Send `message` to the workers, then run rank 0's part (`local()`): a failure inside the collectives
        because a worker died is said as that."""
        self._broadcast(message)
        try:
            return local()
        except RuntimeError:
            for rank, process in enumerate(self.processes, start=1):
                process.join(timeout=2)  # a peer whose sockets closed has exited (or is exiting): its code says why
                if process.exitcode is not None:
                    self._fail(f"tensor-parallel worker {rank} exited (code {process.exitcode}) during a step")
            raise

    def forward(self, ids: torch.Tensor, layout: BatchLayout, local):
        """Every worker runs the forward of this step's batch; `local()` is rank 0's."""
        message = ("forward", _pack(ids), layout.query_lens, layout.context_lens, _pack(layout.block_tables),
                   _pack(layout.slot_mapping), _pack(layout.positions))
        return self.run(message, local)

    def compute_logits(self, hidden: torch.Tensor, local):
        """Every worker computes its vocabulary slice of these rows' logits; `local()` is rank 0's (the whole)."""
        return self.run(("logits", _pack(hidden)), local)

    def update_weights(self, items: list[tuple[str, torch.Tensor]], strict: bool) -> None:
        """Whole tensors by HF name (rank 0 has loaded its pieces, so names and shapes are known good); each
        worker copies in its own pieces before its next step."""
        self._broadcast(("update_weights", [(name, _pack(t)) for name, t in items], strict))

    def release_kv_cache(self) -> None:
        self._broadcast(("release_kv",))

    def allocate_kv_cache(self) -> None:
        self._broadcast(("allocate_kv",))

    def shutdown(self) -> None:
        for conn, process in zip(self.conns, self.processes):
            if process.is_alive():
                try:
                    _send(conn, ("stop",))
                except OSError:
                    pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if dist.is_initialized():
            dist.destroy_process_group()


def _worker_main(config, rank: int, size: int, store_port: int, shm_name: str | None, device: torch.device,
                 threads: int, conn: Connection) -> None:
    die_with_parent()
    try:
        cores = rank_cores(rank, size, threads)
        if cores is not None:
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
        device = _device(device, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _send(conn, ("hello", None))
        group = init_group(store_port, rank, size, device, shm_name)
        runner = _load_shard(config, group, device, conn)
    except Exception as e:  # said to rank 0, which raises it as the engine's start-up error
        traceback.print_exc()
        _send(conn, ("error", f"{type(e).__name__}: {e}"))
        return
    _send(conn, ("ready", None))
    _serve(runner, conn)


def _load_shard(config, group: TensorParallelGroup, device: torch.device, conn: Connection):
    from ember.engine.runner import ModelRunner
    from ember.models import load_model

    model, _ = load_model(config.model, config.dtype, device)
    local = shard_model(model, group)
    kind, *args = pickle.loads(conn.recv_bytes())
    if kind != "start":  # rank 0 failed to start: it says why
        raise SystemExit(0)
    num_blocks = args[0]
    return ModelRunner(model, local, num_blocks, config.cache.block_size, device, config.seed,
                       config.attention_backend, config.cache.kv_cache_dtype, None, config.batch_invariant)


@torch.inference_mode()
def _serve(runner, conn: Connection) -> None:
    while True:
        try:
            kind, *args = pickle.loads(conn.recv_bytes())
        except EOFError:  # the engine process is gone
            return
        if kind == "forward":
            ids, query_lens, context_lens, block_tables, slot_mapping, positions = args
            device = runner.device
            layout = BatchLayout(query_lens, context_lens, _unpack(block_tables, device), _unpack(slot_mapping, device),
                                 _unpack(positions, device))
            with runner.routing():
                runner.run_model(_unpack(ids, device), layout)
        elif kind == "logits":
            with runner.routing():
                runner.model.compute_logits(_unpack(args[0], runner.device))
        elif kind == "update_weights":
            from ember.models.loader import load_weights

            items, strict = args
            whole = ((name, _unpack(t, runner.device)) for name, t in items)
            pieces = shard_hf_tensors(runner.model, runner.model.tp_group, whole)
            load_weights(runner.model, ((n, t, "update_weights") for n, t in pieces), strict=strict)
        elif kind == "release_kv":
            runner.release_kv_cache()
        elif kind == "allocate_kv":
            runner.allocate_kv_cache()
        elif kind == "stop":
            if dist.is_initialized():
                dist.destroy_process_group()
            return

