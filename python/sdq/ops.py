"""Add-only inference as torch.library custom ops (CPU kernels; CUDA kernels when built).

Two ops, declared once with fake (meta) implementations so torch.compile can trace them:
  sdq::activation_transform(x, signs?, down_full, down_last, in_features, block_size, osr)
      -> (xt [batch, total_code_cols], xsum [batch, num_blocks])
  sdq::addonly_gemm(sign, nonzero?, scale, mean, xt, xsum, in_features, block_size, osr)
      -> y [batch, out]
x, xt, xsum, y are float32; sign/nonzero int32 bitplanes (uint32 words); scale/mean float16.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import blocks
from ._native import core


def _np(t: Tensor, dtype=None) -> np.ndarray:
    a = t.detach().contiguous().numpy()
    return a if dtype is None else a.view(dtype)


@torch.library.custom_op("sdq::activation_transform", mutates_args=(), device_types="cpu")
def activation_transform(x: Tensor, signs: Optional[Tensor], down_full: Tensor, down_last: Tensor,
                         in_features: int, block_size: int, osr: float) -> tuple[Tensor, Tensor]:
    xt, xsum = core().activation_transform(
        _np(x), block_size, osr, None if signs is None else _np(signs), _np(down_full),
        _np(down_last))
    return torch.from_numpy(xt), torch.from_numpy(xsum)


@activation_transform.register_fake
def _(x, signs, down_full, down_last, in_features, block_size, osr):
    cols, nb = blocks.packed_shape(in_features, block_size, osr)
    return x.new_empty(x.shape[0], cols), x.new_empty(x.shape[0], nb)


@torch.library.custom_op("sdq::addonly_gemm", mutates_args=(), device_types="cpu")
def addonly_gemm(sign: Tensor, nonzero: Optional[Tensor], scale: Tensor, mean: Tensor, xt: Tensor,
                 xsum: Tensor, in_features: int, block_size: int, osr: float) -> Tensor:
    y = core().addonly_gemm(_np(sign, np.uint32), None if nonzero is None else _np(nonzero, np.uint32),
                            _np(scale, np.uint16), _np(mean, np.uint16), _np(xt), _np(xsum),
                            in_features, block_size, osr)
    return torch.from_numpy(y)


@addonly_gemm.register_fake
def _(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr):
    return xt.new_empty(xt.shape[0], sign.shape[0])


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


@activation_transform.register_kernel("cuda")
def _(x, signs, down_full, down_last, in_features, block_size, osr):
    cols, nb = blocks.packed_shape(in_features, block_size, osr)
    x = x.contiguous()
    xt, xsum = x.new_empty(x.shape[0], cols), x.new_empty(x.shape[0], nb)
    core().cuda_activation_transform(
        x.data_ptr(), x.shape[0], in_features, block_size, osr,
        0 if signs is None else signs.contiguous().data_ptr(), down_full.contiguous().data_ptr(),
        down_last.contiguous().data_ptr(), xt.data_ptr(), xsum.data_ptr(), _stream())
    return xt, xsum


@addonly_gemm.register_kernel("cuda")
def _(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr):
    y = xt.new_empty(xt.shape[0], sign.shape[0])
    core().cuda_addonly_gemm(
        sign.data_ptr(), 0 if nonzero is None else nonzero.data_ptr(), scale.data_ptr(),
        mean.data_ptr(), xt.contiguous().data_ptr(), xsum.contiguous().data_ptr(), y.data_ptr(),
        in_features, block_size, osr, "binary" if nonzero is None else "ternary",
        sign.shape[0], xt.shape[0], _stream())
    return y


def supports(x: Tensor) -> bool:
    """Whether the kernels can run this input (CPU always; CUDA when the build has the kernels)."""
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and bool(core().has_cuda())


class TransformConstants:
    """Per-layer float32 constants of the activation transform: signs and down-samplers."""

    def __init__(self, in_features: int, config, hadamard_signs: Tensor):
        groups = blocks.block_groups(in_features, config.block_size, config.osr)
        self.signs = hadamard_signs.float() if config.hadamard else None
        self.down_full = blocks.resampler(groups[0].m, groups[0].padded).float().contiguous()
        self.down_last = blocks.resampler(groups[-1].m, groups[-1].padded).float().contiguous()

    def to(self, device) -> "TransformConstants":
        for k in ("signs", "down_full", "down_last"):
            v = getattr(self, k)
            if v is not None and v.device != torch.device(device):
                setattr(self, k, v.to(device))
        return self


def sdq_linear(module, x: Tensor) -> Tensor:
    """y = x W_hat^T through the add-only path; x [..., in] of any float dtype."""
    cfg = module.config
    k = module.transform_constants().to(x.device)
    x2 = x.reshape(-1, module.in_features).float().contiguous()
    xt, xsum = torch.ops.sdq.activation_transform(x2, k.signs, k.down_full, k.down_last,
                                                  module.in_features, cfg.block_size, cfg.osr)
    y = torch.ops.sdq.addonly_gemm(module.sign, module.nonzero, module.scale, module.mean, xt, xsum,
                                   module.in_features, cfg.block_size, cfg.osr)
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)
