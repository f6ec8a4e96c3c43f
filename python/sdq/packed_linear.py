"""PackedLinear: what every packed layer (SDQLinear, WGMLinear) shares with nn.Linear's contract.

The buffers are the packed form (never dequantized floats), so the state dict is what is stored.
Device moves (`.to(device)`, `.cuda()`) apply to every tensor; dtype casts (`.half()`,
`.bfloat16()`, `.float()`, `.to(dtype)`) leave the packed tensors exactly as stored (their dtypes
are the format's and the kernels' contract: bitsandbytes' rule for packed weights) and cast only
the bias. The output has the input's dtype. forward() runs the subclass's kernels, or a dequantized
weight built once and cached (not stored) when use_kernels is False or the input has more tokens
than max_kernel_tokens. load_state_dict checks what it loads like sdq.load does.
"""
from __future__ import annotations

import torch
from torch import nn

from .weight import CheckpointError


class PackedLinear(nn.Module):
    """Base of the packed layers. Subclasses set WEIGHT (the packed weight type, with
    state_dict / from_state_dict(d, name=) / dequantize), PACKED_KEYS (its state_dict keys),
    FIXED_DTYPE (PACKED_KEYS and any derived constants) and _kernel_forward."""

    WEIGHT: type
    PACKED_KEYS: tuple[str, ...] = ()
    FIXED_DTYPE: tuple[str, ...] = ()

    def __init__(self, qw, bias: torch.Tensor | None = None):
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
        # prefill and perplexity runs on CPU, at the cost of keeping a dense copy); None: never.
        self.max_kernel_tokens: int | None = None

    @classmethod
    def from_quantized(cls, qw, bias: torch.Tensor | None = None):
        return cls(qw, bias)

    def _packed(self) -> dict[str, torch.Tensor]:
        """The packed form's tensors (the weight type's state_dict keys), as held now."""
        return {k: self._buffers[k] for k in (*self.PACKED_KEYS, "meta")
                if self._buffers.get(k) is not None}

    def quantized_weight(self):
        """The packed weight (a CPU copy), checked."""
        return self.WEIGHT.from_state_dict({k: v.detach().cpu() for k, v in self._packed().items()})

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight, float32 on the CPU, built once (derived state, not stored)."""
        if self._dense is None:
            self._dense = self.quantized_weight().dequantize()
        return self._dense

    @property
    def bits_per_weight_all_in(self) -> float:
        return self.quantized_weight().bits_per_weight_all_in

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._dense = None  # new codes: cached derived state is stale
        self._after_load()

    def _after_load(self) -> None:
        """Rebuild derived state that depends on the packed tensors (subclasses)."""

    def _check_incoming(self, state_dict, prefix: str) -> None:
        """The packed tensors about to be loaded must form a valid packed weight (format
        invariants, metadata) of this layer's shape and config: the kernels read self.config."""
        incoming = {k: state_dict[prefix + k] for k in (*self.PACKED_KEYS, "meta")
                    if prefix + k in state_dict}
        if not incoming:
            return
        name = prefix.rstrip(".") or type(self).__name__
        qw = self.WEIGHT.from_state_dict({**self._packed(), **incoming}, name=name)
        if (qw.out_features, qw.in_features) != (self.out_features, self.in_features) or \
                qw.config != self.config:
            raise CheckpointError(f"{name}: the packed weight being loaded is [out, in] = "
                                  f"[{qw.out_features}, {qw.in_features}] with {qw.config}, this "
                                  f"layer is [{self.out_features}, {self.in_features}] with "
                                  f"{self.config}")

    def _apply(self, fn, recurse=True):
        """Device moves apply to every tensor; dtype casts only to the bias (see module doc)."""
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
        # Kept lean: a decode step calls this once per layer, so every check reads plain
        # attributes (_buffers, _parameters) instead of nn.Module.__getattr__.
        scale = self._buffers["scale"]
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs [..., {self.in_features}], "
                             f"got {tuple(x.shape)}")
        if x.get_device() != scale.get_device() or x.is_meta != scale.is_meta:
            raise RuntimeError(f"input is on {x.device} but this {type(self).__name__} is on "
                               f"{scale.device}; move one of them (module.to(device))")
        limit = self.max_kernel_tokens
        if self.use_kernels and (limit is None or x.numel() // self.in_features <= limit):
            y = self._kernel_forward(x)
        else:
            w = self.dense_weight().to(device=x.device, dtype=x.dtype)
            y = torch.nn.functional.linear(x, w)
        bias = self._parameters.get("bias")
        return y if bias is None else y + bias.to(y.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def set_max_kernel_tokens(model: nn.Module, limit: int | None) -> None:
    """Route inputs of more than `limit` tokens through the dequantized weight in every packed
    layer of `model` (SDQLinear and WGMLinear)."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.max_kernel_tokens = limit
