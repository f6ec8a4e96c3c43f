"""QuantizedWeight: the packed form of one linear layer's weight (docs/format.md)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from . import blocks
from ._native import core
from .config import SDQConfig

STATE_KEYS = ("sign", "nonzero", "scale", "mean", "hadamard_signs")


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
                "config": self.config.to_dict(), "format": "sdq-bitplanes-v1"}
        d = {"sign": self.sign, "scale": self.scale, "mean": self.mean,
             "hadamard_signs": self.hadamard_signs,
             "meta": torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}
        if self.nonzero is not None:
            d["nonzero"] = self.nonzero
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """Rebuild from state_dict(), checking every field's dtype and shape against the metadata."""
        try:
            meta = json.loads(bytes(d["meta"].to(torch.uint8).tolist()).decode())
            config = SDQConfig.from_dict(meta["config"])
            out, inf = int(meta["out_features"]), int(meta["in_features"])
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt QuantizedWeight metadata: {e}") from e
        if meta.get("format") != "sdq-bitplanes-v1":
            raise ValueError(f"unknown packed format {meta.get('format')!r}")
        cols, nb = blocks.packed_shape(inf, config.block_size, config.osr)
        words = cols // 32
        ternary = config.levels == "ternary"
        want = {"sign": (torch.int32, (out, words)), "scale": (torch.float16, (out, nb)),
                "mean": (torch.float16, (out, nb)),
                "hadamard_signs": (torch.int8, (config.block_size,))}
        if ternary:
            want["nonzero"] = (torch.int32, (out, words))
        for k, (dtype, shape) in want.items():
            t = d.get(k)
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                got = None if t is None else (t.dtype, tuple(t.shape))
                raise ValueError(f"corrupt QuantizedWeight: {k} should be {dtype} {shape}, got {got}")
        return cls(out, inf, config, d["sign"], d.get("nonzero") if ternary else None,
                   d["scale"], d["mean"], d["hadamard_signs"])


def _words(t: torch.Tensor) -> np.ndarray:
    """int32 tensor of packed words -> the uint32 NumPy view the core reads (no copy)."""
    return np.ascontiguousarray(t.numpy()).view(np.uint32)
