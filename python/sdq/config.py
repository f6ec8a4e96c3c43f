"""Quantizer configuration: a small, versioned, JSON-serialisable dataclass."""
from __future__ import annotations

import dataclasses
import json
import math

MAX_OSR = 16.0  # same bound as the core (layout.h kMaxOsr): above it fp16 weights are smaller
LEVELS = ("binary", "ternary")
CODE_SELECTIONS = ("sigma_delta", "gram")
SCALE_SEARCHES = ("closed_form", "fp16", "grid")
COMPENSATIONS = ("exact", "diagonal")
MAX_REFINE_PASSES = 16  # coordinate descent converges in a few; more is a typo
MAX_BEAM = 64  # the core's kMaxBeam (gram_beam.h)


class ConfigIO:
    """JSON round trip and replace() for the frozen config dataclasses (SDQConfig, WGMConfig):
    unknown fields and newer versions are errors, so an old sdq never misreads a new file."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        name = cls.__name__
        if not isinstance(d, dict):
            raise TypeError(f"a {name} is read from a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {name} fields: {sorted(unknown)}")
        version = d.get("version", 1)
        if isinstance(version, int) and version > 1:
            raise ValueError(f"{name} version {version} is newer than this sdq (1)")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


@dataclasses.dataclass(frozen=True)
class SDQConfig(ConfigIO):
    """How one weight matrix is Sigma-Delta quantized (method.md section 1).

    osr:        over-sampling ratio, 0 < osr <= 16, fractional allowed. Each block of B (padded)
                columns becomes M = floor(B * osr + 0.5) samples; exact when osr is a multiple of 1/B.
    levels:     "binary" ({-1,+1}, osr bits/weight) or "ternary" ({-1,0,+1}, stored as trit5:
                5/3 * osr bits/weight plus group padding; docs/format.md).
    order:      Sigma-Delta modulator order, 1 or 2.
    block_size: B, a power of two (Hadamard and scale/mean granularity); default 128.
    hadamard:   rotate each block with a random-sign Walsh-Hadamard transform first.
    seed:       seed of the Hadamard sign vector (stored with the layer too).
    sd_scale, p_scale, p_cut: scale = quantile(|u - mean|, p_scale) * sd_scale, and the ternary
                threshold tau = quantile(|z|, p_cut); the paper's defaults 0.95 / 0.93 / 0.55.
    codes:      how codes are chosen: "sigma_delta" (the paper's modulator) or "gram" (sdq's own:
                sequential rounding against the down-sampler's Gram matrix, then a least-squares
                refit of the scale and mean; see sdq/methods/gram.py).
    gram_damp:  damping of the Gram matrix, as a fraction of its mean diagonal ("gram" only).
    scale_search: how the stored fp16 scale and mean are chosen ("gram" only; methods/
                scale_search.py): "closed_form" (least-squares fit, each rounded to fp16),
                "fp16" (the best of the fit's fp16 neighbours, never worse), or "grid" (codes
                chosen for several normalisation scales, the best kept per row; costs 5x the
                code selection).
    code_search: choose the codes for a few (Gram damping, normalisation scale) settings per
                block, measured per levels (gram.CODE_SEARCH: 3 each), and keep per row the one
                with the smallest weighted error ("gram" only; costs about 2x the code
                selection); False: only (gram_damp, sd_scale).
    beam:       chains kept per row by the codes' sequential choice ("gram" only; 1 to 64):
                1 is GPTQ's greedy rounding with the dead-zone threshold tau; more is a beam
                search that keeps the `beam` cheapest chains under the damped weighted error
                (cpp/include/sdq/gram_beam.h; no threshold). Lower error, ~beam x the
                selection's time (README's table).
    refine_passes: passes of coordinate descent over the codes after their sequential choice,
                each followed by a scale/mean refit ("gram" only; methods/refine.py); 0 = none.
    percdamp:   calibrated only: damping of the layer's input Hessian H before the compensation,
                as a fraction of its mean diagonal. GPTQ's 0.01 fits the calibration text too
                closely for SDQ's codes: on the default model the layers' output error under
                held-out Hessians and the held-out perplexity are lower at 0.1 (README).
    compensation: calibrated only: "exact" (each block's error is pushed onto the later columns
                by the exact update for a jointly quantized block, and "gram" codes weigh it by
                what that update cannot undo, the Schur complement), or "diagonal" (GPTQ's
                per-column update and the block's own Hessian, as before this option).
    """

    osr: float = 2.0
    levels: str = "ternary"
    order: int = 1
    block_size: int = 128
    hadamard: bool = True
    seed: int = 0
    sd_scale: float = 0.95
    p_scale: float = 0.93
    p_cut: float = 0.55
    codes: str = "sigma_delta"
    gram_damp: float = 0.2
    scale_search: str = "fp16"
    code_search: bool = True
    beam: int = 1
    refine_passes: int = 1
    compensation: str = "exact"
    percdamp: float = 0.1
    version: int = 1

    def __post_init__(self):
        if isinstance(self.osr, bool) or not isinstance(self.osr, (int, float)):
            raise TypeError(f"osr must be a number, got {type(self.osr).__name__}")
        if not (math.isfinite(self.osr) and 0 < self.osr <= MAX_OSR):
            raise ValueError(f"osr must be in (0, {MAX_OSR:g}], got {self.osr}")
        object.__setattr__(self, "osr", float(self.osr))
        if self.levels not in LEVELS:
            raise ValueError(f"levels must be one of {LEVELS}, got {self.levels!r}")
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"order must be 1 or 2, got {self.order!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two >= 2, got {bs!r}")
        if not isinstance(self.hadamard, bool):
            raise TypeError(f"hadamard must be a bool, got {self.hadamard!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for name in ("sd_scale", "p_scale", "p_cut"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1.5 and (name == "sd_scale" or v < 1)):
                raise ValueError(f"{name} must be in (0, 1) ((0, 1.5] for sd_scale), got {v!r}")
        if self.codes not in CODE_SELECTIONS:
            raise ValueError(f"codes must be one of {CODE_SELECTIONS}, got {self.codes!r}")
        if not (0 <= self.gram_damp <= 10):
            raise ValueError(f"gram_damp must be in [0, 10], got {self.gram_damp!r}")
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search must be one of {SCALE_SEARCHES}, "
                             f"got {self.scale_search!r}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {COMPENSATIONS}, "
                             f"got {self.compensation!r}")
        if not isinstance(self.code_search, bool):
            raise TypeError(f"code_search must be a bool, got {self.code_search!r}")
        pd = self.percdamp
        if isinstance(pd, bool) or not isinstance(pd, (int, float)) or not (
                math.isfinite(pd) and 0 <= pd <= 10):
            raise ValueError(f"percdamp must be a number in [0, 10], got {pd!r}")
        object.__setattr__(self, "percdamp", float(pd))
        b = self.beam
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BEAM:
            raise ValueError(f"beam must be an int in [1, {MAX_BEAM}], got {b!r}")
        rp = self.refine_passes
        if isinstance(rp, bool) or not isinstance(rp, int) or not 0 <= rp <= MAX_REFINE_PASSES:
            raise ValueError(f"refine_passes must be an int in [0, {MAX_REFINE_PASSES}], "
                             f"got {rp!r}")

