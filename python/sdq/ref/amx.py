"""Reference of the AMX GEMMs (sdq/amx_gemm.h), written for clarity, not speed.

Independent of the C++ core: it starts from the sign bitplanes (not the packed tiles) and rounds
the activations and the scales by the same rules, so the compiled kernel agrees with it to float
rounding. Binary: blocks are grouped in spans of ``span = max(1, 512 // cols0)`` consecutive blocks
(cols0: a full block's code columns, its m rounded up to 32; the last span may be shorter), and
the scales are rounded as below ("scaled" codes). Ternary: every block is its own span and keeps
its scale, q = 1 and f = S (the kernel's ternary unpacking has no room for the multiply):

* per (token, span): ``amax`` = the largest |xt| over the span's code columns,
  ``inv = float32(127 / amax)``, ``a = clip(rint(xt * inv), -127, 127)`` (half to even),
  ``ascale = float32(amax / 127)``; a span with amax < 2**-120 (or NaN) gets a = 0, ascale = 0;
* per (row, span): ``smax`` = the largest |S| over the span's blocks, ``f = float32(smax / 127)``
  and per block ``q = clip(rint(S * float32(127 / smax)), -127, 127)``; f = q = 0 where
  smax < 2**-120;
* ``y[t, r] = sum_p (sum_k a[t, k] q[r, b(k)] c[r, k]) * ascale[t, p] * f[r, p]
  + sum_b MU[r, b] * xsum[t, b]``,
  binary c = +1 where the sign bit is set, else -1 (padding columns included: their xt is 0);
  ternary c = 0 where the nonzero bit is clear, else as binary (the kernel reads the same codes
  in trit5 form; how it lays them out does not change these sums).
"""
from __future__ import annotations

import numpy as np

from .kernels import block_geometry

__all__ = ["amx_activations_ref", "amx_gemm_binary_ref", "amx_gemm_ternary_ref",
           "amx_scales_ref", "amx_spans"]

_TINY = np.float32(2.0 ** -120)
_QMAX = np.float32(127.0)
_SPAN_COLS = 512


def _block_columns(in_features: int, block_size: int, osr: float):
    """[(first code column, code columns)] per block: m rounded up to 32, as the packed rows."""
    blocks, total = block_geometry(in_features, block_size, osr)
    cols0 = -(-blocks[0][3] // 32) * 32
    spans = [(offset, cols0 if b < len(blocks) - 1 else -(-m // 32) * 32)
             for b, (_, _, _, m, offset) in enumerate(blocks)]
    return spans, total


def amx_spans(in_features: int, block_size: int, osr: float, scaled: bool = True) -> list[range]:
    """The blocks of each span, in order (scaled: binary codes; else one block per span)."""
    columns, _ = _block_columns(in_features, block_size, osr)
    span = max(1, _SPAN_COLS // columns[0][1]) if scaled else 1
    return [range(b, min(b + span, len(columns))) for b in range(0, len(columns), span)]


def _round(v, largest):
    """(int8 values of v [.., n] by their row's largest |v|, float32 unit per row; 0 where the
    largest is below 2**-120 or NaN), the rule shared by activations and scales."""
    with np.errstate(invalid="ignore"):
        live = largest >= _TINY
    safe = np.where(live, largest, np.float32(1)).astype(np.float32)
    inv = np.where(live, _QMAX / safe, np.float32(0)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        q = np.rint(v * inv[:, None])
    q = np.clip(np.nan_to_num(q), -127, 127).astype(np.int8)
    return q, np.where(live, safe / _QMAX, np.float32(0)).astype(np.float32)


def amx_activations_ref(xt, in_features: int, block_size: int, osr: float, scaled: bool = True):
    """(a int8 [batch, cols], ascale float32 [batch, spans]) for xt [batch, cols]."""
    xt = np.asarray(xt, dtype=np.float32)
    columns, total = _block_columns(in_features, block_size, osr)
    assert xt.shape[1] == total, (xt.shape, total)
    a = np.zeros(xt.shape, dtype=np.int8)
    spans = amx_spans(in_features, block_size, osr, scaled)
    ascale = np.zeros((xt.shape[0], len(spans)), dtype=np.float32)
    for p, blocks in enumerate(spans):
        c0 = columns[blocks[0]][0]
        c1 = columns[blocks[-1]][0] + columns[blocks[-1]][1]
        with np.errstate(invalid="ignore"):
            amax = np.abs(xt[:, c0:c1]).max(axis=1)
        a[:, c0:c1], ascale[:, p] = _round(xt[:, c0:c1], amax)
    return a, ascale


def amx_scales_ref(scale, in_features: int, block_size: int, osr: float, scaled: bool = True):
    """(q int8 [out, num_blocks], f float32 [out, spans]) for the fp16 scales [out, num_blocks];
    not scaled: q = 1, f = S."""
    s = np.asarray(scale, dtype=np.uint16).view(np.float16).astype(np.float32)
    if not scaled:
        return np.ones(s.shape, dtype=np.int8), s
    spans = amx_spans(in_features, block_size, osr)
    q = np.zeros(s.shape, dtype=np.int8)
    f = np.zeros((s.shape[0], len(spans)), dtype=np.float32)
    for p, blocks in enumerate(spans):
        sb = s[:, blocks.start:blocks.stop]
        with np.errstate(invalid="ignore"):
            smax = np.abs(sb).max(axis=1)
        q[:, blocks.start:blocks.stop], f[:, p] = _round(sb, smax)
    return q, f


def _half(v) -> np.ndarray:
    return np.asarray(v, dtype=np.uint16).view(np.float16).astype(np.float64)


def _bits(plane) -> np.ndarray:
    plane = np.ascontiguousarray(plane, dtype="<u4")
    return np.unpackbits(plane.view(np.uint8).reshape(plane.shape[0], -1), axis=1,
                         bitorder="little")


def amx_gemm_binary_ref(sign, scale, mean, xt, xsum, in_features: int, block_size: int,
                        osr: float) -> np.ndarray:
    """y [batch, out] (float64) of the binary AMX kernel, from sign bitplanes [out, words]."""
    codes = np.where(_bits(sign), 1, -1).astype(np.int64)  # [out, cols]
    return _gemm(codes, scale, mean, xt, xsum, in_features, block_size, osr, scaled=True)


def amx_gemm_ternary_ref(sign, nonzero, scale, mean, xt, xsum, in_features: int,
                         block_size: int, osr: float) -> np.ndarray:
    """y [batch, out] (float64) of the ternary AMX kernel, from sign and nonzero bitplanes."""
    codes = (np.where(_bits(sign), 1, -1) * _bits(nonzero)).astype(np.int64)
    return _gemm(codes, scale, mean, xt, xsum, in_features, block_size, osr, scaled=False)


def _gemm(codes, scale, mean, xt, xsum, in_features, block_size, osr, scaled) -> np.ndarray:
    geometry = (in_features, block_size, osr)
    columns, _ = _block_columns(*geometry)
    a, ascale = amx_activations_ref(xt, *geometry, scaled)
    q, f = amx_scales_ref(scale, *geometry, scaled)
    xsum = np.asarray(xsum, dtype=np.float64)
    y = xsum @ _half(mean).T
    for p, blocks in enumerate(amx_spans(*geometry, scaled)):
        dots = 0
        for b in blocks:  # exact integer sums of the span
            c0, n = columns[b]
            weights = codes[:, c0:c0 + n] * q[:, b:b + 1].astype(np.int64)
            dots = dots + a[:, c0:c0 + n].astype(np.int64) @ weights.T
        y += dots * ascale[:, p:p + 1].astype(np.float64) * f[:, p].astype(np.float64)
    return y
