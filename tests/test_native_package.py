"""The native package: CMake install/export, find_package(sdq CONFIG), and the C ABI (sdq_c.h).

One module-scoped build (no Python module, no CUDA): configure with -DSDQ_TESTS=ON, build sdq_core
and the native unit tests (cpp/tests: every CPU kernel variant this machine runs against plain
loops; run here by ctest), then ctest's sdq_install (installs into a temporary prefix) and
sdq_consumer (configures examples/consumer against that prefix with find_package, builds the C
engine and runs its self-check: quantize on its own threads, add-only GEMV/GEMM against a
dequantize-and-dot reference it decodes from the documented bit layout). The C engine's
--quantize mode then gives the C ABI's packed bytes, which must equal the Python quantizer's
(both run the core's encoder, sdq::encode_rows: this checks the C wrapper passes everything on).
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import sdq
from sdq import blocks

ROOT = Path(__file__).resolve().parents[1]


def _tools() -> tuple[str, str]:
    """(cmake, generator) or a skip saying what is missing."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH: the native package build cannot be tested")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")) or \
            not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C and C++ compiler on PATH: the native package build cannot be tested")
    if shutil.which("ninja"):
        return cmake, "Ninja"
    if shutil.which("make"):
        return cmake, "Unix Makefiles"
    pytest.skip("neither ninja nor make is on PATH: the native package build cannot be tested")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    return res


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Builds, installs and runs ctest once; returns (prefix, ctest output, C engine path)."""
    cmake, generator = _tools()
    tmp = tmp_path_factory.mktemp("native")
    build, prefix = tmp / "build", tmp / "prefix"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    _run([cmake, "-S", str(ROOT), "-B", str(build), "-G", generator, "-DCMAKE_BUILD_TYPE=Release",
          "-DSDQ_PYTHON=OFF", "-DSDQ_TESTS=ON", "-DSDQ_CUDA=OFF", f"-DSDQ_TEST_PREFIX={prefix}"],
         env=env)
    # The library and cpp/tests; ctest's sdq_install installs it and sdq_consumer builds the example.
    _run([cmake, "--build", str(build), "-j", "2"], env=env)
    ctest = str(Path(cmake).with_name("ctest")) if Path(cmake).with_name("ctest").exists() \
        else shutil.which("ctest")
    res = _run([ctest, "--test-dir", str(build), "-R", "^sdq_(install|consumer)$",
                "--output-on-failure", "-V"], env=env)
    return prefix, res.stdout, build / "consumer" / "c_engine", (ctest, build, env)


def test_native_unit_tests_pass(native):
    """cpp/tests (kernel variants against plain loops, the thread pool, boundaries): each prints
    its checks and exits non-zero on a failure."""
    ctest, build, env = native[3]
    res = _run([ctest, "--test-dir", str(build), "-E", "^sdq_(install|consumer)$",
                "--output-on-failure"], env=env)
    assert "100% tests passed" in res.stdout and "_native" in res.stdout


def test_ctest_installs_the_package_and_runs_the_consumer(native):
    prefix, out, engine, _ = native
    assert "100% tests passed" in out and "sdq_consumer" in out
    assert "PASS" in out and "FAIL " not in out  # the C engine's own verdict and checks
    lib = next(prefix.rglob("libsdq_core.a"))
    assert (lib.parent / "cmake" / "sdq" / "sdqConfig.cmake").is_file()
    assert (lib.parent / "cmake" / "sdq" / "sdqConfigVersion.cmake").is_file()
    assert (prefix / "include" / "sdq_c.h").is_file()
    assert (prefix / "include" / "sdq" / "gemv.h").is_file()
    assert not (prefix / "include" / "guard.h").exists()  # internal headers stay private
    assert engine.is_file()


def _c_quantize(engine: Path, tmp: Path, W: torch.Tensor, cfg: sdq.SDQConfig,
                signs: np.ndarray) -> bytes:
    """The C ABI's packed bytes (sign, nonzero, scale, mean) for W, via c_engine --quantize."""
    out, n_in = W.shape
    header = struct.pack("<qqqiiiidddd", out, n_in, cfg.block_size,
                         2 if cfg.levels == "binary" else 3, cfg.order, int(cfg.hadamard), 0,
                         cfg.osr, cfg.sd_scale, cfg.p_scale, cfg.p_cut)
    src, dst = tmp / "in.bin", tmp / "out.bin"
    src.write_bytes(header + signs.astype("<f4").tobytes() + W.numpy().astype("<f4").tobytes())
    _run([str(engine), "--quantize", str(src), str(dst)])
    return dst.read_bytes()


def _python_planes(qw) -> list[np.ndarray]:
    planes = [p.numpy().view(np.uint32) for p in qw.bitplanes() if p is not None]
    return planes + [qw.scale.numpy().view(np.uint16), qw.mean.numpy().view(np.uint16)]


def _split(raw: bytes, like: list[np.ndarray]) -> list[np.ndarray]:
    parts, offset = [], 0
    for a in like:
        parts.append(np.frombuffer(raw, a.dtype, a.size, offset).reshape(a.shape))
        offset += a.nbytes
    assert offset == len(raw), "the C ABI wrote a different number of bytes"
    return parts


@pytest.mark.parametrize("out,n_in,kw", [
    (24, 200, dict(levels="ternary", osr=2.0, order=1, block_size=64)),      # short last block
    (16, 256, dict(levels="binary", osr=1.5, order=2, block_size=128)),
    (8, 96, dict(levels="ternary", osr=1.25, order=2, block_size=64, hadamard=False)),
])
def test_c_quantize_gives_the_python_bytes(native, tmp_path, out, n_in, kw):
    cfg = sdq.SDQConfig(codes="sigma_delta", seed=3, **kw)
    W = torch.randn(out, n_in, generator=torch.Generator().manual_seed(out)) * 0.02
    raw = _c_quantize(native[2], tmp_path, W, cfg, blocks.hadamard_signs(cfg.block_size, cfg.seed))
    expected = _python_planes(sdq.quantize_weight(W, cfg))
    assert raw == b"".join(a.tobytes() for a in expected)


def test_c_quantize_on_a_model_sized_layer(native, tmp_path):
    """576 inputs (SmolLM2's width), 300 rows split over the engine's two threads."""
    cfg = sdq.SDQConfig(codes="sigma_delta", levels="ternary", osr=2.0, seed=5)
    W = torch.randn(300, 576, generator=torch.Generator().manual_seed(7)) * 0.02
    raw = _c_quantize(native[2], tmp_path, W, cfg, blocks.hadamard_signs(cfg.block_size, cfg.seed))
    expected = _python_planes(sdq.quantize_weight(W, cfg))
    got = _split(raw, expected)
    for name, g, e in zip(("sign", "nonzero", "scale", "mean"), got, expected):
        assert np.array_equal(g, e), f"{name}: {int((g != e).sum())} of {e.size} differ"
