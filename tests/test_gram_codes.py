"""The core's two Gram loops (cpp/include/sdq/gram_codes.h: sequential rounding, and one
coordinate-descent pass) against plain NumPy float32 references of the same recurrences, on random
and adversarial shapes; and sdq's CPU code selection and refinement (which call them) against the
torch loops that other devices run."""
import numpy as np
import pytest
import torch

from sdq import blocks
from sdq._native import core
from sdq.gptq import damped_inverse_cholesky
from sdq.methods.gram import _select_codes_torch, select_codes
from sdq.methods.refine import _one_pass_torch, one_pass


def _reference(z, hinv, tau):
    """gram_codes.h's recurrence, one row at a time, in float32 (no fused multiply-add)."""
    groups, m = hinv.shape[0], hinv.shape[1]
    n = z.shape[0] // groups
    codes = np.empty_like(z)
    one = np.float32(1)
    for r in range(z.shape[0]):
        U = hinv[r // n]
        v = z[r].copy()
        for j in range(m):
            if tau is None:
                q = one if v[j] > 0 else -one
            else:
                q = one if v[j] >= tau[r] else (-one if v[j] <= -tau[r] else np.float32(0))
            e = (v[j] - q) * (np.float32(1) / U[j, j])
            v[j + 1:] = v[j + 1:] - U[j, j + 1:] * e
            codes[r, j] = q
    return codes


def _factors(groups, m, seed, damp=0.2):
    """Upper factors of damped Gram matrices of a down-sampler: what gram.py rounds against."""
    gen = torch.Generator().manual_seed(seed)
    D = blocks.resampler(m, max(1, m // 2))
    X = torch.randn(2 * m, D.shape[0], generator=gen, dtype=torch.float64)
    G = D.T @ (X.T @ X) @ D
    factors = [damped_inverse_cholesky(G, damp * (i + 1))[0].float().numpy()
               for i in range(groups)]
    return np.ascontiguousarray(np.stack(factors))


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("groups,n,m", [(1, 1, 1), (1, 15, 7), (2, 16, 33), (3, 17, 64),
                                        (1, 40, 130), (2, 5, 256)])
@pytest.mark.parametrize("threads", [1, 2])
def test_core_matches_reference(ternary, groups, n, m, threads):
    rng = np.random.default_rng(groups * 1000 + n * 10 + m)
    z = (rng.standard_normal((groups * n, m)) * rng.choice([0.1, 1.0, 3.0], (groups * n, 1))
         ).astype(np.float32)
    hinv = _factors(groups, m, m)
    tau = np.quantile(np.abs(z), 0.55, axis=1).astype(np.float32) if ternary else None
    got = core().gram_select_codes(z, hinv, tau, "ternary" if ternary else "binary", threads)
    np.testing.assert_array_equal(got, _reference(z, hinv, tau))
    assert set(np.unique(got)) <= ({-1.0, 0.0, 1.0} if ternary else {-1.0, 1.0})


@pytest.mark.parametrize("ternary", [False, True])
def test_core_adversarial_values(ternary):
    """All-zero rows, ties at the threshold, extreme and denormal values, a zero threshold."""
    m, n = 24, 6
    hinv = _factors(1, m, 3)
    z = np.zeros((n, m), np.float32)
    z[1] = 1e30
    z[2] = -3e38
    z[3] = np.float32(1e-40)  # denormal
    z[4, ::2], z[4, 1::2] = 0.5, -0.5  # exactly at tau below
    z[5] = np.linspace(-2, 2, m, dtype=np.float32)
    tau = np.array([0.5, 0.5, 0.5, 0.0, 0.5, 0.5], np.float32) if ternary else None
    with np.errstate(over="ignore", invalid="ignore"):
        want = _reference(z, hinv, tau)
    got = core().gram_select_codes(z, hinv, tau, "ternary" if ternary else "binary", 1)
    np.testing.assert_array_equal(got, want)


def test_core_checks_its_arguments():
    z, hinv = np.zeros((4, 8), np.float32), np.stack([np.eye(8, dtype=np.float32)] * 2)
    with pytest.raises(ValueError, match="multiple"):
        core().gram_select_codes(z[:3], hinv, None, "binary")
    with pytest.raises(ValueError, match="tau"):
        core().gram_select_codes(z, hinv, None, "ternary")
    with pytest.raises(ValueError, match="hinv"):
        core().gram_select_codes(z, hinv[:, :, :4].copy(), None, "binary")
    with pytest.raises(TypeError, match="float32"):
        core().gram_select_codes(z.astype(np.float64), hinv, None, "binary")
    with pytest.raises(ValueError, match="levels"):
        core().gram_select_codes(z, hinv, None, "quaternary")


@pytest.mark.parametrize("ternary", [False, True])
def test_cpu_selection_agrees_with_the_torch_loop(ternary):
    """Same recurrence, different order of float32 updates (the torch loop batches them): the
    codes may differ only where a value sits within rounding of a level boundary."""
    m, n = 256, 96
    hinv = torch.from_numpy(_factors(3, m, 11))
    z = torch.randn(3 * n, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tau = z.abs().quantile(0.55, dim=1).float() if ternary else None
    got, torch_loop = select_codes(z, hinv, tau), _select_codes_torch(z, hinv, tau)
    assert got.dtype == torch.float32 and got.shape == (3 * n, m)
    assert (got == torch_loop).float().mean() > 0.99


def _refine_reference(q, h, G, active, ternary):
    """gram_codes.h's refinement pass, one row at a time, in float32."""
    q, m = q.copy(), q.shape[1]
    for r in range(q.shape[0]):
        if not active[r]:
            continue
        hr = h[r].copy()
        for j in range(m):
            g = G[j, j]
            if not g > 0:
                continue
            if ternary:
                t = q[r, j] + hr[j] * np.float32(-1.0 / float(g))
                d = np.clip(np.round(t), -1, 1) - q[r, j]  # np.round: half to even
            else:
                d = q[r, j] * np.float32(-2) if q[r, j] * hr[j] > g else np.float32(0)
            q[r, j] += d
            hr[j + 1:] = hr[j + 1:] + G[j, j + 1:] * d
    return q


def _refine_problem(n, m, ternary, seed):
    rng = np.random.default_rng(seed)
    levels = [-1.0, 0.0, 1.0] if ternary else [-1.0, 1.0]
    q = rng.choice(levels, (n, m)).astype(np.float32)
    A = rng.standard_normal((m, m + 3)).astype(np.float32)
    G = (A @ A.T / m).astype(np.float32)
    G[np.arange(m) % 7 == 3, np.arange(m) % 7 == 3] *= 0  # a few samples the weighting cannot see
    h = (rng.standard_normal((n, m)) * rng.choice([0.1, 1.0, 5.0], (n, 1))).astype(np.float32)
    active = rng.random(n) > 0.2
    return q, h, G, active


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("n,m", [(1, 1), (15, 7), (16, 33), (17, 64), (40, 130), (5, 256)])
@pytest.mark.parametrize("threads", [1, 2])
def test_core_refine_matches_reference(ternary, n, m, threads):
    q, h, G, active = _refine_problem(n, m, ternary, n * 100 + m)
    want = _refine_reference(q, h, G, active, ternary)
    got = q.copy()
    core().gram_refine_pass(got, h.copy(), G, active.astype(np.uint8),
                            "ternary" if ternary else "binary", threads)
    np.testing.assert_array_equal(got, want)
    assert (got[~active] == q[~active]).all()
    if n * m >= 100:
        assert (got != q).any()  # the pass does something on these problems


def test_core_refine_ties_round_half_to_even():
    """t = q + h * (-1 / G_jj) exactly at +-0.5 and +-1.5: rounds to even, as torch.round does."""
    G = np.eye(4, dtype=np.float32)
    q = np.zeros((1, 4), np.float32)
    h = np.array([[-0.5, 0.5, -1.5, 1.5]], np.float32)
    core().gram_refine_pass(q, h.copy(), G, None, "ternary", 1)
    np.testing.assert_array_equal(q, [[0.0, 0.0, 1.0, -1.0]])


@pytest.mark.parametrize("ternary", [False, True])
def test_cpu_refine_agrees_with_the_torch_loop(ternary):
    q, h, G, active = _refine_problem(96, 256, ternary, 3)
    got, loop = torch.from_numpy(q.copy()), torch.from_numpy(q.copy())
    act = torch.from_numpy(active)
    one_pass(got, torch.from_numpy(h.copy()), torch.from_numpy(G), ternary, act)
    _one_pass_torch(loop, torch.from_numpy(h.copy()), torch.from_numpy(G), ternary, act)
    assert (got == loop).float().mean() > 0.99
    assert (got != torch.from_numpy(q)).any()


@pytest.mark.parametrize("select", [select_codes, _select_codes_torch])
def test_selection_leaves_its_input_alone(select):
    """One row (its transposed copy would otherwise alias it), float32 in: z is not written."""
    z = torch.randn(1, 16, generator=torch.Generator().manual_seed(2))
    before = z.clone()
    select(z, torch.from_numpy(_factors(1, 16, 1)[0]), z.abs().quantile(0.5, dim=1))
    assert torch.equal(z, before)
