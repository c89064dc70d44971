"""Compiling ember's C++ CPU kernels on first use (torch.utils.cpp_extension, cached in
~/.cache/torch_extensions). Without a compiler every caller keeps a PyTorch path."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def vector_flags() -> list[str]:
    """Select ATen's Vectorized<float> implementation for this CPU (as ATen's own kernels do)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"avx2", "fma"} <= flags:
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


@functools.cache
def build(name: str, source: str) -> bool:
    """Compile (or load the cached build of) `source` as the op library `name`; False if impossible."""
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=name,
            sources=[source],
            extra_cflags=["-O3", "-march=native", "-fopenmp", *vector_flags()],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as e:  # no compiler, no ninja, no headers: stay correct, only slower
        logger.warning("C++ kernels %s unavailable (%s); using PyTorch's", name, str(e).splitlines()[0])
        return False
