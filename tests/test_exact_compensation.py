"""compensation="exact": a jointly quantized block's error is pushed onto the later columns by the
best update (not GPTQ's per-column one), and gram codes weigh each block by what that update
cannot undo (the Schur complement of the later columns)."""
import pytest
import torch

import sdq
from sdq.gptq import gptq_blockwise, prepare_hessian
from sdq.methods.sdq import _exact_compensation

B, IN, OUT = 16, 48, 8


def _hessian(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, IN, generator=g, dtype=torch.float64) @ (
        torch.eye(IN, dtype=torch.float64) + 0.3 * torch.randn(IN, IN, generator=g,
                                                               dtype=torch.float64))
    return (2 / 200 * X.T @ X).float()


def _damped(H, percdamp=0.01):
    H = H.double()
    return H + percdamp * H.diagonal().mean() * torch.eye(IN, dtype=torch.float64)


def test_block_weights_are_the_schur_complements():
    H = _hessian()
    W = torch.zeros(OUT, IN)
    Hinv, _ = prepare_hessian(H, W, 0.01, block_size=B)
    _, weights = _exact_compensation(Hinv, B)
    Hd = _damped(H)
    for b, start in enumerate(range(0, IN, B)):
        rest = Hd[start:, start:]
        S = torch.linalg.inv(torch.linalg.inv(rest)[:B, :B])
        assert torch.allclose(weights[b], S, rtol=1e-3, atol=1e-4 * float(S.abs().max()))


@pytest.mark.parametrize("exact", [True, False])
def test_later_columns_get_the_best_update_only_when_exact(exact):
    """Block 0 quantized with error E, the later blocks exactly: the compensated later columns
    must be the minimiser of the damped loss, W_l + E H_0l H_ll^-1 (exact mode only)."""
    H = _hessian(1)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(OUT, IN, generator=g)
    E = 0.1 * torch.randn(OUT, B, generator=g)
    Hinv, W = prepare_hessian(H, W, 0.01, block_size=B)
    if exact:
        Hinv, _ = _exact_compensation(Hinv, B)
    W_hat = gptq_blockwise(W, Hinv, B, lambda b, s, W_b: W_b - E if b == 0 else W_b)
    Hd = _damped(H)
    best = W[:, B:].double() + E.double() @ Hd[:B, B:] @ torch.linalg.inv(Hd[B:, B:])
    assert torch.allclose(W_hat[:, B:].double(), best, atol=1e-4) == exact


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_exact_compensation_lowers_the_layer_error(levels):
    H = _hessian(3)
    W = torch.randn(OUT * 4, IN, generator=torch.Generator().manual_seed(4))
    errors = {}
    for mode in ("exact", "diagonal"):
        cfg = sdq.SDQConfig(osr=2, levels=levels, codes="gram", block_size=B, compensation=mode,
                            refine_passes=0)
        E = (W - sdq.quantize_weight_calibrated(W, H, cfg).dequantize()).double()
        errors[mode] = float((E @ H.double() * E).sum())
    assert errors["exact"] < errors["diagonal"]
