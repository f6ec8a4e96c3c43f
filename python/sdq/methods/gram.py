"""sdq's own code selection: sequential rounding against the down-sampler's Gram matrix.

The paper's modulator shapes the quantization noise with a fixed first- or second-order loop.
What the layer actually computes is D q (then rotated back), so the error that matters for a row
is (q - z) G (q - z)^T with G = D^T C D, where C is the covariance of the layer's inputs in the
rotated block (identity when uncalibrated; the block of the activation Hessian, rotated, when
calibrated). Choosing the codes one sample at a time and pushing each sample's rounding error onto
the samples not yet chosen with G's inverse Cholesky factor is exactly GPTQ on G, so the GPTQ engine
does it. G has rank <= padded < m, hence the damping (gram_damp * mean diag). Afterwards the scale
and mean are refitted per row by (weighted) least squares for the chosen codes.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import blocks
from ..config import SDQConfig
from ..gptq import gptq_columnwise


def _inverse_cholesky(G: torch.Tensor, damp: float) -> torch.Tensor:
    G = G + damp * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    L = torch.linalg.cholesky(G)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()


def _round(v: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
    if tau is None:
        return torch.where(v > 0, 1.0, -1.0)
    return torch.where(v >= tau, 1.0, torch.where(v <= -tau, -1.0, 0.0))


def refit_scale_mean(a: torch.Tensor, w: torch.Tensor, C: torch.Tensor | None):
    """Per row, (s, mu) minimising (s a + mu - w) C (s a + mu - w)^T; C None means identity."""
    one = torch.ones_like(a)
    Ca, C1, Cw = (a, one, w) if C is None else (a @ C, one @ C, w @ C)
    saa, sa1, s11 = (Ca * a).sum(1), (Ca * one).sum(1), (C1 * one).sum(1)
    saw, s1w = (Ca * w).sum(1), (C1 * w).sum(1)
    det = saa * s11 - sa1 * sa1
    ok = det.abs() > 1e-12 * (saa * s11).clamp_min(1e-300)
    s = torch.where(ok, (saw * s11 - sa1 * s1w) / torch.where(ok, det, 1.0), 0.0)
    mu = torch.where(ok, (saa * s1w - sa1 * saw) / torch.where(ok, det, 1.0), s1w / s11)
    return s, mu


def gram_codes(u: torch.Tensor, target: torch.Tensor, g: blocks.BlockGroup, cfg: SDQConfig,
               C: torch.Tensor | None = None):
    """Codes for rows u [n, m] (up-sampled, rotated) whose block is target [n, padded].

    Returns (codes int8 [n, m], scale fp16 [n], mean fp16 [n]), like the modulator path.
    """
    from .sdq import normalise, quantile_lastdim  # the paper's normalisation, shared
    z, _, _ = normalise(u, cfg)
    D = blocks.resampler(g.m, g.padded)  # [padded, m]
    G = D.T @ (D if C is None else C @ D)
    tau = None
    if cfg.levels == "ternary":
        tau = quantile_lastdim(z.abs(), cfg.p_cut).float()
    Hinv = _inverse_cholesky(G, cfg.gram_damp)
    q = gptq_columnwise(z.float(), Hinv, min(128, g.m), lambda j, w, _: _round(w, tau))
    s, mu = refit_scale_mean(q.double() @ D.T, target, C)
    s16, mu16 = s.half(), mu.half()
    if not (torch.isfinite(s16).all() and torch.isfinite(mu16).all()):
        raise ValueError("weights too large for the fp16 scale and mean")
    return np.ascontiguousarray(q.to(torch.int8).numpy()), s16, mu16
