"""SDQLinear: an nn.Module that holds a layer's packed codes and computes from them."""
from __future__ import annotations

import json

import torch

from .config import SDQConfig
from .packed_linear import PackedLinear, set_max_kernel_tokens
from .weight import STATE_KEYS, QuantizedWeight

__all__ = ["SDQLinear", "set_max_kernel_tokens"]


class SDQLinear(PackedLinear):
    """Drop-in replacement of nn.Linear whose weight is a QuantizedWeight (Sigma-Delta codes).

    The packed planes, fp16 scales and means, Hadamard signs and the metadata are buffers; the
    activation transform's float32 constants are non-persistent buffers built from them. The
    module contract (dtype casts, device moves, fallback, checked loads) is PackedLinear's.
    forward() computes through the add-only ops (sdq.ops). Gradients flow to the input, and to
    `scale` and `mean` when they require grad (README, "Training adapters"); the codes are frozen.
    """

    WEIGHT = QuantizedWeight
    PACKED_KEYS = STATE_KEYS
    # Tensors whose dtype is part of the packed format or of the kernels' contract.
    FIXED_DTYPE = (*STATE_KEYS, "meta", "transform_signs", "down_full", "down_last")

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__(qw, bias)
        if "nonzero" not in self._buffers:
            self.register_buffer("nonzero", None)
        self._register_constants()

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

    def _after_load(self) -> None:
        self._register_constants()

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops
        return ops.sdq_linear(self, x)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"osr={c.osr:g}, levels={c.levels}, order={c.order}, block_size={c.block_size}")

