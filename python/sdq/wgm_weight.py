"""WGMWeight: the packed form of one weight quantized by dynamic grouping (WGM, docs/format.md).

Each weight is sign(w) * scale[group]: a sign bitplane, ceil(log2 G) group-index bitplanes and the
fp16 group scales (G per matrix, or G per 64-weight block of a row in block mode). The planes use
the bit order of cpp/include/sdq/bitplane.h: column c of a row is bit c % 32 of word c // 32.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from ._native import core
from .torch_ops import unpack_bits
from .weight import CheckpointError, check_tensor, parse_meta

PACKED_FORMAT = "sdq-wgm-v1"
STATE_KEYS = ("sign", "index", "scale")
BLOCK = 64  # block mode: consecutive weights of a row that share G scales
_BITS = 32


def index_bits(groups: int) -> int:
    """Bits of a group index: ceil(log2 groups), 0 for a single group."""
    return (groups - 1).bit_length()


def words_for(cols: int) -> int:
    return -(-cols // _BITS)


def num_blocks(in_features: int) -> int:
    """Blocks of a row in block mode; the last one is shorter when BLOCK does not divide in."""
    return -(-in_features // BLOCK)


def pack_bits(bits: np.ndarray) -> torch.Tensor:
    """bool [..., cols] -> int32 words [..., words_for(cols)], bit c % 32 of word c // 32 (padding
    bits 0): the core's binary bitplane packing, with True as the +1 code."""
    lead, cols = bits.shape[:-1], bits.shape[-1]
    codes = np.where(bits.reshape(-1, cols), 1, -1).astype(np.int8)
    words, _ = core().pack_bitplanes(codes, "binary")
    return torch.from_numpy(words.view(np.int32).reshape(*lead, words_for(cols)))


def unpack_index(index: torch.Tensor, cols: int) -> torch.Tensor:
    """Index planes [bits, out, words] -> int64 group indices [out, cols]."""
    idx = torch.zeros(index.shape[1], cols, dtype=torch.int64, device=index.device)
    for b in range(index.shape[0]):
        idx |= unpack_bits(index[b], cols).to(torch.int64) << b
    return idx


def dequantize_packed(sign: torch.Tensor, index: torch.Tensor, scale: torch.Tensor,
                      in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat [out, in] = sign * scale[group] in `dtype`, on the tensors' device. scale [G]: one
    set per matrix; [out, nb, G]: one set per 64-weight block of each row."""
    signs = unpack_bits(sign, in_features).to(dtype) * 2 - 1
    idx = unpack_index(index, in_features)
    s = scale.to(dtype)
    if s.dim() == 1:
        return signs * s[idx]
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
    block = (torch.arange(in_features, device=idx.device) // BLOCK)[None, :]
    return signs * s[rows, block, idx]


@dataclasses.dataclass
class WGMWeight:
    """Packed dynamic-grouping codes of a weight W [out_features, in_features].

    sign:   int32 [out, words]: bit 1 -> +1, bit 0 -> -1 (a zero weight has sign +1)
    index:  int32 [bits, out, words]: plane b holds bit b of each weight's group index
    scale:  float16 [G] (per matrix) or [out, num_blocks(in), G] (block mode): group means of |w|
    config: the WGMConfig it was quantized with (groups, block_mode, ...)
    words = ceil(in / 32), bits = ceil(log2 G); padding bits (columns >= in) are 0 in every plane.
    """

    out_features: int
    in_features: int
    config: object  # WGMConfig (imported lazily: sdq.methods.wgm imports this module)
    sign: torch.Tensor
    index: torch.Tensor
    scale: torch.Tensor

    @property
    def groups(self) -> int:
        return self.config.groups

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def group_index(self) -> torch.Tensor:
        """int64 [out, in]: each weight's group."""
        return unpack_index(self.index, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: sign(w) * scale of its group."""
        return dequantize_packed(self.sign, self.index, self.scale, self.in_features)

    @property
    def bits_per_weight(self) -> float:
        """Stored sign and index bits per weight (1 + ceil(log2 G), plus word padding)."""
        return (self.sign.numel() + self.index.numel()) * _BITS / self.numel

    @property
    def bits_per_weight_all_in(self) -> float:
        """Sign and index bits plus the fp16 scales, per weight (the metadata is not counted)."""
        return self.bits_per_weight + self.scale.numel() * 16 / self.numel

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, plus the metadata as a uint8 JSON tensor: safetensors-safe."""
        meta = {"out_features": self.out_features, "in_features": self.in_features,
                "config": self.config.to_dict(), "format": PACKED_FORMAT}
        return {"sign": self.sign, "index": self.index, "scale": self.scale,
                "meta": torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor], *, name: str = "") -> "WGMWeight":
        """Rebuild from state_dict(), checking the metadata, the set of tensors and validate()'s
        invariants; errors are CheckpointError naming `name` and the tensor."""
        where = _where(name)
        out, n_in, config = _parse_meta(d.get("meta"), where)
        unexpected = sorted(set(d) - {"meta", *STATE_KEYS})
        if unexpected:
            raise CheckpointError(f"{where}: unexpected tensors {unexpected} (expected "
                                  f"{sorted({'meta', *STATE_KEYS})})")
        qw = cls(out, n_in, config, d.get("sign"), d.get("index"), d.get("scale"))
        qw.validate(name)
        return qw

    def expected_shapes(self) -> dict[str, tuple[torch.dtype, tuple]]:
        out, words, g = self.out_features, words_for(self.in_features), self.groups
        scale = (out, num_blocks(self.in_features), g) if self.config.block_mode else (g,)
        return {"sign": (torch.int32, (out, words)),
                "index": (torch.int32, (index_bits(g), out, words)),
                "scale": (torch.float16, scale)}

    def validate(self, name: str = "") -> None:
        """Raise CheckpointError unless every tensor has the dtype and shape the metadata implies,
        padding bits are 0, every group index is < G and the scales are finite and >= 0."""
        where = _where(name)
        tensors = {k: getattr(self, k) for k in STATE_KEYS}
        for key, (dtype, shape) in self.expected_shapes().items():
            check_tensor(tensors, key, dtype, shape, where)
        for key in ("sign", "index"):
            _check_padding(tensors[key], self.in_features, key, where)
        _check_index_range(self, where)
        _check_scales(self.scale, where)


def _where(name: str) -> str:
    return f"corrupt packed weight {name}" if name else "corrupt WGMWeight"


def _parse_meta(t: torch.Tensor | None, where: str):
    from .methods.wgm import WGMConfig
    return parse_meta(t, where, PACKED_FORMAT, WGMConfig)


def _check_padding(planes: torch.Tensor, cols: int, key: str, where: str) -> None:
    """The bits of the last word beyond column `cols` are 0 in every row of every plane."""
    used = cols % _BITS
    if used == 0:
        return
    pad_mask = torch.tensor(np.uint32(~((1 << used) - 1) & 0xFFFFFFFF).view(np.int32),
                            device=planes.device)
    stray = planes[..., -1] & pad_mask
    if bool(stray.any()):
        at = tuple(int(i) for i in stray.nonzero()[0])
        raise CheckpointError(f"{where}: tensor {key} has a bit set beyond column {cols - 1} "
                              f"(last word, at {at}); padding bits must be 0")


def _check_index_range(qw: WGMWeight, where: str) -> None:
    """Every group index < G (only a G that is not a power of two leaves room for more)."""
    g = qw.groups
    if g == 1 << index_bits(g):
        return
    idx = qw.group_index()
    bad = idx >= g
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"{where}: tensor index holds group {int(idx[row, col])} at row "
                              f"{row}, column {col}; the layer has {g} groups")


def _check_scales(scale: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(scale) | (scale < 0)
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"{where}: tensor scale should be finite and >= 0 (group means of "
                              f"|w|), got {float(scale[at])} at {at}")
