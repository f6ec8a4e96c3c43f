"""trit5: ternary codes at 1.67 bits per trit (sdq/trit5.h) and the int8 look-up kernel.

The references here are written from the layout text alone, independently of the C++:
- `_encode_ref` builds trits / trit_signs from int8 codes (groups of 3, v, idx, neg, tiles of 32).
- `_gemm_ref` builds the int8 tables exactly as the text defines them (float32 entries, one step
  per token and block, round half to even) and sums in float64; the kernels sum the same integers,
  so they differ from it only by float32 rounding of a few products and sums per (row, block).
- The exact float kernel `_core.addonly_gemm` on the same codes differs by the table rounding:
  at most step_b / 2 per nonzero group, times |S|.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from sdq.ref.kernels import block_geometry

_core = pytest.importorskip("sdq._core")
if not hasattr(_core, "trit5_gemm"):
    pytest.skip("sdq._core was built without the trit5 kernel", allow_module_level=True)

EPS32 = float(np.finfo(np.float32).eps)
KERNELS = [k for k in ("portable", "avx2", "avx512", "neon") if _core.trit5_kernel_supported(k)]

# (out, in_features, block_size, osr): short last block, m not a multiple of 3 or 32, out not a
# multiple of 32, a block of 342 groups (int16 sums flushed twice), a block of 1 group.
SHAPES = [
    (45, 200, 64, 1.3),    # m = 83, 83, 83, 10
    (64, 384, 128, 2.5),   # m = 320: 107 groups, padded to 108
    (33, 40, 16, 1.0),     # m = 16, 16, 8 (16 % 3 == 1)
    (40, 128, 64, 16.0),   # m = 1024: 342 groups
    (7, 2, 2, 1.0),        # one block, m = 2: one group
    (37, 700, 64, 1.5),    # 11 blocks: the scale transpose's 8-block step and a tail of 3
]


# ---- the layout text, in NumPy ----------------------------------------------------------------

def _groups(in_features, block_size, osr):
    """Per block (code_offset, m, G, GP, group_offset) and total_groups."""
    blocks, _ = block_geometry(in_features, block_size, osr)
    out = []
    for b, (_, _, _, m, offset) in enumerate(blocks):
        g = -(-m // 3)  # ceil(m / 3)
        gp = g + g % 2  # rounded up to even
        gp0 = gp if b == 0 else out[0][3]
        out.append((offset, m, g, gp, b * gp0))
    return out, out[-1][4] + out[-1][3]


def _trit_groups(codes, in_features, block_size, osr):
    """codes [out, total_code_cols] -> (t [out, total_groups, 3]) with zero padding groups."""
    geo, total_groups = _groups(in_features, block_size, osr)
    t = np.zeros((codes.shape[0], total_groups, 3), dtype=np.int64)
    for offset, m, g, _, g0 in geo:
        block = np.zeros((codes.shape[0], 3 * g), dtype=np.int64)
        block[:, :m] = codes[:, offset:offset + m]
        t[:, g0:g0 + g] = block.reshape(codes.shape[0], g, 3)
    return t


def _encode_ref(codes, in_features, block_size, osr):
    out = codes.shape[0]
    t = _trit_groups(codes, in_features, block_size, osr)
    v = 9 * (t[..., 0] + 1) + 3 * (t[..., 1] + 1) + (t[..., 2] + 1)
    idx, neg = np.abs(v - 13), v < 13
    tiles, groups = -(-out // 32), t.shape[1]
    idx_t = np.zeros((tiles * 32, groups), dtype=np.uint8)
    neg_t = np.zeros((tiles * 32, groups), dtype=np.uint64)
    idx_t[:out], neg_t[:out] = idx, neg
    idx_t = idx_t.reshape(tiles, 32, groups).transpose(0, 2, 1)  # [tiles, groups, 32]
    trits = (idx_t[:, 0::2] | (idx_t[:, 1::2] << 4)).astype(np.uint8)
    neg_t = neg_t.reshape(tiles, 32, groups)
    signs = (neg_t << np.arange(32, dtype=np.uint64)[None, :, None]).sum(axis=1)
    return trits, signs.astype(np.uint32)


PATTERNS = np.array([[(13 + i) // 9 - 1, ((13 + i) // 3) % 3 - 1, (13 + i) % 3 - 1]
                     for i in range(14)], dtype=np.float32)  # [14, 3] decoded positive patterns


def _tables_ref(xt, in_features, block_size, osr):
    """int8 tables q [batch, total_groups, 14] and steps [batch, num_blocks], as trit5.h says."""
    geo, total_groups = _groups(in_features, block_size, osr)
    batch = xt.shape[0]
    q = np.zeros((batch, total_groups, 14), dtype=np.float64)
    steps = np.zeros((batch, len(geo)), dtype=np.float32)
    p = PATTERNS
    for b, (offset, m, g, _, g0) in enumerate(geo):
        x = np.zeros((batch, 3 * g), dtype=np.float32)
        x[:, :m] = xt[:, offset:offset + m]
        x = x.reshape(batch, g, 1, 3)
        e = (p[:, 0] * x[..., 0] + p[:, 1] * x[..., 1]) + p[:, 2] * x[..., 2]  # float32
        mx = np.abs(e).max(axis=(1, 2))
        for tok in range(batch):
            m32 = np.float32(mx[tok])
            if m32 == 0:
                continue
            pre = np.float32(2.0 ** 100) if m32 < np.float32(2.0 ** -100) else np.float32(1)
            inv = np.float32(127) / (m32 * pre)
            q[tok, g0:g0 + g] = np.rint((e[tok] * pre) * inv)
            steps[tok, b] = m32 / np.float32(127)
    return q, steps


def _gemm_ref(codes, scale, mean, xt, xsum, in_features, block_size, osr, absolute=False):
    """y [batch, out] in float64 from the int8 tables; absolute: every term by its magnitude."""
    geo, _ = _groups(in_features, block_size, osr)
    t = _trit_groups(codes, in_features, block_size, osr)
    v = 9 * (t[..., 0] + 1) + 3 * (t[..., 1] + 1) + (t[..., 2] + 1)
    idx, sgn = np.abs(v - 13), np.where(v < 13, -1.0, 1.0)
    q, steps = _tables_ref(xt, in_features, block_size, osr)
    s = scale.view(np.float16).astype(np.float64)
    mu = mean.view(np.float16).astype(np.float64)
    y = np.zeros((xt.shape[0], codes.shape[0]))
    for b, (_, _, g, gp, g0) in enumerate(geo):
        sel = slice(g0, g0 + gp)
        for tok in range(xt.shape[0]):
            looked = np.take_along_axis(q[tok, sel][None].repeat(len(codes), 0),
                                        idx[:, sel, None], axis=2)[..., 0] * sgn[:, sel]
            acc = np.abs(looked).sum(1) if absolute else looked.sum(1)
            term = acc * steps[tok, b] * s[:, b]
            if absolute:
                y[tok] += np.abs(term) + np.abs(mu[:, b] * xsum[tok, b])
            else:
                y[tok] += term + mu[:, b] * xsum[tok, b]
    return y, steps


# ---- random layers ----------------------------------------------------------------------------

def _codes(rng, out, in_features, block_size, osr, zero_rows=()):
    blocks, total = block_geometry(in_features, block_size, osr)
    codes = np.zeros((out, total), dtype=np.int8)
    for _, _, _, m, offset in blocks:
        codes[:, offset:offset + m] = rng.integers(-1, 2, (out, m))
    codes[list(zero_rows)] = 0
    return codes


def _planes(codes):
    return _core.pack_bitplanes(codes, "ternary")


def _layer(rng, out, in_features, block_size, osr, scale_range=(0.01, 2.0)):
    codes = _codes(rng, out, in_features, block_size, osr, zero_rows=(0, out - 1))
    nb = len(block_geometry(in_features, block_size, osr)[0])
    scale = rng.uniform(*scale_range, (out, nb)).astype(np.float16).view(np.uint16)
    mean = (0.1 * rng.standard_normal((out, nb))).astype(np.float16).view(np.uint16)
    return codes, scale, mean


def _activations(rng, batch, in_features, block_size, osr, magnitude=1.0):
    blocks, total = block_geometry(in_features, block_size, osr)
    xt = np.zeros((batch, total), dtype=np.float32)
    for _, _, _, m, offset in blocks:
        xt[:, offset:offset + m] = (magnitude * rng.standard_normal((batch, m))).astype(np.float32)
    xsum = rng.standard_normal((batch, len(blocks))).astype(np.float32)
    return xt, xsum


def _run(codes, scale, mean, xt, xsum, geom, kernel, threads=1):
    in_features, block_size, osr = geom
    sign, nonzero = _planes(codes)
    trits, signs = _core.trit5_pack(sign, nonzero, in_features, block_size, osr)
    return _core.trit5_gemm(trits, signs, scale, mean, xt, xsum, in_features, block_size, osr,
                            codes.shape[0], threads=threads, kernel=kernel)


def _check_against_ref(y, codes, scale, mean, xt, xsum, geom):
    ref, _ = _gemm_ref(codes, scale, mean, xt, xsum, *geom)
    bound, _ = _gemm_ref(codes, scale, mean, xt, xsum, *geom, absolute=True)
    # float32 rounding of a few products per (row, block) and of the sum over blocks
    nb = len(block_geometry(*geom)[0])
    tol = 8 * EPS32 * math.sqrt(nb + 1) * bound
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(np.isfinite(y))
    np.testing.assert_array_less(np.abs(y - ref), tol + 1e-30)


# ---- layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_pack_matches_layout_text_and_round_trips(rng, shape):
    out, in_features, block_size, osr = shape
    codes = _codes(rng, out, in_features, block_size, osr, zero_rows=(1,))
    sign, nonzero = _planes(codes)
    trits, signs = _core.trit5_pack(sign, nonzero, in_features, block_size, osr, threads=2)
    ref_trits, ref_signs = _encode_ref(codes, in_features, block_size, osr)
    np.testing.assert_array_equal(trits, ref_trits)
    np.testing.assert_array_equal(signs, ref_signs)
    back_sign, back_nonzero = _core.trit5_unpack(trits, signs, out, in_features, block_size, osr)
    np.testing.assert_array_equal(back_sign, sign)
    np.testing.assert_array_equal(back_nonzero, nonzero)
    info = _core.trit5_shape(out, in_features, block_size, osr)
    assert info["trits_shape"] == trits.shape and info["trit_signs_shape"] == signs.shape
    assert info["bits_per_weight"] == (8 * trits.size + 32 * signs.size) / (out * in_features)


def test_bits_per_weight_at_osr_2():
    info = _core.trit5_shape(4096, 4096, 128, 2.0)
    assert info["total_groups"] == 32 * 86
    assert info["bits_per_weight"] == pytest.approx(3.359375)  # 5/3 bits per code x 2, padded


def test_pack_rejects_codes_the_planes_cannot_mean(rng):
    geom = (100, 64, 1.3)
    sign, nonzero = _planes(_codes(rng, 5, *geom))
    bad = sign.copy()
    bad[2, 0] |= ~nonzero[2, 0]  # a sign bit without its nonzero bit
    with pytest.raises(ValueError, match="sign bit without"):
        _core.trit5_pack(bad, nonzero, *geom)
    pad = nonzero.copy()
    pad[0, 2] |= np.uint32(1 << 31)  # column 95: padding of block 0 (m = 83)
    with pytest.raises(ValueError, match="padding"):
        _core.trit5_pack(sign, pad, *geom)


def _set_pattern(trits, row, group, idx):
    """trits with the pattern of (row, group) replaced by idx."""
    t = trits.copy()
    tile, r, p, half = row // 32, row % 32, group // 2, group % 2
    t[tile, p, r] = (t[tile, p, r] & (0xF0 if half == 0 else 0x0F)) | (idx << (4 * half))
    return t


def test_unpack_rejects_non_canonical_input(rng):
    out, geom = 40, (384, 128, 2.5)  # m = 320 (3 blocks): G = 107, GP = 108 (group 107: padding)
    trits, signs = _core.trit5_pack(*_planes(_codes(rng, out, *geom)), *geom)
    info = _core.trit5_shape(out, *geom)
    assert info["groups"] == [107] * 3 and info["padded_groups"] == [108] * 3
    zero_sign = signs.copy()
    zero_sign[0, 5] |= np.uint32(1 << 3)
    cases = [
        (_set_pattern(trits, 3, 0, 14), signs),                 # pattern above 13
        (_set_pattern(trits, 3, 5, 0), zero_sign),              # sign on an all-zero group
        (_set_pattern(trits, 63, 0, 1), signs),                 # row 63 >= out = 40
        (_set_pattern(trits, 2, 107, 9), signs),                # a code in a padding group
        (_set_pattern(trits, 2, 106, 1), signs),                # (0, 0, 1): column 320 >= m
    ]
    for t, s in cases:
        with pytest.raises(ValueError, match="canonical"):
            _core.trit5_unpack(t, s, out, *geom)
    # the last group's first column (318 < m) is fine
    _core.trit5_unpack(_set_pattern(trits, 2, 106, 9), signs, out, *geom)


# ---- kernel -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_int8_reference(rng, kernel, shape):
    out, *geom = shape
    codes, scale, mean = _layer(rng, out, *geom)
    for batch, threads in ((1, 1), (3, 2), (17, 2)):
        xt, xsum = _activations(rng, batch, *geom)
        y = _run(codes, scale, mean, xt, xsum, geom, kernel, threads)
        _check_against_ref(y, codes, scale, mean, xt, xsum, geom)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_batch_64_two_threads(rng, kernel):
    out, *geom = 70, 300, 128, 2.0
    codes, scale, mean = _layer(rng, out, *geom)
    xt, xsum = _activations(rng, 64, *geom)
    y = _run(codes, scale, mean, xt, xsum, geom, kernel, threads=2)
    _check_against_ref(y, codes, scale, mean, xt, xsum, geom)
    y1 = _run(codes, scale, mean, xt, xsum, geom, kernel, threads=1)
    np.testing.assert_array_equal(y, y1)  # the split over threads changes no sum


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("magnitude, scale_range", [(1e30, (0.01, 2.0)),    # huge activations
                                                     (1e-40, (3e4, 6e4))])  # denormal ones
def test_kernel_extreme_activations(rng, kernel, magnitude, scale_range):
    out, *geom = 36, 200, 64, 1.3
    codes, scale, mean = _layer(rng, out, *geom, scale_range=scale_range)
    mean[:] = 0  # keep the mean term from hiding the code term at these scales
    xt, xsum = _activations(rng, 3, *geom, magnitude=magnitude)
    xt[1, :83] *= np.float32(1e-3)  # blocks of very different size in one token
    y = _run(codes, scale, mean, xt, xsum, geom, kernel, threads=2)
    _check_against_ref(y, codes, scale, mean, xt, xsum, geom)
    assert np.abs(y).max() > 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_zero_activations_give_the_mean_term(rng, kernel):
    out, *geom = 33, 200, 64, 1.3
    codes, scale, mean = _layer(rng, out, *geom)
    xt, xsum = _activations(rng, 2, *geom)
    xt[:] = 0
    y = _run(codes, scale, mean, xt, xsum, geom, kernel)
    ref = xsum.astype(np.float64) @ mean.view(np.float16).astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_kernel_close_to_exact_float_kernel(rng, kernel, shape):
    out, *geom = shape
    codes, scale, mean = _layer(rng, out, *geom)
    xt, xsum = _activations(rng, 5, *geom)
    y = _run(codes, scale, mean, xt, xsum, geom, kernel, threads=2)
    sign, nonzero = _planes(codes)
    exact = _core.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, *geom)
    # each nonzero group's table entry is off by at most step / 2
    geo, _ = _groups(*geom)
    _, steps = _gemm_ref(codes, scale, mean, xt, xsum, *geom)
    s = np.abs(scale.view(np.float16).astype(np.float64))
    t = _trit_groups(codes, *geom)
    nonzero_groups = np.stack([np.any(t[:, g0:g0 + g] != 0, axis=2).sum(1)
                               for _, _, g, _, g0 in geo], axis=1)  # [out, nb]
    table_err = 0.5 * (steps.astype(np.float64) @ (nonzero_groups * s).T)  # [batch, out]
    bound, _ = _gemm_ref(codes, scale, mean, xt, xsum, *geom, absolute=True)
    tol = table_err * (1 + 1e-6) + 16 * EPS32 * bound
    np.testing.assert_array_less(np.abs(y - exact), tol + 1e-30)
    # and the rounding is real: the int8 result is not the float one
    assert np.abs(y - exact).max() > 0


def test_every_variant_gives_the_same_result(rng):
    out, *geom = 50, 384, 128, 2.5
    codes, scale, mean = _layer(rng, out, *geom)
    xt, xsum = _activations(rng, 6, *geom)
    ys = [_run(codes, scale, mean, xt, xsum, geom, k, threads=2) for k in KERNELS]
    for y in ys[1:]:  # the same integer sums; only the float epilogue may round differently
        np.testing.assert_allclose(y, ys[0], rtol=1e-5, atol=1e-5)
    assert _core.trit5_kernel_name() in KERNELS


# ---- arguments --------------------------------------------------------------------------------

def test_bad_arguments(rng):
    out, *geom = 40, 200, 64, 1.3
    codes, scale, mean = _layer(rng, out, *geom)
    sign, nonzero = _planes(codes)
    trits, signs = _core.trit5_pack(sign, nonzero, *geom)
    xt, xsum = _activations(rng, 2, *geom)
    args = dict(trits=trits, trit_signs=signs, scale=scale, mean=mean, xt=xt, xsum=xsum,
                in_features=200, block_size=64, osr=1.3, out=out)
    _core.trit5_gemm(**args)
    with pytest.raises(TypeError, match="trits must have dtype uint8"):
        _core.trit5_gemm(**{**args, "trits": trits.view(np.int8)})
    with pytest.raises(ValueError, match="trit_signs must have shape"):
        _core.trit5_gemm(**{**args, "trit_signs": signs[:, :-2].copy()})
    with pytest.raises(ValueError, match="trits must have shape"):
        _core.trit5_gemm(**{**args, "out": 70})
    with pytest.raises(ValueError, match="xt must have shape"):
        _core.trit5_gemm(**{**args, "xt": xt[:, :-1].copy()})
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.trit5_gemm(**{**args, "scale": np.asfortranarray(scale)})
    with pytest.raises(ValueError, match="kernel must be"):
        _core.trit5_gemm(**args, kernel="avx9")
    with pytest.raises(ValueError, match="out must be"):
        _core.trit5_gemm(**{**args, "out": -1})
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        _core.trit5_pack(sign, nonzero, 200, 48, 1.3)
    with pytest.raises(ValueError, match="osr"):
        _core.trit5_shape(4, 200, 64, 0.0)
    with pytest.raises(ValueError, match="nonzero must have shape"):
        _core.trit5_pack(sign, nonzero[:, :-1].copy(), *geom)
    with pytest.raises(ValueError, match="kernel must be"):
        _core.trit5_kernel_supported("sse9")
    empty = _core.trit5_gemm(**{**args, "xt": xt[:0], "xsum": xsum[:0]})
    assert empty.shape == (0, out)
