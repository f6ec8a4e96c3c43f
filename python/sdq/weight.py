"""QuantizedWeight: the packed form of one linear layer's weight (docs/format.md)."""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import torch

from . import blocks, trit5
from ._native import core
from .config import SDQConfig

# The packed tensors a layer may hold: `sign` (binary) or `trits` + `trit_signs` (ternary), then
# the per-block floats. LEGACY_KEYS: what ternary layers held before trit5 (read, converted).
BINARY_CODE_KEYS = ("sign",)
TERNARY_CODE_KEYS = ("trits", "trit_signs")
STATE_KEYS = ("sign", "trits", "trit_signs", "scale", "mean", "hadamard_signs")
LEGACY_KEYS = ("sign", "nonzero")
READ_KEYS = (*STATE_KEYS, "nonzero")  # every packed tensor a file may hold
PACKED_FORMAT = "sdq-bitplanes-v1"  # binary layers, and ternary layers written before trit5
TRIT5_FORMAT = "sdq-trit5-v1"  # ternary layers
PACKED_FORMATS = (PACKED_FORMAT, TRIT5_FORMAT)
META_KEYS = ("out_features", "in_features", "config", "format")


class CheckpointError(ValueError):
    """A packed weight or saved model that breaks the format (docs/format.md).

    Raised by the checks that run before any kernel reads the tensors, so a damaged or crafted
    file fails loudly instead of making the add-only kernels and the dequantized path disagree.
    """


@dataclasses.dataclass
class QuantizedWeight:
    """Packed Sigma-Delta codes of a weight W [out_features, in_features] (docs/format.md).

    scale, mean:    float16 [out, num_blocks] per row-block scale s and mean mu
    hadamard_signs: int8 [block_size] the +-1 signs of the block rotation
    sign:           binary: int32 [out, words], the sign bitplane (uint32 words); ternary: None
    trits:          ternary: uint8 [tiles, total_groups / 2, 32], 4-bit group magnitudes (trit5)
    trit_signs:     ternary: int32 [tiles, total_groups], the groups' sign bits (uint32 words)
    config:         the SDQConfig it was quantized with
    Build one from codes or bitplanes with from_codes / from_bitplanes; bitplanes() gives the
    bitplanes of either kind (cpp/include/sdq/bitplane.h) to the code that reads them.
    """

    out_features: int
    in_features: int
    config: SDQConfig
    scale: torch.Tensor
    mean: torch.Tensor
    hadamard_signs: torch.Tensor
    sign: torch.Tensor | None = None
    trits: torch.Tensor | None = None
    trit_signs: torch.Tensor | None = None

    @classmethod
    def from_bitplanes(cls, out: int, n_in: int, config: SDQConfig, sign: torch.Tensor,
                       nonzero: torch.Tensor | None, scale: torch.Tensor, mean: torch.Tensor,
                       hadamard_signs: torch.Tensor) -> "QuantizedWeight":
        """From int32 bitplanes (the encoder's output); ternary planes are packed to trit5."""
        if config.levels == "binary":
            return cls(out, n_in, config, scale, mean, hadamard_signs, sign=sign)
        trits, trit_signs = trit5.pack_bitplanes(sign, nonzero, n_in, config.block_size,
                                                 config.osr)
        return cls(out, n_in, config, scale, mean, hadamard_signs, trits=trits,
                   trit_signs=trit_signs)

    @classmethod
    def from_codes(cls, out: int, n_in: int, config: SDQConfig, codes: np.ndarray,
                   scale: torch.Tensor, mean: torch.Tensor,
                   hadamard_signs: torch.Tensor) -> "QuantizedWeight":
        """From int8 codes [out, total_code_cols] (block padding columns 0)."""
        if config.levels == "binary":
            sign, _ = core().pack_bitplanes(codes, "binary")
            return cls(out, n_in, config, scale, mean, hadamard_signs,
                       sign=torch.from_numpy(sign.view(np.int32)))
        trits, trit_signs = trit5.pack_codes(codes, n_in, config.block_size, config.osr)
        return cls(out, n_in, config, scale, mean, hadamard_signs, trits=trits,
                   trit_signs=trit_signs)

    @property
    def groups(self) -> tuple[blocks.BlockGroup, ...]:
        return blocks.block_groups(self.in_features, self.config.block_size, self.config.osr)

    @property
    def num_blocks(self) -> int:
        return self.scale.shape[1]

    @property
    def ternary(self) -> bool:
        return self.config.levels == "ternary"

    def code_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that hold the codes, by name: {sign} or {trits, trit_signs}."""
        keys = TERNARY_CODE_KEYS if self.ternary else BINARY_CODE_KEYS
        return {k: getattr(self, k) for k in keys}

    def bitplanes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sign, nonzero or None) int32 bitplanes [out, words], derived for ternary layers
        (trit5.unpack_to_bitplanes); not stored."""
        if not self.ternary:
            return self.sign, None
        cfg = self.config
        return trit5.unpack_to_bitplanes(self.trits, self.trit_signs, self.out_features,
                                         self.in_features, cfg.block_size, cfg.osr)

    def codes(self) -> np.ndarray:
        """Unpacked int8 codes [out, total_code_cols] (block padding columns included)."""
        cfg = self.config
        if self.ternary:
            return trit5.unpack_codes(self.trits, self.trit_signs, self.out_features,
                                      self.in_features, cfg.block_size, cfg.osr)
        return core().unpack_bitplanes(_words(self.sign), None, self.sign.shape[1] * 32)

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
        """Stored code bits per original weight, counted from the tensors: OSR (binary) or
        5/3 OSR (ternary, trit5), plus block, group and tile padding."""
        return sum(_bits(t) for t in self.code_tensors().values()) / self.numel

    @property
    def bits_per_weight_all_in(self) -> float:
        """All stored bits per weight: codes, fp16 scales and means, and the Hadamard signs."""
        extra = sum(_bits(t) for t in (self.scale, self.mean, self.hadamard_signs))
        return self.bits_per_weight + extra / self.numel

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, plus the metadata as a uint8 JSON tensor: safetensors-safe."""
        meta = {"out_features": self.out_features, "in_features": self.in_features,
                "config": self.config.to_dict(),
                "format": TRIT5_FORMAT if self.ternary else PACKED_FORMAT}
        return {**self.code_tensors(), "scale": self.scale, "mean": self.mean,
                "hadamard_signs": self.hadamard_signs,
                "meta": torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor], *, name: str = "") -> "QuantizedWeight":
        """Rebuild from state_dict(), checking the metadata, the set of tensors, every tensor's
        dtype and shape, and the format's invariants (validate()). A ternary layer stored as
        bitplanes (sdq-bitplanes-v1, before trit5) is checked as such, then packed to trit5.
        `name` (the module's) goes into the errors, which are CheckpointError."""
        where = _where(name)
        out, n_in, config, fmt = _parse_meta(d.get("meta"), where)
        legacy = config.levels == "ternary" and fmt == PACKED_FORMAT
        if config.levels == "binary" and fmt != PACKED_FORMAT:
            raise CheckpointError(f"{where}: a binary layer must be stored as {PACKED_FORMAT}, "
                                  f"its metadata says {fmt}")
        codes = LEGACY_KEYS if legacy else (TERNARY_CODE_KEYS if config.levels == "ternary"
                                            else BINARY_CODE_KEYS)
        allowed = {"meta", *codes, "scale", "mean", "hadamard_signs"}
        unexpected = sorted(set(d) - allowed)
        if unexpected:
            raise CheckpointError(f"{where}: unexpected tensors {unexpected} for a {config.levels} "
                                  f"layer in {fmt} (expected {sorted(allowed)})")
        # scale fixes the block count before the layout is computed: a forged in_features cannot
        # make the core lay out billions of blocks.
        nb = -(-n_in // config.block_size)
        for key in ("scale", "mean"):
            check_tensor(d, key, torch.float16, (out, nb), where)
        floats = (d["scale"], d["mean"], d.get("hadamard_signs"))
        if legacy:
            return _from_legacy_planes(out, n_in, config, d, floats, name)
        qw = cls(out, n_in, config, *floats, **{k: d.get(k) for k in codes})
        qw.validate(name)
        return qw

    def validate(self, name: str = "") -> None:
        """Raise CheckpointError unless every tensor has the dtype and shape the metadata implies
        and the format's invariants hold (docs/format.md, "What load checks"): binary: padding
        bits 0; ternary (trit5): every magnitude <= 13, padding groups, code columns and rows
        zero, no sign bit on a zero group; scale and mean finite, Hadamard signs +1 or -1.
        Vectorised: cheap on big layers."""
        where = _where(name)
        self._check_shapes(where)
        _check_hadamard_signs(self.hadamard_signs, where)
        for key in ("scale", "mean"):
            _check_finite(getattr(self, key), key, where)
        cfg = self.config
        if self.ternary:
            ok = trit5.canonical(self.trits, self.trit_signs, self.out_features,
                                 self.in_features, cfg.block_size, cfg.osr)
            if not ok:
                _check_trit5(self.trits, self.trit_signs, self.out_features,  # locate the damage
                             trit5.allowed_idx(self.in_features, cfg.block_size, cfg.osr), where)
                raise CheckpointError(f"{where}: tensors trits and trit_signs are not a canonical "
                                      f"trit5 encoding")
        else:
            code_mask = _code_mask(self.in_features, cfg.block_size, cfg.osr)
            _check_padding(self.sign, code_mask.to(self.sign.device), "sign", self.groups, where)

    def _check_shapes(self, where: str) -> None:
        """Check every tensor against the geometry of the metadata."""
        try:
            cfg = self.config
            cols, nb = blocks.packed_shape(self.in_features, cfg.block_size, cfg.osr)
        except ValueError as e:  # e.g. an OSR that leaves the last block without samples
            raise CheckpointError(f"{where}: impossible block layout: {e}") from e
        want = {"scale": (torch.float16, (self.out_features, nb)),
                "mean": (torch.float16, (self.out_features, nb)),
                "hadamard_signs": (torch.int8, (cfg.block_size,))}
        if self.ternary:
            trits_shape, signs_shape = trit5.shapes(self.out_features, self.in_features,
                                                    cfg.block_size, cfg.osr)
            want["trits"] = (torch.uint8, trits_shape)
            want["trit_signs"] = (torch.int32, signs_shape)
        else:
            want["sign"] = (torch.int32, (self.out_features, cols // 32))
        stray = [k for k in ("sign", "trits", "trit_signs")
                 if k not in want and getattr(self, k) is not None]
        if stray:
            raise CheckpointError(f"{where}: tensor {stray[0]} present in a {cfg.levels} layer")
        tensors = {k: getattr(self, k) for k in want}
        for key, (dtype, shape) in want.items():
            check_tensor(tensors, key, dtype, shape, where)


def _from_legacy_planes(out: int, n_in: int, config: SDQConfig, d: dict, floats: tuple,
                        name: str) -> QuantizedWeight:
    """A ternary layer stored as bitplanes (before trit5): the planes checked as they were
    checked then (shapes, padding bits 0, no sign bit on a zero code), then packed to trit5."""
    where = _where(name)
    try:
        cols, _ = blocks.packed_shape(n_in, config.block_size, config.osr)
    except ValueError as e:
        raise CheckpointError(f"{where}: impossible block layout: {e}") from e
    for key in LEGACY_KEYS:
        check_tensor(d, key, torch.int32, (out, cols // 32), where)
    code_mask = _code_mask(n_in, config.block_size, config.osr)
    groups = blocks.block_groups(n_in, config.block_size, config.osr)
    for key in LEGACY_KEYS:
        _check_padding(d[key], code_mask.to(d[key].device), key, groups, where)
    _check_zero_codes_have_no_sign(d["sign"], d["nonzero"], where)
    qw = QuantizedWeight.from_bitplanes(out, n_in, config, d["sign"], d["nonzero"], *floats)
    qw.validate(name)
    return qw


def _bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _where(name: str) -> str:
    return f"corrupt packed weight {name}" if name else "corrupt QuantizedWeight"


def _parse_meta(t: torch.Tensor | None, where: str) -> tuple[int, int, SDQConfig, str]:
    """(out, in, config, packed format) of an SDQ layer's metadata: either format is read."""
    return parse_meta(t, where, PACKED_FORMATS, SDQConfig, with_format=True)


def parse_meta(t: torch.Tensor | None, where: str, packed_format: str | tuple[str, ...],
               config_cls, *, with_format: bool = False):
    """(out_features, in_features, config) from a packed weight's uint8 JSON metadata tensor,
    each field checked; shared by every packed weight type (its format string(s) and config).
    with_format: the format string is returned too (4th)."""
    formats = (packed_format,) if isinstance(packed_format, str) else packed_format
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
    if meta["format"] not in formats:
        raise CheckpointError(f"{where}: unknown packed format {meta['format']!r} in the metadata "
                              f"(expected {' or '.join(map(repr, formats))})")
    out, n_in = (_positive_int(meta, k, where) for k in ("out_features", "in_features"))
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{where}: metadata config should be an object")
    try:
        config = config_cls.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: metadata config is invalid: {e}") from e
    return (out, n_in, config, meta["format"]) if with_format else (out, n_in, config)


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


def _check_trit5(trits: torch.Tensor, trit_signs: torch.Tensor, out: int, allowed: torch.Tensor,
                 where: str) -> None:
    """trit5 invariants (shapes already checked): every 4-bit magnitude <= 13; each group holds
    only what its place allows (`allowed`: trit5.allowed_idx; padding groups and the code
    columns past a block's m hold zeros); rows past `out` in the last tile are zero; the sign
    bit of an all-zero group (idx 0) is 0."""
    idx = trit5.group_idx(trits)                                   # [tiles * 32, groups]
    neg = trit5.group_neg(trit_signs)
    checks = (
        ("trits", idx > trit5.MAX_IDX, "holds a magnitude above 13 (4-bit value {v})"),
        ("trits", (allowed.to(idx.device) >> idx.clamp(max=trit5.MAX_IDX)) & 1 == 0,
         "holds non-zero codes in padding (magnitude {v}); padding groups and code columns "
         "past a block's samples must be 0"),
        ("trits", (idx != 0) & (torch.arange(idx.shape[0], device=idx.device) >= out)[:, None],
         "holds non-zero codes in a padding row (magnitude {v}); rows past out_features must "
         "be 0"),
        ("trit_signs", (neg != 0) & (idx == 0),
         "has a sign bit set on an all-zero group; the sign bit of idx 0 must be 0"),
    )
    for key, bad, message in checks:
        if bool(bad.any()):
            row, group = divmod(int(bad.flatten().to(torch.uint8).argmax()), bad.shape[1])
            raise CheckpointError(f"{where}: tensor {key} "
                                  f"{message.format(v=int(idx[row, group]))} at row {row}, "
                                  f"group {group}")


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
