"""Low-rank adapters (LoRA) on top of a quantized model: the packed codes stay frozen.

    model = sdq.load("out")
    params = sdq.lora.add_lora(model, rank=8)        # wraps every SDQLinear / WGMLinear
    opt = torch.optim.AdamW(params, lr=1e-3)

Each wrapped layer computes base(x) + (alpha / rank) * up(down(dropout(x))) with `up` initialised
to zero, so training starts from the quantized model exactly. Gradients reach the adapters through
the add-only ops' backward (sdq.ops); nothing of the packed form is trained or changed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .packed_linear import PackedLinear


class LoRALinear(nn.Module):
    """A packed layer (SDQLinear or WGMLinear) plus a trainable low-rank update."""

    def __init__(self, base: PackedLinear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.up(self.down(self.dropout(x).to(self.down.weight.dtype)))
        return self.base(x) + (update * self.scaling).to(x.dtype)

    def merged_update(self) -> torch.Tensor:
        """The adapter's dense weight update [out, in] (scaling included)."""
        return (self.up.weight @ self.down.weight) * self.scaling


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             filter_fn: Callable[[str, PackedLinear], bool] | None = None) -> list[nn.Parameter]:
    """Wrap the packed layers of `model` (SDQLinear, WGMLinear; those `filter_fn(name, module)`
    accepts) in LoRALinear, in place; freeze every other parameter; return the adapters'
    parameters."""
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, PackedLinear) and (filter_fn is None or filter_fn(n, m))]
    if not targets:
        raise ValueError("no SDQLinear or WGMLinear modules to adapt: quantize or load an sdq "
                         "model first")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name, module in targets:
        adapter = LoRALinear(module, rank, alpha, dropout)
        device = module.scale.device
        adapter.down.to(device)
        adapter.up.to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, adapter)
        params += [adapter.down.weight, adapter.up.weight]
    return params
