"""trit5: ternary codes stored at 5 bits per 3 codes (1.67 bits per trit; docs/format.md).

Three codes (t0, t1, t2) of a row make one group, value v = 9 (t0+1) + 3 (t1+1) + (t2+1), stored
as a 4-bit magnitude idx = |v - 13| (two groups per byte of `trits`) and a sign bit neg = v < 13
(one bit per row of a 32-row tile in `trit_signs`). The packing itself is the core's
(`_core.trit5_pack` / `_core.trit5_unpack`, bitplanes <-> trit5); sdq.ref.trit5 is its independent
NumPy twin, for the tests.
Paths that need bitplanes (dequantize, sdq.torch_ops, the CUDA kernels, the C API) get them from
unpack_to_bitplanes, and only from it.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from . import blocks
from ._native import core

TILE = 32  # rows per tile: one trit_signs word holds one bit per row of a tile
MAX_IDX = 13  # |v - 13| for v in [0, 26]


@dataclasses.dataclass(frozen=True)
class Trit5Layout:
    """Where each block's groups sit in a packed row: block b's `groups[b]` groups of three code
    columns start at code column `code_offset[b]` and at group `group_offset[b]`; its groups from
    `groups[b]` up to the next block's group_offset are padding. `m[b]`: block b's code count."""
    code_offset: tuple[int, ...]
    m: tuple[int, ...]
    group_offset: tuple[int, ...]
    groups: tuple[int, ...]
    total_groups: int


def _even(n: int) -> int:
    return n + n % 2


@functools.lru_cache(maxsize=256)
def layout(in_features: int, block_size: int, osr: float) -> Trit5Layout:
    lay = core().layout(in_features, block_size, osr)
    ms = tuple(lay["m"])
    gp0 = _even(-(-ms[0] // 3))
    offsets = tuple(b * gp0 for b in range(len(ms)))
    return Trit5Layout(tuple(lay["code_offset"]), ms, offsets, tuple(-(-m // 3) for m in ms),
                       offsets[-1] + _even(-(-ms[-1] // 3)))


def shapes(out_features: int, in_features: int, block_size: int,
           osr: float) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """(trits shape [tiles, total_groups / 2, 32], trit_signs shape [tiles, total_groups])."""
    tiles = -(-out_features // TILE)
    total = layout(in_features, block_size, osr).total_groups
    return (tiles, total // 2, TILE), (tiles, total)


def _words(t: torch.Tensor) -> np.ndarray:
    """int32 tensor of packed words (any device) -> the uint32 NumPy view the core reads."""
    return np.ascontiguousarray(t.detach().cpu().numpy()).view(np.uint32)


def _i32(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int32)).to(device)


def pack_bitplanes(sign: torch.Tensor, nonzero: torch.Tensor, in_features: int, block_size: int,
                   osr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary bitplanes (int32 [out, words]) -> (trits uint8, trit_signs int32) on the planes'
    device (`_core.trit5_pack`)."""
    trits, signs = core().trit5_pack(_words(sign), _words(nonzero), in_features, block_size, osr)
    return torch.from_numpy(np.ascontiguousarray(trits)).to(sign.device), _i32(signs, sign.device)


def unpack_to_bitplanes(trits: torch.Tensor, trit_signs: torch.Tensor, out_features: int,
                        in_features: int, block_size: int,
                        osr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(trits, trit_signs) -> ternary bitplanes (sign, nonzero) int32 [out, words] on the same
    device: the one way every bitplane consumer (dequantize, sdq.torch_ops, the CUDA kernels,
    the C API) gets a trit5 layer's codes."""
    t = np.ascontiguousarray(trits.detach().cpu().numpy())
    sign, nonzero = core().trit5_unpack(t, _words(trit_signs), out_features, in_features,
                                        block_size, osr)
    return _i32(sign, trits.device), _i32(nonzero, trits.device)


def pack_codes(codes: np.ndarray, in_features: int, block_size: int,
               osr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [out, total_code_cols] (padding columns 0) -> (trits, trit_signs) CPU tensors."""
    sign, nonzero = core().pack_bitplanes(np.ascontiguousarray(codes, dtype=np.int8), "ternary")
    cpu = torch.device("cpu")
    return pack_bitplanes(_i32(sign, cpu), _i32(nonzero, cpu), in_features, block_size, osr)


def unpack_codes(trits: torch.Tensor, trit_signs: torch.Tensor, out_features: int,
                 in_features: int, block_size: int, osr: float) -> np.ndarray:
    """(trits, trit_signs) on any device -> int8 codes [out, total_code_cols] (NumPy)."""
    sign, nonzero = unpack_to_bitplanes(trits, trit_signs, out_features, in_features,
                                        block_size, osr)
    return core().unpack_bitplanes(_words(sign), _words(nonzero), sign.shape[1] * 32)


# ----------------------------------------------------------------------------- invariants
def canonical(trits: torch.Tensor, trit_signs: torch.Tensor, out_features: int, in_features: int,
              block_size: int, osr: float) -> bool:
    """Whether the encoding is canonical (every magnitude <= 13, zeros in padding groups, past
    each block's m and in the rows past out, no sign on an all-zero group), as the core's
    trit5_unpack checks it in one pass: fast enough for every load (weight._check_trit5 runs the
    full check, which locates the damage for the error, only when this says False)."""
    try:
        core().trit5_unpack(np.ascontiguousarray(trits.detach().cpu().numpy()), _words(trit_signs),
                       out_features, in_features, block_size, osr)
    except ValueError:
        return False
    return True


def group_idx(trits: torch.Tensor) -> torch.Tensor:
    """trits [tiles, P, 32] -> idx [tiles * 32, 2 P] (row, group): the 4-bit magnitudes."""
    t = trits.to(torch.int32)
    idx = torch.stack([t & 15, t >> 4], dim=2)                   # [tiles, P, 2, 32]
    return idx.flatten(1, 2).permute(0, 2, 1).reshape(-1, idx.shape[1] * 2)


def group_neg(trit_signs: torch.Tensor) -> torch.Tensor:
    """trit_signs [tiles, G] -> neg bits [tiles * 32, G] (row, group), int32 0/1."""
    shifts = torch.arange(TILE, dtype=torch.int32, device=trit_signs.device)
    bits = (trit_signs.unsqueeze(1) >> shifts[None, :, None]) & 1  # [tiles, 32, G]
    return bits.reshape(-1, trit_signs.shape[1])


@functools.lru_cache(maxsize=256)
def allowed_idx(in_features: int, block_size: int, osr: float) -> torch.Tensor:
    """int32 [total_groups]: bit i set when idx i may appear in that group: any of 0..13 in a full
    group; in a block's last group, those whose codes past m are 0; only 0 in a padding group.
    Treat as read-only: it is cached."""
    lay = layout(in_features, block_size, osr)
    w = np.arange(MAX_IDX + 1) + 13
    trits = np.stack([w // 9 - 1, (w // 3) % 3 - 1, w % 3 - 1], axis=1)  # [14, 3]
    by_valid = [int(sum(1 << i for i in range(MAX_IDX + 1) if not trits[i, k:].any()))
                for k in range(4)]                                     # k valid codes of 3
    mask = np.full(lay.total_groups, by_valid[0], dtype=np.int64)      # padding: idx 0 only
    for m, g0, g in zip(lay.m, lay.group_offset, lay.groups):
        mask[g0: g0 + g] = by_valid[3]
        mask[g0 + g - 1] = by_valid[m - 3 * (g - 1)]
    return torch.from_numpy(mask.astype(np.int32))


# ----------------------------------------------------------------------------- traced form
@torch.library.custom_op("sdq::trit5_bitplanes", mutates_args=())
def bitplanes_op(trits: torch.Tensor, trit_signs: torch.Tensor, out_features: int,
                 in_features: int, block_size: int,
                 osr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """unpack_to_bitplanes as an op, so that torch.compile traces a ternary layer's paths that
    read bitplanes (eager calls cache the planes on the module instead: SDQLinear.bitplanes)."""
    return unpack_to_bitplanes(trits, trit_signs, out_features, in_features, block_size, osr)


@bitplanes_op.register_fake
def _(trits, trit_signs, out_features, in_features, block_size, osr):
    words = blocks.packed_shape(in_features, block_size, osr)[0] // 32
    return (trits.new_empty(out_features, words, dtype=torch.int32),
            trits.new_empty(out_features, words, dtype=torch.int32))
