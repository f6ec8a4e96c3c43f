"""WGMLinear: an nn.Module that holds a WGM (dynamic-grouping) weight packed and computes from it.

Same contract as sdq.SDQLinear (sdq.packed_linear.PackedLinear): the buffers are the packed form
(sign and index planes, fp16 scales, metadata); set_max_kernel_tokens covers both layer kinds.
"""
from __future__ import annotations

import json

import torch

from .packed_linear import PackedLinear, set_max_kernel_tokens
from .wgm_weight import BLOCK, STATE_KEYS, WGMWeight, index_bits, num_blocks, words_for


class WGMLinear(PackedLinear):
    """Drop-in replacement of nn.Linear whose weight is a WGMWeight (sdq.wgm_ops computes); the
    module contract (dtype casts, device moves, fallback, checked loads) is PackedLinear's."""

    WEIGHT = WGMWeight
    PACKED_KEYS = STATE_KEYS
    FIXED_DTYPE = (*STATE_KEYS, "meta")  # the packed format's dtypes

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

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp16/bf16 run the float32 kernel and are rounded back; float64 runs plain torch."""
        from . import wgm_ops  # noqa: F401  registers torch.ops.sdq.wgm_gemm
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        x2 = x.reshape(-1, self.in_features).to(compute)
        block = BLOCK if self.config.block_mode else 0
        y = torch.ops.sdq.wgm_gemm(x2, self.sign, self.index, self.scale, block)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={c.groups}, block_mode={c.block_mode}, method={c.method}")


__all__ = ["WGMLinear", "set_max_kernel_tokens"]
