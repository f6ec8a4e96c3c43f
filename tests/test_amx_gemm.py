"""The AMX GEMMs (sdq/amx_gemm.h), binary and ternary (trit5), against their NumPy reference
(sdq.ref.amx) and against the exact float kernel. Runs only where the CPU and OS offer AMX (Sapphire Rapids and later); the
rest of the suite checks that plans never pick it elsewhere.

Tolerances. The reference rounds the activations and the scales exactly as the core does, so the
integer dot products agree and only the float epilogue differs: we allow 1e-5 of a bound on the
terms' magnitudes, sum_p 127 cols_p ascale_p qmax |f_p| + |MU| |xsum| (p: the spans; qmax 127 for
binary, whose scales are rounded to int8, 1 for ternary, whose f is S), plus the smallest normal
float. Against the exact dot products each activation is off by at most ascale_p / 2 and each
binary scale by f_p / 2, so |y - exact| <= sum_b cols_b ascale_p |q_b f_p| / 2 (+ binary:
sum_k |xt_k| f_p / 2) (+ slack).
"""
from __future__ import annotations

import numpy as np
import pytest

from sdq.ref.amx import (amx_activations_ref, amx_gemm_binary_ref, amx_gemm_ternary_ref,
                         amx_scales_ref, amx_spans)
from sdq.ref.kernels import addonly_gemm_ref, block_geometry, pack_plane_ref
from sdq.ref.lut import lut_pack_binary_ref

_core = pytest.importorskip("sdq._core")
if not hasattr(_core, "amx_gemm_binary"):
    pytest.skip("sdq._core was built without the AMX kernel", allow_module_level=True)
needs_amx = pytest.mark.skipif(not _core.amx_gemm_supported(),
                               reason="this CPU or OS has no AMX")

TINY = float(np.finfo(np.float32).tiny)

# (out, in_features, block_size, osr): short last blocks and blocks whose codes are not a multiple
# of 64 (padded steps), odd OSR, out not a multiple of 32 or of 128 (groups of 4 tiles), one block
SHAPES = [
    (32, 256, 128, 2.0),
    (70, 300, 128, 1.3),
    (45, 1000, 64, 2.5),
    (33, 200, 128, 1.0),
    (5, 128, 128, 16.0),
    (97, 96, 32, 3.0),
    (300, 1100, 64, 1.5),
    (129, 64, 64, 0.5),  # 32 codes: one half-empty step
]
BATCHES = [1, 15, 16, 17, 40]  # padded token tiles: one short, exact, one over, two + a half


LEVELS = ["binary", "ternary"]


def _layer(rng, out, in_features, block_size, osr, levels="binary"):
    """Random codes (padding 0) as bitplanes (sign, nonzero; nonzero None for binary), fp16 scale
    and mean, and the live code columns; row 0's codes all -1, row 1's scale and mean zero, and
    for ternary row 2 all zero and row 3 all +1."""
    blocks, total = block_geometry(in_features, block_size, osr)
    live = np.zeros(total, dtype=bool)
    for _, _, _, m, offset in blocks:
        live[offset:offset + m] = True
    sign = rng.integers(0, 2, (out, total)).astype(bool)
    nonzero = rng.integers(0, 3, (out, total)) > 0 if levels == "ternary" else np.ones_like(sign)
    sign[0], nonzero[0] = False, True
    if levels == "ternary" and out > 3:
        nonzero[2] = False
        sign[3], nonzero[3] = True, True
    nonzero[:, ~live] = False
    sign &= nonzero
    scale = rng.uniform(0.01, 2.0, (out, len(blocks))).astype(np.float16)
    mean = (0.1 * rng.standard_normal((out, len(blocks)))).astype(np.float16)
    if out > 1:
        scale[1] = mean[1] = 0
    planes = (pack_plane_ref(sign), pack_plane_ref(nonzero) if levels == "ternary" else None)
    return planes, scale.view(np.uint16), mean.view(np.uint16), live


def _acts(rng, batch, live, nb, kind="normal"):
    xt = rng.standard_normal((batch, live.size)).astype(np.float32)
    if kind == "huge":
        xt *= np.float32(1e30)
    elif kind == "denormal":
        xt *= np.float32(1e-40)
    elif kind == "zero":
        xt[:] = 0
    elif kind == "spiky":  # one huge value per token: only its own span's rounding coarsens
        xt[:, 3] = 1e6
    xt[:, ~live] = 0
    return xt, rng.standard_normal((batch, nb)).astype(np.float32)


def _columns(in_features, block_size, osr):
    blocks, _ = block_geometry(in_features, block_size, osr)
    cols = [-(-blocks[0][3] // 32) * 32] * len(blocks)
    cols[-1] = -(-blocks[-1][3] // 32) * 32
    return np.array(cols, dtype=np.float64)


def _span_of(geometry, scaled) -> np.ndarray:
    """The span of each block."""
    return np.concatenate([[p] * len(blocks)
                           for p, blocks in enumerate(amx_spans(*geometry, scaled))])


def _magnitude(scale, mean, xt, xsum, geometry, scaled):
    _, ascale = amx_activations_ref(xt, *geometry, scaled)
    _, f = amx_scales_ref(scale, *geometry, scaled)
    span_cols = np.bincount(_span_of(geometry, scaled), weights=_columns(*geometry))
    mu = np.abs(mean.view(np.float16).astype(np.float64))
    qmax = 127 if scaled else 1
    return (127 * span_cols * ascale.astype(np.float64)) @ (qmax * np.abs(f.astype(np.float64))).T \
        + np.abs(xsum.astype(np.float64)) @ mu.T


def _run(planes, scale, mean, xt, xsum, out, geometry, threads=0):
    sign, nonzero = planes
    if nonzero is None:
        packed = _core.lut_pack_binary(sign, *geometry)
        return _core.amx_gemm_binary(packed, scale, mean, xt, xsum, *geometry, out,
                                     threads=threads)
    trits, trit_signs = _core.trit5_pack(sign, nonzero, *geometry)
    return _core.amx_gemm_ternary(trits, trit_signs, scale, mean, xt, xsum, *geometry, out,
                                  threads=threads)


def _reference(planes, scale, mean, xt, xsum, geometry):
    sign, nonzero = planes
    if nonzero is None:
        return amx_gemm_binary_ref(sign, scale, mean, xt, xsum, *geometry)
    return amx_gemm_ternary_ref(sign, nonzero, scale, mean, xt, xsum, *geometry)


def _check_reference(y, planes, scale, mean, xt, xsum, geometry):
    ref = _reference(planes, scale, mean, xt, xsum, geometry)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.isfinite(y).all()
    scaled = planes[1] is None  # binary
    np.testing.assert_array_less(np.abs(y - ref),
                                 1e-5 * _magnitude(scale, mean, xt, xsum, geometry, scaled) + TINY)


@needs_amx
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_reference(levels, shape, batch):
    out, *geometry = shape
    rng = np.random.default_rng(batch * 1000 + out)
    planes, scale, mean, live = _layer(rng, *shape, levels)
    xt, xsum = _acts(rng, batch, live, scale.shape[1])
    for threads in (1, 2):
        _check_reference(_run(planes, scale, mean, xt, xsum, out, geometry, threads), planes,
                         scale, mean, xt, xsum, geometry)


@needs_amx
@pytest.mark.parametrize("levels", LEVELS)
def test_prefill_of_many_tokens_and_rows(levels):
    shape = (1000, 576, 128, 2.0)  # 32 tiles: 8 groups of 4 (the last one short); 4 token pairs
    rng = np.random.default_rng(64)
    planes, scale, mean, live = _layer(rng, *shape, levels)
    xt, xsum = _acts(rng, 130, live, scale.shape[1])
    _check_reference(_run(planes, scale, mean, xt, xsum, shape[0], shape[1:], 2), planes, scale,
                     mean, xt, xsum, shape[1:])


@needs_amx
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("kind", ["zero", "huge", "denormal", "spiky", "dead_span"])
def test_extreme_activations(levels, kind):
    shape = (40, 600, 128, 1.3)  # 5 blocks of 192 code columns: spans of 2, 2, 1
    rng = np.random.default_rng(7)
    planes, scale, mean, live = _layer(rng, *shape, levels)
    xt, xsum = _acts(rng, 18, live, scale.shape[1], kind="normal" if kind == "dead_span" else kind)
    if kind == "dead_span":  # the first span's activations all zero, the others live
        xt[:, :384] = 0
        assert (amx_activations_ref(xt, *shape[1:], levels == "binary")[1][:, 0] == 0).all()
    y = _run(planes, scale, mean, xt, xsum, shape[0], shape[1:])
    _check_reference(y, planes, scale, mean, xt, xsum, shape[1:])
    if kind in ("zero", "denormal"):  # activations round to 0: only MU * xsum remains
        mu = mean.view(np.float16).astype(np.float64)
        np.testing.assert_allclose(y, xsum.astype(np.float64) @ mu.T, rtol=1e-5, atol=1e-6)


@needs_amx
@pytest.mark.parametrize("levels", LEVELS)
def test_int32_sums_of_a_huge_block_do_not_overflow(levels):
    """One block of 262144 code columns (block 16384, OSR 16), every product at its largest
    (a = 127, code x q = 127): the sum of a span, 4.2e9, is more than int32 holds; the kernel
    adds its sums to y every 131072 columns."""
    shape = (32, 16384, 16384, 16.0)
    rng = np.random.default_rng(9)
    planes, scale, mean, live = _layer(rng, *shape, levels)
    sign, nonzero = planes
    ones = pack_plane_ref(np.broadcast_to(live, (shape[0], live.size)))
    planes = (ones, None if nonzero is None else ones)
    scale[:] = np.float16(0.5).view(np.uint16)
    for batch in (1, 20):
        xt = np.where(live, np.float32(0.25), np.float32(0))[None].repeat(batch, axis=0)
        xsum = rng.standard_normal((batch, 1)).astype(np.float32)
        y = _run(planes, scale, mean, xt, xsum, shape[0], shape[1:])
        _check_reference(y, planes, scale, mean, xt, xsum, shape[1:])
        mu = mean.view(np.float16).astype(np.float64)[:, 0]
        np.testing.assert_allclose(y, 0.25 * 0.5 * live.sum() + xsum.astype(np.float64) * mu,
                                   rtol=1e-5)


def test_activations_follow_the_rule():
    """Spot-check the reference's rounding: int8 in [-127, 127], the span's largest at +-127,
    each column within half a step of x."""
    geometry = (600, 128, 1.3)
    rng = np.random.default_rng(3)
    blocks, total = block_geometry(*geometry)
    xt = rng.standard_normal((2, total)).astype(np.float32)
    a, ascale = amx_activations_ref(xt, *geometry)
    spans = amx_spans(*geometry)
    assert [len(p) for p in spans] == [2, 2, 1]  # 192 code columns a block: 2 fit in 512
    for p, span in enumerate(spans):
        cols = np.concatenate([np.arange(blocks[b][4], blocks[b][4] + blocks[b][3]) for b in span])
        assert np.abs(a[:, cols]).max() == 127
        err = np.abs(a[:, cols] * ascale[:, p:p + 1] - xt[:, cols])
        assert (err < ascale[:, p:p + 1] / 2 + 1e-6).all()


def test_scales_follow_the_rule():
    """The reference's int8 scales: the span's largest |S| of each row at +-127, each block's
    q f within f / 2 of S, f = q = 0 for a row whose span is all zero."""
    geometry = (600, 128, 1.3)
    rng = np.random.default_rng(4)
    s = rng.uniform(-2, 2, (6, 5)).astype(np.float16)
    s[1, :2] = 0
    q, f = amx_scales_ref(s.view(np.uint16), *geometry)
    for p, span in enumerate(amx_spans(*geometry)):
        sp = slice(span.start, span.stop)
        live = np.abs(s[:, sp]).max(axis=1) > 0
        assert (np.abs(q[live, sp]).max(axis=1) == 127).all()
        assert (q[~live, sp] == 0).all() and (f[~live, p] == 0).all()
        err = np.abs(q[:, sp] * f[:, p:p + 1] - s[:, sp].astype(np.float32))
        assert (err <= f[:, p:p + 1] / 2 * (1 + 1e-6)).all()


@needs_amx
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_close_to_exact_float_kernel(levels, shape):
    out, *geometry = shape
    rng = np.random.default_rng(11)
    planes, scale, mean, live = _layer(rng, *shape, levels)
    xt, xsum = _acts(rng, 20, live, scale.shape[1])
    y = _run(planes, scale, mean, xt, xsum, out, geometry)
    exact = addonly_gemm_ref(*planes, scale, mean, xt, xsum, *geometry)
    scaled = levels == "binary"
    _, ascale = amx_activations_ref(xt, *geometry, scaled)
    q, f = amx_scales_ref(scale, *geometry, scaled)
    span = _span_of(geometry, scaled)
    blocks, _ = block_geometry(*geometry)
    xabs = np.stack([np.abs(xt[:, o:o + m]).sum(axis=1) for _, _, _, m, o in blocks], axis=1)
    fb = np.abs(f[:, span].astype(np.float64))  # [out, nb]: each block's span factor
    step = (_columns(*geometry) * ascale[:, span] / 2) @ (np.abs(q) * fb).T
    if scaled:  # and each scale off by at most f / 2
        step += (xabs / 2) @ fb.T
    np.testing.assert_array_less(np.abs(y - exact), 1.001 * step + 1e-5 * _magnitude(
        scale, mean, xt, xsum, geometry, scaled) + TINY)
    # and far below the worst case on Gaussian activations, closer than the tables (~1%)
    assert np.linalg.norm(y - exact) < 0.01 * np.linalg.norm(exact)


@needs_amx
def test_packed_layout_is_the_lut_one():
    """The kernel reads lut_pack_binary's tiles: the reference packer gives the same bytes."""
    shape = (70, 300, 128, 1.3)
    (sign, _), _, _, _ = _layer(np.random.default_rng(2), *shape)
    np.testing.assert_array_equal(_core.lut_pack_binary(sign, *shape[1:]), lut_pack_binary_ref(sign))


@needs_amx
def test_bad_arguments():
    shape = (40, 300, 128, 1.3)
    out, in_features, block_size, osr = shape
    rng = np.random.default_rng(5)
    (sign, _), scale, mean, live = _layer(rng, *shape)
    xt, xsum = _acts(rng, 2, live, scale.shape[1])
    packed = _core.lut_pack_binary(sign, in_features, block_size, osr)
    args = dict(in_features=in_features, block_size=block_size, osr=osr, out=out)
    with pytest.raises(ValueError, match="packed must have shape"):
        _core.amx_gemm_binary(packed[:-1].copy(), scale, mean, xt, xsum, **args)
    with pytest.raises(ValueError, match="scale must have shape"):
        _core.amx_gemm_binary(packed, scale[:-1].copy(), mean, xt, xsum, **args)
    with pytest.raises(ValueError, match="xt must have shape"):
        _core.amx_gemm_binary(packed, scale, mean, xt[:, :-1].copy(), xsum, **args)
    with pytest.raises(ValueError, match="xsum must have shape"):
        _core.amx_gemm_binary(packed, scale, mean, xt, xsum[:1].copy(), **args)
    with pytest.raises(TypeError, match="xt must have dtype"):
        _core.amx_gemm_binary(packed, scale, mean, xt.astype(np.float64), xsum, **args)
    with pytest.raises(ValueError, match="out must be"):
        _core.amx_gemm_binary(packed, scale, mean, xt, xsum, in_features, block_size, osr, -1)
    empty = _core.amx_gemm_binary(packed, scale, mean, xt[:0].copy(), xsum[:0].copy(), **args)
    assert empty.shape == (0, out)
    (sign, nonzero), scale, mean, live = _layer(rng, *shape, "ternary")
    trits, trit_signs = _core.trit5_pack(sign, nonzero, in_features, block_size, osr)
    with pytest.raises(ValueError, match="trits must have shape"):
        _core.amx_gemm_ternary(trits[:-1].copy(), trit_signs, scale, mean, xt, xsum, **args)
    with pytest.raises(ValueError, match="trit_signs must have shape"):
        _core.amx_gemm_ternary(trits, trit_signs[:, :-1].copy(), scale, mean, xt, xsum, **args)
    with pytest.raises(ValueError, match="xt must have shape"):
        _core.amx_gemm_ternary(trits, trit_signs, scale, mean, xt[:, :-1].copy(), xsum, **args)


@pytest.mark.skipif(_core.amx_gemm_supported(), reason="this CPU has AMX")
def test_refused_without_amx():
    shape = (40, 300, 128, 1.3)
    (sign, _), scale, mean, live = _layer(np.random.default_rng(5), *shape)
    xt, xsum = _acts(np.random.default_rng(6), 2, live, scale.shape[1])
    packed = _core.lut_pack_binary(sign, *shape[1:])
    with pytest.raises(ValueError, match="no AMX"):
        _core.amx_gemm_binary(packed, scale, mean, xt, xsum, *shape[1:], shape[0])
    (sign, nonzero), scale, mean, _ = _layer(np.random.default_rng(5), *shape, "ternary")
    trits, trit_signs = _core.trit5_pack(sign, nonzero, *shape[1:])
    with pytest.raises(ValueError, match="no AMX"):
        _core.amx_gemm_ternary(trits, trit_signs, scale, mean, xt, xsum, *shape[1:], shape[0])
