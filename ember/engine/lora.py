"""Many LoRA adapters over one base model, batched in the same step (vLLM's multi-LoRA serving).

Every adaptable linear layer holds `max_loras` slots of adapter weights. Each step, the runner
tells the manager which rows of the flat batch belong to which adapter; a layer then adds
`B_s (A_s x)` to each adapter's rows, grouped by adapter: one shrink and one expand product per
adapter present (Punica's segmented-GEMM idea, on PyTorch's matmuls), the base product shared by
all rows. Requests of the base model and of several adapters run together; no weight is merged.

Adapters are read (and checked) when a request names one, into a CPU cache, and the request keeps
the adapter it was admitted with; a step's adapters are copied into slots, evicting the least
recently used adapter the step does not need. The scheduler admits no request whose adapter would
make the running set exceed `max_loras`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ember.engine.config import LoRAConfig
from ember.engine.request import Request
from ember.models import cpu_ops
from ember.models.lora import LoRAAdapter, Target, lora_targets, module_shards, read_adapter


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request, as vLLM names it: a name, a positive integer id unique per adapter
    (what slots and the prefix cache key by), and the PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id: {self.lora_int_id!r} must be an integer >= 1")
        if not self.lora_name:
            raise ValueError("lora_name: must not be empty")


class LoRABatch:
    """This step's rows per adapter slot: [(slot, rows)] where rows is a slice or an index tensor."""

    def __init__(self):
        self.groups: list[tuple[int, slice | torch.Tensor]] = []


class LoRASlots:
    """One linear layer's adapter weights in `max_loras` slots. The shards of a merged projection
    (q, k, v of qkv_proj) share one shrink product: A holds their ranks side by side and B is
    block-diagonal, so a slot costs two matmuls however many shards it adapts."""

    def __init__(self, module: nn.Module, config: LoRAConfig, batch: LoRABatch, dtype: torch.dtype,
                 device: torch.device):
        self.shards = module_shards(module)
        width = len(self.shards) * config.max_lora_rank
        width += width % 2  # (an even width for the pair-packed kernel: a zero column adds exact zeros)
        self.a = torch.zeros(config.max_loras, width, module.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(config.max_loras, module.out_features, width, dtype=dtype, device=device)
        self.width = [0] * config.max_loras  # columns a slot uses (0: this layer is not adapted there)
        self.batch = batch
        self._pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A, B) pair-packed

    def write(self, slot: int, parts: dict[int, tuple[torch.Tensor, torch.Tensor]], rank: int, scaling: float) -> None:
        """parts: shard -> (A [r, in], B [size, r]); the scaling is folded into B."""
        self._pairs.pop(slot, None)
        self.a[slot].zero_()
        self.b[slot].zero_()
        if not parts:
            self.width[slot] = 0
            return
        row = 0
        for shard, size in enumerate(self.shards):
            if shard in parts:
                a, b = parts[shard]
                cols = slice(shard * rank, shard * rank + a.shape[0])
                self.a[slot, cols] = a.to(self.a.dtype)
                self.b[slot, row:row + size, cols] = (b.float() * scaling).to(self.b.dtype)
            row += size
        self.width[slot] = len(self.shards) * rank

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (= the base product of x) plus each adapter's product on its rows, in place."""
        invariant = x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[-1] % 2 == 0 \
            and cpu_ops.batch_invariant_routing() and cpu_ops.gemv_available()
        for slot, rows in self.batch.groups:
            width = self.width[slot]
            if not width:
                continue
            if invariant:  # torch's bf16 matmuls sum in an order that depends on the number of rows
                self._add_invariant(slot, x, y, rows)
                continue
            a, b = self.a[slot, :width], self.b[slot, :, :width]
            if isinstance(rows, slice):
                y[rows].addmm_(x[rows] @ a.t(), b.t())
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return y

    def _add_invariant(self, slot: int, x: torch.Tensor, y: torch.Tensor, rows: slice | torch.Tensor) -> None:
        """The slot's product on its rows through ember's pair-packed kernel, whose sums for a row do not
        depend on the rows beside it (batch invariance, the engine's default); A and B are packed once
        per slot write, the adapter's columns rounded up to even (a zero column adds exact zeros). The
        delta is rounded to bf16 before it is added (the other path's addmm_ rounds once: last-bit
        differences between invariant and variant engines)."""
        width = self.width[slot] + self.width[slot] % 2
        if slot not in self._pairs:
            pack = torch.ops.ember_ops.pack_pairs
            self._pairs[slot] = (pack(self.a[slot, :width]), pack(self.b[slot, :, :width].contiguous()))
        a, b = self._pairs[slot]
        picked = (x[rows] if isinstance(rows, slice) else x.index_select(0, rows)).contiguous()
        shrunk = torch.ops.ember_ops.linear_pairs(picked, a, width, None)
        delta = torch.ops.ember_ops.linear_pairs(shrunk, b, self.b.shape[1], None)
        if isinstance(rows, slice):
            y[rows] += delta
        else:
            y.index_add_(0, rows, delta)


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, dtype: torch.dtype, device: torch.device):
        self.config = config
        self.device = device
        self.targets = lora_targets(model)
        self.batch = LoRABatch()
        self.layers: dict[str, LoRASlots] = {}
        for target in self.targets.values():
            if target.module_name not in self.layers:
                slots = LoRASlots(target.module, config, self.batch, dtype, device)
                target.module.lora = slots
                self.layers[target.module_name] = slots
        # Slots hold adapters by identity: a request carries the adapter it was admitted with, so the
        # engine thread never reads a directory (a vanished one cannot fail a step) and an id re-bound to
        # another adapter never finds the old one's weights.
        self.slot_adapters: list[LoRAAdapter | None] = [None] * config.max_loras
        self._slot_use: OrderedDict[int, None] = OrderedDict((slot, None) for slot in range(config.max_loras))
        self._cpu: OrderedDict[int, tuple[LoRARequest, LoRAAdapter]] = OrderedDict()
        self._pushed: dict[int, tuple[LoRARequest, LoRAAdapter]] = {}  # updated in memory: never re-read
        self._lock = threading.Lock()  # requests are prepared on worker threads
        self.step_groups: list[tuple[int, list[tuple[int, int]]]] = []  # (slot, [(first row, end)]) this step
        # Tensor parallel: called with each slot write (slot, weights, rank, scaling) so every rank holds
        # its pieces of the same adapters in the same slots.
        self.replicate = None

    # ---- adapters (any thread) -----------------------------------------------------------
    def load(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter from memory, or read and checked from its directory (ValueError)."""
        with self._lock:
            cached = self._pushed.get(request.lora_int_id) or self._cpu.get(request.lora_int_id)
            if cached is not None:
                if cached[0].lora_path != request.lora_path:
                    raise ValueError(f"lora_int_id: {request.lora_int_id} is already {cached[0].lora_name!r} "
                                     f"({cached[0].lora_path}); an id names one adapter")
                if request.lora_int_id in self._cpu:
                    self._cpu.move_to_end(request.lora_int_id)
                return cached[1]
        adapter = read_adapter(request.lora_path, self.config.max_lora_rank, self.targets)
        with self._lock:
            self._cpu[request.lora_int_id] = (request, adapter)
            while len(self._cpu) > self.config.cpu_capacity:
                self._cpu.popitem(last=False)
        return adapter

    def forget(self, lora_int_id: int) -> None:
        """Drop an unloaded adapter from memory (requests already admitted keep theirs)."""
        with self._lock:
            self._cpu.pop(lora_int_id, None)
            self._pushed.pop(lora_int_id, None)

    def update(self, request: LoRARequest, tensors: dict[str, torch.Tensor]) -> None:
        """New weights for a known adapter (an RL trainer's push), by PEFT name, in place: requests holding
        it and its slot see them; it stays in memory from now on. Rank and scaling stay as loaded."""
        from ember.models.lora import check_weights

        adapter = self.load(request)
        weights = check_weights(tensors, self.targets, request.lora_path)
        ranks = {a.shape[0] for a, _ in weights.values()}
        if ranks != {adapter.rank}:
            raise ValueError(f"lora: pushed ranks {sorted(ranks)} differ from the adapter's {adapter.rank}")
        adapter.weights = weights
        with self._lock:
            self._pushed[request.lora_int_id] = (request, adapter)
        for slot, held in enumerate(self.slot_adapters):
            if held is adapter:
                self._write(slot, adapter)

    # ---- one step (the engine thread) ----------------------------------------------------------
    def prepare_step(self, requests: list[Request], query_lens: list[int]) -> None:
        """Put this step's adapters in slots and record which rows each one's requests are."""
        runs: list[tuple[int, int, int]] = []  # (slot, start, end), merged when adjacent
        needed = {id(r.lora_adapter) for r in requests if r.lora is not None}
        start = 0
        for request, n in zip(requests, query_lens):
            if request.lora is not None:
                slot = self._slot_for(request.lora_adapter, needed)
                if runs and runs[-1][0] == slot and runs[-1][2] == start:
                    runs[-1] = (slot, runs[-1][1], start + n)
                else:
                    runs.append((slot, start, start + n))
            start += n
        groups: dict[int, list[tuple[int, int]]] = {}
        for slot, a, b in runs:
            groups.setdefault(slot, []).append((a, b))
        self.use_groups(list(groups.items()))

    def _slot_for(self, adapter: LoRAAdapter, needed: set[int]) -> int:
        """The adapter's slot, writing it into the least recently used slot this step does not need."""
        held = [s for s, a in enumerate(self.slot_adapters) if a is adapter]
        if held:
            slot = held[0]
        else:
            slot = next(s for s in self._slot_use if id(self.slot_adapters[s]) not in needed)
            self._write(slot, adapter)
            self.slot_adapters[slot] = adapter
        self._slot_use.move_to_end(slot)
        return slot

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        self.write(slot, adapter.weights, adapter.rank, adapter.scaling)
        if self.replicate is not None:
            self.replicate(slot, adapter.weights, adapter.rank, adapter.scaling)

    @torch.inference_mode()
    def write(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
              scaling: float) -> None:
        """Put an adapter's weights (HF module -> whole A, B) into `slot` of every layer (this rank's pieces
        of them under tensor parallelism); layers it does not adapt get an empty slot."""
        from ember.models.tensor_parallel import lora_piece

        per_layer: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {name: {} for name in self.layers}
        for module, (a, b) in weights.items():
            target: Target = self.targets[module]
            a, b = lora_piece(target.module, target.shard, a, b, target.num_shards)
            per_layer[target.module_name][target.shard] = (a.to(self.device), b.to(self.device))
        for name, parts in per_layer.items():
            self.layers[name].write(slot, parts, rank, scaling)

    def use_groups(self, groups: list[tuple[int, list[tuple[int, int]]]]) -> None:
        """This step's rows per slot, as `step_groups` (a tensor-parallel worker gets rank 0's)."""
        self.step_groups = groups
        self.batch.groups = [(slot, _rows(spans, self.device)) for slot, spans in groups]

    def clear_step(self) -> None:
        self.step_groups = []
        self.batch.groups = []


def _rows(spans: list[tuple[int, int]], device: torch.device) -> slice | torch.Tensor:
    if len(spans) == 1:
        return slice(*spans[0])
    return torch.cat([torch.arange(a, b, device=device) for a, b in spans])
