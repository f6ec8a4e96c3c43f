"""scale_search: the stored fp16 scale/mean never leave a larger weighted error than the closed
form rounded to fp16, and the "grid" normalisation search never one larger than without it."""
import numpy as np
import pytest
import torch

import sdq
from sdq import blocks
from sdq.methods.gram import gram_codes, refit_scale_mean
from sdq.methods.scale_search import Quadratic, best_fp16

P = 32  # padded block width of the small problems


def _problem(kind: str, n: int = 64, seed: int = 0):
    """(a, w, C): decoded codes [n, P], targets [n, P], covariance [P, P] of a block."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, P, generator=g, dtype=torch.float64)
    w = 0.7 * a + 0.3 * torch.randn(n, P, generator=g, dtype=torch.float64) + 0.05
    X = torch.randn(4 * P, P, generator=g, dtype=torch.float64)
    C = X.T @ X / X.shape[0]
    if kind == "zero_rows":
        w[: n // 2] = 0
        a[: n // 4] = 0
    elif kind == "rank1":
        v = torch.randn(P, generator=g, dtype=torch.float64)
        C = torch.outer(v, v).float().double()
    elif kind == "dynamic_range":
        w *= torch.logspace(-4, 3, n, dtype=torch.float64)[:, None]
        C = torch.diag(torch.logspace(-6, 2, P, dtype=torch.float64))
    return a, w, C


def test_quadratic_is_the_weighted_error():
    a, w, C = _problem("random")
    n = a.shape[0]
    s, mu = torch.rand(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    e = s[:, None] * a + mu[:, None] - w
    assert torch.allclose(Quadratic(a, w, C).error(s, mu), ((e @ C) * e).sum(1), rtol=1e-9)
    assert torch.allclose(Quadratic(a, w, None).error(s, mu), (e * e).sum(1), rtol=1e-9)


@pytest.mark.parametrize("kind", ["random", "zero_rows", "rank1", "dynamic_range"])
@pytest.mark.parametrize("weighted", [True, False])
def test_best_fp16_never_worse_than_rounding_the_closed_form(kind, weighted):
    a, w, C = _problem(kind)
    C = C if weighted else None
    s, mu, _ = refit_scale_mean(a, w, C)
    quad = Quadratic(a, w, C)
    s16, mu16 = best_fp16(quad, s, mu)
    assert s16.dtype == mu16.dtype == torch.float16
    closed = quad.error(s.half(), mu.half())
    best = quad.error(s16, mu16)
    assert (best <= closed).all()
    # it stays next to the closed form: at most one fp16 step from the nearest value
    for x, x16 in ((s, s16), (mu, mu16)):
        near = x.half().double()
        step = (torch.nextafter(x.half(), torch.tensor(float("inf"), dtype=torch.float16))
                .double() - near).abs()
        assert ((x16.double() - near).abs() <= step * 1.0001 + 1e-30).all()


def test_best_fp16_finds_a_better_pair_somewhere():
    """Rounding s and mu separately is not optimal along a correlated quadratic: over many rows
    the search must find strictly better pairs (else it would be dead code)."""
    a, w, C = _problem("random", n=512)
    a = a + 3.0  # a strongly correlated with the constant: s and mu trade off
    s, mu, _ = refit_scale_mean(a, w, C)
    quad = Quadratic(a, w, C)
    s16, mu16 = best_fp16(quad, s, mu)
    assert (quad.error(s16, mu16) < quad.error(s.half(), mu.half())).any()


def _block(levels: str, seed: int = 0):
    """Rotated, up-sampled rows of a random block and a random covariance: gram_codes' inputs."""
    cfg = sdq.SDQConfig(osr=2, levels=levels, codes="gram", block_size=64)
    g = blocks.block_groups(64, 64, cfg.osr)[0]
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 64, generator=gen)
    rows = blocks.rotate(W, blocks.hadamard_signs(64, cfg.seed)).double()
    X = torch.randn(256, 64, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, 64)
    C = X.T @ X / 256
    return rows @ blocks.resampler(g.padded, g.m).T, rows, g, cfg, C / C.diagonal().mean()


def _block_error(codes, s, mu, rows, g, C):
    a = torch.from_numpy(codes).double() @ blocks.resampler(g.m, g.padded).T
    return Quadratic(a, rows, C).error(s, mu)


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_search_never_worse_than_the_closed_form(levels):
    u, rows, g, cfg, C = _block(levels)
    errors = {}
    for search in ("closed_form", "fp16", "grid"):
        c = cfg.replace(scale_search=search, refine_passes=0, code_search=False)
        errors[search] = _block_error(*gram_codes(u, rows, g, c, C), rows, g, C)
    assert (errors["fp16"] <= errors["closed_form"]).all()
    assert (errors["grid"] <= errors["fp16"] * (1 + 1e-9)).all()
    assert errors["grid"].sum() < errors["fp16"].sum()  # the grid pays on random blocks


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("seed", [0, 1])
def test_code_search_never_worse_than_one_setting(levels, seed):
    """Each row keeps the best of the searched settings, (gram_damp, sd_scale) among them: its
    weighted error can only go down, and on random blocks some rows must gain."""
    u, rows, g, cfg, C = _block(levels, seed)
    one, searched = (_block_error(*gram_codes(u, rows, g, cfg.replace(code_search=on,
                                                                         refine_passes=0), C),
                                  rows, g, C) for on in (False, True))
    assert (searched <= one * (1 + 1e-9)).all()
    assert searched.sum() < one.sum()


@pytest.mark.parametrize("search", ["fp16", "grid"])
@pytest.mark.parametrize("code_search", [False, True])
def test_search_is_deterministic(search, code_search):
    u, rows, g, cfg, C = _block("ternary")
    cfg = cfg.replace(scale_search=search, code_search=code_search)
    first, second = gram_codes(u, rows, g, cfg, C), gram_codes(u, rows, g, cfg, C)
    assert np.array_equal(first[0], second[0])
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


def test_config_fields_validate_and_old_metadata_loads():
    for bad in ({"scale_search": "best"}, {"compensation": "joint"}, {"refine_passes": -1},
                {"refine_passes": 1.0}, {"refine_passes": True}, {"refine_passes": 99}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sdq.SDQConfig(**bad)
    with pytest.raises(TypeError, match="code_search"):
        sdq.SDQConfig(code_search=1)
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="percdamp"):
            sdq.SDQConfig(percdamp=bad)
    cfg = sdq.SDQConfig(codes="gram", scale_search="grid", refine_passes=3,
                        compensation="diagonal")
    assert sdq.SDQConfig.from_json(cfg.to_json()) == cfg
    old = sdq.SDQConfig().to_dict()
    del old["scale_search"], old["refine_passes"], old["compensation"], old["code_search"]
    del old["percdamp"]
    assert sdq.SDQConfig.from_dict(old) == sdq.SDQConfig()
