"""Plain NumPy references of the core routines and of the data-free SDQ quantizer (method.md 1-5).

Written for clarity, not speed: the tests hold the compiled core and `sdq.quantize_weight` to
these. Nothing in the package imports this module at run time.
"""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "sigma_delta_ref", "sigma_delta_columnwise_ref", "fwht_ref", "sylvester_butterflies",
    "hadamard_matrix",
    "resample_ref", "pack_ref", "unpack_ref", "block_layout_ref", "quantile_ref",
    "quantize_weight_ref", "quantize_weight_columnwise_ref", "dequantize_ref",
]


def sigma_delta_ref(z, tau=None, order=1, levels="ternary"):
    """One chain at a time, one sample at a time: the modulator exactly as method.md writes it."""
    z = np.asarray(z, dtype=np.float32)
    codes = np.zeros(z.shape, dtype=np.int8)
    for r in range(z.shape[0]):
        v1 = v2 = q = np.float32(0)
        t = np.float32(tau[r]) if levels == "ternary" else None
        for n in range(z.shape[1]):
            v1 = np.float32(v1 + np.float32(z[r, n] - q))
            v = v1
            if order == 2:
                v2 = np.float32(v2 + np.float32(v1 - q))
                v = v2
            if levels == "ternary":
                q = np.float32(1 if v >= t else (-1 if v <= -t else 0))
            else:
                q = np.float32(1 if v > 0 else -1)
            codes[r, n] = int(q)
    return codes


def sigma_delta_columnwise_ref(z, tau=None, order=1, levels="ternary"):
    """The research code's approach: a Python loop over columns, all rows at once in NumPy.

    Same arithmetic as sigma_delta_ref (float32, same operation order), so codes are identical.
    """
    z = np.asarray(z, dtype=np.float32)
    rows, m = z.shape
    v1 = np.zeros(rows, np.float32)
    v2 = np.zeros(rows, np.float32)
    q = np.zeros(rows, np.float32)
    t = None if levels != "ternary" else np.asarray(tau, np.float32)
    codes = np.empty((rows, m), np.int8)
    for n in range(m):
        v1 += z[:, n] - q
        v = v1
        if order == 2:
            v2 += v1 - q
            v = v2
        if levels == "ternary":
            q = np.where(v >= t, 1, np.where(v <= -t, -1, 0)).astype(np.float32)
        else:
            q = np.where(v > 0, 1, -1).astype(np.float32)
        codes[:, n] = q
    return codes


@functools.lru_cache(maxsize=4)
def hadamard_matrix(n):
    """Sylvester Hadamard matrix H[i, j] = (-1)^popcount(i & j)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:  # Sylvester: H_2k = [[H_k, H_k], [H_k, -H_k]]
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def sylvester_butterflies(y):
    """Rows of y times the unnormalised Hadamard matrix, stage by stage (h = 1, 2, ...: each pair
    of half-blocks u, v becomes u + v, u - v), in y's own dtype: float64 for fwht_ref; float32
    gives the core's roundings exactly (its FWHT adds in this order)."""
    rows, n = y.shape
    h = 1
    while h < n:
        pairs = y.reshape(rows, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = np.stack([a + b, a - b], axis=2).reshape(rows, n)
        h *= 2
    return y


def fwht_ref(x, signs=None, inverse=False):
    """Rows of x: forward H diag(s) x / sqrt(n); inverse diag(s) H x / sqrt(n), in float64.

    Uses the Sylvester recursion H_2h = [[H_h, H_h], [H_h, -H_h]] on pairs of half-blocks (equal
    to hadamard_matrix(n) @ x; tested).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[1]
    s = np.ones(n) if signs is None else np.asarray(signs, np.float64)
    y = sylvester_butterflies(x if inverse else x * s) / math.sqrt(n)
    return y * s if inverse else y


def resample_ref(x, n_out):
    """scipy.signal.resample along the last axis, re-derived with numpy.fft."""
    x = np.asarray(x, dtype=np.float64)
    n_in = x.shape[-1]
    spec = np.fft.rfft(x, axis=-1)
    out = np.zeros(x.shape[:-1] + (n_out // 2 + 1,), dtype=complex)
    common = min(n_in, n_out)
    out[..., : common // 2 + 1] = spec[..., : common // 2 + 1]
    if common % 2 == 0 and n_in != n_out:
        out[..., common // 2] *= 2.0 if n_out < n_in else 0.5
    return np.fft.irfft(out, n_out, axis=-1) * (n_out / n_in)


def pack_ref(codes, levels):
    """int8 codes [rows, cols] -> (sign, nonzero|None) uint32 [rows, ceil(cols/32)], LSB first."""
    codes = np.asarray(codes)
    rows, cols = codes.shape
    words = (cols + 31) // 32
    sign = np.zeros((rows, words), np.uint64)
    nz = np.zeros((rows, words), np.uint64)
    for c in range(cols):
        sign[:, c // 32] |= (codes[:, c] > 0).astype(np.uint64) << np.uint64(c % 32)
        nz[:, c // 32] |= (codes[:, c] != 0).astype(np.uint64) << np.uint64(c % 32)
    return sign.astype(np.uint32), (nz.astype(np.uint32) if levels == "ternary" else None)


def unpack_ref(sign, nonzero, cols):
    """Inverse of pack_ref."""
    c = np.arange(cols)
    s = (sign[:, c // 32] >> (c % 32).astype(np.uint32)) & 1
    codes = np.where(s == 1, 1, -1)
    if nonzero is not None:
        nz = (nonzero[:, c // 32] >> (c % 32).astype(np.uint32)) & 1
        codes = codes * nz
    return codes.astype(np.int8)


def block_layout_ref(in_features, block_size, osr):
    """List of (start, width, padded, m, code_offset) per block, as layout.h defines them."""
    blocks, offset = [], 0
    for start in range(0, in_features, block_size):
        width = min(block_size, in_features - start)
        padded = 1 << (width - 1).bit_length()
        m = int(math.floor(padded * osr + 0.5))
        blocks.append((start, width, padded, m, offset))
        offset += -(-m // 32) * 32
    return blocks


def quantile_ref(a, p):
    """numpy's default ('linear') quantile along the last axis."""
    return np.quantile(a, p, axis=-1)


def _encode_rows_ref(wb, m, levels, order, hadamard, signs, sd_scale, p_scale, p_cut, modulator):
    """Steps 1-4 on padded row-blocks wb [rows, padded] (float64): (codes, scale, mean)."""
    if hadamard:
        wb = fwht_ref(wb, signs[:wb.shape[1]])
    u = resample_ref(wb, m)
    mu = u.mean(axis=1).astype(np.float16)
    s = (quantile_ref(np.abs(u - mu.astype(np.float64)[:, None]), p_scale) * sd_scale)
    s = s.astype(np.float16)
    s_safe = np.where(s.astype(np.float64) > 0, s.astype(np.float64), 1.0)
    z = ((u - mu.astype(np.float64)[:, None]) / s_safe[:, None]).astype(np.float32)
    tau = quantile_ref(np.abs(z.astype(np.float64)), p_cut).astype(np.float32)
    return modulator(z, tau, order, levels), s, mu


def quantize_weight_ref(W, osr, levels="ternary", order=1, block_size=128, hadamard=True,
                        signs=None, sd_scale=0.95, p_scale=0.93, p_cut=0.55):
    """method.md steps 1-5 for one weight matrix, per row-block.

    Returns a dict: codes (list of int8 [out, m] per block), scale and mean (float16 [out, nb]),
    signs. The scale and mean are rounded to fp16 before normalising, exactly as stored.
    """
    W = np.asarray(W, dtype=np.float64)
    out = W.shape[0]
    if signs is None:
        signs = np.ones(block_size)
    codes, scales, means = [], [], []
    for start, width, padded, m, _ in block_layout_ref(W.shape[1], block_size, osr):
        wb = np.zeros((out, padded))
        wb[:, :width] = W[:, start:start + width]
        c, s, mu = _encode_rows_ref(wb, m, levels, order, hadamard, signs, sd_scale, p_scale,
                                    p_cut, sigma_delta_ref)
        codes.append(c)
        scales.append(s)
        means.append(mu)
    return {"codes": codes, "scale": np.stack(scales, 1), "mean": np.stack(means, 1),
            "signs": np.asarray(signs)}


def quantize_weight_columnwise_ref(W, osr, levels="ternary", order=1, block_size=128,
                                   hadamard=True, signs=None, sd_scale=0.95, p_scale=0.93,
                                   p_cut=0.55):
    """quantize_weight_ref as research code would write it in NumPy, for speed comparisons.

    The same arithmetic (so the same result), but every block of one geometry at once: one
    rotation, one FFT resampling and one pair of quantiles over all row-blocks, and the modulator
    as a Python loop over columns with all chains in NumPy (sigma_delta_columnwise_ref).
    """
    W = np.asarray(W, dtype=np.float64)
    out = W.shape[0]
    if signs is None:
        signs = np.ones(block_size)
    layout = block_layout_ref(W.shape[1], block_size, osr)
    full = [b for b in layout if b[1] == block_size]
    groups = ([full] if full else []) + ([[layout[-1]]] if layout[-1][1] < block_size else [])
    codes, scales, means = [], [], []
    for group in groups:
        _, width, padded, m, _ = group[0]
        wb = np.zeros((out, len(group), padded))
        wb[:, :, :width] = W[:, group[0][0]:group[-1][0] + width].reshape(out, len(group), width)
        c, s, mu = _encode_rows_ref(wb.reshape(-1, padded), m, levels, order, hadamard, signs,
                                    sd_scale, p_scale, p_cut, sigma_delta_columnwise_ref)
        codes += list(c.reshape(out, len(group), m).transpose(1, 0, 2))
        scales.append(s.reshape(out, len(group)))
        means.append(mu.reshape(out, len(group)))
    return {"codes": codes, "scale": np.concatenate(scales, 1),
            "mean": np.concatenate(means, 1), "signs": np.asarray(signs)}


def dequantize_ref(q, in_features, osr, block_size=128, hadamard=True):
    """method.md step 5: W_hat_b = (s * D(q) + mu) @ Hb^T, blocks cropped to their width."""
    blocks = block_layout_ref(in_features, block_size, osr)
    out = q["scale"].shape[0]
    W = np.zeros((out, in_features))
    for b, (start, width, padded, m, _) in enumerate(blocks):
        s = q["scale"][:, b].astype(np.float64)[:, None]
        mu = q["mean"][:, b].astype(np.float64)[:, None]
        wb = s * resample_ref(q["codes"][b].astype(np.float64), padded) + mu
        if hadamard:
            wb = fwht_ref(wb, q["signs"][:padded], inverse=True)
        W[:, start:start + width] = wb[:, :width]
    return W
