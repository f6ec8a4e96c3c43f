"""The core's data-free encoder (cpp/include/sdq/encode.h, sdq._core.encode_rows) behind
sdq.quantize_weight's modulator path.

Two oracles:
- the float64 PyTorch pipeline the encoder replaced (rotate with the core's FWHT, up-sample with
  the float32 resampling matrix in float64, normalise.py, the core's modulator, pack): the
  encoder up-samples in float32 (a third of its time in double), otherwise the same operations in
  the same precision, so scales and means agree to an fp16 step and only rare codes flip (a flip
  at order 2 changes the rest of its chain);
- sdq.ref's NumPy reference (float64 rotation, tau from float32 z): a different rounding path, so
  a tiny fraction of codes may flip, and the reconstruction error must not be worse.
"""
import numpy as np
import pytest
import torch

import sdq
from sdq import blocks, ref
from sdq._native import core
from sdq.methods.normalise import normalise, quantile_lastdim


def _pipeline(W: torch.Tensor, cfg: sdq.SDQConfig):
    """The float64 pipeline of sdq.quantize_weight before the core encoder: (sign, nonzero,
    scale bits, mean bits)."""
    signs = blocks.hadamard_signs(cfg.block_size, cfg.seed)
    out = W.shape[0]
    cols, nb = blocks.packed_shape(W.shape[1], cfg.block_size, cfg.osr)
    codes = np.full((out, cols), -1 if cfg.levels == "binary" else 0, np.int8)
    scale = torch.zeros(out, nb, dtype=torch.float16)
    mean = torch.zeros(out, nb, dtype=torch.float16)
    for g in blocks.block_groups(W.shape[1], cfg.block_size, cfg.osr):
        rows = blocks.gather_blocks(W, g)
        if cfg.hadamard:
            rows = blocks.rotate(rows, signs)
        u = rows.double() @ blocks.resampler(g.padded, g.m).T
        z, s, mu = normalise(u, cfg)
        tau = None
        if cfg.levels == "ternary":
            tau = np.ascontiguousarray(quantile_lastdim(z.abs(), cfg.p_cut).float().numpy())
        c = core().sigma_delta_modulate(np.ascontiguousarray(z.float().numpy()), tau, cfg.order,
                                        cfg.levels)
        view = codes[:, g.code_offset: g.code_offset + g.count * g.code_cols]
        view.reshape(out, g.count, g.code_cols)[:, :, : g.m] = c.reshape(out, g.count, g.m)
        scale[:, g.first: g.first + g.count] = s.reshape(out, g.count)
        mean[:, g.first: g.first + g.count] = mu.reshape(out, g.count)
    sign, nonzero = core().pack_bitplanes(codes, cfg.levels)
    return sign, nonzero, scale.numpy().view(np.uint16), mean.numpy().view(np.uint16)


def _encode(W, cfg: sdq.SDQConfig, **kw):
    W = np.ascontiguousarray(np.asarray(W, dtype=np.float32))
    signs = blocks.hadamard_signs(cfg.block_size, cfg.seed)
    return core().encode_rows(W, signs, cfg.levels, cfg.osr, cfg.block_size, cfg.order,
                              cfg.hadamard, cfg.sd_scale, cfg.p_scale, cfg.p_cut, **kw)


def _assert_same(got, want):
    """Identical code bits, identical fp16 scales and means (as values: a mean whose float64 sum
    cancels to ~1e-17 may round to -0 on one side and +0 on the other)."""
    for name, a, b in zip(("sign", "nonzero", "scale", "mean"), got, want):
        if b is None:
            assert a is None, name
        elif name in ("scale", "mean"):
            np.testing.assert_array_equal(a.view(np.float16), b.view(np.float16), err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def _codes(planes, cols: int, levels: str) -> np.ndarray:
    return core().unpack_bitplanes(planes[0], planes[1] if levels == "ternary" else None, cols)


def _dequantized(planes, W: torch.Tensor, cfg: sdq.SDQConfig) -> torch.Tensor:
    as_i32 = lambda a: None if a is None else torch.from_numpy(a.view(np.int32))  # noqa: E731
    as_f16 = lambda a: torch.from_numpy(a.view(np.float16))  # noqa: E731
    signs = torch.from_numpy(blocks.hadamard_signs(cfg.block_size, cfg.seed).astype(np.int8))
    return sdq.QuantizedWeight.from_bitplanes(
        W.shape[0], W.shape[1], cfg, as_i32(planes[0]), as_i32(planes[1]), as_f16(planes[2]),
        as_f16(planes[3]), signs).dequantize()


def _assert_close(got, want, W: torch.Tensor, cfg: sdq.SDQConfig, max_flipped: float | None):
    """fp16 scales and means within one fp16 step of the float64 pipeline's (plus float32
    rounding noise of W's size: a constant row's scale is that noise); the reconstruction error
    no worse than the pipeline's; with max_flipped, at most that share of the codes differs
    (float32 up-sampling moves a few decisions)."""
    noise = 2.0 ** -24 + 2.0 ** -20 * float(W.abs().max())
    for name, a, b in zip(("scale", "mean"), got[2:], want[2:]):
        x, y = a.view(np.float16).astype(np.float64), b.view(np.float16).astype(np.float64)
        np.testing.assert_allclose(x, y, rtol=2.0 ** -9, atol=noise, err_msg=name)
    err = float((_dequantized(got, W, cfg) - W).norm())
    err_want = float((_dequantized(want, W, cfg) - W).norm())
    assert err <= err_want * 1.01 + noise * W.numel() ** 0.5
    if max_flipped is not None:
        cols, _ = blocks.packed_shape(W.shape[1], cfg.block_size, cfg.osr)
        flipped = np.mean(_codes(got, cols, cfg.levels) != _codes(want, cols, cfg.levels))
        assert flipped <= max_flipped, f"{flipped:.2e} of the codes differ"


# (out, in), osr, levels, order, block_size, hadamard: short last blocks, in below one block,
# odd OSRs (m not a multiple of 32), both orders and alphabets, other block sizes.
CASES = [((33, 256), 2.0, "ternary", 1, 128, True), ((17, 200), 2.5, "binary", 2, 128, True),
         ((9, 1000), 1.3, "ternary", 2, 128, True), ((5, 77), 2.0, "binary", 1, 128, False),
         ((40, 5), 1.5, "ternary", 1, 128, True), ((3, 300), 1.0, "ternary", 2, 64, False),
         ((20, 513), 0.75, "binary", 1, 256, True), ((2, 1), 3.0, "binary", 2, 128, True)]


@pytest.mark.parametrize("shape,osr,levels,order,block_size,hadamard", CASES)
def test_encoder_matches_the_float64_pipeline(shape, osr, levels, order, block_size, hadamard):
    W = torch.randn(*shape) * 0.02
    cfg = sdq.SDQConfig(osr=osr, levels=levels, order=order, block_size=block_size,
                        hadamard=hadamard, seed=3)
    _assert_close(_encode(W, cfg), _pipeline(W, cfg), W, cfg, max_flipped=0.01)


@pytest.mark.parametrize("kind", ["zero_rows", "constant_rows", "huge", "denormal", "tiny_mean",
                                  "spikes", "ties"])
@pytest.mark.parametrize("hadamard", [True, False])
def test_adversarial_rows_match_the_float64_pipeline(kind, hadamard):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(24, 300, generator=g)
    if kind == "zero_rows":
        W[::3] = 0
    elif kind == "constant_rows":
        W[::2] = torch.arange(12, dtype=torch.float32)[:, None] - 5.5
    elif kind == "huge":  # near the largest mean/scale fp16 holds after rotation + resampling
        W = W * 2000
    elif kind == "denormal":  # float32 subnormals: fp16 scale and mean flush to 0
        W = W * 1e-40
    elif kind == "tiny_mean":  # means in fp16's subnormal range
        W = W * 1e-6 + 3e-6
    elif kind == "spikes":
        W = torch.zeros(24, 300)
        W[torch.arange(24), torch.arange(24) * 11] = 7.0
    elif kind == "ties":  # few distinct values: the quantiles fall on repeated values
        W = torch.randint(-2, 3, (24, 300), generator=g).float()
    for levels, order in (("ternary", 1), ("binary", 2)):
        cfg = sdq.SDQConfig(osr=1.5, levels=levels, order=order, hadamard=hadamard)
        # constant rows: the codes follow rounding noise on both sides, so only values are compared
        flips = None if kind == "constant_rows" else 0.01
        _assert_close(_encode(W, cfg), _pipeline(W, cfg), W, cfg, max_flipped=flips)


def test_threads_and_row_ranges_do_not_change_the_result():
    W = torch.randn(53, 1000)
    cfg = sdq.SDQConfig(osr=2.5, levels="ternary", order=2)
    whole = _encode(W, cfg, threads=1)
    _assert_same(_encode(W, cfg, threads=2), whole)
    cuts = [0, 1, 17, 18, 40, 53]
    parts = [_encode(W, cfg, row_begin=a, row_end=b, threads=2) for a, b in zip(cuts, cuts[1:])]
    for i, full in enumerate(whole):
        tiled = sum(p[i].astype(np.uint64) for p in parts)  # rows outside a range are 0
        np.testing.assert_array_equal(tiled.astype(full.dtype), full)
    empty = _encode(W, cfg, row_begin=7, row_end=7)
    assert not any(a.any() for a in empty)


@pytest.mark.parametrize("levels,order", [("ternary", 1), ("binary", 1), ("ternary", 2)])
def test_quantize_weight_against_the_numpy_reference(levels, order):
    # sdq.ref rotates in float64 and takes tau from float32 z: a different rounding path, so a
    # code may flip where a modulator state lies within ~1e-7 of a threshold (measured: ~1e-6 of
    # codes at order 1, ~3e-4 at order 2, where one flip changes the rest of its chain).
    W = torch.randn(64, 700)
    cfg = sdq.SDQConfig(osr=2.0, levels=levels, order=order, seed=11)
    qw = sdq.quantize_weight(W, cfg)
    r = ref.quantize_weight_columnwise_ref(W.numpy(), 2.0, levels, order,
                                           signs=blocks.hadamard_signs(128, 11).astype(np.float64))
    codes = qw.codes()
    flipped = total = 0
    for (_, _, _, m, off), want in zip(ref.block_layout_ref(700, 128, 2.0), r["codes"]):
        flipped += int((codes[:, off:off + m] != want).sum())
        total += want.size
    assert flipped <= 2e-3 * total
    np.testing.assert_allclose(qw.scale.float().numpy(), r["scale"].astype(np.float32), rtol=1e-3)
    np.testing.assert_allclose(qw.mean.float().numpy(), r["mean"].astype(np.float32), rtol=1e-3,
                               atol=1e-7)
    err = float((qw.dequantize() - W).norm() / W.norm())
    err_ref = float(np.linalg.norm(ref.dequantize_ref(r, 700, 2.0) - W.numpy()) / W.norm())
    assert err <= err_ref * (1 + 1e-2)


def test_columnwise_reference_equals_the_per_chain_reference():
    W = np.random.default_rng(2).standard_normal((6, 300))
    signs = blocks.hadamard_signs(128, 0).astype(np.float64)
    for levels, order, osr in (("ternary", 2, 1.3), ("binary", 1, 2.0)):
        a = ref.quantize_weight_ref(W, osr, levels, order, signs=signs)
        b = ref.quantize_weight_columnwise_ref(W, osr, levels, order, signs=signs)
        assert len(a["codes"]) == len(b["codes"])
        for x, y in zip(a["codes"], b["codes"]):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(a["scale"], b["scale"])
        np.testing.assert_array_equal(a["mean"], b["mean"])


def test_too_large_or_non_finite_weights_are_value_errors():
    cfg = sdq.SDQConfig(osr=2.0)
    with pytest.raises(ValueError, match="too large"):
        sdq.quantize_weight(torch.full((2, 128), 1e6), cfg)
    W = np.ones((3, 128), np.float32)
    W[1, 5] = np.nan
    with pytest.raises(ValueError, match="too large .* or not finite"):
        _encode(W, cfg)


def test_bad_arguments_are_named():
    W = np.zeros((4, 128), np.float32)
    signs = blocks.hadamard_signs(128, 0)
    enc = core().encode_rows
    with pytest.raises(ValueError, match="rows"):
        enc(W, signs, "binary", 2.0, row_begin=3, row_end=2)
    with pytest.raises(ValueError, match="rows"):
        enc(W, signs, "binary", 2.0, row_end=5)
    with pytest.raises(ValueError, match="signs must have shape"):
        enc(W, signs[:64], "binary", 2.0)
    with pytest.raises(ValueError, match="signs are required"):
        enc(W, None, "binary", 2.0)
    with pytest.raises(ValueError, match="levels"):
        enc(W, signs, "quaternary", 2.0)
    with pytest.raises(ValueError, match="order"):
        enc(W, signs, "binary", 2.0, order=3)
    with pytest.raises(ValueError, match="osr"):
        enc(W, signs, "binary", 17.0)
    with pytest.raises(ValueError, match="sd_scale"):
        enc(W, signs, "binary", 2.0, sd_scale=0.0)
    with pytest.raises(ValueError, match="p_scale"):
        enc(W, signs, "binary", 2.0, p_cut=1.5)
    with pytest.raises(TypeError, match="W must have dtype"):
        enc(W.astype(np.float64), signs, "binary", 2.0)
    sign, nz, s, mu = enc(W, None, "binary", 2.0, hadamard=False)  # no signs needed
    assert nz is None and sign.shape == (4, 8) and s.shape == mu.shape == (4, 1)
