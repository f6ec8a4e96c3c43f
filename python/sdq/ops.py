"""Add-only inference as torch.library custom ops, with fake kernels and autograd.

Two ops, declared once so torch.compile can trace them:
  sdq::activation_transform(x, signs?, down_full, down_last, in_features, block_size, osr)
      -> (xt [batch, total_code_cols], xsum [batch, num_blocks])
  sdq::addonly_gemm(sign, nonzero?, scale, mean, xt, xsum, in_features, block_size, osr)
      -> y [batch, out]
sign/nonzero are int32 bitplanes (uint32 words). The compiled kernels run float32 activations with
fp16 scale and mean (CPU always; CUDA when built); every other case (float64, float32 scales being
tuned, devices without kernels) runs sdq.torch_ops, which also gives both ops their backward.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import blocks, torch_ops
from ._native import core


def _np(t: Tensor, dtype=None) -> np.ndarray:
    a = t.detach().contiguous().numpy()
    return a if dtype is None else a.view(dtype)


def _kernel_dtypes(x: Tensor, *tables: Optional[Tensor]) -> bool:
    """Whether the compiled kernels take these tensors (float32 activations and tables)."""
    return x.dtype == torch.float32 and all(t is None or t.dtype == torch.float32 for t in tables)


def _gemm_kernel_dtypes(scale: Tensor, mean: Tensor, xt: Tensor, xsum: Tensor) -> bool:
    return (scale.dtype == mean.dtype == torch.float16
            and xt.dtype == xsum.dtype == torch.float32)


# ----------------------------------------------------------------------------- the op schemas
@torch.library.custom_op("sdq::activation_transform", mutates_args=())
def activation_transform(x: Tensor, signs: Optional[Tensor], down_full: Tensor, down_last: Tensor,
                         in_features: int, block_size: int, osr: float) -> tuple[Tensor, Tensor]:
    return torch_ops.activation_transform(x, signs, down_full, down_last, in_features,
                                          block_size, osr)


@torch.library.custom_op("sdq::addonly_gemm", mutates_args=())
def addonly_gemm(sign: Tensor, nonzero: Optional[Tensor], scale: Tensor, mean: Tensor, xt: Tensor,
                 xsum: Tensor, in_features: int, block_size: int, osr: float) -> Tensor:
    return torch_ops.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, in_features, block_size,
                                  osr)


@activation_transform.register_fake
def _(x, signs, down_full, down_last, in_features, block_size, osr):
    cols, nb = blocks.packed_shape(in_features, block_size, osr)
    return x.new_empty(x.shape[0], cols), x.new_empty(x.shape[0], nb)


@addonly_gemm.register_fake
def _(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr):
    return xt.new_empty(xt.shape[0], sign.shape[0], dtype=torch.promote_types(xt.dtype,
                                                                              torch.float32))


# ----------------------------------------------------------------------------- CPU kernels
@activation_transform.register_kernel("cpu")
def _(x, signs, down_full, down_last, in_features, block_size, osr):
    if not _kernel_dtypes(x, signs, down_full, down_last):
        return torch_ops.activation_transform(x, signs, down_full, down_last, in_features,
                                              block_size, osr)
    xt, xsum = core().activation_transform(
        _np(x), block_size, osr, None if signs is None else _np(signs), _np(down_full),
        _np(down_last))
    return torch.from_numpy(xt), torch.from_numpy(xsum)


@addonly_gemm.register_kernel("cpu")
def _(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr):
    if not _gemm_kernel_dtypes(scale, mean, xt, xsum):
        return torch_ops.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, in_features,
                                      block_size, osr)
    y = core().addonly_gemm(_np(sign, np.uint32), None if nonzero is None else _np(nonzero, np.uint32),
                            _np(scale, np.uint16), _np(mean, np.uint16), _np(xt), _np(xsum),
                            in_features, block_size, osr)
    return torch.from_numpy(y)


# ----------------------------------------------------------------------------- CUDA kernels
def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _check_cuda(op: str, device: torch.device, **tensors: Optional[Tensor]) -> None:
    """The CUDA kernels read raw pointers: every tensor must be on x's GPU (contiguity is made)."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"sdq::{op}: {name} is on {t.device}, expected {device} "
                               "(move the module and its input to the same device)")


def _cuda_activation_transform(x, signs, down_full, down_last, in_features, block_size, osr):
    if not _kernel_dtypes(x, signs, down_full, down_last):
        return torch_ops.activation_transform(x, signs, down_full, down_last, in_features,
                                              block_size, osr)
    _check_cuda("activation_transform", x.device, signs=signs, down_full=down_full,
                down_last=down_last)
    cols, nb = blocks.packed_shape(in_features, block_size, osr)
    x, down_full, down_last = x.contiguous(), down_full.contiguous(), down_last.contiguous()
    signs = None if signs is None else signs.contiguous()
    xt, xsum = x.new_empty(x.shape[0], cols), x.new_empty(x.shape[0], nb)
    with torch.cuda.device(x.device):
        core().cuda_activation_transform(
            x.data_ptr(), x.shape[0], in_features, block_size, osr,
            0 if signs is None else signs.data_ptr(), down_full.data_ptr(), down_last.data_ptr(),
            xt.data_ptr(), xsum.data_ptr(), _stream())
    return xt, xsum


def _cuda_addonly_gemm(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr):
    if not _gemm_kernel_dtypes(scale, mean, xt, xsum):
        return torch_ops.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, in_features,
                                      block_size, osr)
    _check_cuda("addonly_gemm", xt.device, sign=sign, nonzero=nonzero, scale=scale, mean=mean,
                xsum=xsum)
    sign, scale, mean = sign.contiguous(), scale.contiguous(), mean.contiguous()
    nonzero = None if nonzero is None else nonzero.contiguous()
    xt, xsum = xt.contiguous(), xsum.contiguous()
    y = xt.new_empty(xt.shape[0], sign.shape[0])
    with torch.cuda.device(xt.device):
        core().cuda_addonly_gemm(
            sign.data_ptr(), 0 if nonzero is None else nonzero.data_ptr(), scale.data_ptr(),
            mean.data_ptr(), xt.data_ptr(), xsum.data_ptr(), y.data_ptr(), in_features,
            block_size, osr, "binary" if nonzero is None else "ternary", sign.shape[0],
            xt.shape[0], _stream())
    return y


if core().has_cuda():  # a build flag: asking it does not initialise CUDA
    activation_transform.register_kernel("cuda")(_cuda_activation_transform)
    addonly_gemm.register_kernel("cuda")(_cuda_addonly_gemm)


# ----------------------------------------------------------------------------- autograd
def _transform_setup(ctx, inputs, output):
    _, signs, down_full, down_last, *ctx.geometry = inputs
    ctx.save_for_backward(signs, down_full, down_last)


def _transform_backward(ctx, grad_xt, grad_xsum):
    signs, down_full, down_last = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch_ops.activation_transform_backward(grad_xt, grad_xsum, signs, down_full,
                                                         down_last, *ctx.geometry)
    return grad_x, None, None, None, None, None, None


def _gemm_setup(ctx, inputs, output):
    sign, nonzero, scale, mean, xt, xsum, *ctx.geometry = inputs
    ctx.save_for_backward(sign, nonzero, scale, mean, xt, xsum)


def _gemm_backward(ctx, grad_y):
    sign, nonzero, scale, mean, xt, xsum = ctx.saved_tensors
    grads = torch_ops.addonly_gemm_backward(grad_y, sign, nonzero, scale, mean, xt, xsum,
                                            *ctx.geometry, needs=ctx.needs_input_grad[2:6])
    return (None, None, *grads, None, None, None)


activation_transform.register_autograd(_transform_backward, setup_context=_transform_setup)
addonly_gemm.register_autograd(_gemm_backward, setup_context=_gemm_setup)


# ----------------------------------------------------------------------------- the layer call
def transform_constants(in_features: int, config, hadamard_signs: Tensor):
    """A layer's float32 activation-transform constants: (signs or None, down_full, down_last)."""
    groups = blocks.block_groups(in_features, config.block_size, config.osr)
    signs = hadamard_signs.float() if config.hadamard else None
    down = lambda g: blocks.resampler(g.m, g.padded).float().contiguous()  # noqa: E731
    return signs, down(groups[0]), down(groups[-1])


def sdq_linear(module, x: Tensor) -> Tensor:
    """y = x W_hat^T through the add-only ops; x [..., in] of any float dtype, y in x's dtype.

    fp16 and bf16 inputs run the float32 kernels (fp32 accumulation) and are rounded back;
    float64 runs sdq.torch_ops in float64. Plain eager CPU calls that need no gradient skip the
    op dispatch (_eager_cpu): the same kernels, called with the layer's prepared NumPy views.
    """
    if _eager_cpu_ok(module, x):
        return _eager_cpu(module, x)
    cfg = module.config
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, module.in_features).to(compute)
    xt, xsum = torch.ops.sdq.activation_transform(
        x2, module.transform_signs, module.down_full, module.down_last, module.in_features,
        cfg.block_size, cfg.osr)
    y = torch.ops.sdq.addonly_gemm(module.sign, module.nonzero, module.scale, module.mean, xt,
                                   xsum, module.in_features, cfg.block_size, cfg.osr)
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)


# ----------------------------------------------------------------------------- eager fast path
_EAGER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _eager_cpu_ok(module, x: Tensor) -> bool:
    """The op dispatch buys tracing, autograd and tensor subclasses/modes; a plain eager CPU call
    that needs none of them can call the kernels directly (the ops' CPU kernel does the same)."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    if x.dtype not in _EAGER_DTYPES or module.scale.dtype != torch.float16 \
            or module.mean.dtype != torch.float16:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or module.scale.requires_grad
                                    or module.mean.requires_grad):
        return False
    # no __torch_function__ / __torch_dispatch__ mode active (FakeTensorMode, FlopCounterMode...)
    return not torch._C._is_torch_function_mode_enabled() and \
        torch._C._len_torch_dispatch_stack() == 0


def _plan(module) -> tuple:
    """NumPy views of the layer's packed tensors and constants, built once per set of tensors
    (rebuilt when a buffer is replaced: device moves, loads, assignment)."""
    tensors = (module.sign, module.nonzero, module.scale, module.mean, module.transform_signs,
               module.down_full, module.down_last)
    key = tuple(None if t is None else (t.data_ptr(), t.shape, t.dtype) for t in tensors)
    cached = module.__dict__.get("_eager_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    sign, nonzero, scale, mean, signs, down_full, down_last = tensors
    views = (_np(sign, np.uint32), None if nonzero is None else _np(nonzero, np.uint32),
             _np(scale, np.uint16), _np(mean, np.uint16), None if signs is None else _np(signs),
             _np(down_full), _np(down_last))
    module.__dict__["_eager_plan"] = (key, views)
    return views


def _eager_cpu(module, x: Tensor) -> Tensor:
    sign, nonzero, scale, mean, signs, down_full, down_last = _plan(module)
    cfg, c = module.config, core()
    x2 = x.detach().reshape(-1, module.in_features).to(torch.float32).contiguous().numpy()
    xt, xsum = c.activation_transform(x2, cfg.block_size, cfg.osr, signs, down_full, down_last)
    y = c.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, module.in_features, cfg.block_size,
                       cfg.osr)
    return torch.from_numpy(y).to(x.dtype).reshape(*x.shape[:-1], module.out_features)
