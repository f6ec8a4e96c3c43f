"""The core's beam search over the Gram codes' sequential rounding (cpp/include/sdq/gram_beam.h)
against a plain NumPy float32 reference of the same recurrence, on random and adversarial shapes;
what its chains' costs mean; and SDQConfig.beam through the calibrated quantizer."""
import numpy as np
import pytest
import torch

from sdq import SDQConfig
from sdq._native import core
from sdq.methods.gram import _beam_codes_torch, greedy_codes, select_codes
from sdq.methods.sdq import quantize_weight_calibrated

from test_gram_codes import _factors


def _reference(z, hinv, beam, ternary):
    """gram_beam.h's recurrence, one row at a time, in float32: (codes [beam, rows, m], costs
    [beam, rows]). Candidates in order (chain rank, level), a stable sort keeps the earlier of
    equal costs."""
    rows, m = z.shape
    n = rows // hinv.shape[0]
    values = np.array([-1, 0, 1] if ternary else [-1, 1], dtype=np.float32)
    codes = np.empty((beam, rows, m), np.float32)
    costs = np.empty((beam, rows), np.float32)
    for r in range(rows):
        U = hinv[r // n]
        chains = [(np.float32(0), z[r].copy(), [])]  # (cost, residual, codes)
        for j in range(m):
            inv = np.float32(1) / U[j, j]
            cands = [(cost + e * e, e, c, v) for c, (cost, res, _) in enumerate(chains)
                     for v in values for e in [(res[j] - v) * inv]]
            kept = sorted(range(len(cands)), key=lambda i: cands[i][0])[:beam]
            new = []
            for i in kept:
                cost, e, c, v = cands[i]
                res = chains[c][1].copy()
                res[j + 1:] = res[j + 1:] - U[j, j + 1:] * e
                new.append((cost, res, chains[c][2] + [v]))
            chains = new
        for b in range(beam):
            cost, _, q = chains[b] if b < len(chains) else chains[0]
            codes[b, r], costs[b, r] = q, cost
    return codes, costs


def _inputs(groups, n, m, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((groups * n, m)) * rng.choice([0.1, 1.0, 3.0], (groups * n, 1))
         ).astype(np.float32)
    return z, _factors(groups, m, seed)


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("groups,n,m,beam", [(1, 1, 1, 1), (1, 3, 1, 4), (1, 5, 2, 16),
                                             (1, 7, 9, 2), (2, 6, 33, 4), (3, 5, 17, 8),
                                             (1, 4, 64, 3), (2, 2, 130, 5)])
@pytest.mark.parametrize("threads", [1, 2])
def test_core_matches_reference(ternary, groups, n, m, beam, threads):
    z, hinv = _inputs(groups, n, m, groups * 100 + n * 10 + m)
    codes, costs = core().gram_beam_codes(z, hinv, beam, "ternary" if ternary else "binary",
                                          threads)
    want_codes, want_costs = _reference(z, hinv, beam, ternary)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(costs, want_costs)
    assert set(np.unique(codes)) <= ({-1.0, 0.0, 1.0} if ternary else {-1.0, 1.0})


def test_ties_and_repeated_rows():
    """All-zero rows tie every level at every step: the earlier candidate wins, in the core as
    in the reference; a row with fewer distinct chains than the beam repeats its best one."""
    z = np.zeros((4, 5), np.float32)
    z[1] = 0.5  # ties between 0 and 1 for ternary
    z[2, ::2] = -1.0
    hinv = _factors(1, 5, 3)
    for ternary in (False, True):
        for beam in (1, 3, 7):
            codes, costs = core().gram_beam_codes(z, hinv, beam,
                                                  "ternary" if ternary else "binary", 1)
            want_codes, want_costs = _reference(z, hinv, beam, ternary)
            np.testing.assert_array_equal(codes, want_codes)
            np.testing.assert_array_equal(costs, want_costs)
    codes, _ = core().gram_beam_codes(z[:, :1].copy(), _factors(1, 1, 0), 5, "binary", 1)
    np.testing.assert_array_equal(codes[2:], np.broadcast_to(codes[0], codes[2:].shape))


@pytest.mark.parametrize("ternary", [False, True])
def test_cost_is_the_damped_weighted_error(ternary):
    """The chain cost sums e_j^2 = ((z_j - q_j) / U_jj)^2 along the chain: the nearest-plane
    identity makes it (q - z) G (q - z)^T for G = (U^T U)^-1; chains come cheapest first and
    are distinct."""
    z, hinv = _inputs(1, 12, 40, 7)
    codes, costs = core().gram_beam_codes(z, hinv, 6, "ternary" if ternary else "binary", 2)
    U = hinv[0].astype(np.float64)
    G = np.linalg.inv(np.triu(U).T @ np.triu(U))
    d = codes.astype(np.float64) - z[None].astype(np.float64)
    exact = np.einsum("brm,mk,brk->br", d, G, d)
    np.testing.assert_allclose(costs, exact, rtol=2e-3)
    assert np.all(np.diff(costs, axis=0) >= 0)
    for r in range(z.shape[0]):
        assert len({codes[b, r].tobytes() for b in range(6)}) == 6


def test_binary_beam_of_one_is_the_greedy_rounding():
    """Binary levels have no dead zone, so one chain is exactly gram_select_codes's rounding."""
    z, hinv = _inputs(2, 9, 48, 11)
    codes, _ = core().gram_beam_codes(z, hinv, 1, "binary", 1)
    np.testing.assert_array_equal(codes[0], greedy_codes(torch.from_numpy(z),
                                                         torch.from_numpy(hinv), None).numpy())


@pytest.mark.parametrize("ternary", [False, True])
def test_wider_beams_find_cheaper_chains(ternary):
    """Not a guarantee row by row (a beam can drop the greedy chain), but over many rows a wider
    beam's best chains cost less in total."""
    z, hinv = _inputs(1, 64, 64, 5)
    level = "ternary" if ternary else "binary"
    totals = [core().gram_beam_codes(z, hinv, k, level, 2)[1][0].sum() for k in (1, 4, 16)]
    assert totals[0] > totals[1] > totals[2]


@pytest.mark.parametrize("ternary", [False, True])
def test_torch_loop_agrees_with_core(ternary):
    """Other devices run _beam_codes_torch: the same recurrence, torch.topk for the ranking
    (ties may order differently; random data has none)."""
    z, hinv = _inputs(2, 10, 37, 13)
    got = _beam_codes_torch(torch.from_numpy(z), torch.from_numpy(hinv), ternary, 4).numpy()
    want, _ = core().gram_beam_codes(z, hinv, 4, "ternary" if ternary else "binary", 1)
    np.testing.assert_array_equal(got, want[0])
    got_cpu = select_codes(torch.from_numpy(z), torch.from_numpy(hinv),
                           torch.ones(z.shape[0]) if ternary else None, beam=4).numpy()
    np.testing.assert_array_equal(got_cpu, want[0])


def test_bad_arguments():
    z, hinv = _inputs(1, 3, 4, 0)
    with pytest.raises(ValueError, match="beam"):
        core().gram_beam_codes(z, hinv, 0, "binary")
    with pytest.raises(ValueError, match="beam"):
        core().gram_beam_codes(z, hinv, 65, "binary")
    with pytest.raises(ValueError):
        core().gram_beam_codes(z[:, :3].copy(), hinv, 2, "binary")
    with pytest.raises(ValueError):
        core().gram_beam_codes(z, hinv, 2, "quaternary")
    with pytest.raises((TypeError, ValueError)):
        core().gram_beam_codes(z.astype(np.float64), hinv, 2, "binary")
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match="beam"):
            SDQConfig(codes="gram", beam=bad)


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_beam_lowers_the_layer_error(levels):
    """Through quantize_weight_calibrated: a beam of 4 gives a smaller weighted output error
    tr(E H E^T) than the greedy rounding on a layer with correlated inputs."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 256, generator=gen)
    X = torch.randn(1024, 256, generator=gen) @ (torch.eye(256) + 0.3 * torch.randn(
        256, 256, generator=gen))
    H = X.T @ X / X.shape[0]

    def error(beam):
        cfg = SDQConfig(osr=2, levels=levels, codes="gram", beam=beam)
        E = quantize_weight_calibrated(W, H, cfg).dequantize() - W
        return float(torch.einsum("oi,ij,oj->", E.double(), H.double(), E.double()))

    assert error(4) < error(1)


def test_cli_beam_reaches_the_config(capsys):
    from sdq.cli import _method_config, build_parser, main
    args = build_parser().parse_args(["quantize", "--beam", "8", "--out", "x"])
    assert _method_config(args).beam == 8
    assert _method_config(build_parser().parse_args(["quantize", "--out", "x"])).beam == 1
    for bad in ("0", "65", "two"):
        with pytest.raises(SystemExit) as e:
            main(["quantize", "--beam", bad, "--out", "x"])
        assert e.value.code != 0
        assert "--beam" in capsys.readouterr().err
