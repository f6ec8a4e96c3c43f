"""Per-block transforms shared by encoding and decoding: Hadamard rotation and resampling.

A layer's input dimension is cut into blocks (layout.h / sdq._core.layout); all blocks but the last
have the same geometry, so the work is done per *group* of equal blocks, batched over rows.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from ._native import core


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """`count` consecutive blocks of equal geometry starting at block index `first`."""
    first: int
    count: int
    start: int        # first input column
    width: int        # input columns per block
    padded: int       # width zero-padded to a power of two
    m: int            # samples per block after up-sampling
    code_offset: int  # first code column of the group in a packed row
    code_cols: int    # code columns per block, m rounded up to a multiple of 32


@functools.lru_cache(maxsize=256)
def block_groups(in_features: int, block_size: int, osr: float) -> tuple[BlockGroup, ...]:
    lay = core().layout(in_features, block_size, osr)
    nb = lay["num_blocks"]
    stride = -(-lay["m"][0] // 32) * 32
    full = nb if lay["width"][-1] == block_size else nb - 1
    groups = []
    if full:
        groups.append(BlockGroup(0, full, 0, block_size, block_size, lay["m"][0], 0, stride))
    if full < nb:
        m = lay["m"][-1]
        groups.append(BlockGroup(full, 1, full * block_size, lay["width"][-1], lay["padded"][-1],
                                 m, lay["code_offset"][-1], -(-m // 32) * 32))
    return tuple(groups)


def packed_shape(in_features: int, block_size: int, osr: float) -> tuple[int, int]:
    """(code columns of a packed row, number of blocks): the sizes every packed tensor derives."""
    lay = core().layout(in_features, block_size, osr)
    return lay["total_code_cols"], lay["num_blocks"]


def hadamard_signs(block_size: int, seed: int) -> np.ndarray:
    """The layer's random +-1 sign vector (float32 [block_size]), reproducible from the seed."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, block_size) * 2 - 1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def resampler(n_in: int, n_out: int) -> torch.Tensor:
    """float64 [n_out, n_in] band-limited resampling matrix (from the core, cached)."""
    return torch.from_numpy(core().resample_matrix(n_in, n_out)).double()


def rotate(x: torch.Tensor, signs: np.ndarray | None, inverse: bool = False) -> torch.Tensor:
    """Rows of x (float32 [rows, n], n a power of two) through the core's FWHT; returns a copy."""
    a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32).copy()
    s = None if signs is None else np.ascontiguousarray(signs[: a.shape[1]], dtype=np.float32)
    core().fwht(a, s, inverse)
    return torch.from_numpy(a)


def gather_blocks(W: torch.Tensor, g: BlockGroup) -> torch.Tensor:
    """[out, in] -> [out * count, padded]: the group's blocks as rows, zero-padded."""
    out = W.shape[0]
    cols = W[:, g.start: g.start + g.count * g.width].reshape(out * g.count, g.width)
    if g.padded == g.width:
        return cols.contiguous()
    return torch.nn.functional.pad(cols, (0, g.padded - g.width))


def scatter_blocks(rows: torch.Tensor, g: BlockGroup, out: int, W: torch.Tensor) -> None:
    """Inverse of gather_blocks: writes rows [out * count, padded] into W [out, in] (cropped)."""
    W[:, g.start: g.start + g.count * g.width] = rows[:, : g.width].reshape(out, g.count * g.width)
