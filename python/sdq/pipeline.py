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
from collections import defaultdict
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import experts as moe
from .config import SDQConfig
from .methods import DenseQuantized, needs_calibration, quantize_linear
from .nn import SDQLinear
from .traversal import (
    HessianAccumulator, LayerPlan, capture_layer_inputs, decoder_layers, plan_layer, run_layer,
)

# Why each group of parameters stays in full precision. Groups marked listed=True are printed
# weight by weight: they are the ones a user may not expect.
GROUPS = {
    "embeddings": ("input embeddings (a lookup table, not a matmul)", False),
    "lm_head": ("LM head (outside the decoder layers; quality-critical)", False),
    "norms": ("norm scales and other 1-D vectors", False),
    "biases": ("biases", False),
    "routers": ("MoE routers and expert gates (expert choice stays exact)", True),
    "excluded": ("excluded by filter_fn", True),
    "unsupported": ("weights sdq cannot quantize", True),
    "outside": ("weights outside the decoder layers", True),
}


@dataclasses.dataclass
class QuantizeReport:
    """What quantize_ did: per linear (layer index, name) its config and all-in bits; and the
    coverage: {"total_params", "quantized_params", "full_precision": {group: {"params",
    "tensors", "reason", "weights": [{"name", "params", "reason"}] (listed groups only)}}}."""
    method: dict
    calibrated: bool
    linears: dict = dataclasses.field(default_factory=dict)  # (layer, name) -> dict
    coverage: dict = dataclasses.field(default_factory=dict)

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


# --- coverage ------------------------------------------------------------------------------


def _layer_groups(plans: list[LayerPlan], excluded: set) -> dict[int, tuple[str, str | None]]:
    """id(parameter) -> (group, per-weight reason or None) for the weights the plans decide."""
    decided = {}
    for index, plan in enumerate(plans):
        for name, linear in plan.linears.items():
            decided[id(linear.weight)] = ("excluded" if (index, name) in excluded else "quantized",
                                          None)
        for name, module in plan.experts.items():
            for p in module.parameters():
                decided[id(p)] = ("excluded" if (index, name) in excluded else "quantized", None)
        for weight in plan.routers.values():
            decided[id(weight)] = ("routers", None)
        for weight, reason in plan.unsupported.values():
            decided[id(weight)] = ("unsupported", reason)
    return decided


def _group_of(name: str, p: torch.Tensor, embeddings: set, head: int | None) -> str:
    """The group of a weight no plan decided (outside the layers, or not linear-like)."""
    if name.endswith("bias"):
        return "biases"
    if id(p) in embeddings:
        return "embeddings"
    if id(p) == head:
        return "lm_head"
    return "norms" if p.dim() <= 1 else "outside"


def model_coverage(model: nn.Module, plans: list[LayerPlan], excluded: set = frozenset()) -> dict:
    """Every parameter of `model` (tied ones once) sorted into quantized or a full-precision
    group (GROUPS), as a JSON-able dict (QuantizeReport.coverage). plans: one per decoder layer;
    excluded: the (layer index, name) of planned linears and experts left out by filter_fn."""
    decided = _layer_groups(plans, excluded)
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                  for p in m.parameters()}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(out_emb, "weight", None)
    head = id(head_weight) if isinstance(head_weight, torch.Tensor) else None
    total, quantized = 0, 0
    groups = defaultdict(lambda: {"params": 0, "tensors": 0})
    for name, p in model.named_parameters():
        total += p.numel()
        group, reason = decided.get(id(p)) or (_group_of(name, p, embeddings, head), None)
        if group == "quantized":
            quantized += p.numel()
            continue
        entry = groups[group]
        entry["params"] += p.numel()
        entry["tensors"] += 1
        entry["reason"], listed = GROUPS[group]
        if listed:
            entry.setdefault("weights", []).append(
                {"name": name, "params": p.numel(), "reason": reason or entry["reason"]})
    ordered = {g: groups[g] for g in GROUPS if g in groups}
    return {"total_params": total, "quantized_params": quantized, "full_precision": ordered}


def coverage_lines(coverage: dict) -> list[str]:
    """The coverage as printable lines: the quantized share, then each full-precision group with
    its share of the model's parameters (and, for the listed groups, each weight)."""
    total = coverage["total_params"] or 1
    lines = [f"coverage: {100 * coverage['quantized_params'] / total:.1f}% of "
             f"{coverage['total_params']:,} parameters quantized; in full precision:"]
    kept = coverage["full_precision"]
    for group in sorted(kept, key=lambda g: list(GROUPS).index(g) if g in GROUPS else len(GROUPS)):
        entry = kept[group]  # (a saved config.json has its keys sorted: restore GROUPS' order)
        lines.append(f"  {group:<12}{100 * entry['params'] / total:6.2f}%  {entry['tensors']:>4} "
                     f"tensor{'s' if entry['tensors'] != 1 else ' '}  {entry['reason']}")
        for weight in entry.get("weights", []):
            note = "" if weight["reason"] == entry["reason"] else f": {weight['reason']}"
            lines.append(f"      {weight['name']} ({weight['params']:,} params){note}")
    return lines


def _check_strict(plans: list[LayerPlan]) -> None:
    """strict=True: weights that would silently stay in full precision are an error, before any
    work. Routers and filter_fn exclusions are deliberate, so they pass."""
    skipped = [f"layer {i} {name} ({reason})" for i, plan in enumerate(plans)
               for name, (_, reason) in plan.unsupported.items()]
    if skipped:
        more = f"; and {len(skipped) - 4} more" if len(skipped) > 4 else ""
        raise ValueError(f"strict: {len(skipped)} linear-like weight(s) in the decoder layers "
                         f"cannot be quantized and would stay in full precision: "
                         f"{'; '.join(skipped[:4])}{more}")


# --- quantization --------------------------------------------------------------------------


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


def _apply_experts(layer: nn.Module, name: str, fused: nn.Module, results: dict) -> None:
    """Put quantized experts in place: an SDQExperts, or the baseline's dense expert weights."""
    if all(isinstance(r, DenseQuantized) for r in results.values()):
        moe.write_dense(fused, results)
    else:
        _replace(layer, name, moe.SDQExperts.from_quantized(fused, results))


def _layer_hessians(layer: nn.Module, linears: dict, experts: dict, routed: set,
                    hidden: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
    """Run the layer once on the calibration inputs; the Hessian of every linear and of every
    routed expert's projections ("mlp.experts.gate_up_proj.5"). Experts no token reached have
    none (they are quantized data-free)."""
    with contextlib.ExitStack() as stack:
        acc = stack.enter_context(HessianAccumulator(layer, list(linears)))
        expert_accs = {n: stack.enter_context(moe.ExpertHessians(m)) for n, m in experts.items()}
        run_layer(layer, hidden, kwargs)
    hessians = acc.hessians(optional=routed)
    for name, expert_acc in expert_accs.items():
        hessians.update({f"{name}.{sub}": h for sub, h in expert_acc.hessians().items()})
    return hessians


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


@torch.no_grad()
def quantize_(model: nn.Module, config, calibration: torch.Tensor | None = None, *,
              osr_for: Callable[[int, str], float] | None = None,
              filter_fn: Callable[[int, str, nn.Module], bool] | None = None,
              strict: bool = False, progress: bool = True) -> QuantizeReport:
    """Quantize the nn.Linear modules and fused MoE experts of every decoder layer, in place.

    config:      SDQConfig (packed SDQLinear / SDQExperts modules) or methods.BaselineConfig
                 (dense, for comparisons). Embeddings, the LM head and MoE routers are left alone.
    calibration: LongTensor [n, seqlen] of token ids; enables the calibrated variants (SDQ with
                 GPTQ compensation; required by GPTQ).
    osr_for:     (layer index, weight name) -> OSR, e.g. a MultiOSR allocation (SDQ only); fused
                 experts' weights are named like "mlp.experts.gate_up_proj.5".
    filter_fn:   (layer index, name, module) -> bool, which linears (and fused experts modules,
                 as a whole) to quantize.
    strict:      raise, before any work, if a linear-like weight of the decoder layers cannot be
                 quantized (it would stay in full precision).
    """
    if needs_calibration(config) and calibration is None:
        raise ValueError(f"{config.method} needs calibration data")
    if osr_for is not None and not isinstance(config, SDQConfig):
        raise ValueError("a per-linear OSR allocation only applies to SDQ")
    layers = decoder_layers(model)
    plans = [plan_layer(layer) for layer in layers]
    if strict:
        _check_strict(plans)
    selected = [_selected(i, plan, filter_fn) for i, plan in enumerate(plans)]
    excluded = {(i, n) for i, plan in enumerate(plans)
                for n in (*plan.linears, *plan.experts)
                if n not in selected[i][0] and n not in selected[i][1]}
    report = QuantizeReport(config.to_dict(), calibration is not None,
                            coverage=model_coverage(model, plans, excluded))
    quantize = _Quantizer(config, osr_for, report)
    hidden = kwargs = None
    if calibration is not None:
        hidden, kwargs = capture_layer_inputs(model, calibration)
    bar = tqdm(list(enumerate(layers)), desc="quantize", unit="layer", disable=not progress)
    for index, layer in bar:
        linears, experts = selected[index]
        hessians = {} if hidden is None else _layer_hessians(
            layer, linears, experts, plans[index].routed & set(linears), hidden, kwargs)
        for name, linear in linears.items():
            result = quantize(index, name, linear.weight.data, hessians.get(name))
            _apply(layer, name, linear, result)
        for name, fused in experts.items():
            results = {sub: quantize(index, f"{name}.{sub}", w, hessians.get(f"{name}.{sub}"))
                       for sub, w in moe.expert_weights(fused).items()}
            _apply_experts(layer, name, fused, results)
        del hessians
        if hidden is not None:
            hidden = run_layer(layer, hidden, kwargs)
    return report
