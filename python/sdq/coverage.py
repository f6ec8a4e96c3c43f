"""Coverage: which parameters a quantize_ run packed, and which stayed in full precision and why.

QuantizeReport.coverage holds model_coverage's dict; the CLI and `sdq info` print coverage_lines.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .traversal import LayerPlan

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


def check_strict(plans: list[LayerPlan]) -> None:
    """strict=True: weights that would silently stay in full precision are an error, before any
    work. Routers and filter_fn exclusions are deliberate, so they pass."""
    skipped = [f"layer {i} {name} ({reason})" for i, plan in enumerate(plans)
               for name, (_, reason) in plan.unsupported.items()]
    if skipped:
        more = f"; and {len(skipped) - 4} more" if len(skipped) > 4 else ""
        raise ValueError(f"strict: {len(skipped)} linear-like weight(s) in the decoder layers "
                         f"cannot be quantized and would stay in full precision: "
                         f"{'; '.join(skipped[:4])}{more}")
