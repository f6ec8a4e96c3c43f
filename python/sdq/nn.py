"""SDQLinear: an nn.Module that holds a layer's packed codes and computes from them."""
from __future__ import annotations

import json

import torch
from torch import nn

from .config import SDQConfig
from .weight import STATE_KEYS, CheckpointError, QuantizedWeight


class SDQLinear(nn.Module):
    """Drop-in replacement of nn.Linear whose weight is a QuantizedWeight.

    The packed planes, fp16 scales and means, Hadamard signs and the metadata are buffers, so the
    module's state_dict is the packed form (never dequantized floats). forward() computes through
    the add-only ops (sdq.ops), or through a dequantized weight built once and cached (not part of
    the state dict) when use_kernels is False or the input is longer than max_kernel_tokens.

    Like a PyTorch module, it follows device moves (`.to(device)`, `.cuda()`); unlike one, its
    packed tensors ignore dtype casts (`.half()`, `.bfloat16()`, `.float()`, `.to(dtype)`): the
    codes, fp16 scales and means and float32 transform constants stay exactly as stored (as
    bitsandbytes does for its packed weights), while the bias follows the cast. The output has the
    input's dtype. Gradients flow to the input, and to `scale` and `mean` when they require grad
    (see README, "Training adapters"); the codes are frozen.
    """

    # Tensors whose dtype is part of the packed format or of the kernels' contract.
    FIXED_DTYPE = ("sign", "nonzero", "scale", "mean", "hadamard_signs", "meta",
                   "transform_signs", "down_full", "down_last")

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
        self._register_constants()

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
                             torch.ones(cfg.block_size, dtype=torch.int8))
        return cls(qw, torch.zeros(out) if bias else None)

    def _packed(self) -> dict[str, torch.Tensor]:
        """The packed form's tensors (QuantizedWeight.state_dict's keys), as held now."""
        return {k: self._buffers[k] for k in (*STATE_KEYS, "meta") if self._buffers.get(k) is not None}

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight.from_state_dict(self._packed())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._dense = None  # new codes: cached derived state is stale
        self._register_constants()

    def _check_incoming(self, state_dict, prefix: str) -> None:
        """The packed tensors about to be loaded must form a valid packed weight (format
        invariants, metadata) of this layer's shape and config: the kernels read self.config."""
        incoming = {k: state_dict[prefix + k] for k in (*STATE_KEYS, "meta")
                    if prefix + k in state_dict}
        if not incoming:
            return
        name = prefix.rstrip(".") or type(self).__name__
        qw = QuantizedWeight.from_state_dict({**self._packed(), **incoming}, name=name)
        if (qw.out_features, qw.in_features) != (self.out_features, self.in_features) or \
                qw.config != self.config:
            raise CheckpointError(f"{name}: the packed weight being loaded is [out, in] = "
                                  f"[{qw.out_features}, {qw.in_features}] with {qw.config}, this "
                                  f"layer is [{self.out_features}, {self.in_features}] with "
                                  f"{self.config}")

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight, float32 on the CPU, built once (derived state, not stored)."""
        if self._dense is None:
            cpu = {k: v.detach().cpu() for k, v in self._packed().items()}
            self._dense = QuantizedWeight.from_state_dict(cpu).dequantize()
        return self._dense

    def _register_constants(self) -> None:
        """The activation transform's float32 constants as non-persistent buffers: they follow
        device moves like the codes, and are built here, not in forward, so that torch.compile
        traces only the ops."""
        from .ops import transform_constants
        constants = transform_constants(self.in_features, self.config, self.hadamard_signs.cpu())
        for name, t in zip(("transform_signs", "down_full", "down_last"), constants):
            self.register_buffer(name, None if t is None else t.to(self.sign.device),
                                 persistent=False)

    def transform_constants(self):
        """(signs or None, down_full, down_last) of the activation transform."""
        return self.transform_signs, self.down_full, self.down_last

    def _apply(self, fn, recurse=True):
        """Device moves apply to every tensor; dtype casts only to the bias (see class doc)."""
        fixed = {k: self._buffers[k] for k in self.FIXED_DTYPE if self._buffers.get(k) is not None}
        for k in fixed:
            self._buffers[k] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in fixed.items():
                moved = fn(t)
                self._buffers[k] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops
        if not x.is_floating_point():
            raise TypeError(f"SDQLinear expects a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SDQLinear expects inputs [..., {self.in_features}], "
                             f"got {tuple(x.shape)}")
        if x.device != self.sign.device:
            raise RuntimeError(f"input is on {x.device} but this SDQLinear is on "
                               f"{self.sign.device}; move one of them (module.to(device))")
        tokens = x.numel() // self.in_features
        limit = self.max_kernel_tokens
        if self.use_kernels and (limit is None or tokens <= limit):
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
