"""QuantizedWeight: the packed form of one linear layer's weight (docs/format.md)."""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import torch

from . import blocks
from ._native import core
from .config import SDQConfig

STATE_KEYS = ("sign", "nonzero", "scale", "mean", "hadamard_signs")
PACKED_FORMAT = "sdq-bitplanes-v1"
META_KEYS = ("out_features", "in_features", "config", "format")


class CheckpointError(ValueError):
    """A packed weight or saved model that breaks the format (docs/format.md).

    Raised by the checks that run before any kernel reads the tensors, so a damaged or crafted
    file fails loudly instead of making the add-only kernels and the dequantized path disagree.
    """


@dataclasses.dataclass
class QuantizedWeight:
    """Packed Sigma-Delta codes of a weight W [out_features, in_features].

    sign:           int32 [out, words]: the sign bitplane (uint32 words stored as int32)
    nonzero:        int32 [out, words] non-zero bitplane (ternary) or None (binary)
    scale, mean:    float16 [out, num_blocks] per row-block scale s and mean mu
    hadamard_signs: int8 [block_size] the +-1 signs of the block rotation
    config:         the SDQConfig it was quantized with
    The bit layout of the planes is documented in cpp/include/sdq/bitplane.h and docs/format.md.
    """

    out_features: int
    in_features: int
    config: SDQConfig
    sign: torch.Tensor
    nonzero: torch.Tensor | None
    scale: torch.Tensor
    mean: torch.Tensor
    hadamard_signs: torch.Tensor

    @property
    def groups(self) -> tuple[blocks.BlockGroup, ...]:
        return blocks.block_groups(self.in_features, self.config.block_size, self.config.osr)

    @property
    def num_blocks(self) -> int:
        return self.scale.shape[1]

    def codes(self) -> np.ndarray:
        """Unpacked int8 codes [out, total_code_cols] (block padding columns included)."""
        cols = self.sign.shape[1] * 32
        nz = None if self.nonzero is None else _words(self.nonzero)
        return core().unpack_bitplanes(_words(self.sign), nz, cols)

    def signs_f32(self) -> np.ndarray | None:
        return self.hadamard_signs.numpy().astype(np.float32) if self.config.hadamard else None

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: W_hat_b = (s * D(q) + mu) @ Hb^T per block (method.md step 5)."""
        codes = torch.from_numpy(self.codes())
        out = self.out_features
        W = torch.empty(out, self.in_features, dtype=torch.float32)
        for g in self.groups:
            q = codes[:, g.code_offset: g.code_offset + g.count * g.code_cols]
            q = q.reshape(out * g.count, g.code_cols)[:, : g.m].double()
            s = self.scale[:, g.first: g.first + g.count].reshape(-1, 1).double()
            mu = self.mean[:, g.first: g.first + g.count].reshape(-1, 1).double()
            rows = s * (q @ blocks.resampler(g.m, g.padded).T) + mu
            if self.config.hadamard:
                rows = blocks.rotate(rows.float(), self.signs_f32(), inverse=True)
            blocks.scatter_blocks(rows.float(), g, out, W)
        return W

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def bits_per_weight(self) -> float:
        """Stored code bits per original weight (OSR binary, 2*OSR ternary, plus block padding)."""
        planes = 1 if self.nonzero is None else 2
        return planes * self.sign.numel() * 32 / self.numel

    @property
    def bits_per_weight_all_in(self) -> float:
        """All stored bits per weight: codes, fp16 scales and means, and the Hadamard signs."""
        extra = (self.scale.numel() + self.mean.numel()) * 16 + self.hadamard_signs.numel() * 8
        return self.bits_per_weight + extra / self.numel

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, plus the metadata as a uint8 JSON tensor: safetensors-safe."""
        meta = {"out_features": self.out_features, "in_features": self.in_features,
                "config": self.config.to_dict(), "format": PACKED_FORMAT}
        d = {"sign": self.sign, "scale": self.scale, "mean": self.mean,
             "hadamard_signs": self.hadamard_signs,
             "meta": torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}
        if self.nonzero is not None:
            d["nonzero"] = self.nonzero
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor], *, name: str = "") -> "QuantizedWeight":
        """Rebuild from state_dict(), checking the metadata, the set of tensors, every tensor's
        dtype and shape, and the format's invariants (validate()). `name` (the module's) goes
        into the errors, which are CheckpointError."""
        where = _where(name)
        out, n_in, config = _parse_meta(d.get("meta"), where)
        allowed = {"meta", *STATE_KEYS} - ({"nonzero"} if config.levels == "binary" else set())
        unexpected = sorted(set(d) - allowed)
        if unexpected:
            raise CheckpointError(f"{where}: unexpected tensors {unexpected} for a {config.levels} "
                                  f"layer (expected {sorted(allowed)})")
        # scale fixes the block count before the layout is computed: a forged in_features cannot
        # make the core lay out billions of blocks.
        nb = -(-n_in // config.block_size)
        for key in ("scale", "mean"):
            check_tensor(d, key, torch.float16, (out, nb), where)
        qw = cls(out, n_in, config, d.get("sign"), d.get("nonzero") if config.levels == "ternary"
                 else None, d["scale"], d["mean"], d.get("hadamard_signs"))
        qw.validate(name)
        return qw

    def validate(self, name: str = "") -> None:
        """Raise CheckpointError unless every tensor has the dtype and shape the metadata implies
        and the format's invariants hold (docs/format.md, "What load checks"): padding bits are 0
        in every plane, a ternary sign bit is set only where the nonzero bit is, scale and mean are
        finite, the Hadamard signs are +1 or -1. Vectorised bit operations: cheap on big layers."""
        where = _where(name)
        planes = self._check_shapes(where)
        _check_hadamard_signs(self.hadamard_signs, where)
        for key in ("scale", "mean"):
            _check_finite(getattr(self, key), key, where)
        code_mask = _code_mask(self.in_features, self.config.block_size, self.config.osr)
        for key, plane in planes.items():
            _check_padding(plane, code_mask.to(plane.device), key, self.groups, where)
        if self.nonzero is not None:
            _check_zero_codes_have_no_sign(self.sign, self.nonzero, where)

    def _check_shapes(self, where: str) -> dict[str, torch.Tensor]:
        """The planes by name, after checking every tensor against the geometry of the metadata."""
        try:
            cfg = self.config
            cols, nb = blocks.packed_shape(self.in_features, cfg.block_size, cfg.osr)
        except ValueError as e:  # e.g. an OSR that leaves the last block without samples
            raise CheckpointError(f"{where}: impossible block layout: {e}") from e
        words = cols // 32
        want = {"sign": (torch.int32, (self.out_features, words)),
                "scale": (torch.float16, (self.out_features, nb)),
                "mean": (torch.float16, (self.out_features, nb)),
                "hadamard_signs": (torch.int8, (self.config.block_size,))}
        ternary = self.config.levels == "ternary"
        if ternary:
            want["nonzero"] = (torch.int32, (self.out_features, words))
        elif self.nonzero is not None:
            raise CheckpointError(f"{where}: tensor nonzero present in a binary layer")
        tensors = {k: getattr(self, k) for k in want}
        for key, (dtype, shape) in want.items():
            check_tensor(tensors, key, dtype, shape, where)
        return {"sign": self.sign, **({"nonzero": self.nonzero} if ternary else {})}


def _where(name: str) -> str:
    return f"corrupt packed weight {name}" if name else "corrupt QuantizedWeight"


def _parse_meta(t: torch.Tensor | None, where: str) -> tuple[int, int, SDQConfig]:
    return parse_meta(t, where, PACKED_FORMAT, SDQConfig)


def parse_meta(t: torch.Tensor | None, where: str, packed_format: str, config_cls):
    """(out_features, in_features, config) from a packed weight's uint8 JSON metadata tensor,
    each field checked; shared by every packed weight type (its format string and config)."""
    if t is None:
        raise CheckpointError(f"{where}: tensor meta (the metadata) is missing")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise CheckpointError(f"{where}: tensor meta (the metadata) should be 1-D uint8, got "
                              f"{got}")
    try:
        meta = json.loads(bytes(t.tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: metadata is not UTF-8 JSON: {e}") from e
    if not isinstance(meta, dict) or set(meta) != set(META_KEYS):
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{where}: metadata should have the fields {sorted(META_KEYS)}, "
                              f"got {got}")
    if meta["format"] != packed_format:
        raise CheckpointError(f"{where}: unknown packed format {meta['format']!r} in the metadata "
                              f"(expected {packed_format!r})")
    out, n_in = (_positive_int(meta, k, where) for k in ("out_features", "in_features"))
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{where}: metadata config should be an object")
    try:
        config = config_cls.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: metadata config is invalid: {e}") from e
    return out, n_in, config


def _positive_int(meta: dict, key: str, where: str) -> int:
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CheckpointError(f"{where}: metadata {key} should be a positive integer, got {v!r}")
    return v


def check_tensor(d: dict, key: str, dtype: torch.dtype, shape: tuple, where: str) -> None:
    t = d.get(key)
    if t is None:
        raise CheckpointError(f"{where}: tensor {key} is missing (should be {dtype} {shape})")
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise CheckpointError(f"{where}: tensor {key} should be {dtype} {shape}, got {got}")


def _check_hadamard_signs(signs: torch.Tensor, where: str) -> None:
    bad = (signs != 1) & (signs != -1)
    if bool(bad.any()):
        i = int(bad.to(torch.uint8).argmax())
        raise CheckpointError(f"{where}: tensor hadamard_signs should hold only +1 and -1, got "
                              f"{int(signs[i])} at index {i}")


def _check_finite(t: torch.Tensor, key: str, where: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        row, block = divmod(int(bad.flatten().to(torch.uint8).argmax()), t.shape[1])
        raise CheckpointError(f"{where}: tensor {key} is not finite ({float(t[row, block])} at row "
                              f"{row}, block {block})")


def _first_set_bit(stray: torch.Tensor) -> tuple[int, int]:
    """(row, code column) of the lowest set bit in the first non-zero word of stray [rows,
    words]."""
    flat = stray.flatten()
    i = int(flat.ne(0).to(torch.uint8).argmax())
    row, word = divmod(i, stray.shape[1])
    v = int(flat[i]) & 0xFFFFFFFF
    return row, word * 32 + (v & -v).bit_length() - 1


def _check_padding(plane: torch.Tensor, code_mask: torch.Tensor, key: str,
                   groups: tuple[blocks.BlockGroup, ...], where: str) -> None:
    stray = plane & ~code_mask
    if bool(stray.any()):
        row, col = _first_set_bit(stray)
        block = col // groups[0].code_cols  # block b starts at b * code_cols(0) (layout.h)
        raise CheckpointError(f"{where}: tensor {key} has a bit set in block padding (row {row}, "
                              f"code column {col}, block {block}); padding must be 0 in every "
                              f"plane")


def _check_zero_codes_have_no_sign(sign: torch.Tensor, nonzero: torch.Tensor, where: str) -> None:
    stray = sign & ~nonzero
    if bool(stray.any()):
        row, col = _first_set_bit(stray)
        raise CheckpointError(f"{where}: tensor sign has a bit set where tensor nonzero has none "
                              f"(row {row}, code column {col}); the sign bit of a zero code must "
                              f"be 0")


@functools.lru_cache(maxsize=256)
def _code_mask(in_features: int, block_size: int, osr: float) -> torch.Tensor:
    """int32 [words]: the bits of a packed row that hold codes; the others are block padding
    (columns m .. code_cols of each block, layout.h). Treat as read-only: it is cached."""
    cols, _ = blocks.packed_shape(in_features, block_size, osr)
    is_code = np.zeros(cols, dtype=bool)
    for g in blocks.block_groups(in_features, block_size, osr):
        span = is_code[g.code_offset: g.code_offset + g.count * g.code_cols]
        span.reshape(g.count, g.code_cols)[:, : g.m] = True
    bits = is_code.reshape(-1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return torch.from_numpy(bits.sum(axis=1).astype(np.uint32).view(np.int32))


def _words(t: torch.Tensor) -> np.ndarray:
    """int32 tensor of packed words -> the uint32 NumPy view the core reads (no copy)."""
    return np.ascontiguousarray(t.numpy()).view(np.uint32)
