"""Weight quantizers: SDQ (Sigma-Delta) and the baselines it is compared with, one dispatch.

A method is a config plus a weight quantizer; traversal, calibration, evaluation, saving and the
CLI are shared (sdq.pipeline). SDQ returns packed QuantizedWeights. Baselines return a
DenseQuantized: their dequantized weight and honest bit count, for quality comparisons only.
"""
from __future__ import annotations

import dataclasses

import torch

from ..calibration_warnings import CalibrationWarning
from ..config import SDQConfig
from ..gptq import gptq_quantize
from . import baselines
from .sdq import quantize_weight, quantize_weight_calibrated
from .wgm import WGMConfig, quantize_weight_wgm

__all__ = ["BASELINES", "BaselineConfig", "CalibrationWarning", "DenseQuantized", "WGMConfig",
           "needs_calibration", "quantize_linear"]

BASELINES = ("rtn", "iwrtn", "gptq", "absmean_ternary", "sign_rowscale")
_GRIDDED = ("rtn", "iwrtn", "gptq")  # uniform grid per row and group: bits and group_size apply


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """method: one of BASELINES; bits (rtn, iwrtn, gptq: 2, 3, 4 or 8); group_size (same three);
    symmetric (rtn, gptq: scale only, zero-point fixed; default asymmetric: scale + offset);
    act_order (gptq: columns by decreasing Hessian diagonal, groups in that order)."""
    method: str
    bits: int | None = None
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False

    def __post_init__(self):
        if self.method not in BASELINES:
            raise ValueError(f"method must be one of {BASELINES}, got {self.method!r}")
        if self.method in _GRIDDED and self.bits not in (2, 3, 4, 8):
            raise ValueError(f"{self.method} needs bits in (2, 3, 4, 8), got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order applies to gptq only")
        if self.symmetric and self.method not in ("rtn", "gptq"):
            raise ValueError("symmetric applies to rtn and gptq only")

    @property
    def label(self) -> str:
        """A short name for tables, e.g. "gptq-3-g64-asym-actorder", "iwrtn-4-g32"."""
        if self.method not in _GRIDDED:
            return self.method
        parts = [self.method, str(self.bits), f"g{self.group_size}"]
        if self.method != "iwrtn":
            parts.append("sym" if self.symmetric else "asym")
        if self.act_order:
            parts.append("actorder")
        return "-".join(parts)

    def storage_params(self, out_features: int) -> dict:
        """The keyword arguments of baselines.bits_all_in for this config."""
        if self.method not in _GRIDDED:
            return {}
        params = {"bits": self.bits, "group_size": self.group_size}
        if self.symmetric:
            params["symmetric"] = True
        if self.act_order:
            params.update(act_order=True, out_features=out_features)
        return params

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DenseQuantized:
    """A baseline's result: the dequantized weight (what its stored form rebuilds) and its size."""
    weight: torch.Tensor
    bits_per_weight_all_in: float

    def dequantize(self) -> torch.Tensor:
        return self.weight


def needs_calibration(config) -> bool:
    return isinstance(config, BaselineConfig) and config.method in ("gptq", "iwrtn")


def quantize_linear(W: torch.Tensor, config, hessian: torch.Tensor | None = None, *,
                    name: str | None = None):
    """Quantize one weight [out, in] with `config`; `hessian` (2/n sum x x^T) enables calibration.

    name: the layer, e.g. "layer 3 mlp.down_proj", for the CalibrationWarning that says when its
    calibration data needed extra damping or a fallback (dead or rank-deficient inputs).
    """
    if isinstance(config, SDQConfig):
        if hessian is None:
            return quantize_weight(W, config)
        return quantize_weight_calibrated(W, hessian, config, name=name)
    if isinstance(config, WGMConfig):  # packed WGMWeight (dynamic grouping, methods/wgm.py)
        if hessian is not None:
            raise ValueError("wgm is data-free: it takes no calibration data (Hessian)")
        return quantize_weight_wgm(W, config)
    if not isinstance(config, BaselineConfig):
        raise TypeError(f"config must be an SDQConfig, WGMConfig or BaselineConfig, got "
                        f"{type(config).__name__}")
    m, (n_out, n_in) = config.method, W.shape
    if needs_calibration(config) and hessian is None:
        raise ValueError(f"{m} needs calibration data (a Hessian)")
    if m == "gptq":
        W_hat = gptq_quantize(W, hessian, config.bits, config.group_size,
                              symmetric=config.symmetric, act_order=config.act_order, name=name)
    elif m == "iwrtn":
        W_hat = baselines.iw_rtn(W, torch.diagonal(hessian), config.bits, config.group_size)
    elif m == "rtn":
        W_hat = baselines.rtn(W, config.bits, config.group_size, config.symmetric)
    elif m == "absmean_ternary":
        W_hat = baselines.absmean_ternary(W)
    else:
        W_hat = baselines.sign_rowscale(W)
    return DenseQuantized(W_hat, baselines.bits_all_in(m, n_in, **config.storage_params(n_out)))
