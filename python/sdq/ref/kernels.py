"""Reference of the add-only inference path (gemv.h), written for clarity, not speed.

Same layout as the C++ core:
  * a layer's input is cut into blocks of `block_size` columns (the last may be shorter), each
    zero-padded to the next power of two `p_b` and resampled to `m_b = floor(p_b * osr + 0.5)`;
  * in a packed row, block b starts at code column `b * code_cols(0)`, where
    `code_cols(b) = ceil(m_b / 32) * 32` (a block starts on a 32-bit word);
  * codes are bitplanes of uint32 words, bit c % 32 of word c // 32, least significant bit first;
    binary: sign plane only (1 -> +1, 0 -> -1); ternary: nonzero plane and sign plane.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "block_geometry",
    "activation_transform_ref",
    "addonly_gemm_ref",
    "unpack_plane_ref",
    "pack_plane_ref",
]


def block_geometry(in_features: int, block_size: int, osr: float):
    """Per block (start, width, padded, m, code_offset); and total code columns of a row."""
    nb = -(-in_features // block_size)
    blocks = []
    cols0 = None
    for b in range(nb):
        start = b * block_size
        width = min(block_size, in_features - start)
        padded = 1 << max(0, (width - 1).bit_length())
        m = int(math.floor(padded * osr + 0.5))
        cols = -(-m // 32) * 32
        cols0 = cols if cols0 is None else cols0
        blocks.append((start, width, padded, m, b * cols0))
    total = 0 if nb == 0 else blocks[-1][4] + (-(-blocks[-1][3] // 32) * 32)
    return blocks, total


def _hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix, H[i, j] = (-1)^popcount(i & j)."""
    i = np.arange(n)
    bits = np.bitwise_and.outer(i, i)
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return np.where(parity == 1, -1.0, 1.0)


def activation_transform_ref(x, block_size, osr, signs, down_full, down_last):
    """xt, xsum for activations x [batch, in] (float64 result).

    signs: [block_size] of +-1, or None for no Hadamard rotation. A padded (short) last block uses
    the first `padded` signs. down_full / down_last: the down-sampler D of a full / the last block,
    [padded, m]. Per block: x' = H diag(signs) pad(x_b) / sqrt(padded); xt_b = D^T x';
    xsum_b = sum(x').
    """
    x = np.asarray(x, dtype=np.float64)
    batch, in_features = x.shape
    blocks, total = block_geometry(in_features, block_size, osr)
    xt = np.zeros((batch, total))
    xsum = np.zeros((batch, len(blocks)))
    for b, (start, width, padded, m, offset) in enumerate(blocks):
        xb = np.zeros((batch, padded))
        xb[:, :width] = x[:, start:start + width]
        if signs is not None:
            s = np.asarray(signs, dtype=np.float64)[:padded]
            xb = (xb * s) @ _hadamard(padded).T / math.sqrt(padded)
        down = np.asarray(down_last if b == len(blocks) - 1 else down_full, dtype=np.float64)
        assert down.shape == (padded, m), (down.shape, padded, m)
        xt[:, offset:offset + m] = xb @ down
        xsum[:, b] = xb.sum(axis=1)
    return xt, xsum


def unpack_plane_ref(words: np.ndarray, cols: int) -> np.ndarray:
    """[rows, words] uint32 -> [rows, cols] bits (uint8), least significant bit first."""
    w = np.asarray(words, dtype=np.uint32)
    bits = (w[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    return bits.reshape(w.shape[0], -1)[:, :cols].astype(np.uint8)


def pack_plane_ref(bits: np.ndarray) -> np.ndarray:
    """[rows, cols] of 0/1 -> [rows, ceil(cols / 32)] uint32, least significant bit first."""
    bits = np.asarray(bits, dtype=np.uint64)
    rows, cols = bits.shape
    nw = -(-cols // 32)
    padded = np.zeros((rows, nw * 32), dtype=np.uint64)
    padded[:, :cols] = bits
    weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
    return (padded.reshape(rows, nw, 32) * weights).sum(axis=2).astype(np.uint32)


def _half(a) -> np.ndarray:
    """uint16 fp16 bit patterns -> float64 values."""
    return np.asarray(a, dtype=np.uint16).view(np.float16).astype(np.float64)


def addonly_gemm_ref(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr):
    """y [batch, out] (float64) = sum_b S[r,b] <q_rb, xt_b> + MU[r,b] xsum_b.

    sign / nonzero: uint32 bitplanes [out, words] (nonzero None for binary codes in {-1, +1});
    scale / mean: uint16 fp16 bit patterns [out, num_blocks].
    """
    blocks, total = block_geometry(in_features, block_size, osr)
    s_bits = unpack_plane_ref(sign, total).astype(np.float64)
    if nonzero is None:
        codes = 2.0 * s_bits - 1.0
    else:
        codes = unpack_plane_ref(nonzero, total) * (2.0 * s_bits - 1.0)
    xt = np.asarray(xt, dtype=np.float64)
    xsum = np.asarray(xsum, dtype=np.float64)
    scale, mean = _half(scale), _half(mean)
    y = np.zeros((xt.shape[0], codes.shape[0]))
    for b, (_, _, _, m, offset) in enumerate(blocks):
        dots = xt[:, offset:offset + m] @ codes[:, offset:offset + m].T  # [batch, out]
        y += dots * scale[:, b] + np.outer(xsum[:, b], mean[:, b])
    return y
