"""quantize_: one pipeline for every method, decoder layer by decoder layer.

With calibration, the inputs of layer l+1 are produced by the already-quantized layer l, and each
linear's Hessian 2/n sum x x^T comes from those inputs (GPTQ's sequential scheme); each expert of
a fused MoE module gets its Hessians from the tokens routed to it. Memory stays at one layer's
activations for the calibration set plus the model.

The report says what was quantized and, grouped, what stayed in full precision and why
(coverage_lines prints it).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import experts as moe
from .config import SDQConfig
from .coverage import check_strict, coverage_lines, model_coverage
from .device import resolve as resolve_device
from .finetune import DEFAULT_LR, cached_teacher, finetune
from .methods import DenseQuantized, WGMConfig, needs_calibration, quantize_linear
from .nn import SDQLinear
from .traversal import (
    HessianAccumulator, LayerPlan, capture_layer_inputs, decoder_layers, plan_layer, run_layer,
)
from .wgm_nn import WGMLinear
from .wgm_weight import WGMWeight

@dataclasses.dataclass
class QuantizeReport:
    """What quantize_ did: per linear (layer index, name) its config and all-in bits; and the
    coverage: {"total_params", "quantized_params", "full_precision": {group: {"params",
    "tensors", "reason", "weights": [{"name", "params", "reason"}] (listed groups only)}}}."""
    method: dict
    calibrated: bool
    linears: dict = dataclasses.field(default_factory=dict)  # (layer, name) -> dict
    coverage: dict = dataclasses.field(default_factory=dict)
    finetune: dict | None = None  # sdq.finetune's report (FinetuneReport.to_dict()) when it ran

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

    def coverage_lines(self) -> list[str]:
        return coverage_lines(self.coverage)


# --- quantization --------------------------------------------------------------------------


def _replace(layer: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in the place of the module `name`, on that module's device (packed weights are
    built on the CPU; a layer quantized on a GPU stays there)."""
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    old = getattr(parent, child)
    place = next(old.parameters(), None)
    setattr(parent, child, new if place is None else new.to(place.device))


def _apply(layer: nn.Module, name: str, linear: nn.Linear, result) -> None:
    """Put the quantized weight in place: packed SDQLinear or WGMLinear, or the baseline's dense
    weight."""
    if isinstance(result, DenseQuantized):
        linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
    elif isinstance(result, WGMWeight):
        bias = None if linear.bias is None else linear.bias.data
        _replace(layer, name, WGMLinear.from_quantized(result, bias))
    else:
        bias = None if linear.bias is None else linear.bias.data
        _replace(layer, name, SDQLinear.from_quantized(result, bias))


def _apply_experts(layer: nn.Module, name: str, fused: nn.Module, results: dict) -> None:
    """Put quantized experts in place: an SDQExperts, or the baseline's dense expert weights."""
    if all(isinstance(r, DenseQuantized) for r in results.values()):
        moe.write_dense(fused, results)
    else:
        _replace(layer, name, moe.SDQExperts.from_quantized(fused, results))


def _layer_hessians(layer: nn.Module, linears: dict, experts: dict, optional: set,
                    hidden: torch.Tensor, kwargs: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the layer once on the calibration inputs: the Hessian of every linear and of every
    routed expert's projections ("mlp.experts.gate_up_proj.5"), and the tokens each saw. Experts
    no token reached have none (they are quantized data-free); linears in `optional` may have
    none (routed ones; sdq.distributed checks the counts of all ranks instead)."""
    with contextlib.ExitStack() as stack:
        acc = stack.enter_context(HessianAccumulator(layer, list(linears)))
        expert_accs = {n: stack.enter_context(moe.ExpertHessians(m)) for n, m in experts.items()}
        run_layer(layer, hidden, kwargs)
    hessians, counts = acc.hessians(optional=optional), acc.counts()
    for name, expert_acc in expert_accs.items():
        hessians.update({f"{name}.{sub}": h for sub, h in expert_acc.hessians().items()})
        counts.update({f"{name}.{sub}": c for sub, c in expert_acc.counts().items()})
    return hessians, counts


@dataclasses.dataclass
class _Quantizer:
    """Quantizes one weight with the run's config and records it in the report."""
    config: object
    osr_for: Callable[[int, str], float] | None
    report: QuantizeReport

    def __call__(self, index: int, name: str, weight: torch.Tensor, hessian):
        cfg = self.config if self.osr_for is None else self.config.replace(
            osr=self.osr_for(index, name))
        if hessian is None and needs_calibration(cfg):
            # An expert no calibration token reached: GPTQ on white inputs (H = I) is
            # round-to-nearest on GPTQ's grid, its data-free form.
            hessian = torch.eye(weight.shape[1], device=weight.device)
        result = quantize_linear(weight.float(), cfg, hessian, name=f"layer {index} {name}")
        self.report.linears[(index, name)] = {
            "numel": weight.numel(), "bits_all_in": result.bits_per_weight_all_in,
            **({"osr": cfg.osr} if isinstance(cfg, SDQConfig) else {})}
        return result


def _selected(index: int, plan: LayerPlan, filter_fn) -> tuple[dict, dict]:
    """The plan's linears and fused experts that filter_fn keeps (all of them without one).
    Fused experts are kept or excluded as a whole, under their module name."""
    if filter_fn is None:
        return plan.linears, plan.experts
    return ({n: m for n, m in plan.linears.items() if filter_fn(index, n, m)},
            {n: m for n, m in plan.experts.items() if filter_fn(index, n, m)})


def _check_wgm_request(config, calibrated: bool, selected: list) -> None:
    """WGM is data-free, and its packed form has no fused-experts module (SDQExperts holds
    SDQLinear children only): refuse both before any work."""
    if not isinstance(config, WGMConfig):
        return
    if calibrated:
        raise ValueError("wgm is data-free: pass no calibration data (no GPTQ compensation)")
    if any(experts for _, experts in selected):
        raise ValueError("wgm does not pack fused MoE experts; leave them out with filter_fn")


@torch.no_grad()
def quantize_(model: nn.Module, config, calibration: torch.Tensor | None = None, *,
              osr_for: Callable[[int, str], float] | None = None,
              filter_fn: Callable[[int, str, nn.Module], bool] | None = None,
              strict: bool = False, progress: bool = True,
              device: str | torch.device | None = None, finetune_steps: int = 0,
              finetune_lr: float = DEFAULT_LR, finetune_seed: int = 0) -> QuantizeReport:
    """Quantize the nn.Linear modules and fused MoE experts of every decoder layer, in place.

    config:      SDQConfig (packed SDQLinear / SDQExperts modules), WGMConfig (packed WGMLinear,
                 data-free, no fused experts) or methods.BaselineConfig (dense, for
                 comparisons). Embeddings, the LM head and MoE routers are left alone.
    calibration: LongTensor [n, seqlen] of token ids; enables the calibrated variants (SDQ with
                 GPTQ compensation; required by GPTQ).
    osr_for:     (layer index, weight name) -> OSR, e.g. a MultiOSR allocation (SDQ only); fused
                 experts' weights are named like "mlp.experts.gate_up_proj.5".
    filter_fn:   (layer index, name, module) -> bool, which linears (and fused experts modules,
                 as a whole) to quantize.
    strict:      raise, before any work, if a linear-like weight of the decoder layers cannot be
                 quantized (it would stay in full precision).
    device:      move the model there first ("cuda", "cpu", "auto": a GPU when one is visible);
                 None: where it is. Capture, Hessians, code selection, compensation and refits
                 run on the model's device (sdq.device); the model stays there.
    finetune_steps, finetune_lr, finetune_seed: after quantizing, tune the scales, means and norms
                 end to end against the model as it was (sdq.finetune; its top-k next-token
                 probabilities on the calibration sequences are cached before quantizing, so no
                 copy of the model is kept). SDQ with calibration only; 0 steps: off.
    """
    target = None if device is None else resolve_device(device)
    layers = decoder_layers(model)
    plans, selected, quantize = prepare(model, config, calibration is not None,
                                        osr_for=osr_for, filter_fn=filter_fn, strict=strict)
    if target is not None:
        model.to(target)
    report = quantize.report
    teacher = cached_teacher(model, config, calibration, finetune_steps, progress=progress)
    hidden = kwargs = None
    if calibration is not None:
        hidden, kwargs = capture_layer_inputs(model, calibration)
    bar = tqdm(list(enumerate(layers)), desc="quantize", unit="layer", disable=not progress)
    for index, layer in bar:
        hidden = quantize_layer(index, layer, plans[index], selected[index], quantize, hidden,
                                kwargs)
    if teacher is not None:
        report.finetune = finetune(model, teacher, None, finetune_steps, lr=finetune_lr,
                                   seed=finetune_seed, progress=progress).to_dict()
    return report


def prepare(model: nn.Module, config, calibrated: bool, *, osr_for=None, filter_fn=None,
            strict: bool = False) -> tuple[list[LayerPlan], list[tuple[dict, dict]], _Quantizer]:
    """Check the request and plan every decoder layer of `model` (its parameters may be on the
    meta device): (plans, the selected (linears, experts) of each layer, the quantizer whose
    report holds the coverage). Raises, before any work, on a request that cannot be served."""
    if needs_calibration(config) and not calibrated:
        raise ValueError(f"{config.method} needs calibration data")
    if osr_for is not None and not isinstance(config, SDQConfig):
        raise ValueError("a per-linear OSR allocation only applies to SDQ")
    plans = [plan_layer(layer) for layer in decoder_layers(model)]
    if strict:
        check_strict(plans)
    selected = [_selected(i, plan, filter_fn) for i, plan in enumerate(plans)]
    _check_wgm_request(config, calibrated, selected)
    excluded = {(i, n) for i, plan in enumerate(plans)
                for n in (*plan.linears, *plan.experts)
                if n not in selected[i][0] and n not in selected[i][1]}
    report = QuantizeReport(config.to_dict(), calibrated,
                            coverage=model_coverage(model, plans, excluded))
    return plans, selected, _Quantizer(config, osr_for, report)


def quantize_layer(index: int, layer: nn.Module, plan: LayerPlan, selected: tuple[dict, dict],
                   quantize: _Quantizer, hidden: torch.Tensor | None = None,
                   kwargs: dict | None = None) -> torch.Tensor | None:
    """Quantize the selected linears and fused experts of decoder layer `index` in place
    (calibrated when `hidden`, the layer's inputs, is given). Returns the next layer's inputs:
    `hidden` run through the quantized layer (None data-free). quantize_ calls it for every layer
    of a model in memory; sdq.streaming for one layer at a time read from disk."""
    linears, experts = selected
    hessians = {} if hidden is None else _layer_hessians(
        layer, linears, experts, plan.routed & set(linears), hidden, kwargs)[0]
    for name, linear in linears.items():
        result = quantize(index, name, linear.weight.data, hessians.get(name))
        _apply(layer, name, linear, result)
    for name, fused in experts.items():
        results = {sub: quantize(index, f"{name}.{sub}", w, hessians.get(f"{name}.{sub}"))
                   for sub, w in moe.expert_weights(fused).items()}
        _apply_experts(layer, name, fused, results)
    del hessians
    return None if hidden is None else run_layer(layer, hidden, kwargs)
