"""WGMLinear: an nn.Module that holds a WGM (dynamic-grouping) weight packed and computes from it.

Same contract as sdq.SDQLinear: the buffers are the packed form (sign and index planes, fp16
scales, metadata), never dequantized floats; dtype casts (`.half()`, `.bfloat16()`, `.to(dtype)`)
leave them as stored and cast only the bias, device moves apply to everything; the output has the
input's dtype; use_kernels False (or an input longer than max_kernel_tokens) computes through a
dequantized weight built once and cached (not part of the state dict).
"""
from __future__ import annotations

import json

import torch
from torch import nn

from .weight import CheckpointError
from .wgm_weight import BLOCK, STATE_KEYS, WGMWeight, index_bits, num_blocks, words_for


class WGMLinear(nn.Module):
    """Drop-in replacement of nn.Linear whose weight is a WGMWeight (sdq.wgm_ops computes)."""

    FIXED_DTYPE = ("sign", "index", "scale", "meta")  # the packed format's dtypes

    def __init__(self, qw: WGMWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.config = qw.config
        for name, t in qw.state_dict().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self._dense: torch.Tensor | None = None
        self.use_kernels = True  # False: the dequantize-then-matmul path (reference, debugging)
        # Inputs with more tokens than this use the cached dequantized weight (faster for long
        # prefill and perplexity runs); None: never.
        self.max_kernel_tokens: int | None = None

    @classmethod
    def from_quantized(cls, qw: WGMWeight, bias: torch.Tensor | None = None) -> "WGMLinear":
        return cls(qw, bias)

    @classmethod
    def empty_like(cls, meta_json: str, bias: bool) -> "WGMLinear":
        """A module of the right shapes, to be filled by load_state_dict (used by sdq.load)."""
        from .methods.wgm import WGMConfig
        meta = json.loads(meta_json)
        cfg = WGMConfig.from_dict(meta["config"])
        out, n_in = meta["out_features"], meta["in_features"]
        words, g = words_for(n_in), cfg.groups
        scale = (out, num_blocks(n_in), g) if cfg.block_mode else (g,)
        qw = WGMWeight(out, n_in, cfg, torch.zeros(out, words, dtype=torch.int32),
                       torch.zeros(index_bits(g), out, words, dtype=torch.int32),
                       torch.zeros(scale, dtype=torch.float16))
        return cls(qw, torch.zeros(out) if bias else None)

    def _packed(self) -> dict[str, torch.Tensor]:
        return {k: self._buffers[k] for k in (*STATE_KEYS, "meta")}

    def quantized_weight(self) -> WGMWeight:
        return WGMWeight.from_state_dict({k: v.detach().cpu() for k, v in self._packed().items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._dense = None  # new codes: the cached dense weight is stale

    def _check_incoming(self, state_dict, prefix: str) -> None:
        """The packed tensors about to be loaded must form a valid WGM weight of this layer's
        shape and config: the kernel reads shapes from the tensors, not from self.config."""
        incoming = {k: state_dict[prefix + k] for k in (*STATE_KEYS, "meta")
                    if prefix + k in state_dict}
        if not incoming:
            return
        name = prefix.rstrip(".") or type(self).__name__
        qw = WGMWeight.from_state_dict({**self._packed(), **incoming}, name=name)
        if (qw.out_features, qw.in_features) != (self.out_features, self.in_features) or \
                qw.config != self.config:
            raise CheckpointError(f"{name}: the packed weight being loaded is [out, in] = "
                                  f"[{qw.out_features}, {qw.in_features}] with {qw.config}, this "
                                  f"layer is [{self.out_features}, {self.in_features}] with "
                                  f"{self.config}")

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight, float32 on the CPU, built once (derived state, not stored)."""
        if self._dense is None:
            self._dense = self.quantized_weight().dequantize()
        return self._dense

    def _apply(self, fn, recurse=True):
        """Device moves apply to every tensor; dtype casts only to the bias (see module doc)."""
        fixed = {k: self._buffers[k] for k in self.FIXED_DTYPE}
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
        from . import wgm_ops  # noqa: F401  registers torch.ops.sdq.wgm_gemm
        if not x.is_floating_point():
            raise TypeError(f"WGMLinear expects a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"WGMLinear expects inputs [..., {self.in_features}], "
                             f"got {tuple(x.shape)}")
        if x.device != self.sign.device:
            raise RuntimeError(f"input is on {x.device} but this WGMLinear is on "
                               f"{self.sign.device}; move one of them (module.to(device))")
        tokens = x.numel() // self.in_features
        limit = self.max_kernel_tokens
        if self.use_kernels and (limit is None or tokens <= limit):
            y = self._kernel_forward(x)
        else:
            w = self.dense_weight().to(device=x.device, dtype=x.dtype)
            y = torch.nn.functional.linear(x, w)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp16/bf16 run the float32 kernel and are rounded back; float64 runs plain torch."""
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        x2 = x.reshape(-1, self.in_features).to(compute)
        block = BLOCK if self.config.block_mode else 0
        y = torch.ops.sdq.wgm_gemm(x2, self.sign, self.index, self.scale, block)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def bits_per_weight_all_in(self) -> float:
        return self.quantized_weight().bits_per_weight_all_in

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={c.groups}, block_mode={c.block_mode}, method={c.method}")


def set_max_kernel_tokens(model: nn.Module, limit: int | None) -> None:
    """Route inputs of more than `limit` tokens through the dequantized weight in every
    WGMLinear (sdq.nn.set_max_kernel_tokens does the same for SDQLinear)."""
    for m in model.modules():
        if isinstance(m, WGMLinear):
            m.max_kernel_tokens = limit
