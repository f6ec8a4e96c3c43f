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

import functools
from operator import is_
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import blocks, plan_op, table_ops, torch_ops  # noqa: F401 (registers their ops)
from .plan_op import version
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
# Raw-pointer calls of the core (the cheapest crossing, no NumPy round trip): a compiled decode
# step calls these once per layer, so their Python is kept to checks on tensor attributes.
@functools.lru_cache(maxsize=256)
def _geometry(in_features: int, block_size: int, osr: float) -> tuple:
    """(total_code_cols, num_blocks, words_per_row, down_full shape, down_last shape)."""
    lay = core().layout(in_features, block_size, osr)
    p, m = lay["padded"], lay["m"]
    return (lay["total_code_cols"], lay["num_blocks"], lay["words_per_row"], (p[0], m[0]),
            (p[-1], m[-1]))


def _check_shapes(op: str, **tensors: tuple) -> None:
    """ValueError naming the first tensor (name=(tensor or None, expected shape)) that differs:
    the core reads raw pointers, so a wrong size would read out of bounds."""
    for name, (t, shape) in tensors.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"sdq::{op}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


@activation_transform.register_kernel("cpu")
def _(x, signs, down_full, down_last, in_features, block_size, osr):
    if not _kernel_dtypes(x, signs, down_full, down_last):
        return torch_ops.activation_transform(x, signs, down_full, down_last, in_features,
                                              block_size, osr)
    cols, nb, _, full, last = _geometry(in_features, block_size, osr)
    x, down_full, down_last = x.contiguous(), down_full.contiguous(), down_last.contiguous()
    signs = None if signs is None else signs.contiguous()
    batch = x.shape[0] if x.dim() == 2 else -1
    _check_shapes("activation_transform", x=(x, (batch, in_features)),
                  signs=(signs, (block_size,)), down_full=(down_full, full),
                  down_last=(down_last, last))
    xt, xsum = x.new_empty(batch, cols), x.new_empty(batch, nb)
    core().activation_transform_ptr(x.data_ptr(), batch, in_features, block_size, osr,
                                    _ptr(signs), down_full.data_ptr(), down_last.data_ptr(),
                                    xt.data_ptr(), xsum.data_ptr(), torch.get_num_threads())
    return xt, xsum


@addonly_gemm.register_kernel("cpu")
def _(sign, nonzero, scale, mean, xt, xsum, in_features, block_size, osr):
    if not _gemm_kernel_dtypes(scale, mean, xt, xsum):
        return torch_ops.addonly_gemm(sign, nonzero, scale, mean, xt, xsum, in_features,
                                      block_size, osr)
    cols, nb, words, _, _ = _geometry(in_features, block_size, osr)
    sign, scale, mean = sign.contiguous(), scale.contiguous(), mean.contiguous()
    nonzero = None if nonzero is None else nonzero.contiguous()
    xt, xsum = xt.contiguous(), xsum.contiguous()
    out, batch = sign.shape[0], xt.shape[0]
    for name, t in (("sign", sign), ("nonzero", nonzero)):
        if t is not None and t.dtype not in (torch.int32, torch.uint32):
            raise TypeError(f"sdq::addonly_gemm: {name} must be int32 bitplanes, got {t.dtype}")
    _check_shapes("addonly_gemm", sign=(sign, (out, words)), nonzero=(nonzero, (out, words)),
                  scale=(scale, (out, nb)), mean=(mean, (out, nb)), xt=(xt, (batch, cols)),
                  xsum=(xsum, (batch, nb)))
    y = xt.new_empty(batch, out)
    core().addonly_gemm_ptr(sign.data_ptr(), _ptr(nonzero), scale.data_ptr(), mean.data_ptr(),
                            xt.data_ptr(), xsum.data_ptr(), y.data_ptr(), in_features,
                            block_size, osr, out, batch, torch.get_num_threads())
    return y


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
    float64 runs sdq.torch_ops in float64. CPU inference runs the int8-table GEMMs (set_cpu_gemm
    selects the exact one); calls that need a gradient run the exact ops, which have autograd. Plain eager CPU calls that need no gradient skip the
    op dispatch (_eager_cpu): the same kernels, in one call of the layer's prepared LinearPlan.
    """
    if _eager_cpu_ok(module, x):
        return _eager_cpu(module, x)
    cfg = module.config
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, module.in_features).to(compute)
    geometry = (module.in_features, cfg.block_size, cfg.osr)
    if _table_gemm_ok(module, x):
        # one op for the whole layer (sdq.plan_op): what compiled decode steps run on the CPU
        codes = (module.trits, module.trit_signs) if module.ternary else (module.lut_codes(), None)
        y = torch.ops.sdq.plan_linear(x2, *codes, module.scale, module.mean,
                                      module.transform_signs, module.down_full, module.down_last,
                                      *geometry)
        return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)
    xt, xsum = torch.ops.sdq.activation_transform(
        x2, module.transform_signs, module.down_full, module.down_last, *geometry)
    sign, nonzero = module.bitplanes()  # ternary: derived from trit5 (SDQLinear.bitplanes)
    y = torch.ops.sdq.addonly_gemm(sign, nonzero, module.scale, module.mean, xt, xsum, *geometry)
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)


def _table_gemm_ok(module, x: Tensor) -> bool:
    """Whether a dispatcher-path call runs the int8-table kernels (sdq::plan_linear): CPU
    inference in float32 kernels, as the eager plans do; otherwise the exact ops, which have
    autograd."""
    if _cpu_gemm == "addonly" or not x.is_cpu or x.dtype not in _EAGER_DTYPES:
        return False
    scale, mean = module.scale, module.mean
    if scale.dtype != torch.float16 or mean.dtype != torch.float16:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad
                                             or mean.requires_grad))


# ----------------------------------------------------------------------------- eager fast path
_EAGER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The per-call checks read these once (each torch.X lookup is a dict access on every call).
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_depth = torch._C._len_torch_dispatch_stack
_num_threads = torch.get_num_threads
_F16, _F32 = torch.float16, torch.float32


def _eager_cpu_ok(module, x: Tensor) -> bool:
    """The op dispatch buys tracing, autograd and tensor subclasses/modes; a plain eager CPU call
    that needs none of them can call the kernels directly (the ops' CPU kernel does the same)."""
    if type(x) is not Tensor or not x.is_cpu or _is_compiling():
        return False
    b = module._buffers  # not module.scale: nn.Module.__getattr__ costs a Python call
    scale, mean = b["scale"], b["mean"]
    if x.dtype not in _EAGER_DTYPES or scale.dtype is not _F16 or mean.dtype is not _F16:
        return False
    if _grad_enabled() and (x.requires_grad or scale.requires_grad or mean.requires_grad):
        return False
    # no __torch_function__ / __torch_dispatch__ mode active (FakeTensorMode, FlopCounterMode...)
    return not _function_mode() and _dispatch_depth() == 0


# Which GEMM the CPU plans run: "auto" (the int8 kernels: lut_binary for binary, trit5 for
# ternary, switching to their AMX GEMMs from 6 / 8 tokens on AMX CPUs), "tables" (the int8-table
# kernels at every batch) or "addonly" (the exact float-table kernel, the reference). set_cpu_gemm.
_CPU_GEMMS = ("auto", "tables", "addonly")
_cpu_gemm = "auto"


def set_cpu_gemm(name: str) -> str:
    """Choose the GEMM of CPU inference layer calls: "auto" (default; int8 activation tables,
    about 0.1-1% relative output error, cpp/include/sdq/lut_gemm.h and trit5.h; on AMX CPUs
    prefill batches of 6 tokens or more (binary) or 8 (ternary) run an int8 AMX GEMM, and the
    transform before any int8 GEMM projects in bf16, amx_gemm.h), "tables" (the int8 tables at every
    batch: a token's output then does not depend on the batch it came in) or "addonly" (exact
    float tables, slower). Returns the previous choice; plans rebuild on their next call."""
    global _cpu_gemm
    if name not in _CPU_GEMMS:
        raise ValueError(f"set_cpu_gemm: expected one of {_CPU_GEMMS}, got {name!r}")
    previous, _cpu_gemm = _cpu_gemm, name
    plan_op.set_tables_only(name == "tables")
    return previous


def _plan_versions(b) -> tuple:
    """The version counters (and GEMM choice) a layer's plan depends on, besides its buffers'
    identities: those of the codes and of the scales and means (the plan reads a repack of the
    binary codes and keeps the scales and means laid out per tile: in-place writes make both
    stale) and set_cpu_gemm's choice. b: the module's _buffers."""
    codes = b["trits"] if b["sign"] is None else b["sign"]
    return version(codes), version(b["scale"]), version(b["mean"]), _cpu_gemm


def _plan_codes(module) -> dict:
    """The codes a layer's plan reads: binary sign bitplanes; ternary trit5 (or, for the exact
    kernel, bitplanes derived from it)."""
    as_np = lambda t: None if t is None else _np(t, np.uint32)  # noqa: E731
    if _cpu_gemm != "addonly":
        if module.ternary:
            return {"sign": None, "nonzero": None, "trits": _np(module.trits),
                    "trit_signs": _np(module.trit_signs, np.uint32)}
        return {"sign": None, "nonzero": None, "lut_codes": _np(module.lut_codes())}
    sign, nonzero = module.bitplanes()
    return {"sign": as_np(sign), "nonzero": as_np(nonzero)}


class _PlanEntry:
    """A module's cached LinearPlan, the buffers it was built from (kept alive, so that their ids
    cannot be reused meanwhile) and _plan_versions. Copies and pickles of the module get an empty
    entry and build their own plan: this one reads the original module's tensors."""
    __slots__ = ("versions", "plan", "tensors")

    def __init__(self, versions=None, plan=None, tensors=()):
        self.versions, self.plan, self.tensors = versions, plan, tensors

    def __deepcopy__(self, memo):
        return _PlanEntry()

    def __reduce__(self):
        return _PlanEntry, ()


def _plan_gemm(module) -> str:
    """The LinearPlan gemm argument for set_cpu_gemm's choice."""
    if _cpu_gemm == "tables":
        return "trit5" if module.ternary else "lut_binary"
    return _cpu_gemm


def _layer_plan(module):
    """The layer's _core.LinearPlan, built on first use and rebuilt when a buffer is not the one
    it was built from (device moves, load_state_dict, assignment) or _plan_versions changes
    (in-place writes to the codes, scales or means; set_cpu_gemm)."""
    b = module._buffers
    cached = module.__dict__.get("_eager_plan")
    if cached is not None and cached.versions == _plan_versions(b) and \
            len(b) == len(cached.tensors) and all(map(is_, b.values(), cached.tensors)):
        return cached.plan
    cfg = module.config
    codes = _plan_codes(module)
    signs = module.transform_signs
    plan = core().LinearPlan(
        module.in_features, cfg.block_size, cfg.osr, codes["sign"], codes["nonzero"],
        _np(module.scale, np.uint16), _np(module.mean, np.uint16),
        None if signs is None else _np(signs), _np(module.down_full), _np(module.down_last),
        gemm=_plan_gemm(module), trits=codes.get("trits"), trit_signs=codes.get("trit_signs"),
        lut_codes=codes.get("lut_codes"))
    # after _plan_codes: it may derive planes (new buffers)
    module.__dict__["_eager_plan"] = _PlanEntry(_plan_versions(b), plan, tuple(b.values()))
    return plan


def _eager_cpu(module, x: Tensor) -> Tensor:
    """One LinearPlan call: the transform and GEMM in C++, writing into y directly (layers that
    read equal inputs, q/k/v and gate/up, reuse one transform: sdq/linear_plan.h)."""
    plan = _layer_plan(module)
    x2 = x if x.dim() == 2 else x.reshape(-1, module.in_features)
    if x2.dtype is not _F32 or not x2.is_contiguous():
        x2 = x2.to(_F32).contiguous()
    n = x2.shape[0]
    y = x2.new_empty(n, module.out_features)
    plan.run_ptr(x2.data_ptr(), n, y.data_ptr(), _num_threads())
    if x2 is x:
        return y
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)
