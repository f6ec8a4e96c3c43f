"""The CPU add-only kernels (gemv.h) against the NumPy references in sdq.ref.kernels.

Tolerance. Both kernels sum float32 terms; the reference works in float64. A float32 sum of K terms
whose absolute values add up to A has a rounding error of about eps32 * sqrt(K) * A when the
errors behave like a random walk (the worst case, eps32 * K * A, is never approached by these
inputs). We allow 4x that: `tol = 4 * eps32 * sqrt(K) * A`, where A is computed by running the
reference on absolute values (an upper bound of every partial sum), plus the smallest normal float
so all-zero rows compare exactly.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from sdq.ref.kernels import (
    activation_transform_ref,
    addonly_gemm_ref,
    block_geometry,
    pack_plane_ref,
)

_core = pytest.importorskip("sdq._core")
if not hasattr(_core, "addonly_gemm"):
    pytest.skip("sdq._core was built without the CPU add-only kernels", allow_module_level=True)

EPS32 = float(np.finfo(np.float32).eps)
TINY = float(np.finfo(np.float32).tiny)
KERNELS = _core.addonly_kernels()


def _layer(rng, out, in_features, block_size, osr, ternary, zero_rows=()):
    """Random codes (padding columns zero / -1, as pack writes them) and fp16 scale and mean."""
    blocks, total = block_geometry(in_features, block_size, osr)
    live = np.zeros(total, dtype=bool)
    for _, _, _, m, offset in blocks:
        live[offset:offset + m] = True
    if ternary:
        codes = rng.integers(-1, 2, (out, total))
        codes[list(zero_rows)] = 0
    else:
        codes = 2 * rng.integers(0, 2, (out, total)) - 1
    codes[:, ~live] = 0 if ternary else -1
    sign = pack_plane_ref(codes > 0)
    nonzero = pack_plane_ref(codes != 0) if ternary else None
    nb = len(blocks)
    scale = rng.uniform(0.01, 2.0, (out, nb)).astype(np.float16)
    mean = (0.1 * rng.standard_normal((out, nb))).astype(np.float16)
    return sign, nonzero, scale.view(np.uint16), mean.view(np.uint16)


def _downs(rng, in_features, block_size, osr):
    blocks, _ = block_geometry(in_features, block_size, osr)
    full = rng.standard_normal((blocks[0][2], blocks[0][3])).astype(np.float32)
    last = rng.standard_normal((blocks[-1][2], blocks[-1][3])).astype(np.float32)
    return full, last


def _abs_half(a):
    return np.abs(a.view(np.float16)).view(np.uint16)


def _gemm_tolerance(layer, xt, xsum, in_features, block_size, osr):
    sign, nonzero, scale, mean = layer
    all_ones = np.full_like(sign, 0xFFFFFFFF)  # every code +1: sums |S| |xt|
    bound = addonly_gemm_ref(all_ones, None, _abs_half(scale), _abs_half(mean), np.abs(xt),
                             np.abs(xsum), in_features, block_size, osr)
    terms = xt.shape[1] + xsum.shape[1]
    return 4 * EPS32 * math.sqrt(terms) * bound + TINY


def _check_gemm(layer, xt, xsum, in_features, block_size, osr, kernel):
    sign, nonzero, scale, mean = layer
    y = _core.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr,
                           kernel=kernel)
    ref = addonly_gemm_ref(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr)
    tol = _gemm_tolerance(layer, xt, xsum, in_features, block_size, osr)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= tol), np.max(np.abs(y - ref) / tol)


def _random_xt(rng, batch, in_features, block_size, osr, magnitude=1.0):
    """xt / xsum shaped like activation_transform's output, zero in the padding."""
    blocks, total = block_geometry(in_features, block_size, osr)
    xt = np.zeros((batch, total), dtype=np.float32)
    for _, _, _, m, offset in blocks:
        xt[:, offset:offset + m] = magnitude * rng.standard_normal((batch, m))
    xsum = (magnitude * rng.standard_normal((batch, len(blocks)))).astype(np.float32)
    return xt, xsum


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ternary", [False, True], ids=["binary", "ternary"])
@pytest.mark.parametrize("osr", [1.0, 1.5, 2.0, 2.5, 0.75])
@pytest.mark.parametrize("in_features", [128, 200, 64, 1000])
def test_gemm_matches_reference(kernel, ternary, osr, in_features):
    rng = np.random.default_rng(zlib.crc32(repr((kernel, ternary, osr, in_features)).encode()))
    for batch, out in [(1, 7), (3, 256), (16, 1), (64, 33)]:
        layer = _layer(rng, out, in_features, 128, osr, ternary)
        xt, xsum = _random_xt(rng, batch, in_features, 128, osr)
        _check_gemm(layer, xt, xsum, in_features, 128, osr, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("magnitude", [1e15, 1e-15])
def test_gemm_huge_and_tiny(kernel, magnitude):
    rng = np.random.default_rng(7)
    for ternary in (False, True):
        layer = list(_layer(rng, 40, 300, 128, 2.0, ternary))
        # fp16 extremes: the largest normal and subnormal scales exercise the half conversion.
        layer[2][0] = np.float16(65504.0).view(np.uint16)
        layer[2][1] = np.float16(6e-8).view(np.uint16)
        xt, xsum = _random_xt(rng, 3, 300, 128, 2.0, magnitude)
        _check_gemm(tuple(layer), xt, xsum, 300, 128, 2.0, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gemm_zero_rows(kernel):
    rng = np.random.default_rng(3)
    sign, nonzero, scale, mean = _layer(rng, 20, 256, 128, 1.5, True, zero_rows=(0, 5, 19))
    mean[[0, 5, 19]] = 0
    xt, xsum = _random_xt(rng, 2, 256, 128, 1.5)
    y = _core.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, 256, 128, 1.5, kernel=kernel)
    assert np.all(y[:, [0, 5, 19]] == 0)
    binary = _layer(rng, 20, 256, 128, 1.5, False)
    binary[2][:] = 0
    binary[3][:] = 0
    y = _core.addonly_gemm(*binary, xt, xsum, 256, 128, 1.5, kernel=kernel)
    assert np.all(y == 0)


def test_kernel_name():
    assert _core.addonly_kernel_name() in ("portable", "avx2-lut", "avx512-lut")
    assert "portable" in KERNELS


@pytest.mark.parametrize("hadamard", [True, False])
@pytest.mark.parametrize("osr", [1.0, 1.5, 2.0, 0.75])
@pytest.mark.parametrize("in_features", [128, 200, 64, 1000, 1])
def test_activation_transform_matches_reference(hadamard, osr, in_features):
    rng = np.random.default_rng(in_features * 10 + int(osr * 4))
    bs = 128
    signs = rng.choice([-1.0, 1.0], bs).astype(np.float32) if hadamard else None
    full, last = _downs(rng, in_features, bs, osr)
    for batch, magnitude in [(1, 1.0), (3, 1e15), (16, 1e-15)]:
        x = (magnitude * rng.standard_normal((batch, in_features))).astype(np.float32)
        xt, xsum = _core.activation_transform(x, bs, osr, signs, full, last)
        ref_xt, ref_xsum = activation_transform_ref(x, bs, osr, signs, full, last)
        # Bound of every intermediate: |x'_i| <= sum|x_b| / sqrt(p), then through |D|.
        bound_xt, bound_xsum = _transform_bound(x, bs, osr, full, last)
        blocks, _ = block_geometry(in_features, bs, osr)
        terms = blocks[0][2] + int(math.log2(blocks[0][2])) + 1
        assert np.all(np.abs(xt - ref_xt) <= 4 * EPS32 * math.sqrt(terms) * bound_xt + TINY)
        assert np.all(np.abs(xsum - ref_xsum) <= 4 * EPS32 * math.sqrt(terms) * bound_xsum + TINY)


def _transform_bound(x, block_size, osr, full, last):
    blocks, total = block_geometry(x.shape[1], block_size, osr)
    xt = np.zeros((x.shape[0], total))
    xsum = np.zeros((x.shape[0], len(blocks)))
    for b, (start, width, padded, m, offset) in enumerate(blocks):
        a = np.abs(x[:, start:start + width].astype(np.float64)).sum(axis=1)
        d = np.abs(last if b == len(blocks) - 1 else full).sum(axis=0)
        xt[:, offset:offset + m] = np.outer(a / math.sqrt(padded), d)
        xsum[:, b] = a * math.sqrt(padded)
    return xt, xsum


@pytest.mark.skipif(not hasattr(_core, "resample_matrix"), reason="needs _core.resample_matrix")
@pytest.mark.parametrize("ternary", [False, True], ids=["binary", "ternary"])
def test_end_to_end_equals_dense_reconstruction(ternary):
    """transform + gemm == x @ W_hat^T with W_hat_b = (S * D q + MU) @ Hb^T (method.md step 5)."""
    rng = np.random.default_rng(11)
    out, in_features, bs, osr = 24, 300, 128, 1.5
    blocks, total = block_geometry(in_features, bs, osr)
    sign, nonzero, scale, mean = _layer(rng, out, in_features, bs, osr, ternary)
    signs = rng.choice([-1.0, 1.0], bs).astype(np.float32)
    downs = [_core.resample_matrix(m, p) for _, _, p, m, _ in blocks]
    codes = np.unpackbits(sign.view(np.uint8), axis=1, bitorder="little")[:, :total] * 2.0 - 1.0
    if ternary:
        codes *= np.unpackbits(nonzero.view(np.uint8), axis=1, bitorder="little")[:, :total]
    s, mu = scale.view(np.float16).astype(np.float64), mean.view(np.float16).astype(np.float64)
    w_hat = np.zeros((out, in_features))
    for b, (start, width, p, m, offset) in enumerate(blocks):
        wb = s[:, b:b + 1] * (codes[:, offset:offset + m] @ downs[b].T.astype(np.float64))
        wb += mu[:, b:b + 1]
        h = _hadamard(p) * signs[:p][:, None] / math.sqrt(p)  # Hb = diag(signs) H / sqrt(p)
        w_hat[:, start:start + width] = (wb @ h.T)[:, :width]
    x = rng.standard_normal((5, in_features)).astype(np.float32)
    xt, xsum = _core.activation_transform(x, bs, osr, signs, downs[0], downs[-1])
    y = _core.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, in_features, bs, osr)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_hat.T, rtol=1e-4, atol=1e-4)


def _hadamard(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


# ---- error paths ----

def _valid_args():
    rng = np.random.default_rng(0)
    sign, nonzero, scale, mean = _layer(rng, 8, 200, 128, 2.0, True)
    xt, xsum = _random_xt(rng, 2, 200, 128, 2.0)
    return dict(sign=sign, nonzero=nonzero, scale=scale, mean=mean, xt=xt, xsum=xsum,
                in_features=200, block_size=128, osr=2.0)


@pytest.mark.parametrize("name", ["sign", "nonzero", "scale", "mean", "xt", "xsum"])
def test_gemm_wrong_dtype(name):
    args = _valid_args()
    args[name] = args[name].astype(np.float64)
    with pytest.raises(TypeError, match=name):
        _core.addonly_gemm(**args)


@pytest.mark.parametrize("name", ["sign", "nonzero", "scale", "mean", "xt", "xsum"])
def test_gemm_wrong_shape(name):
    args = _valid_args()
    if name in ("sign", "xt"):  # their row counts define out / batch: cut a column instead
        args[name] = args[name][:, :-1].copy()
    else:
        args[name] = args[name][:-1].copy()
    with pytest.raises(ValueError, match=name):
        _core.addonly_gemm(**args)


def test_gemm_bad_geometry_and_kernel():
    args = _valid_args()
    with pytest.raises(ValueError, match="block_size"):
        _core.addonly_gemm(**{**args, "block_size": 100})
    with pytest.raises(ValueError, match="osr"):
        _core.addonly_gemm(**{**args, "osr": 0.0})
    with pytest.raises(ValueError, match="in_features"):
        _core.addonly_gemm(**{**args, "in_features": 0})
    with pytest.raises(ValueError, match="kernel"):
        _core.addonly_gemm(**args, kernel="sse9")
    with pytest.raises(ValueError, match="must be C-contiguous"):
        _core.addonly_gemm(**{**args, "xt": np.asfortranarray(args["xt"])})


def test_activation_transform_errors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 170)).astype(np.float32)  # last block padded to 64, not 128
    full, last = _downs(rng, 170, 128, 2.0)
    signs = np.ones(128, np.float32)
    with pytest.raises(TypeError, match="x"):
        _core.activation_transform(x.astype(np.float64), 128, 2.0, signs, full, last)
    with pytest.raises(TypeError, match="signs"):
        _core.activation_transform(x, 128, 2.0, signs.astype(np.int32), full, last)
    with pytest.raises(ValueError, match="signs"):
        _core.activation_transform(x, 128, 2.0, signs[:64].copy(), full, last)
    with pytest.raises(ValueError, match="down_full"):
        _core.activation_transform(x, 128, 2.0, signs, last, last)
    with pytest.raises(ValueError, match="down_last"):
        _core.activation_transform(x, 128, 2.0, signs, full, full)
    with pytest.raises(ValueError, match="block_size"):
        _core.activation_transform(x, 96, 2.0, signs, full, last)
    with pytest.raises(ValueError, match="x must be 2-D"):
        _core.activation_transform(x[0], 128, 2.0, signs, full, last)
