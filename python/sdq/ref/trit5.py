"""NumPy twin of the trit5 packing (docs/format.md, "Ternary codes: trit5"), written from the text.

Three ternary codes (t0, t1, t2) make one base-3 value v = 9 (t0+1) + 3 (t1+1) + (t2+1) in
[0, 26], stored as idx = |v - 13| (4 bits, two groups per byte) and neg = v < 13 (1 bit, 32 rows
per uint32 word): 5 bits per 3 codes. Rows go in tiles of 32; within a row, block b's m_b codes
make ceil(m_b / 3) groups, rounded up to an even count, numbered from b * GP_0.

The layout is derived here on its own (sdq.ref.core.block_layout_ref), not from the package, so
that the tests compare two independent readings of the format.
"""
from __future__ import annotations

import numpy as np

from .core import block_layout_ref

__all__ = ["groups", "pack", "unpack"]

TILE = 32  # rows per tile: one trit_signs word holds one bit per row


def _even_groups(m: int) -> int:
    """GP: ceil(m / 3) groups of three codes, rounded up to an even count (two per byte)."""
    g = -(-m // 3)
    return g + g % 2


def groups(in_features, block_size, osr):
    """(per block: (code_offset, m, group_offset, groups G), total_groups)."""
    lay = block_layout_ref(in_features, block_size, osr)
    gp0 = _even_groups(lay[0][3])
    per_block = [(offset, m, b * gp0, -(-m // 3)) for b, (_, _, _, m, offset) in enumerate(lay)]
    total = (len(lay) - 1) * gp0 + _even_groups(lay[-1][3])
    return per_block, total


def pack(codes, in_features, block_size, osr):
    """int8 codes [out, total_code_cols] in {-1, 0, +1} -> (trits uint8 [tiles, total_groups / 2,
    32], trit_signs uint32 [tiles, total_groups])."""
    codes = np.asarray(codes, dtype=np.int64)
    out = codes.shape[0]
    per_block, total = groups(in_features, block_size, osr)
    tiles = -(-out // TILE)
    v = np.full((tiles * TILE, total), 13, dtype=np.int64)  # 13: three zero codes (padding)
    for offset, m, g0, g in per_block:
        t = np.zeros((out, 3 * g), dtype=np.int64)
        t[:, :m] = codes[:, offset: offset + m]
        t = t.reshape(out, g, 3) + 1
        v[:out, g0: g0 + g] = 9 * t[..., 0] + 3 * t[..., 1] + t[..., 2]
    idx = np.abs(v - 13).reshape(tiles, TILE, total // 2, 2)
    trits = (idx[..., 0] | idx[..., 1] << 4).transpose(0, 2, 1).astype(np.uint8)
    neg = (v < 13).reshape(tiles, TILE, total).astype(np.uint64)
    words = (neg << np.arange(TILE, dtype=np.uint64)[None, :, None]).sum(axis=1)
    return np.ascontiguousarray(trits), words.astype(np.uint32)


def unpack(trits, trit_signs, out_features, in_features, block_size, osr):
    """Inverse of pack: int8 codes [out, total_code_cols] (block padding columns 0)."""
    per_block, total = groups(in_features, block_size, osr)
    trits = np.asarray(trits).astype(np.int64)
    tiles = trits.shape[0]
    nib = np.stack([trits & 15, trits >> 4], axis=-1)               # [tiles, P, 32, 2]
    idx = nib.transpose(0, 2, 1, 3).reshape(tiles * TILE, total)
    signs = np.asarray(trit_signs).astype(np.uint32).astype(np.int64)  # [tiles, total]
    neg = (signs[:, None, :] >> np.arange(TILE)[None, :, None]) & 1   # [tiles, 32, total]
    neg = neg.reshape(tiles * TILE, total)
    w = 13 + idx
    t = np.stack([w // 9 - 1, (w // 3) % 3 - 1, w % 3 - 1], axis=-1)  # [rows, total, 3]
    t = np.where(neg[..., None] == 1, -t, t)[:out_features]
    cols = per_block[-1][0] + -(-per_block[-1][1] // 32) * 32
    codes = np.zeros((out_features, cols), dtype=np.int8)
    for offset, m, g0, g in per_block:
        codes[:, offset: offset + m] = t[:, g0: g0 + g].reshape(out_features, 3 * g)[:, :m]
    return codes
