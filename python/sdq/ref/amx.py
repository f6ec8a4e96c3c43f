"""Reference of the AMX GEMMs (sdq/amx_gemm.h), written for clarity, not speed.

Independent of the C++ core: it starts from the sign bitplanes (not the packed tiles) and rounds
the activations by the same rule, so the compiled kernel agrees with it to float rounding:

* per (token, block): ``amax`` = the largest |xt| over the block's code columns,
  ``inv = float32(127 / amax)``, ``a = clip(rint(xt * inv), -127, 127)`` (half to even),
  ``ascale = float32(amax / 127)``; a block with amax < 2**-120 (or NaN) gets a = 0, ascale = 0;
* ``y[t, r] = sum_b (sum_k a[t, k] c[r, k]) * ascale[t, b] * S[r, b] + MU[r, b] * xsum[t, b]``,
  binary c = +1 where the sign bit is set, else -1 (padding columns included: their xt is 0);
  ternary c = 0 where the nonzero bit is clear, else as binary (the kernel reads the same codes
  in trit5 form; how it lays them out does not change these sums).
"""
from __future__ import annotations

import numpy as np

from .kernels import block_geometry

__all__ = ["amx_activations_ref", "amx_gemm_binary_ref", "amx_gemm_ternary_ref"]

_TINY_AMAX = np.float32(2.0 ** -120)
_QMAX = np.float32(127.0)


def _block_columns(in_features: int, block_size: int, osr: float):
    """[(first code column, code columns)] per block: m rounded up to 32, as the packed rows."""
    blocks, total = block_geometry(in_features, block_size, osr)
    cols0 = -(-blocks[0][3] // 32) * 32
    spans = [(offset, cols0 if b < len(blocks) - 1 else -(-m // 32) * 32)
             for b, (_, _, _, m, offset) in enumerate(blocks)]
    return spans, total


def amx_activations_ref(xt, in_features: int, block_size: int, osr: float):
    """(a int8 [batch, cols], ascale float32 [batch, num_blocks]) for xt [batch, cols]."""
    xt = np.asarray(xt, dtype=np.float32)
    spans, total = _block_columns(in_features, block_size, osr)
    assert xt.shape[1] == total, (xt.shape, total)
    a = np.zeros(xt.shape, dtype=np.int8)
    ascale = np.zeros((xt.shape[0], len(spans)), dtype=np.float32)
    for b, (c0, n) in enumerate(spans):
        xb = xt[:, c0:c0 + n]
        with np.errstate(invalid="ignore"):
            amax = np.abs(xb).max(axis=1)
            live = amax >= _TINY_AMAX
        safe = np.where(live, amax, np.float32(1))
        inv = np.where(live, _QMAX / safe, np.float32(0)).astype(np.float32)
        with np.errstate(invalid="ignore"):
            qb = np.rint(xb * inv[:, None])
        a[:, c0:c0 + n] = np.clip(np.nan_to_num(qb), -127, 127).astype(np.int8)
        ascale[:, b] = np.where(live, safe / _QMAX, np.float32(0))
    return a, ascale


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
    return _gemm(codes, scale, mean, xt, xsum, in_features, block_size, osr)


def amx_gemm_ternary_ref(sign, nonzero, scale, mean, xt, xsum, in_features: int,
                         block_size: int, osr: float) -> np.ndarray:
    """y [batch, out] (float64) of the ternary AMX kernel, from sign and nonzero bitplanes."""
    codes = (np.where(_bits(sign), 1, -1) * _bits(nonzero)).astype(np.int64)
    return _gemm(codes, scale, mean, xt, xsum, in_features, block_size, osr)


def _gemm(codes, scale, mean, xt, xsum, in_features, block_size, osr) -> np.ndarray:
    spans, _ = _block_columns(in_features, block_size, osr)
    a, ascale = amx_activations_ref(xt, in_features, block_size, osr)
    out = codes.shape[0]
    scale, mean = _half(scale), _half(mean)
    xsum = np.asarray(xsum, dtype=np.float64)
    y = np.zeros((xt.shape[0], out))
    for b, (c0, n) in enumerate(spans):
        dots = a[:, c0:c0 + n].astype(np.int64) @ codes[:, c0:c0 + n].T  # exact
        y += dots * ascale[:, b:b + 1].astype(np.float64) * scale[:, b] + mean[:, b] * xsum[:, b:b + 1]
    return y
