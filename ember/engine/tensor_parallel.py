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

With `distributed_executor="ray"` the workers are Ray actors placed on the cluster the engine process is
connected to (`ray start` on each node, then `ray.init()` or `RAY_ADDRESS`): the same commands go by actor
calls (in order, as Ray runs one caller's calls), the process group's store listens on rank 0's node
address, and ranks on other nodes than rank 0 use gloo/NCCL only (no shared memory between machines).
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import contextlib
import pickle
import secrets
import signal
import threading
import traceback
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from ember.engine.attention import BatchLayout
from ember.models import shm_collectives
from ember.models.shm_collectives import SharedMemoryComm
from ember.models.tensor_parallel import TensorParallelGroup, load_model_shard, shard_hf_tensors
from ember.process import die_with_parent, start_from_keeper

logger = logging.getLogger(__name__)

# Model loading on a loaded machine can take minutes; a collective that waits longer than this on a
# live peer is a bug, and one on a dead peer fails at once when its sockets close.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
PLACEMENT_TIMEOUT_S = 300  # a Ray actor not placed by then: the cluster lacks the resources


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


def _encode(message: tuple) -> bytes:
    # plain pickle: multiprocessing's would move tensors through shared-memory files, slower for small ones
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(_encode(message))


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
    """Rank `rank`'s device: the GPU `rank` places after rank 0's (a Ray actor sees only its own: cuda:0)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def init_group(store_addr: tuple[str, int], rank: int, size: int, device: torch.device, shm_name: str | None,
               store=None, shm: SharedMemoryComm | None = None) -> TensorParallelGroup:
    """Rank `rank`'s process group; on CPU with the shared-memory collectives (segment `shm_name`, which rank 0
    created before starting the workers: `shm`) for the tensors that fit. On CPU the group is gloo's, private to
    the engine (a trainer in the same process keeps its default group); on CUDA it is the default group (NCCL)."""
    if store is None:
        store = dist.TCPStore(*store_addr, size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    group = None
    if device.type == "cuda":
        dist.init_process_group("nccl", store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    else:
        group = dist.ProcessGroupGloo(dist.PrefixStore("ember-tp", store), rank, size, COLLECTIVE_TIMEOUT)
    if shm is None and shm_name is not None:
        shm = SharedMemoryComm(shm_name, rank, size)
    return TensorParallelGroup(rank, size, group, shm)


def _leave_group(group: TensorParallelGroup | None) -> None:
    if group is not None and group.group is None and dist.is_initialized():  # the default group was ours (CUDA)
        dist.destroy_process_group()


class _ProcessLink:
    """A worker started here with multiprocessing: commands down a pipe, death seen by its exit code."""

    def __init__(self, context, rank: int, args: tuple):
        self.rank = rank
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, name=f"ember-tp{rank}", daemon=True,
                                       args=(*args, child))
        start_from_keeper(self.process.start)  # (PDEATHSIG follows the starting thread: one that lasts)
        child.close()

    def describe(self) -> str:
        return f"pid {self.process.pid}"

    def send(self, data: bytes) -> None:
        self.conn.send_bytes(data)

    def last_words(self) -> str | None:
        """The error an exited worker said before it went, if it said one."""
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll():
                got, payload = pickle.loads(self.conn.recv_bytes())
                if got == "error":
                    return payload
        return None

    def expect(self, kind: str):
        """The worker's next message if it is `kind`; else ("error", why) if it said one, or None if it exited."""
        ready = wait([self.conn, self.process.sentinel])
        if self.conn in ready:
            with contextlib.suppress(EOFError):
                got, payload = pickle.loads(self.conn.recv_bytes())
                if got in (kind, "error"):
                    return got, payload
        return None

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """The worker's exit code once it has exited (waiting up to `wait_s` for it), else None."""
        self.process.join(timeout=wait_s)
        return self.process.exitcode

    def stop(self, timeout: float) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.send(_encode(("stop",)))
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class _RayLink:
    """A worker as a Ray actor: commands by actor calls (Ray runs one caller's calls in order); death seen as
    the actor's error on a finished call."""

    def __init__(self, actor, rank: int):
        self.actor, self.rank = actor, rank
        self.pending: list = []  # calls not known finished
        self.code: int | None = None  # -1 once a call failed (the actor then exits: RayShard.execute)
        self.error: str | None = None

    def describe(self) -> str:
        return "Ray actor"

    def send(self, data: bytes) -> None:
        self.pending.append(self.actor.execute.remote(data))
        if len(self.pending) > 64:
            self.exit_code()  # collect finished calls (an error stays in self.code for the next check)

    def last_words(self) -> str | None:
        return self.error

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """-1 once a call has failed because the actor died (or raised), else None."""
        import ray

        if self.code is None and self.pending:
            done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=wait_s)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:  # RayActorError or the command's own exception
                    self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    self.code = -1
                    break
        return self.code

    def stop(self, timeout: float) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.get(self.actor.execute.remote(_encode(("stop",))), timeout=timeout)
        with contextlib.suppress(Exception):
            ray.kill(self.actor)


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..size-1: start them, send each step, stop them."""

    def __init__(self, config, size: int, device: torch.device, threads: int, executor: str = "mp"):
        if device.type == "cuda" and executor == "mp" and (device.index or 0) + size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size: {size} ranks from {device} need GPUs up to cuda:"
                             f"{(device.index or 0) + size - 1}; {torch.cuda.device_count()} are visible")
        self.size = size
        self.threads = threads
        self.dead: str | None = None
        self.links: list = []
        self.shm_name = self.shm = None
        same_machine = executor == "mp"
        if device.type == "cpu" and same_machine and shm_collectives.available():
            self.shm_name = f"ember-tp-{os.getpid()}-{secrets.token_hex(4)}"
            self.shm = SharedMemoryComm(self.shm_name, 0, size, create=True,
                                        peers_alive=lambda: all(link.exit_code() is None for link in self.links))
        host = _node_address() if executor == "ray" else "127.0.0.1"
        self.store = dist.TCPStore(host, 0, size, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
        args = (config, size, (host, self.store.port), self.shm_name, device, threads)
        try:
            if executor == "ray":
                self._start_ray(args, device)
            else:
                context = mp.get_context("spawn")  # a fresh interpreter: no copy of the parent's threads or model
                self.links = [_ProcessLink(context, rank, (config, rank, *args[1:])) for rank in range(1, size)]
            logger.info("tensor parallel: %d ranks (%s), %d thread(s) each; workers %s", size, executor, threads,
                        " ".join(link.describe() for link in self.links))
            self.group = self._rendezvous(host, device)
        except BaseException:
            self.shutdown(timeout=2)
            raise

    def _rendezvous(self, host: str, device: torch.device) -> TensorParallelGroup:
        """Rank 0 joins the process group while watching the workers: one that fails before it joins ends the
        start with its own error, not a wait for the rendezvous to time out."""
        joined: dict = {}

        def join() -> None:
            try:
                joined["group"] = init_group((host, self.store.port), 0, self.size, device, self.shm_name, self.store,
                                             self.shm)
            except BaseException as e:  # said by the main thread
                joined["error"] = e

        thread = threading.Thread(target=join, name="ember-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            for link in self.links:
                self._check(link, "while starting", wait_s=0.1)
            thread.join(0.1)
        if "error" in joined:
            raise joined["error"]
        return joined["group"]

    def _start_ray(self, args: tuple, device: torch.device) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=False)  # RAY_ADDRESS or a local cluster, as Ray decides
        resources = {"num_cpus": args[-1], "num_gpus": 1 if device.type == "cuda" else 0}
        actor_class = ray.remote(**resources)(RayShard)
        for rank in range(1, self.size):
            actor = actor_class.remote()
            try:  # placed and running, before rank 0 waits for it in the rendezvous
                ray.get(actor.ping.remote(), timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise WorkerDiedError(f"tensor-parallel worker {rank}: Ray could not place an actor needing {resources} "
                                      f"within {PLACEMENT_TIMEOUT_S} s (the cluster has {ray.available_resources()} "
                                      "free)") from None
            link = _RayLink(actor, rank)
            link.pending.append(actor.setup.remote(args[0], rank, *args[1:]))
            self.links.append(link)

    def _expect(self, link, kind: str, doing: str):
        got = link.expect(kind)
        if got is not None and got[0] == kind:
            return got[1]
        if got is not None:
            self._fail(f"tensor-parallel worker {link.rank} failed while {doing}: {got[1]}")
        self._fail(f"tensor-parallel worker {link.rank} exited (code {link.exit_code(10)}) while {doing}")

    def _fail(self, message: str):
        self.dead = message
        self.shutdown(timeout=2)  # a live worker may be waiting in a collective, deaf to "stop": not long
        raise WorkerDiedError(message)

    def _check(self, link, doing: str, wait_s: float = 0.0) -> None:
        code = link.exit_code(wait_s)
        if code is not None:
            why = link.last_words()
            self._fail(f"tensor-parallel worker {link.rank} exited (code {code}) {doing}".rstrip()
                       + (f": {why}" if why else ""))

    def start(self, num_blocks: int) -> None:
        """Every worker has its shard: size its KV cache as rank 0's and wait until each is ready."""
        for link in self.links:
            try:
                link.send(_encode(("start", num_blocks)))
            except OSError:  # it has exited: its own error says why
                self._check(link, "while loading the model", wait_s=10)
                raise
        for link in self.links:
            if isinstance(link, _RayLink):
                self._check(link, "while loading the model", wait_s=COLLECTIVE_TIMEOUT.total_seconds())
            else:
                self._expect(link, "ready", "loading the model")
        if self.shm is not None:
            self.shm.unlink()  # every rank has it mapped

    def _broadcast(self, message: tuple) -> None:
        if self.dead is not None:
            raise WorkerDiedError(self.dead)
        data = _encode(message)
        for link in self.links:
            self._check(link, "")
            try:
                link.send(data)
            except OSError:
                self._check(link, "", wait_s=10)
                raise

    def run(self, message: tuple, local):
        """Send `message` to the workers, then run rank 0's part (`local()`). Any failure there ends the engine:
        a worker's death is said as that; any other error leaves the workers inside this step's collectives,
        out of step with rank 0 for good."""
        self._broadcast(message)
        try:
            return local()
        except Exception as e:
            for link in self.links:  # a peer whose sockets closed has exited (or is exiting): its code says why
                self._check(link, "during a step", wait_s=2)
            self._fail(f"rank 0 failed during a step ({type(e).__name__}: {e}); the tensor-parallel ranks are out "
                       "of step")

    def forward(self, ids: torch.Tensor, layout: BatchLayout, local, lora_groups=()):
        """Every worker runs the forward of this step's batch (with LoRA: its rows per adapter slot, as
        LoRAManager.step_groups); `local()` is rank 0's."""
        rows = None if layout.output_rows is None else _pack(layout.output_rows)
        message = ("forward", _pack(ids), layout.query_lens, layout.context_lens, _pack(layout.block_tables),
                   _pack(layout.slot_mapping), _pack(layout.positions), rows, lora_groups)
        return self.run(message, local)

    def write_lora(self, slot: int, weights: dict, rank: int, scaling: float) -> None:
        """An adapter's whole A and B per HF module into `slot`; each worker keeps its pieces (before its
        next step, as rank 0 does)."""
        items = [(name, _pack(a), _pack(b)) for name, (a, b) in weights.items()]
        self._broadcast(("lora_write", slot, items, rank, scaling))

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

    def shutdown(self, timeout: float = 30.0) -> None:
        for link in self.links:
            link.stop(timeout)
        self.links = []
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        _leave_group(getattr(self, "group", None))
        self.group = None


class _Shard:
    """A worker rank: its process group, its piece of the model and its runner; runs rank 0's commands."""

    def __init__(self, config, rank: int, size: int, store_addr: tuple[str, int], shm_name: str | None,
                 device: torch.device, threads: int, pin: bool):
        cores = rank_cores(rank, size, threads) if pin else None
        if cores is not None:
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
        self.device = device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.config = config
        self.group = init_group(store_addr, rank, size, self.device, shm_name)
        self.model, self.local_config = load_model_shard(config.model, config.dtype, self.device, self.group,
                                                         config.quant_config())
        self.runner = None
        self.lora = None

    def start(self, num_blocks: int) -> None:
        from ember.engine.runner import ModelRunner

        config = self.config
        if config.lora.enable_lora:  # slots on this rank's pieces, attached before the runner binds its plans
            from ember.engine.lora import LoRAManager

            self.lora = LoRAManager(self.model, config.lora, next(self.model.parameters()).dtype, self.device)
        self.runner = ModelRunner(self.model, self.local_config, num_blocks, config.cache.block_size, self.device,
                                  config.seed, config.attention_backend, config.cache.kv_cache_dtype, None,
                                  config.batch_invariant)

    @torch.inference_mode()
    def handle(self, message: tuple) -> bool:
        """Run one command; False once told to stop."""
        kind, *args = message
        runner, device = self.runner, self.device
        if kind == "start":
            self.start(args[0])
        elif kind == "forward":
            ids, query_lens, context_lens, block_tables, slot_mapping, positions, rows, lora_groups = args
            layout = BatchLayout(query_lens, context_lens, _unpack(block_tables, device), _unpack(slot_mapping, device),
                                 _unpack(positions, device), None if rows is None else _unpack(rows, device))
            if lora_groups:
                self.lora.use_groups(lora_groups)
            try:
                with runner.routing():
                    runner.run_model(_unpack(ids, device), layout)
            finally:
                if lora_groups:
                    self.lora.clear_step()
        elif kind == "lora_write":
            slot, items, rank, scaling = args
            self.lora.write(slot, {name: (_unpack(a, device), _unpack(b, device)) for name, a, b in items}, rank,
                            scaling)
        elif kind == "logits":
            with runner.routing():
                runner.model.compute_logits(_unpack(args[0], device))
        elif kind == "update_weights":
            from ember.models.loader import load_weights

            items, strict = args
            pieces = shard_hf_tensors(self.model, self.group, ((name, _unpack(t, device)) for name, t in items))
            load_weights(self.model, ((n, t, "update_weights") for n, t in pieces), strict=strict)
        elif kind == "release_kv":
            runner.release_kv_cache()
        elif kind == "allocate_kv":
            runner.allocate_kv_cache()
        elif kind == "stop":
            _leave_group(self.group)
            return False
        return True


def _worker_main(config, rank: int, size: int, store_addr: tuple[str, int], shm_name: str | None,
                 device: torch.device, threads: int, conn: Connection) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle (a server drains first)
    try:
        shard = _Shard(config, rank, size, store_addr, shm_name, _device(device, rank), threads, pin=True)
        kind, *args = pickle.loads(conn.recv_bytes())
        if kind != "start":  # rank 0 failed to start: it says why
            return
        shard.start(args[0])
    except Exception as e:  # said to rank 0, which raises it as the engine's start-up error
        traceback.print_exc()
        _send(conn, ("error", f"{type(e).__name__}: {e}"))
        return
    _send(conn, ("ready", None))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:  # the engine process is gone
            return
        if not shard.handle(message):
            return


class RayShard:
    """A worker rank as a Ray actor (wrapped with `ray.remote` when the engine starts one)."""

    def ping(self) -> bool:
        return True

    def setup(self, config, rank: int, size: int, store_addr: tuple[str, int], shm_name: str | None,
              device: torch.device, threads: int) -> None:
        local = torch.device("cuda", 0) if device.type == "cuda" else device  # Ray shows the actor its GPU only
        self.shard = _Shard(config, rank, size, store_addr, shm_name, local, threads, pin=False)

    def execute(self, data: bytes) -> None:
        try:
            self.shard.handle(pickle.loads(data))
        except BaseException:  # exit, so the peers' collectives fail at once instead of waiting on this rank
            traceback.print_exc()
            os._exit(1)


def _node_address() -> str:
    """This node's address as the cluster sees it (where the other ranks reach rank 0's store)."""
    import ray

    return ray.util.get_node_ip_address()
