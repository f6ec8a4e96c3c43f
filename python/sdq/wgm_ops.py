"""The WGM add-only product as a torch.library custom op, with a fake kernel and autograd.

  sdq::wgm_gemm(x [batch, in], sign, index, scale, block) -> y [batch, out] = x @ W_hat^T

sign int32 [out, words], index int32 [bits, out, words], scale fp16 [G] (block 0: per matrix) or
[out, ceil(in / 64), G] (block 64), as stored by WGMWeight. The CPU kernel (sdq._core.wgm_gemm)
runs float32 activations with fp16 scales; every other case (float64, float32 scales, devices
without a kernel) runs the plain-torch form: the weight dequantized from the packed form, then a
matmul. The gradient reaches x only (grad_y @ W_hat, from the packed form); codes and scales are
frozen.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._native import core
from .wgm_weight import dequantize_packed


def _np(t: Tensor, dtype=None) -> np.ndarray:
    a = t.detach().contiguous().numpy()
    return a if dtype is None else a.view(dtype)


def wgm_gemm_torch(x: Tensor, sign: Tensor, index: Tensor, scale: Tensor, block: int) -> Tensor:
    """The op in plain torch: any device, y in the promoted dtype of x and float32."""
    dt = torch.promote_types(x.dtype, torch.float32)
    W_hat = dequantize_packed(sign, index, scale, x.shape[-1], dt)
    return x.to(dt) @ W_hat.T


@torch.library.custom_op("sdq::wgm_gemm", mutates_args=())
def wgm_gemm(x: Tensor, sign: Tensor, index: Tensor, scale: Tensor, block: int) -> Tensor:
    return wgm_gemm_torch(x, sign, index, scale, block)


@wgm_gemm.register_fake
def _(x, sign, index, scale, block):
    return x.new_empty(x.shape[0], sign.shape[0], dtype=torch.promote_types(x.dtype,
                                                                            torch.float32))


@wgm_gemm.register_kernel("cpu")
def _(x, sign, index, scale, block):
    if x.dtype != torch.float32 or scale.dtype != torch.float16:
        return wgm_gemm_torch(x, sign, index, scale, block)
    y = core().wgm_gemm(_np(x), _np(sign, np.uint32), _np(index, np.uint32),
                        _np(scale, np.uint16), block)
    return torch.from_numpy(y)


def _setup(ctx, inputs, output):
    x, sign, index, scale, ctx.block = inputs
    ctx.x_dtype, ctx.in_features = x.dtype, x.shape[-1]
    ctx.save_for_backward(sign, index, scale)


def _backward(ctx, grad_y):
    sign, index, scale = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        W_hat = dequantize_packed(sign, index, scale, ctx.in_features, grad_y.dtype)
        grad_x = (grad_y @ W_hat).to(ctx.x_dtype)
    return grad_x, None, None, None, None


wgm_gemm.register_autograd(_backward, setup_context=_setup)
