"""The core on 64-bit ARM: cross-built with cmake/aarch64-linux-gnu.cmake, its native tests (every
kernel variant the target runs, NEON included, against plain loops; the installed package's C
engine) run under qemu-user. Skips unless Debian's cross toolchain and qemu are installed:
`apt-get install g++-aarch64-linux-gnu qemu-user`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSROOT = Path("/usr/aarch64-linux-gnu")


def _needs() -> str:
    for tool in ("cmake", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc", "qemu-aarch64"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (apt-get install g++-aarch64-linux-gnu qemu-user)"
    if not SYSROOT.is_dir():
        return f"no AArch64 sysroot at {SYSROOT}"
    return ""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    return res


@pytest.mark.skipif(bool(_needs()), reason=_needs() or "ok")
def test_native_tests_pass_on_aarch64(tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2",
           # qemu-user aborts a forked child that starts threads (test_thread_pool_native.cpp)
           "SDQ_TEST_NO_FORK": "1"}
    _run(["cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'cmake' / 'aarch64-linux-gnu.cmake'}",
          "-DSDQ_PYTHON=OFF", "-DSDQ_TESTS=ON", "-DSDQ_CUDA=OFF"], env=env)
    _run(["cmake", "--build", str(build), "-j", "2"], env=env)
    res = _run(["ctest", "--test-dir", str(build), "--output-on-failure", "-V"], env=env)
    assert "100% tests passed" in res.stdout
    # The NEON variants are the ones chosen there, and each was checked against the references.
    assert "lut kernel: neon" in res.stdout and "trit5 kernel chosen here: neon" in res.stdout
    assert "ok   neon, 2 thread(s)" in res.stdout
