"""Reference of the binary int8 look-up kernel (sdq/lut_gemm.h), written for clarity, not speed.

Independent of the C++ core: it starts from the sign bitplanes (not the packed tiles) and rounds
the tables by the same rule, so the compiled kernels agree with it to float rounding:

* code columns are cut into groups of 4; for token t and group g, with x_j = xt[t, 4g + j], entry
  i of the group's table is ``((s0 x0 + s1 x1) + s2 x2) + s3 x3`` in float32, s_j = +1 when bit j
  of i is set, else -1;
* per (token, block): ``amax`` = the largest |entry| of the block, ``inv = float32(127 / amax)``,
  ``q = clip(rint(entry * inv), -127, 127)`` (half to even), ``tscale = float32(amax / 127)``;
  a block with amax < 2**-120 gets q = 0 and tscale = 0;
* ``y[t, r] = sum_b (sum_g q[t, g, nibble(r, g)]) * tscale[t, b] * S[r, b] + MU[r, b] * xsum[t, b]``.
"""
from __future__ import annotations

import numpy as np

from .kernels import block_geometry

__all__ = ["LUT_TILE_ROWS", "lut_pack_binary_ref", "lut_tables_ref", "lut_gemm_binary_ref"]

LUT_TILE_ROWS = 32
_TINY_AMAX = np.float32(2.0 ** -120)
_QMAX = np.float32(127.0)


def lut_pack_binary_ref(sign: np.ndarray) -> np.ndarray:
    """Packed tiles (uint8, 1-D) of sign bitplanes [out, words]: byte p * 32 + i of tile k is
    byte p (little-endian) of row 32 k + i; rows past out are zero."""
    sign = np.ascontiguousarray(sign, dtype="<u4")
    out, words = sign.shape
    tiles = -(-out // LUT_TILE_ROWS)
    rows = np.zeros((tiles * LUT_TILE_ROWS, words * 4), dtype=np.uint8)
    rows[:out] = sign.view(np.uint8).reshape(out, words * 4)
    return rows.reshape(tiles, LUT_TILE_ROWS, words * 4).transpose(0, 2, 1).reshape(-1).copy()


def _entries(xt: np.ndarray) -> np.ndarray:
    """float32 [batch, groups, 16] table entries of xt [batch, cols] (cols a multiple of 4)."""
    x = np.asarray(xt, dtype=np.float32).reshape(xt.shape[0], -1, 4)
    i = np.arange(16)
    signs = np.where((i[:, None] >> np.arange(4)) & 1, np.float32(1), np.float32(-1))  # [16, 4]
    t = x[:, :, None, :] * signs.astype(np.float32)  # exact: sign flips
    return ((t[..., 0] + t[..., 1]) + t[..., 2]) + t[..., 3]


def lut_tables_ref(xt, in_features: int, block_size: int, osr: float):
    """(q int8 [batch, groups, 16], tscale float32 [batch, num_blocks]) for xt [batch, cols]."""
    xt = np.asarray(xt, dtype=np.float32)
    blocks, total = block_geometry(in_features, block_size, osr)
    assert xt.shape[1] == total, (xt.shape, total)
    e = _entries(xt)
    q = np.zeros(e.shape, dtype=np.int8)
    tscale = np.zeros((xt.shape[0], len(blocks)), dtype=np.float32)
    cols0 = -(-blocks[0][3] // 32) * 32
    for b, (_, _, _, m, offset) in enumerate(blocks):
        g0, g1 = offset // 4, offset // 4 + (-(-m // 32) * 32 if b == len(blocks) - 1 else cols0) // 4
        eb = e[:, g0:g1]
        amax = np.abs(eb).max(axis=(1, 2))
        live = amax >= _TINY_AMAX
        safe = np.where(live, amax, np.float32(1))
        inv = np.where(live, _QMAX / safe, np.float32(0)).astype(np.float32)
        qb = np.rint(eb * inv[:, None, None])
        q[:, g0:g1] = np.clip(qb, -127, 127).astype(np.int8)
        tscale[:, b] = np.where(live, safe / _QMAX, np.float32(0))
    return q, tscale


def _half(a) -> np.ndarray:
    return np.asarray(a, dtype=np.uint16).view(np.float16).astype(np.float64)


def lut_gemm_binary_ref(sign, scale, mean, xt, xsum, in_features: int, block_size: int,
                        osr: float) -> np.ndarray:
    """y [batch, out] (float64) of the int8 look-up kernel, from sign bitplanes [out, words]."""
    blocks, total = block_geometry(in_features, block_size, osr)
    q, tscale = lut_tables_ref(xt, in_features, block_size, osr)
    sign = np.ascontiguousarray(sign, dtype="<u4")
    out = sign.shape[0]
    nibbles = (sign.view(np.uint8).reshape(out, -1, 1) >> np.array([0, 4], np.uint8)) & 15
    nibbles = nibbles.reshape(out, -1).astype(np.intp)  # [out, groups]
    groups = nibbles.shape[1]
    scale, mean = _half(scale), _half(mean)
    xsum = np.asarray(xsum, dtype=np.float64)
    y = np.zeros((xt.shape[0], out))
    cols0 = -(-blocks[0][3] // 32) * 32
    for t in range(xt.shape[0]):
        looked = q[t, np.arange(groups)[None, :], nibbles].astype(np.int64)  # [out, groups]
        for b, (_, _, _, m, offset) in enumerate(blocks):
            g0 = offset // 4
            g1 = g0 + (-(-m // 32) * 32 if b == len(blocks) - 1 else cols0) // 4
            acc = looked[:, g0:g1].sum(axis=1)
            y[t] += acc * float(tscale[t, b]) * scale[:, b] + mean[:, b] * xsum[t, b]
    return y
