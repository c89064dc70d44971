"""llama.cpp's quantized block formats, decoded exactly into ember's integer layouts.

Every format here stores w = q * scale + offset per group of input channels, with small
integer q, so each maps onto a `PackedWeight` with no rounding at all (no dequantize then
requantize): the 4-bit formats onto ember's int4 layout (groups of 32), the 5-, 6- and 8-bit
ones onto int8 with a scale (and an offset where the format has a minimum) per group.

Block layouts (ggml-common.h), per row of K channels, blocks in order along K:
- Q8_0: fp16 d, 32 x int8 q.                          w = d * q
- Q4_0: fp16 d, 16 bytes: channel j low nibble, 16 + j high.      w = d * (q - 8)
- Q4_1: fp16 d, fp16 m, nibbles as Q4_0.               w = d * q + m
- Q5_0: fp16 d, 32 high bits (u32), nibbles as Q4_0.   w = d * (q - 16)
- Q5_1: fp16 d, fp16 m, 32 high bits, nibbles.        w = d * q + m
- Q4_K: 256 channels: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 groups of 32,
  128 bytes: per 64 channels, channel j low nibble, 32 + j high.   w = d * sc * q - dmin * m
- Q5_K: as Q4_K plus 32 bytes of high bits (bit i of byte j: channel 32 i + j).
- Q6_K: 256 channels: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (groups of
  16), fp16 d at the end.                              w = d * sc * (q - 32)
Q2_K, Q3_K and the IQ formats are not mapped: the loader dequantizes them (gguf's own code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedWeight:
    """An [N, K] weight as w[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k // group.

    bits 4: q uint8 in 0..15 (ember's int4 layout); bits 8: q int8. offset None: zero."""

    q: torch.Tensor
    scale: torch.Tensor  # fp32 [N, K / group]
    offset: torch.Tensor | None  # fp32 [N, K / group]
    group: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.float().view(n, k // self.group, self.group) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(n, k).to(dtype)

    def rows(self, index) -> "PackedWeight":
        """The weight's output channels `index` (a slice or an index tensor)."""
        return PackedWeight(self.q[index], self.scale[index], None if self.offset is None else self.offset[index],
                            self.group, self.bits)

    def as_int8(self, group: int) -> "PackedWeight":
        """The same values with int8 q and groups of `group` (a divisor of this group): exact."""
        if self.group % group:
            raise ValueError(f"group {group} does not divide {self.group}")
        repeat = self.group // group
        q, offset = self.q, self.offset
        if self.bits == 4:  # 0..15 -> -8..7, the 8 steps moved into the offset
            q = (q.to(torch.int16) - 8).to(torch.int8)
            shift = 8 * self.scale
            offset = shift if offset is None else offset + shift
        widen = (lambda t: t.repeat_interleave(repeat, dim=1)) if repeat > 1 else (lambda t: t)
        return PackedWeight(q.to(torch.int8), widen(self.scale), None if offset is None else widen(offset), group, 8)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, as fp32 [rows, blocks]."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor, half: int) -> torch.Tensor:
    """[..., half] bytes -> [..., 2 * half] values: the low nibbles, then the high ones."""
    return torch.cat((qs & 15, qs >> 4), dim=-1)


def _high_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """[..., 4] bytes read as a little-endian u32 -> its lowest `count` bits as [..., count] 0/1."""
    bits = (qh[..., :, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # [..., 4, 8]: byte b bit i = bit 8 b + i
    return bits.reshape(*qh.shape[:-1], 32)[..., :count]


def _blocks(raw: torch.Tensor, rows: int, block_bytes: int) -> torch.Tensor:
    return raw.reshape(rows, -1, block_bytes)


def _q8_0(raw, rows):
    b = _blocks(raw, rows, 34)
    return PackedWeight(b[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), _f16(b, 0), None, 32, 8)


def _q4_0(raw, rows):
    b = _blocks(raw, rows, 18)
    d = _f16(b, 0)
    return PackedWeight(_nibbles(b[..., 2:], 16).reshape(rows, -1), d, -8 * d, 32, 4)


def _q4_1(raw, rows):
    b = _blocks(raw, rows, 20)
    return PackedWeight(_nibbles(b[..., 4:], 16).reshape(rows, -1), _f16(b, 0), _f16(b, 2), 32, 4)


def _q5_0(raw, rows):
    b = _blocks(raw, rows, 22)
    q = _nibbles(b[..., 6:], 16) | (_high_bits(b[..., 2:6], 32) << 4)
    return PackedWeight((q.to(torch.int16) - 16).to(torch.int8).reshape(rows, -1), _f16(b, 0), None, 32, 8)


def _q5_1(raw, rows):
    b = _blocks(raw, rows, 24)
    q = _nibbles(b[..., 8:], 16) | (_high_bits(b[..., 4:8], 32) << 4)
    return PackedWeight(q.to(torch.int8).reshape(rows, -1), _f16(b, 0), _f16(b, 2), 32, 8)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per block."""
    lo, mid, top = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat((lo & 63, (top & 15) | ((lo >> 6) << 4)), dim=-1)
    mn = torch.cat((mid & 63, (top >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def _k_affine(b: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    sc, mn = _k_scales(b[..., 4:16])
    return (d * sc).reshape(rows, -1), (-(dmin * mn)).reshape(rows, -1)


def _q4_k(raw, rows):
    b = _blocks(raw, rows, 144)
    scale, offset = _k_affine(b, rows)
    q = _nibbles(b[..., 16:].reshape(rows, b.shape[1], 4, 32), 32)  # per 64 channels: low nibbles, then high
    return PackedWeight(q.reshape(rows, -1), scale, offset, 32, 4)


def _q5_k(raw, rows):
    b = _blocks(raw, rows, 176)
    scale, offset = _k_affine(b, rows)
    low = _nibbles(b[..., 48:].reshape(rows, b.shape[1], 4, 32), 32).reshape(rows, b.shape[1], 8, 32)
    high = (b[..., 16:48, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # [rows, blocks, 32 bytes, 8 bits]
    q = low | (high.transpose(-1, -2) << 4)  # group i takes bit i of the 32 bytes
    return PackedWeight(q.to(torch.int8).reshape(rows, -1), scale, offset, 32, 8)


def _q6_k(raw, rows):
    b = _blocks(raw, rows, 210)
    nb = b.shape[1]
    ql = b[..., :128].reshape(rows, nb, 2, 64)  # per 128 channels: 64 bytes of low nibbles
    qh = b[..., 128:192].reshape(rows, nb, 2, 32)  # and 32 bytes of 2-bit highs
    low = torch.cat((ql & 15, ql >> 4), dim=-1).reshape(rows, nb, 2, 4, 32)  # channel quarters 0..3
    high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=3)  # [rows, nb, 2, 4, 32]
    q = (low | (high << 4)).to(torch.int16) - 32
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    scale = _f16(b, 208)[..., None] * sc
    return PackedWeight(q.to(torch.int8).reshape(rows, -1), scale.reshape(rows, -1), None, 16, 8)


# GGML type name -> (decoder, channels per block, bytes per block)
DECODERS = {
    "Q8_0": (_q8_0, 32, 34),
    "Q4_0": (_q4_0, 32, 18),
    "Q4_1": (_q4_1, 32, 20),
    "Q5_0": (_q5_0, 32, 22),
    "Q5_1": (_q5_1, 32, 24),
    "Q4_K": (_q4_k, 256, 144),
    "Q5_K": (_q5_k, 256, 176),
    "Q6_K": (_q6_k, 256, 210),
}


def decode(type_name: str, raw: np.ndarray | torch.Tensor) -> PackedWeight:
    """Raw blocks [rows, bytes per row] of a mapped type -> the PackedWeight holding the same values."""
    decoder, _, _ = DECODERS[type_name]
    raw = torch.from_numpy(np.array(raw, copy=True)) if isinstance(raw, np.ndarray) else raw  # off the read-only map
    return decoder(raw, raw.shape[0])
