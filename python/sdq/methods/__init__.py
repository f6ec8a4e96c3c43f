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

BASELINES = ("rtn", "gptq", "absmean_ternary", "sign_rowscale")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """method: one of BASELINES; bits (rtn, gptq: 2, 3, 4 or 8); group_size (rtn, gptq)."""
    method: str
    bits: int | None = None
    group_size: int = 128

    def __post_init__(self):
        if self.method not in BASELINES:
            raise ValueError(f"method must be one of {BASELINES}, got {self.method!r}")
        if self.method in ("rtn", "gptq") and self.bits not in (2, 3, 4, 8):
            raise ValueError(f"{self.method} needs bits in (2, 3, 4, 8), got {self.bits!r}")

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
    return isinstance(config, BaselineConfig) and config.method == "gptq"


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
    m, n_in = config.method, W.shape[1]
    if m == "gptq":
        if hessian is None:
            raise ValueError("gptq needs calibration data (a Hessian)")
        W_hat = gptq_quantize(W, hessian, config.bits, config.group_size, name=name)
    elif m == "rtn":
        W_hat = baselines.rtn(W, config.bits, config.group_size)
    elif m == "absmean_ternary":
        W_hat = baselines.absmean_ternary(W)
    else:
        W_hat = baselines.sign_rowscale(W)
    params = {"bits": config.bits, "group_size": config.group_size} if m in ("rtn", "gptq") else {}
    return DenseQuantized(W_hat, baselines.bits_all_in(m, n_in, **params))
