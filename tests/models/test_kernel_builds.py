"""The C++ kernels build once, visibly and safely: an interrupted build is redone by the next start, and the
sources compile for CPUs without AVX-512 (x86-64-v3) and for aarch64 (with a cross compiler)."""

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each compiles torch's headers: tens of seconds

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "ember" / "models" / "cpu_ops.cpp", ROOT / "ember" / "models" / "avx2_ops.cpp",
           ROOT / "ember" / "engine" / "attention" / "paged_cpu.cpp"]


def _syntax_check(compiler: str, flags: list[str], source: Path) -> subprocess.CompletedProcess:
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    return subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-fopenmp", *flags, *includes, str(source)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_sources_compile_for_x86_without_avx512(source):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    result = _syntax_check(compiler, ["-march=x86-64-v3", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], source)
    assert result.returncode == 0, result.stderr[-4000:]


def test_avx2_kernels_compile_with_avx512_vectors():
    """AVX-512 CPUs without AVX512-BF16 (Skylake to Ice Lake servers) build avx2_ops.cpp with ATen's 512-bit
    vectors: its ymm paths must step aside there."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    flags = ["-march=skylake-avx512", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    result = _syntax_check(compiler, flags, ROOT / "ember" / "models" / "avx2_ops.cpp")
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_sources_compile_for_aarch64(source):
    compiler = shutil.which("aarch64-linux-gnu-g++")
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    result = _syntax_check(compiler, ["-march=armv8.2-a"], source)
    assert result.returncode == 0, result.stderr[-4000:]


def test_a_build_killed_mid_compile_is_redone_by_the_next_start(tmp_path, llama_dir):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "kernels")}
    command = [sys.executable, "-m", "ember.cli", "generate", "--model", str(llama_dir), "--dtype", "float32",
               "--max-tokens", "4", "Hello"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own process group: the compiler goes with it
    try:
        for line in first.stdout:  # wait until a compile is under way ...
            if "compiling ember's C++ kernels" in line:
                break
        else:
            pytest.fail("no kernel build was started")
        locks = []
        while not locks and first.poll() is None:  # ... and torch's build lock is on disk
            locks = list((tmp_path / "kernels").glob("*/lock"))
            time.sleep(0.05)
        assert locks, "the build finished before it could be interrupted"
        os.killpg(first.pid, signal.SIGTERM)  # as `timeout` or `docker stop` would
        first.wait(60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert list((tmp_path / "kernels").glob("*/lock")), "the interrupted build left no lock (nothing tested)"
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "was interrupted earlier; building again" in second.stderr
    assert not list((tmp_path / "kernels").glob("*/lock"))
