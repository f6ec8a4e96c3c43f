"""Packed layers computed as dense matmuls for a while: the calibration forward of quantized layers.

After a decoder layer is quantized, its outputs on the calibration set (the next layer's inputs)
are computed through the packed layers: hundreds of tokens per call, where a dense matmul on the
dequantized weight is several times faster than the add-only kernels and gives the same values.
The dense copies live only inside the `with` block, on the packed layer's device; nothing is cached
on the packed modules.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .packed_linear import PackedLinear


class _DenseLinear(nn.Module):
    """The dequantized weight of one packed layer; computes in its input's dtype like it."""

    def __init__(self, packed: PackedLinear):
        super().__init__()
        device = packed.scale.device
        self.weight = packed.quantized_weight().dequantize().to(device)
        self.bias = packed.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, b)


@contextlib.contextmanager
def dense_packed_layers(module: nn.Module):
    """Inside the block, every packed layer (SDQLinear, WGMLinear, also inside SDQExperts) of
    `module` is replaced by a dense linear of its dequantized weight; restored on exit."""
    swaps = [(parent, name, child) for parent in module.modules()
             for name, child in parent._modules.items() if isinstance(child, PackedLinear)]
    try:
        for parent, name, child in swaps:
            parent._modules[name] = _DenseLinear(child)
        yield module
    finally:
        for parent, name, child in swaps:
            parent._modules[name] = child
