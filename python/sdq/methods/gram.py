"""sdq's own code selection: sequential rounding against the down-sampler's Gram matrix.

The paper's modulator shapes the quantization noise with a fixed first- or second-order loop.
What the layer actually computes is D q (then rotated back), so the error that matters for a row
is (q - z) G (q - z)^T with G = D^T C D, where C is the covariance of the layer's inputs in the
rotated block (identity when uncalibrated; the block of the activation Hessian, rotated, when
calibrated). Choosing the codes one sample at a time and pushing each sample's rounding error onto
the samples not yet chosen with G's inverse Cholesky factor is exactly GPTQ on G, so the GPTQ engine
does it. G has rank <= padded < m, hence the damping (gram_damp * mean diag). Afterwards the scale
and mean are refitted per row by (weighted) least squares for the chosen codes, stored as the best
fp16 pair (scale_search.py), and the codes are refined by coordinate descent (refine.py). With the
code search (the default) this runs for a few (damping, normalisation scale) settings at once and
each row keeps its best (CODE_SEARCH). On the CPU the two sequential loops run in the core
(cpp/include/sdq/gram_codes.h).

Calibration data can be dead or too thin to pin C down (few tokens, MoE experts): the damping then
grows until G factorises, a C that stays unusable is replaced by the identity, and a weighted refit
that C cannot decide falls back to the unweighted one; `note` is told each time (one
CalibrationWarning per layer, see sdq.calibration_warnings).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .. import blocks, device
from .._native import core, float32_array
from ..config import SDQConfig
from ..gptq import damped_inverse_cholesky
from .normalise import FP16_MAX, normalise, quantile_lastdim
from .refine import refine_codes
from .scale_search import Quadratic, best_fp16

Note = Callable[[str], None]  # records what had to be done for this block (CalibrationNotes)

# Normalisation scales tried by scale_search="grid", as factors of the paper's quantile scale.
SCALE_GRID = (0.8, 0.9, 1.0, 1.1, 1.25)

# The settings code_search tries, as factors of (gram_damp, the paper's quantile scale). Less
# damping lets the rounding push more of its error into what D filters out, until the pushed
# error overloads the levels and the rounding goes unstable; where that happens depends on the
# block, and a larger scale (smaller z) holds it off for ternary codes, a smaller one pays for
# binary. Measured on the default model (bench/code_search.py: output error of layers 0, 8, 16, 24,
# 29 under held-out Hessians, with the search and percdamp 0.1 against neither): ternary OSR 2
# -27%, OSR 1.5 -9%; binary OSR 2 -11%, OSR 3 -9%.
CODE_SEARCH = {"ternary": ((1.0, 1.0), (0.35, 1.1), (0.25, 1.25)),
               "binary": ((1.0, 1.0), (1.0, 0.9), (1.5, 0.85))}


def _ignore(what: str) -> None:
    pass


def _gram_factors(D: torch.Tensor, C: torch.Tensor | None, damps: list[float], note: Note):
    """(Hinv float32 [k, m, m], C used): GPTQ's factor of G = D^T C D damped by each of `damps`
    x mean diag (G formed once).

    A G that does not factorise at a damping gets more (damped_inverse_cholesky); a covariance
    that no damping makes usable (non-finite, or no mean diagonal) is dropped for the identity at
    every damping, i.e. this block gets uncalibrated codes. D^T D always factorises once damped.
    """
    if C is not None:
        factors = _factors_of(D.T @ (C @ D), damps, note)
        if factors is not None:
            return factors, C
        note("input covariance unusable (no damping made it factorise): uncalibrated codes")
    factors = _factors_of(D.T @ D, damps, note)
    if factors is None:  # unreachable: D^T D is finite with a positive diagonal
        raise ValueError("the down-sampler's Gram matrix does not factorise: this is a bug in sdq")
    return factors, None


def _factors_of(G: torch.Tensor, damps: list[float], note: Note) -> torch.Tensor | None:
    """damped_inverse_cholesky of G at each damping, stacked (float32); None if one fails."""
    factors = {}
    for damp in dict.fromkeys(damps):
        U, used = damped_inverse_cholesky(G, damp)
        if U is None:
            return None
        if used != damp:
            note(f"Gram matrix damped by {used:g} x mean diag (damping {damp:g} failed)")
        factors[damp] = U.float()
    return torch.stack([factors[d] for d in damps])


def _round_into(out: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | None,
                one: torch.Tensor, zero: torch.Tensor) -> None:
    """out = the nearest level of v: sign (binary), or -1/0/+1 with threshold tau (ternary)."""
    if tau is None:
        torch.where(v > 0, one, -one, out=out)
    else:
        torch.where(v <= -tau, -one, zero, out=out)
        torch.where(v >= tau, one, out, out=out)


def select_codes(z: torch.Tensor, Hinv: torch.Tensor, tau: torch.Tensor | None,
                 beam: int = 1) -> torch.Tensor:
    """The codes of rows z [n, m] against Hinv [m, m] or a stack [k, m, m] (see
    greedy_codes): greedy rounding with the ternary threshold tau when beam is 1, else the best
    chain of a beam search of that width (beam_codes; tau unused)."""
    if beam == 1:
        return greedy_codes(z, Hinv, tau)
    return beam_codes(z, Hinv, tau is not None, beam)


def beam_codes(z: torch.Tensor, Hinv: torch.Tensor, ternary: bool, beam: int) -> torch.Tensor:
    """The best chain of a beam search of width `beam` over the sequential rounding of rows z
    [n, m] (or k groups of rows, Hinv [k, m, m]): float32 codes [n, m] on z's device. On the
    CPU the core does it (cpp/include/sdq/gram_beam.h); other devices run the torch loop."""
    Hs = Hinv if Hinv.dim() == 3 else Hinv[None]
    if z.device.type != "cpu":
        return _beam_codes_torch(z, Hs, ternary, beam)
    codes, _ = core().gram_beam_codes(float32_array(z), float32_array(Hs), beam,
                                      "ternary" if ternary else "binary", device.caller_threads())
    return torch.from_numpy(codes[0])


def _beam_codes_torch(z: torch.Tensor, Hs: torch.Tensor, ternary: bool,
                      beam: int) -> torch.Tensor:
    """beam_codes as torch ops, for any device: every row's chains at once, [n, beam, m].
    (torch.topk does not promise to keep ties in order, so a tie between two chains' costs may
    resolve differently from the core.)"""
    Hs = Hs.to(device=z.device, dtype=torch.float32)
    k, m = Hs.shape[0], z.shape[1]
    n = z.shape[0] // k
    values = torch.tensor([-1.0, 0.0, 1.0] if ternary else [-1.0, 1.0], device=z.device)
    L = len(values)
    out = torch.empty(k * n, m, dtype=torch.float32, device=z.device)
    for i in range(k):
        U = Hs[i]
        inv = 1.0 / torch.diagonal(U)
        Z = z[i * n:(i + 1) * n].to(torch.float32)[:, None, :].repeat(1, beam, 1)
        Q = torch.zeros_like(Z)
        cost = torch.full((n, beam), float("inf"), device=z.device)
        cost[:, 0] = 0.0  # one chain to start from
        for j in range(m):
            e = (Z[:, :, j, None] - values) * inv[j]  # [n, beam, L]
            best, idx = (cost[:, :, None] + e * e).view(n, beam * L).topk(
                beam, dim=1, largest=False, sorted=True)
            take = (idx // L)[:, :, None].expand(-1, -1, m)
            Z, Q = Z.gather(1, take), Q.gather(1, take)
            Q[:, :, j] = values[idx % L]
            if j + 1 < m:
                Z[:, :, j + 1:] -= e.view(n, beam * L).gather(1, idx)[:, :, None] * U[j, j + 1:]
            cost = best
        out[i * n:(i + 1) * n] = Q[:, 0]
    return out


def greedy_codes(z: torch.Tensor, Hinv: torch.Tensor, tau: torch.Tensor | None,
                 batch: int = 128) -> torch.Tensor:
    """GPTQ's sequential rounding of rows z [n, m] against Hinv [m, m] (upper, from
    damped_inverse_cholesky); float32 codes [n, m] on z's device. Hinv may also be a stack
    [k, m, m]: z then holds k groups of n / k rows, group i rounded against Hinv[i] (the
    settings of the code search, all in one call).

    On the CPU the core does it (cpp/include/sdq/gram_codes.h: one row's chain at a time, in
    SIMD lanes; ~10x faster than the torch loop below, which other devices run). Both compute
    the same recurrence; float32 rounding differs with the order of the updates.
    """
    if z.device.type != "cpu":
        return _select_codes_torch(z, Hinv, tau, batch)
    Hs = Hinv if Hinv.dim() == 3 else Hinv[None]
    codes = core().gram_select_codes(float32_array(z), float32_array(Hs),
                                     None if tau is None else float32_array(tau),
                                     "binary" if tau is None else "ternary",
                                     device.caller_threads())
    return torch.from_numpy(codes)


def _select_codes_torch(z: torch.Tensor, Hinv: torch.Tensor, tau: torch.Tensor | None,
                        batch: int = 128) -> torch.Tensor:
    """greedy_codes as torch ops, for any device.

    Sample j is rounded, and its error (z_j - q_j) / Hinv[j, j] is pushed onto the samples after
    it through row j of Hinv; inside a batch of `batch` samples at once, onto later batches in
    one matmul (what gptq_columnwise does, without its per-column checks and copies: this loop
    runs m times per block of every linear). The work is laid out sample-major so that each step
    touches contiguous memory.
    """
    Hs = (Hinv if Hinv.dim() == 3 else Hinv[None]).to(device=z.device, dtype=torch.float32)
    k, m = Hs.shape[0], z.shape[1]
    n = z.shape[0] // k
    # [k, m, n]: row j of group i = sample j of that group's rows
    Zt = z.to(torch.float32).reshape(k, n, m).transpose(1, 2).clone(  # never z's own memory
        memory_format=torch.contiguous_format)
    inv_diag = 1.0 / torch.diagonal(Hs, dim1=1, dim2=2)[:, :, None]  # [k, m, 1]
    tau = None if tau is None else tau.to(torch.float32).reshape(k, n)
    Q = torch.empty_like(Zt)
    one = torch.ones((), dtype=Zt.dtype, device=Zt.device)
    zero = torch.zeros((), dtype=Zt.dtype, device=Zt.device)
    E = torch.empty(k, min(batch, m), n, dtype=Zt.dtype, device=Zt.device)
    for start in range(0, m, batch):
        end = min(start + batch, m)
        for j in range(start, end):
            _round_into(Q[:, j], Zt[:, j], tau, one, zero)
            err = E[:, j - start]
            torch.sub(Zt[:, j], Q[:, j], out=err).mul_(inv_diag[:, j])
            if j + 1 < end:
                Zt[:, j + 1:end].baddbmm_(Hs[:, j, j + 1:end, None], err[:, None, :], alpha=-1.0)
        if end < m:
            Zt[:, end:].baddbmm_(Hs[:, start:end, end:].transpose(1, 2), E[:, : end - start],
                                 alpha=-1.0)
    return Q.transpose(1, 2).reshape(k * n, m)


def _normal_sums(a: torch.Tensor, w: torch.Tensor, C: torch.Tensor | None):
    """Per row the entries of min (s a + mu - w) C (...)^T's normal equations:
    a.a, a.1, 1.1, a.w, 1.w in the C inner product (C None: the plain one)."""
    # C is symmetric: the constant's terms need only its column sums, not a [n, p] @ C product.
    c1 = torch.ones(a.shape[1], dtype=a.dtype, device=a.device) if C is None else C.sum(0)
    Ca = a if C is None else a @ C
    return (Ca * a).sum(1), Ca.sum(1), c1.sum().expand(a.shape[0]), (Ca * w).sum(1), w @ c1


def _solve_scale_mean(saa, sa1, s11, saw, s1w):
    """Per row (s, mu, solved) of the 2x2 normal equations. Where they are singular (solved False)
    s = 0 and mu is the weighted mean of w, or 0 where the constant carries no weight either."""
    det = saa * s11 - sa1 * sa1
    solved = det.abs() > 1e-12 * (saa * s11).clamp_min(1e-300)
    safe_det = torch.where(solved, det, 1.0)
    has_mean = s11 > 1e-300
    mean = torch.where(has_mean, s1w / torch.where(has_mean, s11, 1.0), 0.0)
    s = torch.where(solved, (saw * s11 - sa1 * s1w) / safe_det, 0.0)
    mu = torch.where(solved, (saa * s1w - sa1 * saw) / safe_det, mean)
    return s, mu, solved


# C is known to float32 precision only (H is accumulated and rotated in float32), so a weighted
# system whose determinant is within C's rounding is singular in fact, whatever float64 says. In
# units of ||C||_F (see _resolved_by) a float32-rounded rank-1 C measures up to 2.5e-9; genuine
# data, even SmolLM2 down_proj blocks whose one outlier direction holds all but 2e-4 of the
# trace, measures 4e-7 and more. A quarter of float32's epsilon sits between, 12x from each.
_COVARIANCE_NOISE = 2.0 ** -25


def _resolved_by(C: torch.Tensor, a: torch.Tensor, saa, sa1, s11) -> torch.Tensor:
    """Rows whose weighted 2x2 system stands above C's rounding: its determinant exceeds the change
    that a perturbation of C by _COVARIANCE_NOISE * ||C||_F could cause. A rank-1 C rounded to
    float32 passes the exact-singularity test yet leaves (s, mu) to the noise."""
    eta = _COVARIANCE_NOISE * float(torch.linalg.matrix_norm(C))
    na, n1 = a.norm(dim=1), a.shape[1] ** 0.5
    noise = eta * (s11 * na ** 2 + saa * n1 ** 2 + 2 * sa1.abs() * na * n1)
    return saa * s11 - sa1 * sa1 > noise


# The damping of a weighting that cannot pin (s, mu) down, as a fraction of its mean diagonal:
# GPTQ's own default percdamp, far above C's float32 noise.
_REFIT_DAMP = 0.01


def _fits_fp16(s: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return (s.abs() <= FP16_MAX) & (mu.abs() <= FP16_MAX)  # False for NaN too


def refit_scale_mean(a: torch.Tensor, w: torch.Tensor, C: torch.Tensor | None):
    """Per row, (s, mu) minimising (s a + mu - w) C (s a + mu - w)^T; C None means identity.

    A weighting that cannot tell a from the constant (dead or rank-deficient inputs: C blind to
    one of them, up to its float32 rounding), or whose fit does not fit in fp16, is no basis for a
    fit on its own: such rows fall back towards the unweighted fit, by least squares under
    C + _REFIT_DAMP x mean(diag C) I: the weighted optimum along what C sees, the unweighted fit
    along what it is blind to. A C with nothing on its diagonal (dead inputs) gives exactly the
    unweighted fit. Never NaN.
    Returns (s, mu, fell_back), fell_back the bool mask [rows] of rows that fell back while their
    plain fit was well-posed (rows with constant codes are singular either way).
    """
    sums = _normal_sums(a, w, C)
    s, mu, solved = _solve_scale_mean(*sums)
    if C is None:
        return s, mu, torch.zeros_like(solved)
    usable = solved & _resolved_by(C, a, *sums[:3]) & _fits_fp16(s, mu)
    if bool(usable.all()):
        return s, mu, ~usable
    s_plain, mu_plain, plain_solved = _solve_scale_mean(*_normal_sums(a, w, None))
    s_fb, mu_fb = s_plain, mu_plain
    mean_diag = float(C.diagonal().mean())
    if math.isfinite(mean_diag) and mean_diag > 0:
        damped = C + _REFIT_DAMP * mean_diag * torch.eye(C.shape[0], dtype=C.dtype,
                                                          device=C.device)
        s_d, mu_d, solved_d = _solve_scale_mean(*_normal_sums(a, w, damped))
        ok_d = solved_d & _fits_fp16(s_d, mu_d)
        s_fb, mu_fb = torch.where(ok_d, s_d, s_plain), torch.where(ok_d, mu_d, mu_plain)
    s = torch.where(usable, s, s_fb)
    mu = torch.where(usable, mu, mu_fb)
    return s, mu, ~usable & plain_solved


def _codes_and_fit(z: torch.Tensor, tau: torch.Tensor | None, target: torch.Tensor,
                   D: torch.Tensor, Hinv: torch.Tensor, C: torch.Tensor | None, cfg: SDQConfig,
                   note: Note):
    """Sequential codes for z [k n, m] (k stacked candidate normalisations of the n rows, tau
    [k n] their ternary thresholds or None), their (s, mu) fit (fp16; the best fp16 pair unless
    scale_search is "closed_form") and weighted error per row [k n] (inf where the fit leaves
    the fp16 range)."""
    q = select_codes(z, Hinv, tau, cfg.beam)
    a = q.double() @ D.T
    target = target.repeat(z.shape[0] // target.shape[0], 1)
    s, mu, fell_back = refit_scale_mean(a, target, C)
    if bool(fell_back.any()):
        note("weighted scale/mean fit singular or out of fp16 range: damped/unweighted fit used")
    fits = torch.isfinite(s.half()) & torch.isfinite(mu.half())
    s, mu = torch.where(fits, s, 0.0), torch.where(fits, mu, 0.0)
    quad = Quadratic(a, target, C)
    s16, mu16 = best_fp16(quad, s, mu) if cfg.scale_search != "closed_form" else (s.half(),
                                                                                  mu.half())
    return q, s16, mu16, torch.where(fits, quad.error(s16, mu16), float("inf"))


def _settings(cfg: SDQConfig) -> list[tuple[float, float]]:
    """(Gram damping, normalisation scale factor) of every setting the codes are chosen for."""
    search = CODE_SEARCH[cfg.levels] if cfg.code_search else ((1.0, 1.0),)
    grid = SCALE_GRID if cfg.scale_search == "grid" else (1.0,)
    return [(cfg.gram_damp * d, f * g) for d, f in search for g in grid]


def gram_codes(u: torch.Tensor, target: torch.Tensor, g: blocks.BlockGroup, cfg: SDQConfig,
               C: torch.Tensor | None = None, note: Note | None = None):
    """Codes for rows u [n, m] (up-sampled, rotated) whose block is target [n, padded].

    C: the block's rotated input covariance (None: identity). note(what), if given, is told when
    the covariance needed more damping, was dropped, or the weighted refit was.
    The codes are chosen for every setting of _settings (the code search's Gram dampings and
    normalisation scales, times SCALE_GRID's scales with scale_search "grid"), all at once,
    stacked, and each row keeps the one with the smallest weighted error; then
    cfg.refine_passes passes of coordinate descent (refine.py).
    Returns (codes int8 [n, m], scale fp16 [n], mean fp16 [n]), like the modulator path.
    """
    note = note or _ignore
    z, _, _ = normalise(u, cfg)
    D = device.resampler(g.m, g.padded, u.device)  # [padded, m]
    settings = _settings(cfg)
    Hinv, C = _gram_factors(D, C, [d for d, _ in settings], note)
    # quantile(|z / f|) = quantile(|z|) / f: one sort serves every setting
    tau = quantile_lastdim(z.abs(), cfg.p_cut) if cfg.levels == "ternary" else None
    q, s16, mu16, err = _codes_and_fit(
        torch.cat([z / f for _, f in settings]),
        None if tau is None else torch.cat([tau / f for _, f in settings]).float(),
        target, D, Hinv, C, cfg, note)
    if len(settings) > 1:
        n = z.shape[0]
        pick = err.view(len(settings), n).argmin(0) * n + torch.arange(n, device=z.device)
        q, s16, mu16, err = q[pick], s16[pick], mu16[pick], err[pick]
    if not bool(torch.isfinite(err).all()):
        raise ValueError(f"weights too large for the fp16 scale and mean (|value| must stay "
                         f"below {FP16_MAX:g} after rotation and resampling)")
    q, s16, mu16 = refine_codes(q, target, D, C, s16, mu16, cfg.levels == "ternary",
                                cfg.refine_passes, refit_scale_mean)
    return np.ascontiguousarray(q.to(torch.int8).cpu().numpy()), s16, mu16


def encode_gram(rows: torch.Tensor, g: blocks.BlockGroup, cfg: SDQConfig, signs: np.ndarray,
                C: torch.Tensor | None = None, note: Note | None = None):
    """Rows [n, padded] of one block geometry -> (codes int8 [n, m] numpy, scale fp16 [n], mean
    fp16 [n] on rows' device): rotate, up-sample, gram_codes; on any device (sdq.device)."""
    if cfg.hadamard:
        rows = device.rotate(rows, signs)
    rows = rows.double()
    return gram_codes(rows @ device.resampler(g.padded, g.m, rows.device).T, rows, g, cfg, C, note)
