"""Dynamic-grouping binary quantization (arXiv 2509.03054, "WGM"; shared docs/method.md section 2).

Per weight matrix, no calibration: sort |w|, partition the sorted sequence into G contiguous groups
minimising sum over groups [|G| Var(|w| in G) + lambda / |G|] (sdq._core.wgm_partition), and
reconstruct each weight as sign(w) * mean(|w| in its group). Block mode does the same on every
64 consecutive weights of a row on its own (G scales per block).

Zeros: |0| sorts first, so zero weights fall in the lowest-magnitude group(s) and are stored with
sign +1; they are reconstructed as +scale of that group (0 when the group holds only zeros).

Honest storage (WGMWeight): 1 sign bit + ceil(log2 G) index bits per weight + 16 bits per fp16
scale (G per matrix, or G per 64-weight block). At G = 32 per matrix that is about 6 bits/weight,
not the ~1.007 of the paper's first version, which did not count the indices.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .._native import core
from ..config import ConfigIO
from ..validate import as_weight_matrix
from ..wgm_weight import BLOCK, WGMWeight, index_bits, pack_bits

MAX_GROUPS = 256  # an index then fits in a byte (8 bit planes)
PARTITION_METHODS = ("greedy", "windowed", "dp")
FP16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class WGMConfig(ConfigIO):
    """How one weight matrix is quantized by dynamic grouping.

    groups:     G, 1 <= G <= 256 groups (scales) per matrix, or per 64-weight block.
    window:     windowed greedy: sorted values start in windows of this many (default 512).
    lam:        lambda of the cost |G| Var + lambda / |G| (finite, >= 0; the paper's 0.75).
    block_mode: partition each 64 consecutive weights of a row on its own (G scales per block).
    method:     partition algorithm of the core: "greedy" (default: from single weights),
                "windowed" (the paper's, from windows of `window` sorted weights), "dp" (exact,
                O(G n^2): small inputs only). Windowed groups never split a window, so on a
                whole matrix its top group holds the 512 largest |w| together and clips the
                outliers; greedy keeps them, at more partition time (whole default model: 35 s vs
                0.15 s on one thread, bench/wgm.py).
                On SmolLM2-135M at G = 32: perplexity 25.2 greedy, 1.6e4 windowed
                (bench/quality.py, the wgm-* rows), hence the default.
    """

    groups: int = 32
    window: int = 512
    lam: float = 0.75
    block_mode: bool = False
    method: str = "greedy"
    version: int = 1

    def __post_init__(self):
        g = self.groups
        if isinstance(g, bool) or not isinstance(g, int):
            raise TypeError(f"groups must be an int, got {type(g).__name__}")
        if not 1 <= g <= MAX_GROUPS:
            raise ValueError(f"groups must be in [1, {MAX_GROUPS}], got {g}")
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window must be an int, got {type(w).__name__}")
        if w < 1:
            raise ValueError(f"window must be >= 1, got {w}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)):
            raise TypeError(f"lam must be a number, got {type(self.lam).__name__}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be finite and >= 0, got {self.lam}")
        object.__setattr__(self, "lam", float(self.lam))
        if not isinstance(self.block_mode, bool):
            raise TypeError(f"block_mode must be a bool, got {self.block_mode!r}")
        if self.method not in PARTITION_METHODS:
            raise ValueError(f"method must be one of {PARTITION_METHODS}, got {self.method!r}")
        if self.version != 1:
            raise ValueError(f"WGMConfig version {self.version!r} is not supported (1)")

    @property
    def index_bits(self) -> int:
        return index_bits(self.groups)


def quantize_weight_wgm(W, config: WGMConfig | None = None) -> WGMWeight:
    """Quantize one weight W [out, in] (torch tensor or NumPy array, finite) to a WGMWeight."""
    config = WGMConfig() if config is None else config
    if not isinstance(config, WGMConfig):
        raise TypeError(f"config must be a WGMConfig, got {type(config).__name__}")
    W = as_weight_matrix(W)
    out, n_in = W.shape
    magnitude = W.abs().numpy()
    if config.block_mode:
        group, scale = _quantize_blocks(magnitude, config)
    else:
        g, s = _partition_rows(magnitude.reshape(1, -1), config)
        group, scale = g.reshape(out, n_in), s[0]
    planes = np.stack([(group >> b) & 1 for b in range(config.index_bits)]).astype(bool) \
        if config.index_bits else np.zeros((0, out, n_in), dtype=bool)
    return WGMWeight(out, n_in, config, pack_bits((W >= 0).numpy()), pack_bits(planes),
                     torch.from_numpy(scale))


def _quantize_blocks(magnitude: np.ndarray, config: WGMConfig) -> tuple[np.ndarray, np.ndarray]:
    """Block mode: (group [out, in], scale fp16 [out, nb, G]); full 64-weight blocks are
    partitioned together in one core call, a shorter last block in a second one."""
    out, n_in = magnitude.shape
    full = n_in // BLOCK
    group = np.empty((out, n_in), dtype=np.int64)
    scales = []
    if full:
        rows = magnitude[:, : full * BLOCK].reshape(out * full, BLOCK)
        g, s = _partition_rows(rows, config)
        group[:, : full * BLOCK] = g.reshape(out, full * BLOCK)
        scales.append(s.reshape(out, full, config.groups))
    if n_in % BLOCK:
        g, s = _partition_rows(magnitude[:, full * BLOCK:], config)
        group[:, full * BLOCK:] = g
        scales.append(s.reshape(out, 1, config.groups))
    return group, np.concatenate(scales, axis=1)


def _partition_rows(values: np.ndarray, config: WGMConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each row of |w| values [rows, n] on its own: (group of every value [rows, n] int64, fp16
    group means [rows, G]; an empty group, when n < G, has scale 0)."""
    rows, n = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.ascontiguousarray(np.take_along_axis(values, order, axis=1), dtype=np.float32)
    bounds = core().wgm_partition(ordered, config.groups, window=config.window, lam=config.lam,
                                  method=config.method)
    _check_bounds(bounds, rows, n, config.groups)
    group = np.empty((rows, n), dtype=np.int64)
    np.put_along_axis(group, order, _sorted_group_ids(bounds, n), axis=1)
    return group, _group_means(ordered, bounds)


def _check_bounds(bounds: np.ndarray, rows: int, n: int, groups: int) -> None:
    """The core's boundaries must be 0 = b_0 <= ... <= b_G = n (an internal contract, not user
    input: a violation is a bug, not bad data)."""
    ok = (bounds.shape == (rows, groups + 1) and bool((bounds[:, 0] == 0).all())
          and bool((bounds[:, -1] == n).all()) and bool((np.diff(bounds, axis=1) >= 0).all()))
    if not ok:
        raise RuntimeError(f"sdq._core.wgm_partition returned invalid group boundaries "
                           f"(shape {bounds.shape}, expected ({rows}, {groups + 1}) from 0 to {n})")


def _sorted_group_ids(bounds: np.ndarray, n: int) -> np.ndarray:
    """Group of each sorted position [rows, n]: the number of group starts b_1..b_{G-1} at or
    before it."""
    rows = bounds.shape[0]
    starts = np.zeros((rows, n + 1), dtype=np.int64)
    inner = bounds[:, 1:-1]
    np.add.at(starts, (np.repeat(np.arange(rows), inner.shape[1]), inner.ravel()), 1)
    return np.cumsum(starts, axis=1)[:, :n]


def _group_means(ordered: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """fp16 mean of each group [rows, G] (0 for an empty one), summed in float64."""
    cum = np.zeros((ordered.shape[0], ordered.shape[1] + 1))
    np.cumsum(ordered, axis=1, dtype=np.float64, out=cum[:, 1:])
    sums = np.diff(np.take_along_axis(cum, bounds, axis=1), axis=1)
    counts = np.diff(bounds, axis=1)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    if means.max(initial=0.0) > FP16_MAX:
        raise ValueError(f"a group mean of |W| ({means.max():.4g}) overflows fp16 "
                         f"(max {FP16_MAX:g}): WGM stores fp16 scales")
    return means.astype(np.float16)
