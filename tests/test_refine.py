"""Code refinement (coordinate descent after the sequential choice): it never raises the block's
weighted error, one pass equals a naive full-recompute coordinate descent, it is deterministic,
and the stored format does not change."""
import dataclasses

import pytest
import torch

import sdq
from sdq import blocks
from sdq.methods.gram import refit_scale_mean
from sdq.methods.refine import code_residual, one_pass, refine_codes
from sdq.methods.scale_search import Quadratic

P, M = 32, 64  # padded width and samples of the small blocks (OSR 2)


def _problem(kind: str, levels: str, n: int = 40, seed: int = 0):
    """(q float32 [n, M], w [n, P], D [P, M], C [P, P] or None, s fp16, mu fp16): a block with
    rough codes (sign / threshold of the up-sampled row) and their least-squares scale/mean."""
    g = torch.Generator().manual_seed(seed)
    D = blocks.resampler(M, P)
    w = torch.randn(n, P, generator=g, dtype=torch.float64)
    X = torch.randn(4 * P, P, generator=g, dtype=torch.float64)
    C = X.T @ X / X.shape[0]
    if kind == "zero":
        w.zero_()
    elif kind == "rank1":
        v = torch.randn(P, generator=g, dtype=torch.float64)
        C = torch.outer(v, v).float().double()
    elif kind == "dynamic_range":
        w *= torch.logspace(-4, 3, n, dtype=torch.float64)[:, None]
        C = torch.diag(torch.logspace(-6, 2, P, dtype=torch.float64))
    elif kind == "identity":
        C = None
    u = w @ blocks.resampler(P, M).T
    z = u / u.abs().mean(1, keepdim=True).clamp_min(1e-30)
    q = torch.sign(z) + (z == 0) if levels == "binary" else torch.where(z.abs() > 0.7, z.sign(), 0)
    s, mu, _ = refit_scale_mean(q @ D.T, w, C)
    return q.float(), w, D, C, s.half(), mu.half()


def _error(q, w, D, C, s, mu):
    return Quadratic(q.double() @ D.T, w, C).error(s, mu)


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("kind", ["random", "zero", "rank1", "dynamic_range", "identity"])
def test_refinement_never_raises_the_block_error(levels, kind):
    q, w, D, C, s, mu = _problem(kind, levels)
    before = _error(q, w, D, C, s, mu)
    q2, s2, mu2 = refine_codes(q, w, D, C, s, mu, levels == "ternary", 3, refit_scale_mean)
    after = _error(q2, w, D, C, s2, mu2)
    assert (after <= before).all()
    assert s2.dtype == mu2.dtype == torch.float16 and torch.isfinite(s2).all()
    allowed = {-1.0, 1.0} if levels == "binary" else {-1.0, 0.0, 1.0}
    assert set(q2.unique().tolist()) <= allowed
    if kind in ("random", "identity", "dynamic_range"):
        assert after.sum() < 0.9 * before.sum()  # and it pays on rough codes


def _naive_pass(q, w, D, C, s, mu, levels):
    """Coordinate descent recomputing the whole error for every trial (O(m^2) per code)."""
    q = q.clone().double()
    values = [-1.0, 1.0] if levels == "binary" else [-1.0, 0.0, 1.0]
    for j in range(q.shape[1]):
        best = _error(q, w, D, C, s, mu)
        for v in values:
            trial = q.clone()
            trial[:, j] = v
            e = _error(trial, w, D, C, s, mu)
            take = e < best - 1e-9 * best.abs()
            q[take, j] = v
            best = torch.where(take, e, best)
    return q.float()


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_one_pass_is_coordinate_descent_with_an_exact_residual(levels):
    q, w, D, C, s, mu = _problem("random", levels, n=12)
    fast = q.clone()
    G = D.float().T @ (C.float() @ D.float())
    one_pass(fast, code_residual(q, w, D, C, s, mu), G, levels == "ternary",
             torch.ones(q.shape[0], dtype=torch.bool))
    assert torch.equal(fast, _naive_pass(q, w, D, C, s, mu, levels))


def test_refinement_is_deterministic():
    q, w, D, C, s, mu = _problem("random", "ternary")
    first = refine_codes(q, w, D, C, s, mu, True, 2, refit_scale_mean)
    second = refine_codes(q, w, D, C, s, mu, True, 2, refit_scale_mean)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 192, generator=g) * 0.05
    X = torch.randn(1024, 192, generator=g) @ (torch.eye(192) + 0.2 * torch.randn(192, 192,
                                                                                   generator=g))
    return W, 2 / X.shape[0] * X.T @ X


def _layer_error(W, H, qw):
    E = (W - qw.dequantize()).double()
    return float((E @ H.double() * E).sum())


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_refined_layer_keeps_the_format_and_lowers_the_layer_error(levels):
    """192 inputs: a full block of 128 and a padded one of 64, both refined."""
    W, H = _layer()
    base = sdq.SDQConfig(osr=2, levels=levels, codes="gram", refine_passes=0)
    plain = sdq.quantize_weight_calibrated(W, H, base)
    refined = sdq.quantize_weight_calibrated(W, H, base.replace(refine_passes=2))
    for field in dataclasses.fields(plain):  # every packed tensor: same shape and dtype
        a, b = getattr(plain, field.name), getattr(refined, field.name)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            assert a.shape == b.shape and a.dtype == b.dtype, field.name
    assert refined.bits_per_weight_all_in == plain.bits_per_weight_all_in
    assert _layer_error(W, H, refined) < _layer_error(W, H, plain)
    again = sdq.quantize_weight_calibrated(W, H, base.replace(refine_passes=2))
    assert torch.equal(again.dequantize(), refined.dequantize())


def test_refined_weight_round_trips():
    """Stored with the new fields in its metadata, read back to the same weights."""
    W, H = _layer(1)
    cfg = sdq.SDQConfig(osr=1.5, levels="ternary", codes="gram", refine_passes=1,
                        scale_search="grid")
    qw = sdq.quantize_weight_calibrated(W, H, cfg)
    back = type(qw).from_state_dict(qw.state_dict())
    assert back.config == cfg
    assert torch.equal(back.dequantize(), qw.dequantize())
