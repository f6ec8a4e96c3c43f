"""The two add-only ops written in plain torch: any device, any float dtype, differentiable.

The compiled kernels (sdq._core, CPU and CUDA) compute the forward in float32 with fp16 scales.
This module is what the ops fall back to for other dtypes (float64 for gradcheck, float32 master
copies of scale and mean while tuning them) and devices without kernels, and it holds the
backward formulas of both ops. Both ops are linear maps, so their backward is exact:

  activation_transform, per block b of x (zero-padded to `padded`):
      v = x_b R            R = diag(signs) H / sqrt(padded)   (the core's forward FWHT, fwht.h)
      xt_b = v D           D = down [padded, m]                (code columns beyond m are zero)
      xsum_b = v 1
  addonly_gemm, per row o and block b:
      y[t, o] = sum_b scale[o, b] * (q_ob . xt_tb) + mean[o, b] * xsum[t, b]
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import blocks

_BITS = 32


def unpack_codes(sign: Tensor, nonzero: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Bitplanes [out, words] (int32 words, bit c % 32 of word c // 32) -> codes [out, 32 * words].

    Binary: bit 1 -> +1, bit 0 -> -1 (padding columns read -1 and meet zero activations);
    ternary: nonzero 0 -> 0, else +1 / -1 by the sign bit (cpp/include/sdq/bitplane.h).
    """
    plus_minus = unpack_bits(sign).to(dtype) * 2 - 1
    return plus_minus if nonzero is None else plus_minus * unpack_bits(nonzero).to(dtype)


def unpack_bits(words: Tensor, cols: int | None = None) -> Tensor:
    """int32 words [..., words] -> int32 bits [..., cols] (all 32 * words without cols), bit c % 32
    of word c // 32; any device."""
    shifts = torch.arange(_BITS, device=words.device, dtype=torch.int32)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).flatten(-2)
    return bits if cols is None else bits[..., :cols]


def _hadamard(n: int, like: Tensor) -> Tensor:
    """Sylvester-ordered H [n, n] (H[i, j] = (-1)^popcount(i & j)) like `like`. Built per call, not
    cached: a cached tensor would leak out of torch.compile's fake-tensor tracing."""
    h = torch.ones(1, 1, dtype=like.dtype, device=like.device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _rotation(signs: Tensor | None, padded: int, like: Tensor) -> Tensor:
    """R [padded, padded] with rows v -> v R equal to the core's forward FWHT of v."""
    if signs is None:
        return torch.eye(padded, dtype=like.dtype, device=like.device)
    h = _hadamard(padded, like) / padded ** 0.5
    return signs[:padded].to(like.dtype)[:, None] * h


def _maps(g: blocks.BlockGroup, signs: Tensor | None, down: Tensor, like: Tensor):
    """(P [padded, m], r [padded]): xt_b = x_b P and xsum_b = x_b r for blocks of group g."""
    rot = _rotation(signs, g.padded, like)
    return rot @ down.to(device=like.device, dtype=like.dtype), rot.sum(1)


def _group_maps(in_features, block_size, osr, signs, down_full, down_last, like):
    groups = blocks.block_groups(in_features, block_size, osr)
    downs = [down_full] * (len(groups) - 1) + [down_last]
    return [(g, *_maps(g, signs, d, like)) for g, d in zip(groups, downs)]


def activation_transform(x: Tensor, signs, down_full, down_last, in_features: int,
                         block_size: int, osr: float) -> tuple[Tensor, Tensor]:
    """xt [batch, total_code_cols], xsum [batch, num_blocks] in x's dtype (see module doc)."""
    cols, nb = blocks.packed_shape(in_features, block_size, osr)
    batch = x.shape[0]
    xt, xsum = x.new_zeros(batch, cols), x.new_empty(batch, nb)
    for g, P, r in _group_maps(in_features, block_size, osr, signs, down_full, down_last, x):
        xb = _gather(x, g)                                          # [batch, count, padded]
        xt_view(xt, g)[:, :, : g.m] = xb @ P
        xsum[:, g.first: g.first + g.count] = xb @ r
    return xt, xsum


def activation_transform_backward(grad_xt: Tensor, grad_xsum: Tensor, signs, down_full,
                                  down_last, in_features: int, block_size: int,
                                  osr: float) -> Tensor:
    """d loss / d x [batch, in] from the gradients of xt and xsum (the transposed maps)."""
    grad_x = grad_xt.new_zeros(grad_xt.shape[0], in_features)
    for g, P, r in _group_maps(in_features, block_size, osr, signs, down_full, down_last,
                               grad_xt):
        gv = xt_view(grad_xt, g)[:, :, : g.m] @ P.T                 # [batch, count, padded]
        gv = gv + grad_xsum[:, g.first: g.first + g.count, None] * r
        cols = gv[:, :, : g.width].reshape(grad_x.shape[0], g.count * g.width)
        grad_x[:, g.start: g.start + g.count * g.width] = cols
    return grad_x


def addonly_gemm(sign, nonzero, scale, mean, xt: Tensor, xsum: Tensor, in_features: int,
                 block_size: int, osr: float) -> Tensor:
    """y [batch, out] in the promoted dtype of xt and float32 (see module doc)."""
    dt = torch.promote_types(xt.dtype, torch.float32)
    q = unpack_codes(sign, nonzero, dt)
    s, mu, xt, xsum = scale.to(dt), mean.to(dt), xt.to(dt), xsum.to(dt)
    y = xsum @ mu.T
    for g in blocks.block_groups(in_features, block_size, osr):
        part = torch.einsum("tbc,obc->tob", xt_view(xt, g), xt_view(q, g))  # [batch, out, count]
        y = y + (part * s[:, g.first: g.first + g.count]).sum(-1)
    return y


def addonly_gemm_backward(grad_y: Tensor, sign, nonzero, scale, mean, xt: Tensor, xsum: Tensor,
                          in_features: int, block_size: int, osr: float, needs: tuple):
    """Gradients (scale, mean, xt, xsum) of addonly_gemm; None where `needs` says not needed."""
    dt = grad_y.dtype
    q = unpack_codes(sign, nonzero, dt)
    s = scale.to(dt)
    groups = blocks.block_groups(in_features, block_size, osr)
    grad_scale = grad_mean = grad_xt = grad_xsum = None
    if needs[0]:
        per_code = grad_y.T @ xt.to(dt) * q                        # [out, cols]
        grad_scale = torch.cat([xt_view(per_code, g).sum(-1) for g in groups], 1)
        grad_scale = grad_scale.to(scale.dtype)
    if needs[1]:
        grad_mean = (grad_y.T @ xsum.to(dt)).to(mean.dtype)
    if needs[2]:
        grad_xt = grad_y.new_zeros(xt.shape)
        for g in groups:
            gs = grad_y[:, :, None] * s[:, g.first: g.first + g.count]   # [batch, out, count]
            xt_view(grad_xt, g)[:] = torch.einsum("tob,obc->tbc", gs, xt_view(q, g))
        grad_xt = grad_xt.to(xt.dtype)
    if needs[3]:
        grad_xsum = (grad_y @ mean.to(dt)).to(xsum.dtype)
    return grad_scale, grad_mean, grad_xt, grad_xsum


def xt_view(t: Tensor, g: blocks.BlockGroup) -> Tensor:
    """The code columns of group g in a [rows, total_code_cols] tensor, as [rows, count, code_cols]."""
    part = t[:, g.code_offset: g.code_offset + g.count * g.code_cols]
    return part.unflatten(1, (g.count, g.code_cols))


def _gather(x: Tensor, g: blocks.BlockGroup) -> Tensor:
    """The blocks of group g in x [batch, in], zero-padded: [batch, count, padded]."""
    xb = x[:, g.start: g.start + g.count * g.width].unflatten(1, (g.count, g.width))
    return torch.nn.functional.pad(xb, (0, g.padded - g.width))
