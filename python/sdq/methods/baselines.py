"""Data-free baselines (method.md section 3): RTN, BitNet-b1.58-style ternary, binary.

Each quantizer maps a weight W [out, in] (any float dtype) to the dequantized W_hat [out, in]
float32 that the stored format reproduces exactly: every scale and offset is rounded to fp16,
because fp16 is what the bit counts of `bits_all_in` pay for. GPTQ, the calibrated baseline,
is sdq.gptq.gptq_quantize; it shares RTN's grid.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gptq import check_bits, check_positive_int, uniform_grid, uniform_round
from ..validate import check_weight

__all__ = ["rtn", "absmean_ternary", "sign_rowscale", "bits_all_in"]


def rtn(W: Tensor, bits: int, group_size: int = 128) -> Tensor:
    """Round-to-nearest on an asymmetric min-max grid per row and group of input columns.

    Groups are `group_size` consecutive input columns; the last may be shorter. Each row-group
    has 2^bits levels between its min and max, with an fp16 scale and fp16 offset.
    """
    check_weight(W)
    check_bits(bits)
    check_positive_int(group_size, "group_size")
    W_hat = torch.empty(W.shape, dtype=torch.float32, device=W.device)
    for start in range(0, W.shape[1], group_size):
        group = W[:, start:start + group_size].float()
        scale, offset = uniform_grid(group, bits)
        W_hat[:, start:start + group_size] = uniform_round(group, scale, offset, bits)
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


def bits_all_in(method: str, in_features: int, **params: int) -> float:
    """Honest storage of a baseline, in bits per original weight, codes plus metadata.

    method: "rtn" or "gptq" (params: bits, group_size=128): bits + 32 * ceil(in / group) / in,
    i.e. bits + 32 / group_size when groups tile the row (fp16 scale and offset per group);
    "absmean_ternary": 2 + 16 / in; "sign_rowscale": 1 + 16 / in (one fp16 scale per row).
    """
    check_positive_int(in_features, "in_features")
    if method in ("rtn", "gptq"):
        bits = params.get("bits")
        check_bits(bits)
        group_size = params.get("group_size", 128)
        check_positive_int(group_size, "group_size")
        return bits + 32 * math.ceil(in_features / group_size) / in_features
    if params:
        raise ValueError(f"{method!r} takes no parameters, got {sorted(params)}")
    if method == "absmean_ternary":
        return 2 + 16 / in_features
    if method == "sign_rowscale":
        return 1 + 16 / in_features
    raise ValueError(f"unknown method {method!r}: expected rtn, gptq, absmean_ternary "
                     "or sign_rowscale")
