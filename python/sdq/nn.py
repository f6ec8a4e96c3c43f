"""SDQLinear: an nn.Module that holds a layer's packed codes and computes from them."""
from __future__ import annotations

import json

import torch
from torch import nn

from .config import SDQConfig
from .weight import QuantizedWeight


class SDQLinear(nn.Module):
    """Drop-in replacement of nn.Linear whose weight is a QuantizedWeight.

    The packed planes, fp16 scales and means, Hadamard signs and the metadata are buffers, so the
    module's state_dict is the packed form (never dequantized floats). forward() uses the add-only
    kernels (sdq.ops) when they support the input, else a dequantized weight built once and cached
    (not part of the state dict).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.config: SDQConfig = qw.config
        for name, t in qw.state_dict().items():
            self.register_buffer(name, t)
        if "nonzero" not in self._buffers:
            self.register_buffer("nonzero", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._dense: torch.Tensor | None = None
        self.use_kernels = True  # False: the dequantize-then-matmul path (reference, debugging)
        # Inputs with more tokens than this use the cached dequantized weight (faster for long
        # prefill and perplexity runs on CPU, at the cost of keeping a dense copy); None: never.
        self.max_kernel_tokens: int | None = None
        self._constants = self._make_constants()

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "SDQLinear":
        return cls(qw, bias)

    @classmethod
    def empty_like(cls, meta_json: str, bias: bool) -> "SDQLinear":
        """A module of the right shapes, to be filled by load_state_dict (used by sdq.load)."""
        meta = json.loads(meta_json)
        cfg = SDQConfig.from_dict(meta["config"])
        out, n_in = meta["out_features"], meta["in_features"]
        from . import blocks
        cols, nb = blocks.packed_shape(n_in, cfg.block_size, cfg.osr)
        words = cols // 32
        z = lambda *s, dt: torch.zeros(*s, dtype=dt)  # noqa: E731
        qw = QuantizedWeight(out, n_in, cfg, z(out, words, dt=torch.int32),
                             z(out, words, dt=torch.int32) if cfg.levels == "ternary" else None,
                             z(out, nb, dt=torch.float16), z(out, nb, dt=torch.float16),
                             z(cfg.block_size, dt=torch.int8))
        return cls(qw, torch.zeros(out) if bias else None)

    def quantized_weight(self) -> QuantizedWeight:
        d = {k: v for k, v in self._buffers.items() if v is not None}
        return QuantizedWeight.from_state_dict(d)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._dense = None  # new codes: cached derived state is stale
        self._constants = self._make_constants()

    def dense_weight(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.quantized_weight().dequantize()
        return self._dense

    def _make_constants(self):
        """Built eagerly (not in forward) so that torch.compile traces only the ops."""
        from .ops import TransformConstants
        return TransformConstants(self.in_features, self.config, self.hadamard_signs)

    def transform_constants(self):
        return self._constants

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops
        tokens = x.numel() // self.in_features
        limit = self.max_kernel_tokens
        if self.use_kernels and ops.supports(x) and (limit is None or tokens <= limit):
            y = ops.sdq_linear(self, x)
        else:
            w = self.dense_weight().to(device=x.device, dtype=x.dtype)
            y = torch.nn.functional.linear(x, w)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def bits_per_weight_all_in(self) -> float:
        return self.quantized_weight().bits_per_weight_all_in

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"osr={c.osr:g}, levels={c.levels}, order={c.order}, block_size={c.block_size}")


def set_max_kernel_tokens(model: nn.Module, limit: int | None) -> None:
    """Route inputs of more than `limit` tokens through the dequantized weight in every SDQLinear."""
    for m in model.modules():
        if isinstance(m, SDQLinear):
            m.max_kernel_tokens = limit
