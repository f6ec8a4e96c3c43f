"""A whole CPU layer call as one dispatcher op, for compiled graphs:

  sdq::plan_linear(x, codes, codes2, scale, mean, signs, down_full, down_last,
                   in_features, block_size, osr) -> y float32 [batch, out]

Eager CPU calls already run one LinearPlan per layer (sdq.ops._eager_cpu). Inside a
torch.compile'd decode step the layer used to be two torch.library.custom_op calls (the transform,
then the table GEMM), and each such call costs 15-40 us of Python wrappers: more than a 576-wide
layer's C++ work. This op is registered on the CPU key directly (torch.library.Library: ~4 us a
call) and runs the same LinearPlan the eager path builds, so a compiled step gets one C++
crossing per layer and the shared q/k/v and gate/up transforms too.

codes/codes2 are what the int8-table kernels read: ternary trits/trit_signs (trit5), binary
lut_codes/None. One plan is cached per codes tensor (keyed by its id: the entry keeps its tensors
alive, so the id cannot be reused by a new tensor while it is cached) and serves a call only for
the same tensor objects at the same addresses and version counters and the same geometry;
otherwise it is rebuilt in place. That check costs ~2.3 us a call, against ~3.9 us for a key of
every tensor's address, shape, dtype and version: a decode step makes one call per layer. The
cache is bounded, and emptied whenever an SDQLinear's tensors are replaced (SDQLinear._apply:
.to(), .float(), ...), so that it does not keep old copies alive. Inference only (no autograd):
sdq.ops.sdq_linear calls it only where the int8-table ops would run.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

from ._native import core

_MAX_PLANS = 4096  # a 70B model has ~560 linears; more than this would be several models at once
_plans: "OrderedDict[int, tuple]" = OrderedDict()  # id(codes) -> (plan, tensors, stamp, geometry)
_tables_only = False  # sdq.ops.set_cpu_gemm("tables"): never the AMX prefill GEMM

_lib = torch.library.Library("sdq", "FRAGMENT")
_lib.define("plan_linear(Tensor x, Tensor codes, Tensor? codes2, Tensor scale, Tensor mean, "
            "Tensor? signs, Tensor down_full, Tensor down_last, int in_features, int block_size, "
            "float osr) -> Tensor")


def _view(t: Tensor | None, dtype=None):
    """A NumPy view of t's own memory (never a copy, unlike sdq.ops._np): the plan must read the
    tensor itself, so that in-place writes reach it; _plan checks contiguity first."""
    if t is None:
        return None
    a = t.detach().numpy()
    return a if dtype is None else a.view(dtype)


def version(t: Tensor | None) -> int:
    """t's version counter (in-place writes bump it); inference tensors have none: 0. What the
    plan caches here and the eager plans (sdq.ops) are keyed on."""
    return 0 if t is None or t.is_inference() else t._version


def _stamp(tensors: tuple) -> list:
    """What must not have changed for a cached plan to serve: each tensor's address and version."""
    out = []
    for t in tensors:
        if t is not None:
            out.append(t.data_ptr())
            out.append(0 if t.is_inference() else t._version)  # version(t), inlined: hot path
    return out


def _plan(tensors: tuple, geometry: tuple):
    """The cached LinearPlan for these tensors (built on a miss; least recently used dropped)."""
    key = id(tensors[0])
    hit = _plans.get(key)
    stamp = _stamp(tensors)
    if (hit is not None and hit[2] == stamp and hit[3] == geometry
            and all(a is b for a, b in zip(hit[1], tensors))):
        _plans.move_to_end(key)
        return hit[0]
    codes, codes2, scale, mean, signs, down_full, down_last = tensors
    in_features, block_size, osr = geometry
    for t in tensors:
        if t is not None and (not t.is_cpu or not t.is_contiguous()):
            raise ValueError("sdq::plan_linear: every tensor must be a contiguous CPU tensor")
    ternary = codes2 is not None
    plan = core().LinearPlan(
        in_features, block_size, osr, None, None, _view(scale, np.uint16),
        _view(mean, np.uint16), _view(signs), _view(down_full), _view(down_last),
        gemm=("trit5" if ternary else "lut_binary") if _tables_only else "auto",
        trits=_view(codes) if ternary else None,
        trit_signs=_view(codes2, np.uint32) if ternary else None,
        lut_codes=None if ternary else _view(codes))
    # the tensors stay alive with the plan that reads them (and keep `key` theirs)
    _plans[key] = (plan, tensors, stamp, geometry)
    _plans.move_to_end(key)
    if len(_plans) > _MAX_PLANS:
        _plans.popitem(last=False)
    return plan


def _plan_linear_cpu(x, codes, codes2, scale, mean, signs, down_full, down_last, in_features,
                     block_size, osr):
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"sdq::plan_linear: x must be float32 [batch, {in_features}], got "
                         f"{x.dtype} {tuple(x.shape)}")
    plan = _plan((codes, codes2, scale, mean, signs, down_full, down_last),
                 (in_features, block_size, osr))
    x = x.contiguous()
    y = x.new_empty(x.shape[0], scale.shape[0])
    plan.run_ptr(x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
    return y


_lib.impl("plan_linear", _plan_linear_cpu, "CPU")


@torch.library.register_fake("sdq::plan_linear")
def _(x, codes, codes2, scale, mean, signs, down_full, down_last, in_features, block_size, osr):
    return x.new_empty(x.shape[0], scale.shape[0], dtype=torch.float32)


def clear_cache() -> None:
    """Drops every cached plan (and the references that keep their tensors alive)."""
    _plans.clear()


def set_tables_only(yes: bool) -> None:
    """Plans built from now on run the int8 tables at every batch (True) or switch prefill
    batches to the AMX GEMMs where the CPU has them (False); drops the cached plans."""
    global _tables_only
    _tables_only = bool(yes)
    clear_cache()
