"""The binary int8 look-up kernel (sdq/lut_gemm.h) against its NumPy reference (sdq.ref.lut) and
against the exact float kernel (sdq.ref.kernels / _core.addonly_gemm).

Tolerances. The reference rounds the tables exactly as the core does, so the integer sums agree
and only the float epilogue differs: we allow 1e-5 of a bound on the terms' magnitudes,
sum_b 127 * groups_b * tscale_b * |S| + |MU| |xsum| (>= every partial sum), plus the smallest
normal float. Against the exact dot products, each table entry is off by at most tscale_b / 2
(rounding) plus its float32 rounding, so |y - exact| <= sum_b |S| groups_b tscale_b / 2 (+ slack).
"""
from __future__ import annotations

import numpy as np
import pytest

from sdq.ref.kernels import addonly_gemm_ref, block_geometry, pack_plane_ref
from sdq.ref.lut import lut_gemm_binary_ref, lut_pack_binary_ref, lut_tables_ref

_core = pytest.importorskip("sdq._core")
if not hasattr(_core, "lut_gemm_binary"):
    pytest.skip("sdq._core was built without the look-up kernels", allow_module_level=True)

TINY = float(np.finfo(np.float32).tiny)
KERNELS = [k for k in ("portable", "avx2", "avx512", "avx512-vnni", "neon") if _core.lut_kernel_supported(k)]

# (out, in_features, block_size, osr): short last blocks, odd OSR, out not a multiple of 32
SHAPES = [
    (32, 256, 128, 2.0),
    (70, 300, 128, 1.3),
    (45, 1000, 64, 2.5),
    (33, 200, 128, 1.0),
    (5, 128, 128, 16.0),  # 512 pairs per block: int16 sums are flushed to int32
    (97, 96, 32, 3.0),
    (41, 1100, 64, 1.5),  # 18 blocks: the scale transpose's 8-block steps and a tail of 2
]


def _live(in_features, block_size, osr):
    blocks, total = block_geometry(in_features, block_size, osr)
    live = np.zeros(total, dtype=bool)
    for _, _, _, m, offset in blocks:
        live[offset:offset + m] = True
    return blocks, live


def _layer(rng, out, in_features, block_size, osr):
    """Random binary codes (padding bits 0, as pack writes them), fp16 scale and mean; row 0's
    codes all -1, row 1's scale and mean zero."""
    blocks, live = _live(in_features, block_size, osr)
    codes = rng.integers(0, 2, (out, live.size)).astype(bool)
    codes[:, ~live] = False
    codes[0] = False
    sign = pack_plane_ref(codes)
    scale = rng.uniform(0.01, 2.0, (out, len(blocks))).astype(np.float16)
    mean = (0.1 * rng.standard_normal((out, len(blocks)))).astype(np.float16)
    if out > 1:
        scale[1] = 0
        mean[1] = 0
    return sign, scale.view(np.uint16), mean.view(np.uint16)


def _acts(rng, batch, in_features, block_size, osr, kind="normal"):
    blocks, live = _live(in_features, block_size, osr)
    xt = rng.standard_normal((batch, live.size)).astype(np.float32)
    if kind == "huge":
        xt *= np.float32(1e30)
    elif kind == "denormal":
        xt *= np.float32(1e-40)
    elif kind == "zero":
        xt[:] = 0
    elif kind == "spiky":  # one huge value per token: the other blocks' tables are unaffected
        xt[:, 3] = 1e6
    xt[:, ~live] = 0
    xsum = rng.standard_normal((batch, len(blocks))).astype(np.float32)
    return xt, xsum


def _group_counts(in_features, block_size, osr):
    blocks, _ = block_geometry(in_features, block_size, osr)
    cols0 = -(-blocks[0][3] // 32) * 32
    counts = [cols0 // 4] * len(blocks)
    counts[-1] = -(-blocks[-1][3] // 32) * 32 // 4
    return np.array(counts, dtype=np.float64)


def _magnitude(scale, mean, xt, xsum, shape):
    _, in_features, block_size, osr = shape
    _, tscale = lut_tables_ref(xt, in_features, block_size, osr)
    s = np.abs(scale.view(np.float16).astype(np.float64))
    mu = np.abs(mean.view(np.float16).astype(np.float64))
    per_block = 127 * _group_counts(in_features, block_size, osr) * tscale  # [batch, nb]
    return per_block @ s.T + np.abs(xsum.astype(np.float64)) @ mu.T


def _run(sign, scale, mean, xt, xsum, shape, kernel, threads=0):
    out, in_features, block_size, osr = shape
    packed = _core.lut_pack_binary(sign, in_features, block_size, osr)
    return _core.lut_gemm_binary(packed, scale, mean, xt, xsum, in_features, block_size, osr, out,
                                 threads=threads, kernel=kernel)


def _check_reference(y, sign, scale, mean, xt, xsum, shape):
    _, in_features, block_size, osr = shape
    ref = lut_gemm_binary_ref(sign, scale, mean, xt, xsum, in_features, block_size, osr)
    tol = 1e-5 * _magnitude(scale, mean, xt, xsum, shape) + TINY
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.isfinite(y).all()
    np.testing.assert_array_less(np.abs(y - ref), tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_matches_reference(shape):
    out, in_features, block_size, osr = shape
    sign, _, _ = _layer(np.random.default_rng(out), *shape)
    packed = _core.lut_pack_binary(sign, in_features, block_size, osr)
    assert packed.dtype == np.uint8
    assert packed.size == -(-out // 32) * 32 * sign.shape[1] * 4  # bitplane bytes + tile padding
    np.testing.assert_array_equal(packed, lut_pack_binary_ref(sign))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_matches_reference(kernel, shape, batch):
    rng = np.random.default_rng(batch * 1000 + shape[0])
    sign, scale, mean = _layer(rng, *shape)
    xt, xsum = _acts(rng, batch, *shape[1:])
    for threads in (1, 2):
        y = _run(sign, scale, mean, xt, xsum, shape, kernel, threads)
        _check_reference(y, sign, scale, mean, xt, xsum, shape)


@pytest.mark.parametrize("kernel", KERNELS)
def test_batch_64_prefill(kernel):
    shape = (100, 520, 128, 2.0)  # 4 token chunks of 16, 4 tiles (the last one short)
    rng = np.random.default_rng(64)
    sign, scale, mean = _layer(rng, *shape)
    xt, xsum = _acts(rng, 64, *shape[1:])
    _check_reference(_run(sign, scale, mean, xt, xsum, shape, kernel, 2), sign, scale, mean, xt,
                     xsum, shape)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["zero", "huge", "denormal", "spiky"])
def test_extreme_activations(kernel, kind):
    shape = (40, 300, 128, 1.3)
    rng = np.random.default_rng(7)
    sign, scale, mean = _layer(rng, *shape)
    xt, xsum = _acts(rng, 3, *shape[1:], kind=kind)
    y = _run(sign, scale, mean, xt, xsum, shape, kernel)
    _check_reference(y, sign, scale, mean, xt, xsum, shape)
    if kind in ("zero", "denormal"):  # tables are zero: only MU * xsum remains
        mu = mean.view(np.float16).astype(np.float64)
        np.testing.assert_allclose(y, xsum.astype(np.float64) @ mu.T, rtol=1e-5, atol=1e-6)


def test_tables_follow_the_rule():
    """Spot-check the reference's tables: entries are the +-1 sums, scaled to +-127."""
    shape = (1, 128, 128, 1.0)
    rng = np.random.default_rng(3)
    xt, _ = _acts(rng, 1, *shape[1:])
    q, tscale = lut_tables_ref(xt, *shape[1:])
    x = xt[0, :4].astype(np.float64)
    signs = np.array([[1 if (i >> j) & 1 else -1 for j in range(4)] for i in range(16)])
    np.testing.assert_array_less(np.abs(q[0, 0] * tscale[0, 0] - signs @ x), tscale[0, 0] / 2 + 1e-6)
    assert np.abs(q).max() == 127
    np.testing.assert_array_equal(q[0, :, ::-1], -q[0])  # entry 15 - i = -entry i


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_close_to_exact_float_kernel(kernel, shape):
    out, in_features, block_size, osr = shape
    rng = np.random.default_rng(11)
    sign, scale, mean = _layer(rng, *shape)
    xt, xsum = _acts(rng, 5, *shape[1:])
    y = _run(sign, scale, mean, xt, xsum, shape, kernel)
    exact = addonly_gemm_ref(sign, None, scale, mean, xt, xsum, in_features, block_size, osr)
    _, tscale = lut_tables_ref(xt, in_features, block_size, osr)
    step = (_group_counts(in_features, block_size, osr) * tscale / 2) @ np.abs(
        scale.view(np.float16).astype(np.float64)).T
    np.testing.assert_array_less(np.abs(y - exact), 1.001 * step + 1e-5 * _magnitude(
        scale, mean, xt, xsum, shape) + TINY)
    # and the error is far below the worst case on Gaussian activations: ~1% of |y|
    float_y = _core.addonly_gemm(sign, None, scale, mean, xt, xsum, in_features, block_size, osr)
    assert np.linalg.norm(y - float_y) < 0.03 * np.linalg.norm(float_y)


def test_kernel_names():
    assert _core.lut_kernel_name("portable") == "portable"
    assert _core.lut_kernel_name() in KERNELS
    assert _core.lut_kernel_supported("portable") and _core.lut_kernel_supported("auto")
    with pytest.raises(ValueError, match="kernel must be"):
        _core.lut_kernel_supported("avx9")


def test_bad_arguments():
    shape = (40, 300, 128, 1.3)
    out, in_features, block_size, osr = shape
    rng = np.random.default_rng(5)
    sign, scale, mean = _layer(rng, *shape)
    xt, xsum = _acts(rng, 2, *shape[1:])
    packed = _core.lut_pack_binary(sign, in_features, block_size, osr)
    args = dict(in_features=in_features, block_size=block_size, osr=osr, out=out)
    with pytest.raises(ValueError, match="sign must have shape"):
        _core.lut_pack_binary(sign[:, :-1].copy(), in_features, block_size, osr)
    with pytest.raises(TypeError, match="sign must have dtype"):
        _core.lut_pack_binary(sign.astype(np.int64), in_features, block_size, osr)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        _core.lut_pack_binary(sign, in_features, 100, osr)
    with pytest.raises(ValueError, match="packed must have shape"):
        _core.lut_gemm_binary(packed[:-1].copy(), scale, mean, xt, xsum, **args)
    with pytest.raises(ValueError, match="packed must have shape"):  # out disagrees with packed
        _core.lut_gemm_binary(packed, scale, mean, xt, xsum, in_features, block_size, osr, out + 40)
    with pytest.raises(ValueError, match="scale must have shape"):
        _core.lut_gemm_binary(packed, scale[:-1].copy(), mean, xt, xsum, **args)
    with pytest.raises(ValueError, match="xt must have shape"):
        _core.lut_gemm_binary(packed, scale, mean, xt[:, :-1].copy(), xsum, **args)
    with pytest.raises(ValueError, match="xsum must have shape"):
        _core.lut_gemm_binary(packed, scale, mean, xt, xsum[:1].copy(), **args)
    with pytest.raises(TypeError, match="xt must have dtype"):
        _core.lut_gemm_binary(packed, scale, mean, xt.astype(np.float64), xsum, **args)
    with pytest.raises(ValueError, match="kernel must be"):
        _core.lut_gemm_binary(packed, scale, mean, xt, xsum, **args, kernel="sse")
    with pytest.raises(ValueError, match="out must be"):
        _core.lut_gemm_binary(packed, scale, mean, xt, xsum, in_features, block_size, osr, -1)
    empty = _core.lut_gemm_binary(packed, scale, mean, xt[:0].copy(), xsum[:0].copy(), **args)
    assert empty.shape == (0, out)
