"""Baselines (method.md section 3): RTN, importance-weighted RTN, BitNet-b1.58 ternary, binary.

Each quantizer maps a weight W [out, in] (any float dtype) to the dequantized W_hat [out, in]
float32 that the stored format reproduces exactly: every scale and offset is rounded to fp16,
because fp16 is what the bit counts of `bits_all_in` pay for. GPTQ, the strongest calibrated
baseline, is sdq.gptq.gptq_quantize; it shares RTN's grid. iw_rtn is the calibrated RTN that
llama.cpp's imatrix quantizers resemble: each group's grid is searched to minimise the error
weighted by the calibration Hessian's diagonal.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gptq import (_FP16_MAX, _FP16_TINY, check_bits, check_positive_int, uniform_grid,
                    uniform_round)
from ..validate import check_weight

__all__ = ["rtn", "iw_rtn", "absmean_ternary", "sign_rowscale", "bits_all_in"]


def rtn(W: Tensor, bits: int, group_size: int = 128, symmetric: bool = False) -> Tensor:
    """Round-to-nearest on a min-max grid per row and group of input columns.

    Groups are `group_size` consecutive input columns; the last may be shorter. Each row-group
    has 2^bits levels between its min and max, with an fp16 scale and fp16 offset (symmetric:
    between -max|w| and max|w|, fp16 scale only; see sdq.gptq.uniform_grid).
    """
    check_weight(W)
    check_bits(bits)
    check_positive_int(group_size, "group_size")
    W_hat = torch.empty(W.shape, dtype=torch.float32, device=W.device)
    for start in range(0, W.shape[1], group_size):
        group = W[:, start:start + group_size].float()
        scale, offset = uniform_grid(group, bits, symmetric)
        W_hat[:, start:start + group_size] = uniform_round(group, scale, offset, bits)
    return W_hat


# The grids iw_rtn tries per group: each end of the min-max range pulled in by 0, 5, .., 25% of
# the range (0, 0 is plain RTN's grid, so the search never loses to it), then refits.
_CLIP_STEPS = torch.arange(6) * 0.05
_REFITS = 2


def _check_importance(h, n_in: int) -> Tensor:
    if not isinstance(h, Tensor) or h.dim() != 1 or h.numel() != n_in:
        raise ValueError(f"importance must be a 1-D tensor of {n_in} values (the diagonal of the "
                         f"calibration Hessian), got {getattr(h, 'shape', type(h).__name__)}")
    h = h.detach().float()
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("importance must be finite and >= 0")
    return h


def _weighted_error(w: Tensor, q: Tensor, h: Tensor) -> Tensor:
    """sum_j h_j (w_j - q_j)^2 of each row-group: w, q [out, G, g], h [G, g] -> [out, G]."""
    return ((w - q).square() * h).sum(dim=-1)


def _round_fp16(scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    scale = scale.clamp(_FP16_TINY, _FP16_MAX).half().float().clamp_min(_FP16_TINY)
    return scale, offset.clamp(-_FP16_MAX, _FP16_MAX).half().float()


def _weighted_refit(w: Tensor, q: Tensor, h: Tensor, scale: Tensor, offset: Tensor,
                    bits: int) -> tuple[Tensor, Tensor]:
    """Least-squares (scale, offset) for the codes of q under the weights h: the 2x2 normal
    equations of min sum_j h_j (w_j - s k_j - o)^2 per row-group (unchanged where singular)."""
    k = torch.round((q - offset) / scale).clamp_(0, 2 ** bits - 1)
    s0, s1, s2 = h.sum(-1), (h * k).sum(-1), (h * k * k).sum(-1)
    t0, t1 = (h * w).sum(-1), (h * w * k).sum(-1)
    det = s0 * s2 - s1 * s1
    ok = det > 1e-12 * s0 * s2
    safe = torch.where(ok, det, torch.ones_like(det))
    new_s = torch.where(ok, (s0 * t1 - s1 * t0) / safe, scale[..., 0])
    new_o = torch.where(ok, (s2 * t0 - s1 * t1) / safe, offset[..., 0])
    return _round_fp16(new_s.clamp_min(_FP16_TINY)[..., None], new_o[..., None])


def _iw_groups(w: Tensor, h: Tensor, bits: int) -> Tensor:
    """iw_rtn on whole groups: w [out, G, g] float32, h [G, g] -> the reconstruction. Only each
    group's best (scale, offset) is carried along: the codes are rebuilt once at the end."""
    maxq = 2 ** bits - 1
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    span = hi - lo
    # Plain RTN's grid first, exactly as uniform_grid builds it (so the result never loses to it).
    best_s, best_o = (t.view_as(lo) for t in uniform_grid(w.reshape(-1, w.shape[-1]), bits))
    best_err = _weighted_error(w, uniform_round(w, best_s, best_o, bits), h)

    def consider(scale: Tensor, offset: Tensor) -> None:
        nonlocal best_s, best_o, best_err
        err = _weighted_error(w, uniform_round(w, scale, offset, bits), h)
        better = err < best_err
        best_s = torch.where(better[..., None], scale, best_s)
        best_o = torch.where(better[..., None], offset, best_o)
        best_err = torch.where(better, err, best_err)

    for a in _CLIP_STEPS.tolist():
        for b in _CLIP_STEPS.tolist():
            if a or b:
                consider(*_round_fp16(span * (1 - a - b) / maxq, lo + a * span))
    for _ in range(_REFITS):
        consider(*_weighted_refit(w, uniform_round(w, best_s, best_o, bits), h, best_s, best_o,
                                  bits))
    return uniform_round(w, best_s, best_o, bits)


def iw_rtn(W: Tensor, importance: Tensor, bits: int, group_size: int = 128) -> Tensor:
    """Importance-weighted RTN: per row and group, the asymmetric grid (fp16 scale and offset)
    that minimises sum_j h_j (w_j - q_j)^2, h = `importance` [in] (the calibration Hessian's
    diagonal, i.e. mean x_j^2 up to a factor: llama.cpp's imatrix).

    The search tries the min-max grid (plain RTN) and grids with either end pulled in by up to
    25% of the range, then refits scale and offset by weighted least squares for the chosen codes
    (kept only where it helps), so the weighted error is never above RTN's. A group whose columns
    all have zero importance (inputs always zero) is weighted uniformly. Same storage as RTN.
    """
    check_weight(W)
    check_bits(bits)
    check_positive_int(group_size, "group_size")
    n_out, n_in = W.shape
    h = _check_importance(importance, n_in).to(W.device)
    W_hat = torch.empty(W.shape, dtype=torch.float32, device=W.device)
    full = n_in - n_in % group_size
    for start, end in ((0, full), (full, n_in)):
        if end == start:
            continue
        g = min(group_size, end - start)
        w = W[:, start:end].float().reshape(n_out, -1, g)
        hg = h[start:end].reshape(-1, g)
        hg = torch.where(hg.sum(-1, keepdim=True) > 0, hg, torch.ones_like(hg))
        W_hat[:, start:end] = _iw_groups(w, hg, bits).reshape(n_out, end - start)
    return W_hat


def _row_absmean(W: Tensor) -> Tensor:
    """mean|w| of each row [out, 1], rounded to the fp16 it is stored as."""
    return W.float().abs().mean(dim=1, keepdim=True).half().float()


def absmean_ternary(W: Tensor) -> Tensor:
    """BitNet b1.58 post-training ternary: gamma * clip(round(w / gamma), -1, 1).

    gamma = mean|w| of the row (one fp16 scale per row). A row of zeros has gamma = 0 and
    stays zero. Storage: the codes take log2(3) ~ 1.585 bits of information, but are stored
    as two bit planes (non-zero, sign), so all-in bits = 2 + 16 / in.
    """
    check_weight(W)
    gamma = _row_absmean(W)
    safe = torch.where(gamma > 0, gamma, torch.ones_like(gamma))
    codes = torch.round(W.float() / safe).clamp_(-1, 1)
    return codes * gamma


def sign_rowscale(W: Tensor) -> Tensor:
    """Binary with a per-row scale: sign(w) * mean|w| of the row (sign(0) taken as +1).

    One sign plane and one fp16 scale per row: all-in bits = 1 + 16 / in.
    """
    check_weight(W)
    signs = torch.where(W >= 0, 1.0, -1.0).float()
    return signs * _row_absmean(W)


def bits_all_in(method: str, in_features: int, **params) -> float:
    """Honest storage of a baseline, in bits per original weight, codes plus metadata.

    method "rtn", "iwrtn" or "gptq" (params: bits, group_size=128, symmetric=False,
    act_order=False, out_features): bits + 32 * ceil(in / group) / in, i.e. bits + 32 / group_size
    when groups tile the row (fp16 scale and offset per group; symmetric: fp16 scale only, 16).
    act_order (gptq) also stores the column permutation its groups follow: ceil(log2 in) bits per
    input column, shared by the `out_features` rows.
    "absmean_ternary": 2 + 16 / in; "sign_rowscale": 1 + 16 / in (one fp16 scale per row).
    """
    check_positive_int(in_features, "in_features")
    if method in ("rtn", "iwrtn", "gptq"):
        params = dict(params)
        bits = params.pop("bits", None)
        check_bits(bits)
        group_size = params.pop("group_size", 128)
        check_positive_int(group_size, "group_size")
        meta = 16 if params.pop("symmetric", False) else 32
        total = bits + meta * math.ceil(in_features / group_size) / in_features
        out_features = params.pop("out_features", None)
        if params.pop("act_order", False):
            if method != "gptq":
                raise ValueError("act_order applies to gptq only")
            check_positive_int(out_features, "out_features (needed with act_order)")
            total += math.ceil(math.log2(in_features)) / out_features if in_features > 1 else 0
        if params:
            raise ValueError(f"unknown parameters for {method!r}: {sorted(params)}")
        return total
    if params:
        raise ValueError(f"{method!r} takes no parameters, got {sorted(params)}")
    if method == "absmean_ternary":
        return 2 + 16 / in_features
    if method == "sign_rowscale":
        return 1 + 16 / in_features
    raise ValueError(f"unknown method {method!r}: expected rtn, iwrtn, gptq, absmean_ternary "
                     "or sign_rowscale")
