"""The activation transform with its projection in bf16 on AMX (sdq/amx_gemm.h,
activation_transform_bf16): what the prepared AMX GEMM calls run (linear_plan.h). Against a NumPy
reference built from the core's own float32 rotation (the FWHT binding runs the same code): the
rotated activations and the down-sampler rounded to bf16 (half to even), their products summed
exactly. The AMX sums those exact products in float32, so each output is within
(padded + 1) * 2^-24 * sum |v d| of the reference; the float32 projection is off by ~2^-9 relative
there, so the bound tells the two apart. xsum is the float32 transform's, bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

from sdq.ref.kernels import block_geometry
from test_gemv import _downs

_core = pytest.importorskip("sdq._core")
needs_bf16 = pytest.mark.skipif(not _core.activation_transform_bf16_supported(),
                                reason="this CPU or OS has no AMX-BF16")
TINY = float(np.finfo(np.float32).tiny)


def bf16(a):
    """float32 -> the nearest bf16 (half to even), as float64."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return u.view(np.float32).astype(np.float64)


def _reference(x, block_size, osr, signs, full, last):
    """(xt, bound): the bf16-operand projection of the core's float32 rotation, and the bound."""
    blocks, total = block_geometry(x.shape[1], block_size, osr)
    xt = np.zeros((x.shape[0], total))
    bound = np.zeros_like(xt)
    for b, (start, width, padded, m, offset) in enumerate(blocks):
        v = np.zeros((x.shape[0], padded), dtype=np.float32)
        v[:, :width] = x[:, start:start + width]
        if signs is not None:
            _core.fwht(v, signs[:padded].copy())
        d = bf16(last if b == len(blocks) - 1 else full)
        xt[:, offset:offset + m] = bf16(v) @ d
        bound[:, offset:offset + m] = (padded + 1) * 2.0 ** -24 * (np.abs(bf16(v)) @ np.abs(d))
    return xt, bound


@needs_bf16
@pytest.mark.parametrize("hadamard", [True, False])
@pytest.mark.parametrize("in_features,block_size,osr", [
    (128, 128, 2.0), (576, 128, 2.0), (300, 64, 1.3), (96, 32, 3.0), (100, 64, 2.5),
    (1000, 128, 1.5), (1, 128, 1.0), (40, 16, 0.75)])
@pytest.mark.parametrize("batch", [1, 15, 64, 70])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference(hadamard, in_features, block_size, osr, batch, threads):
    rng = np.random.default_rng(in_features + batch)
    signs = rng.choice([-1.0, 1.0], block_size).astype(np.float32) if hadamard else None
    full, last = _downs(rng, in_features, block_size, osr)
    x = rng.standard_normal((batch, in_features)).astype(np.float32)
    xt, xsum = _core.activation_transform(x, block_size, osr, signs, full, last, threads,
                                          projection="bf16")
    ref, bound = _reference(x, block_size, osr, signs, full, last)
    assert np.all(np.abs(xt - ref) <= bound + TINY)
    xt32, xsum32 = _core.activation_transform(x, block_size, osr, signs, full, last, threads)
    assert np.array_equal(xsum, xsum32)
    assert not np.all(np.abs(xt32 - ref) <= bound + TINY)  # float32 is not what this computes


@needs_bf16
@pytest.mark.parametrize("scale", [1e30, 1e-30, 0.0])
def test_extreme_activations(scale):
    rng = np.random.default_rng(3)
    signs = rng.choice([-1.0, 1.0], 128).astype(np.float32)
    full, last = _downs(rng, 300, 128, 2.0)
    x = (scale * rng.standard_normal((20, 300))).astype(np.float32)
    xt, _ = _core.activation_transform(x, 128, 2.0, signs, full, last, projection="bf16")
    ref, bound = _reference(x, 128, 2.0, signs, full, last)
    assert np.isfinite(xt).all()
    assert np.all(np.abs(xt - ref) <= bound + TINY)


def test_bad_projection_name():
    x = np.zeros((1, 128), np.float32)
    full = np.zeros((128, 256), np.float32)
    with pytest.raises(ValueError, match="projection must be"):
        _core.activation_transform(x, 128, 2.0, None, full, full, projection="fp8")


@pytest.mark.skipif(_core.activation_transform_bf16_supported(), reason="this CPU has AMX-BF16")
def test_refused_without_amx_bf16():
    x = np.zeros((1, 128), np.float32)
    full = np.zeros((128, 256), np.float32)
    with pytest.raises(ValueError, match="AMX-BF16"):
        _core.activation_transform(x, 128, 2.0, None, full, full, projection="bf16")
