"""Compiling ember's C++ CPU kernels on first use (torch.utils.cpp_extension), once per machine, visibly.

A build is cached under a name carrying a key of the source, the compiler flags, torch's version and
install directory and the CPU's features, so two checkouts, venvs or machines sharing a cache never load each other's
binaries (`-march=native` code can crash on another CPU). Builds are serialised by an OS file lock,
which a killed builder cannot keep: whoever takes it next removes what an interrupted build left
(torch's own lock file would otherwise make every later start wait forever) and builds again. A
build that fails is remembered, so later starts say so in one line instead of compiling again.
Without a compiler every caller keeps a PyTorch path.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def vector_flags() -> list[str]:
    """Select ATen's Vectorized<float> implementation for this CPU (as ATen's own kernels do)."""
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"avx2", "fma"} <= flags:
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def compiler_flags() -> list[str]:
    return ["-O3", "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native", "-fopenmp",
            *vector_flags()]


def build_key(source: str) -> str:
    """What a binary depends on: the source, the flags, torch (version, install directory), the CPU's features."""
    import torch

    digest = hashlib.sha256(Path(source).read_bytes())
    # torch's install directory too: a build names its headers and libraries by path, so two venvs with the same
    # torch version sharing one build would each make torch's build system recompile it for their own paths
    # (measured: a CI venv and a development venv alternating rebuilt both kernels at every switch).
    for part in (" ".join(compiler_flags()), torch.__version__, str(Path(torch.__file__).parent), platform.machine(),
                 " ".join(sorted(cpu_flags()))):
        digest.update(part.encode())
    return digest.hexdigest()[:12]


def _build_directory(name: str) -> Path:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False))
    except Exception:  # a private helper of torch's: if it moves, torch's documented default
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
        return Path(root) / name


@contextmanager
def _exclusive(directory: Path):
    """One builder at a time across processes; the OS drops the lock of a process that dies."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "ember.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process building ember's kernels ({directory.name}) ...", file=sys.stderr,
                  flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@functools.cache
def build(name: str, source: str) -> bool:
    """Compile (or load the cached build of) `source` as the op library `name`; False if impossible."""
    try:
        key = f"{name}_{build_key(source)}"
        directory = _build_directory(key)
        failed = directory / "failed"
        if failed.is_file():
            logger.warning("C++ kernels %s unavailable (their build failed before: %s); using PyTorch's. "
                           "Delete %s to try again", name, failed.read_text().strip(), directory)
            return False
        with _exclusive(directory):
            if (directory / "lock").exists():  # torch's lock, left by a build that was killed: nobody holds ours
                (directory / "lock").unlink()
                print(f"a build of ember's kernels ({name}) was interrupted earlier; building again",
                      file=sys.stderr, flush=True)
            fresh = not (directory / f"{key}.so").is_file()
            if fresh:  # a compile takes a minute or two: say so, or the wait looks like a hang
                print(f"compiling ember's C++ kernels ({name}; first use, cached in {directory}) ...",
                      file=sys.stderr, flush=True)
            started = time.perf_counter()
            _load(key, source, failed)
            if fresh:
                print(f"compiled {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        return True
    except Exception as e:  # no compiler, no ninja, no headers: stay correct, only slower
        logger.warning("C++ kernels %s unavailable (%s); using PyTorch's", name, str(e).splitlines()[0])
        return False


def _load(key: str, source: str, failed: Path) -> None:
    from torch.utils import cpp_extension

    # Compile a copy kept in the build directory: the build then names the same source path whoever
    # asks for it, so two checkouts with the same source (same key) share one build instead of each
    # making torch's build system redo it for its own path.
    copy = failed.parent / f"{key}.cpp"
    text = Path(source).read_bytes()
    if not copy.is_file() or copy.read_bytes() != text:
        copy.write_bytes(text)
    try:
        cpp_extension.load(name=key, sources=[str(copy)], extra_cflags=compiler_flags(), extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:
        if "Error building extension" in str(e):  # the compiler's verdict on this source: remember it
            failed.write_text(str(e).splitlines()[0][:500])
        raise
