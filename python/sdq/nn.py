"""SDQLinear: an nn.Module that holds a layer's packed codes and computes from them."""
from __future__ import annotations

import json

import torch

from . import ops, plan_op
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
    # Derived forms of the codes (non-persistent, never stored): ternary bitplanes (bitplanes())
    # and binary's tile repack for the CPU int8-table kernel (lut_codes()).
    PLANE_KEYS = ("bitplane_sign", "bitplane_nonzero", "lut_binary_codes")
    # Tensors whose dtype is part of the packed format or of the kernels' contract.
    FIXED_DTYPE = (*STATE_KEYS, "meta", "transform_signs", "down_full", "down_last", *PLANE_KEYS)

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__(qw, bias)
        for key in ("sign", "trits", "trit_signs"):  # the other levels' code tensors read None
            if key not in self._buffers:
                self.register_buffer(key, None)
        self._drop_bitplanes()
        self._register_constants()

    @property
    def ternary(self) -> bool:
        return self.config.levels == "ternary"

    def bitplanes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sign, nonzero or None) int32 bitplanes for the paths that read them (sdq.torch_ops,
        the CUDA kernels). A ternary layer stores trit5, so its planes are derived by
        trit5.unpack_to_bitplanes: built on the first eager call that needs them (at once when
        the layer moves to a GPU, whose kernels read them every call) and kept as non-persistent
        buffers until the codes change; under torch.compile the traced op derives them."""
        if not self.ternary:
            return self.sign, None
        if self.bitplane_sign is None:
            planes = torch.ops.sdq.trit5_bitplanes(
                self.trits, self.trit_signs, self.out_features, self.in_features,
                self.config.block_size, self.config.osr)
            if torch.compiler.is_compiling():
                return planes
            self.bitplane_sign, self.bitplane_nonzero = planes
        return self.bitplane_sign, self.bitplane_nonzero

    def lut_codes(self) -> torch.Tensor:
        """Binary codes re-laid for the CPU int8-table kernel (`sdq::lut_pack_binary`: tiles of
        32 rows, the same bits as `sign`), built on first use and kept as a non-persistent
        buffer until `sign` is replaced, written in place or moved; under torch.compile the
        traced op builds them."""
        cfg = self.config
        if torch.compiler.is_compiling():
            if self.lut_binary_codes is not None:
                return self.lut_binary_codes
            return torch.ops.sdq.lut_pack_binary(self.sign, self.in_features, cfg.block_size,
                                                 cfg.osr)
        source = (id(self.sign), ops.version(self.sign))
        if self.lut_binary_codes is None or self.__dict__.get("_lut_source") != source:
            self.lut_binary_codes = torch.ops.sdq.lut_pack_binary(
                self.sign, self.in_features, cfg.block_size, cfg.osr)
            self.__dict__["_lut_source"] = source
        return self.lut_binary_codes

    def _drop_bitplanes(self) -> None:
        for key in self.PLANE_KEYS:
            self.register_buffer(key, None, persistent=False)

    def _apply(self, fn, recurse=True):
        """Device moves as PackedLinear's; derived planes are kept on a GPU only (its kernels read
        them every call): on the CPU the trit5 kernels need none."""
        super()._apply(fn, recurse)
        self.__dict__.pop("_eager_plan", None)  # holds the old tensors (ops._layer_plan)
        plan_op.clear_cache()  # so do sdq::plan_linear's plans (rebuilt on their next call)
        self.register_buffer("lut_binary_codes", None, persistent=False)  # CPU-only, rebuilt
        if self.ternary:
            if self.trits.device.type != "cuda":  # CPU, or a "meta" skeleton: nothing to derive
                self._drop_bitplanes()
            elif self.bitplane_sign is None:
                self.bitplanes()
        return self

    @classmethod
    def empty_like(cls, meta_json: str, bias: bool) -> "SDQLinear":
        """A module of the right shapes, to be filled by load_state_dict (used by sdq.load)."""
        meta = json.loads(meta_json)
        cfg = SDQConfig.from_dict(meta["config"])
        out, n_in = meta["out_features"], meta["in_features"]
        from . import blocks, trit5
        cols, nb = blocks.packed_shape(n_in, cfg.block_size, cfg.osr)
        if cfg.levels == "ternary":
            trits_shape, signs_shape = trit5.shapes(out, n_in, cfg.block_size, cfg.osr)
            codes = {"trits": torch.zeros(trits_shape, dtype=torch.uint8),
                     "trit_signs": torch.zeros(signs_shape, dtype=torch.int32)}
        else:
            codes = {"sign": torch.zeros(out, cols // 32, dtype=torch.int32)}
        qw = QuantizedWeight(out, n_in, cfg, torch.zeros(out, nb, dtype=torch.float16),
                             torch.zeros(out, nb, dtype=torch.float16),
                             torch.ones(cfg.block_size, dtype=torch.int8), **codes)
        return cls(qw, torch.zeros(out) if bias else None)

    def _register_constants(self) -> None:
        """The activation transform's float32 constants as non-persistent buffers: they follow
        device moves like the codes, and are built here, not in forward, so that torch.compile
        traces only the ops."""
        from .ops import transform_constants
        constants = transform_constants(self.in_features, self.config, self.hadamard_signs.cpu())
        for name, t in zip(("transform_signs", "down_full", "down_last"), constants):
            self.register_buffer(name, None if t is None else t.to(self.scale.device),
                                 persistent=False)

    def transform_constants(self):
        """(signs or None, down_full, down_last) of the activation transform."""
        return self.transform_signs, self.down_full, self.down_last

    def _after_load(self) -> None:
        self._drop_bitplanes()  # new codes: the derived planes are stale
        self._register_constants()
        if self.ternary and self.trits.device.type == "cuda":
            self.bitplanes()

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sdq_linear(self, x)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"osr={c.osr:g}, levels={c.levels}, order={c.order}, block_size={c.block_size}")

