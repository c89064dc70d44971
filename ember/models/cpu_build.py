"""Compiling ember's C++ CPU kernels on first use (torch.utils.cpp_extension, cached in
~/.cache/torch_extensions). Without a compiler every caller keeps a PyTorch path."""

from __future__ import annotations

import functools
import logging
import sys
import time
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


def _needs_compile(name: str, source: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        built = Path(_get_build_directory(name, False)) / f"{name}.so"
    except Exception:  # a private helper of torch's: if it moves, assume a compile
        return True
    return not built.is_file() or built.stat().st_mtime < Path(source).stat().st_mtime


@functools.cache
def build(name: str, source: str) -> bool:
    """Compile (or load the cached build of) `source` as the op library `name`; False if impossible."""
    try:
        from torch.utils import cpp_extension

        fresh = _needs_compile(name, source)
        if fresh:  # a compile takes a minute or two: say so, or the wait looks like a hang
            print(f"compiling ember's C++ kernels ({name}; first use, cached under ~/.cache/torch_extensions) ...",
                  file=sys.stderr, flush=True)
        started = time.perf_counter()
        cpp_extension.load(
            name=name,
            sources=[source],
            extra_cflags=["-O3", "-march=native", "-fopenmp", *vector_flags()],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        if fresh:
            print(f"compiled {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        return True
    except Exception as e:  # no compiler, no ninja, no headers: stay correct, only slower
        logger.warning("C++ kernels %s unavailable (%s); using PyTorch's", name, str(e).splitlines()[0])
        return False
