"""Code refinement after the sequential (GPTQ-order) choice: coordinate descent on single codes.

The sequential rounding of gram.py decides sample j once, knowing only the samples before it.
Afterwards every code can be revisited knowing all the others (QuantEase-style coordinate
descent). The objective is the one the scale/mean refit minimises, the block's weighted error in
weight space (method.md 4.2/4.5): with a = q D^T, e = s a + mu - w,

    E(q) = e C e^T,   and changing code j by d:   E' - E = s^2 (2 d h_j + d^2 G_jj)

where h = e C D / s (code units) and G = D^T C D. The best new level for code j is the level
nearest to q_j - h_j / G_jj (a 1-D convex quadratic: E cannot go up). After a
change, h += d G[j] keeps the residual exact in O(m) per trial (GPTQ's lazy batches: the rows of
the current chunk at once, later samples in one matmul per chunk). After each pass the scale and
mean are refitted (closed form, then the best fp16 pair, scale_search.best_fp16), and a row keeps
the new codes, scale and mean only if its error, recomputed exactly in float64, went down: so
refinement never raises the error it minimises.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import device
from .._native import core, float32_array
from .normalise import FP16_MAX
from .scale_search import Quadratic, best_fp16

# Samples per lazy batch: the changes inside it update each other one by one, later samples get
# the whole batch's changes in one matmul.
_CHUNK = 64


def code_residual(q: torch.Tensor, w: torch.Tensor, D: torch.Tensor, C: torch.Tensor | None,
                  s: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """h = e C D / s [n, m] float32 (rows with s = 0: e C D), e = s q D^T + mu - w."""
    s64 = s.double()
    e = s64[:, None] * (q.double() @ D.T) + mu.double()[:, None] - w
    h = (e if C is None else e @ C) @ D
    return (h / torch.where(s64 != 0, s64, 1.0)[:, None]).float()


def one_pass(q: torch.Tensor, h: torch.Tensor, G: torch.Tensor, ternary: bool,
             active: torch.Tensor) -> None:
    """One sweep j = 0..m-1 over the codes q [n, m] (float32, changed in place) with the residual
    h [n, m] (code units, float32; consumed). Rows where `active` is False are not changed.

    Code j moves to the level nearest to q_j - h_j / G_jj, which never raises E (a 1-D convex
    quadratic): binary, a flip (d = -2 q_j, E' - E = 4 s^2 (G_jj - q_j h_j)) exactly when
    q_j h_j > G_jj; ternary, round and clamp. A row with h = 0 stays put, hence inactive rows'
    h is zeroed. On the CPU the core runs the sweep (cpp/include/sdq/gram_codes.h: each row's
    chain in SIMD lanes); other devices run the torch loop below, the fewest ops per step (it
    runs m times per block). Same recurrence; float32 rounding differs with the update order.
    """
    if q.device.type == "cpu":
        codes = float32_array(q)  # q's own memory when q is contiguous float32
        core().gram_refine_pass(codes, float32_array(h), float32_array(G),
                                np.ascontiguousarray(active.numpy(), dtype=np.uint8),
                                "ternary" if ternary else "binary", device.caller_threads())
        q.copy_(torch.from_numpy(codes))
    else:
        _one_pass_torch(q, h, G, ternary, active)


def _one_pass_torch(q: torch.Tensor, h: torch.Tensor, G: torch.Tensor, ternary: bool,
                    active: torch.Tensor) -> None:
    """one_pass as torch ops, for any device."""
    qT, hT = q.T.contiguous(), h.T.contiguous()  # sample-major: each step reads contiguous rows
    hT[:, ~active] = 0
    m, n = qT.shape
    gdiag = torch.diagonal(G).tolist()
    delta = torch.empty(min(_CHUNK, m), n, dtype=qT.dtype, device=qT.device)
    t = torch.empty(n, dtype=qT.dtype, device=qT.device)
    flip = torch.empty(n, dtype=torch.bool, device=qT.device)
    for c0 in range(0, m, _CHUNK):
        c1 = min(c0 + _CHUNK, m)
        for j in range(c0, c1):
            d = delta[j - c0]
            if gdiag[j] <= 0:  # the weighting cannot see this sample: leave it
                d.zero_()
                continue
            if ternary:
                torch.add(qT[j], hT[j], alpha=-1.0 / gdiag[j], out=t)
                torch.sub(t.round_().clamp_(-1, 1), qT[j], out=d)
            else:
                torch.gt(torch.mul(qT[j], hT[j], out=t), gdiag[j], out=flip)
                torch.mul(qT[j], flip, out=d).mul_(-2.0)
            qT[j] += d
            if j + 1 < c1:
                hT[j + 1:c1].addr_(G[j, j + 1:c1], d)
        if c1 < m:
            hT[c1:].addmm_(G[c0:c1, c1:].T, delta[: c1 - c0])
    q.copy_(qT.T)


def refine_codes(q: torch.Tensor, w: torch.Tensor, D: torch.Tensor, C: torch.Tensor | None,
                 s: torch.Tensor, mu: torch.Tensor, ternary: bool, passes: int, refit):
    """`passes` sweeps of coordinate descent on codes q [n, m] (float32) for targets w [n, p]
    (rotated, padded rows, float64), down-sampler D [p, m], covariance C [p, p] (None: identity)
    and fp16 scale and mean s, mu [n]. refit(a, w, C) -> (s, mu, fell_back) is the closed-form
    scale/mean fit (gram.refit_scale_mean). Returns (q, s, mu): the same types, each row no worse
    in E than it came in. Deterministic (same inputs, same result)."""
    if passes == 0:
        return q, s, mu
    Df = D.float()
    G = Df.T @ Df if C is None else Df.T @ (C.float() @ Df)
    wC = None if C is None else w @ C
    best = Quadratic(q.double() @ D.T, w, C, wC).error(s, mu)
    for _ in range(passes):
        s64, mu64 = s.double(), mu.double()
        active = s64 != 0  # with s = 0 the codes do not change the error
        q_new = q.clone()
        one_pass(q_new, code_residual(q, w, D, C, s, mu), G, ternary, active)
        a = q_new.double() @ D.T
        s_fit, mu_fit, _ = refit(a, w, C)
        quad = Quadratic(a, w, C, wC)
        fits = torch.isfinite(s_fit) & torch.isfinite(mu_fit) \
            & (s_fit.abs() <= FP16_MAX) & (mu_fit.abs() <= FP16_MAX)
        s_fit, mu_fit = torch.where(fits, s_fit, s64), torch.where(fits, mu_fit, mu64)
        s_new, mu_new = best_fp16(quad, s_fit, mu_fit)
        err = quad.error(s_new, mu_new)
        # the codes alone (old s, mu) are already no worse when the pass only made gains
        err_codes = quad.error(s, mu)
        use_fit = err <= err_codes
        s_new, mu_new = torch.where(use_fit, s_new, s), torch.where(use_fit, mu_new, mu)
        err = torch.minimum(err, err_codes)
        better = err < best
        if not bool(better.any()):
            break
        q = torch.where(better[:, None], q_new, q)
        s, mu = torch.where(better, s_new, s), torch.where(better, mu_new, mu)
        best = torch.where(better, err, best)
    return q, s, mu
