"""quantize_: one pipeline for every method, decoder layer by decoder layer.

With calibration, the inputs of layer l+1 are produced by the already-quantized layer l, and each
linear's Hessian 2/n sum x x^T comes from those inputs (GPTQ's sequential scheme). Memory stays at
one layer's activations for the calibration set plus the model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import SDQConfig
from .methods import DenseQuantized, needs_calibration, quantize_linear
from .nn import SDQLinear
from .traversal import capture_layer_inputs, collect_hessians, decoder_layers, linear_modules


@dataclasses.dataclass
class QuantizeReport:
    """What quantize_ did: per linear (layer index, name) its config and all-in bits."""
    method: dict
    calibrated: bool
    linears: dict = dataclasses.field(default_factory=dict)  # (layer, name) -> dict

    @property
    def bits_per_weight_all_in(self) -> float:
        """Parameter-weighted all-in bits over the quantized linears."""
        total = sum(v["numel"] for v in self.linears.values())
        return sum(v["bits_all_in"] * v["numel"] for v in self.linears.values()) / total

    @property
    def average_osr(self) -> float | None:
        if not all("osr" in v for v in self.linears.values()):
            return None
        total = sum(v["numel"] for v in self.linears.values())
        return sum(v["osr"] * v["numel"] for v in self.linears.values()) / total


def _replace(layer: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    setattr(parent, child, new)


def _apply(layer: nn.Module, name: str, linear: nn.Linear, result) -> None:
    """Put the quantized weight in place: packed SDQLinear, or the baseline's dense weight."""
    if isinstance(result, DenseQuantized):
        linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
    else:
        bias = None if linear.bias is None else linear.bias.data
        _replace(layer, name, SDQLinear.from_quantized(result, bias))


@torch.no_grad()
def quantize_(model: nn.Module, config, calibration: torch.Tensor | None = None, *,
              osr_for: Callable[[int, str], float] | None = None,
              filter_fn: Callable[[int, str, nn.Linear], bool] | None = None,
              progress: bool = True) -> QuantizeReport:
    """Quantize the nn.Linear modules of every decoder layer of `model`, in place.

    config:      SDQConfig (packed SDQLinear modules) or methods.BaselineConfig (dense, for
                 comparisons). Embeddings and the LM head are left alone.
    calibration: LongTensor [n, seqlen] of token ids; enables the calibrated variants (SDQ with
                 GPTQ compensation; required by GPTQ).
    osr_for:     (layer index, linear name) -> OSR, e.g. a MultiOSR allocation (SDQ only).
    filter_fn:   (layer index, linear name, module) -> bool, which linears to quantize.
    """
    if needs_calibration(config) and calibration is None:
        raise ValueError(f"{config.method} needs calibration data")
    if osr_for is not None and not isinstance(config, SDQConfig):
        raise ValueError("a per-linear OSR allocation only applies to SDQ")
    layers = decoder_layers(model)
    report = QuantizeReport(config.to_dict(), calibration is not None)
    hidden = kwargs = None
    if calibration is not None:
        hidden, kwargs = capture_layer_inputs(model, calibration)
    bar = tqdm(list(enumerate(layers)), desc="quantize", unit="layer", disable=not progress)
    for index, layer in bar:
        linears = {n: m for n, m in linear_modules(layer).items()
                   if filter_fn is None or filter_fn(index, n, m)}
        hessians = collect_hessians(layer, hidden, kwargs, list(linears)) if hidden is not None else {}
        for name, linear in linears.items():
            cfg = config if osr_for is None else config.replace(osr=osr_for(index, name))
            result = quantize_linear(linear.weight.data.float(), cfg, hessians.get(name))
            report.linears[(index, name)] = {
                "numel": linear.weight.numel(), "bits_all_in": result.bits_per_weight_all_in,
                **({"osr": cfg.osr} if isinstance(cfg, SDQConfig) else {})}
            _apply(layer, name, linear, result)
        del hessians
        if hidden is not None:
            from .traversal import run_layer
            hidden = run_layer(layer, hidden, kwargs)
    return report
