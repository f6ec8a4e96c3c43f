"""LinearPlan (the prepared per-layer call behind SDQLinear's eager CPU path): it computes exactly
what the transform and the chosen GEMM compute (the int8-table one by default, the exact add-only
one under set_cpu_gemm("addonly")), shares the activation transform only when that is valid, is
rebuilt when the layer's tensors change, and is not used where the ops must run (grad, compile,
float64).
"""
import contextlib
import math

import numpy as np
import pytest
import torch

import sdq
from sdq import ops
from sdq._native import core
from sdq.nn import SDQLinear

pytestmark = pytest.mark.int8_tables  # the default GEMM choice is what these tests check


def _module(out, n_in, levels, osr=1.5, hadamard=True, seed=0):
    W = torch.randn(out, n_in)
    cfg = sdq.SDQConfig(osr=osr, levels=levels, hadamard=hadamard, seed=seed)
    return SDQLinear.from_quantized(sdq.quantize_weight(W, cfg))


# linear_plan.cpp: automatic plans run their AMX GEMM from these batches where the CPU has AMX
AMX_MIN_BATCH = {"binary": 6, "ternary": 8}


def _auto_gemm(levels, batch):
    """The GEMM an automatic plan runs for `batch` tokens (linear_plan.cpp, LinearPlan::gemm)."""
    amx = core().amx_gemm_supported() and batch >= AMX_MIN_BATCH[levels]
    if levels == "ternary":
        return "amx_ternary" if amx else "trit5"
    return "amx_binary" if amx else "lut_binary"


def _two_ops(mod, x, threads=0, gemm="auto"):
    """The unprepared path: the NumPy bindings of the transform (its projection in bf16 before an
    int8 GEMM, where the CPU has AMX-BF16) and of the GEMM `gemm` names ("auto": the int8 kernel
    of the layer's levels and the batch; "tables": the int8-table one of its levels; "addonly":
    the exact one)."""
    cfg, c = mod.config, core()
    signs, down_full, down_last = (None if t is None else t.numpy() for t in
                                   mod.transform_constants())
    # before an int8 GEMM a plan projects in bf16 where the CPU can (sdq/linear_plan.h)
    bf16 = gemm != "addonly" and c.activation_transform_bf16_supported()
    xt, xsum = c.activation_transform(x.numpy(), cfg.block_size, cfg.osr, signs, down_full,
                                      down_last, threads, projection="bf16" if bf16 else "float32")
    geometry = (mod.in_features, cfg.block_size, cfg.osr)
    scale, mean = mod.scale.numpy().view(np.uint16), mod.mean.numpy().view(np.uint16)
    sign, nonzero = mod.bitplanes()
    if gemm in ("auto", "tables") and mod.ternary:
        amx = gemm == "auto" and _auto_gemm("ternary", x.shape[0]) == "amx_ternary"
        kernel = c.amx_gemm_ternary if amx else c.trit5_gemm
        y = kernel(mod.trits.numpy(), mod.trit_signs.numpy().view(np.uint32), scale, mean,
                   xt, xsum, *geometry, mod.out_features, threads)
    elif gemm in ("auto", "tables"):
        lut = c.lut_pack_binary(sign.numpy().view(np.uint32), *geometry)
        amx = gemm == "auto" and _auto_gemm("binary", x.shape[0]) == "amx_binary"
        kernel = c.amx_gemm_binary if amx else c.lut_gemm_binary
        y = kernel(lut, scale, mean, xt, xsum, *geometry, mod.out_features, threads)
    else:
        y = c.addonly_gemm(sign.numpy().view(np.uint32),
                           None if nonzero is None else nonzero.numpy().view(np.uint32), scale,
                           mean, xt, xsum, *geometry, threads)
    return torch.from_numpy(y)


@contextlib.contextmanager
def _cpu_gemm(name):
    previous = ops.set_cpu_gemm(name)
    try:
        yield
    finally:
        ops.set_cpu_gemm(previous)


def _plan(mod):
    return ops._layer_plan(mod)


@pytest.mark.parametrize("out,n_in", [(1, 128), (7, 200), (33, 64), (70, 1000), (16, 576)])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("gemm", ["auto", "tables", "addonly"])
def test_plan_equals_the_two_ops(out, n_in, levels, batch, threads, gemm):
    mod = _module(out, n_in, levels, hadamard=out % 2 == 1)
    x = torch.randn(batch, n_in)
    want = _two_ops(mod, x, threads, gemm)
    with _cpu_gemm(gemm):
        plan = _plan(mod)
        tables = "trit5" if levels == "ternary" else "lut_binary"
        assert plan.gemm == {"auto": _auto_gemm(levels, 1), "tables": tables,
                             "addonly": "addonly"}[gemm]
        assert plan.gemm_for(batch) == {"auto": _auto_gemm(levels, batch), "tables": tables,
                                        "addonly": "addonly"}[gemm]
        assert torch.equal(torch.from_numpy(plan.run(x.numpy(), threads)), want)
        y = torch.empty(batch, out)
        plan.run_ptr(x.data_ptr(), batch, y.data_ptr(), threads)
        assert torch.equal(y, want)
        with torch.no_grad():
            assert torch.equal(mod(x), want)


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_int8_tables_stay_close_to_the_exact_kernel(levels):
    """The int8-table GEMMs round the activations (cpp/include/sdq/lut_gemm.h, trit5.h): on a
    layer of the default model's width their output stays within a few percent of the exact
    kernel's (the per-kernel bounds are tested in test_lut_gemm.py and test_trit5.py)."""
    mod = _module(64, 576, levels, osr=2)
    x = torch.randn(8, 576)
    exact, tables = _two_ops(mod, x, gemm="addonly"), _two_ops(mod, x)
    assert not torch.equal(exact, tables)  # they are different kernels
    assert ((tables - exact).norm() / exact.norm()).item() < 0.03


def test_set_cpu_gemm_rejects_unknown_names():
    with pytest.raises(ValueError, match="set_cpu_gemm"):
        ops.set_cpu_gemm("int4")


@torch.no_grad()
def test_in_place_write_to_binary_codes_rebuilds_the_repack():
    """The binary plan reads a repack of `sign` (SDQLinear.lut_codes): writing the codes in
    place must not leave it stale."""
    mod, other = _module(40, 300, "binary"), _module(40, 300, "binary", seed=3)
    x = torch.randn(2, 300)
    mod(x)
    mod.sign.copy_(other.sign)
    assert torch.equal(mod(x), _two_ops(mod, x))


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_module_call_equals_the_ops(levels):
    """SDQLinear's eager call (the plan) and the op path (what autograd and compile run)."""
    mod = _module(24, 300, levels)
    x = torch.randn(2, 3, 300)
    with torch.no_grad():
        fast = mod(x)
        with _cpu_gemm("addonly"):
            exact = mod(x)
    assert "_eager_plan" in mod.__dict__
    cfg = mod.config
    geometry = (300, cfg.block_size, cfg.osr)
    xt, xsum = torch.ops.sdq.activation_transform(x.reshape(6, 300), *mod.transform_constants(),
                                                  *geometry)
    y = torch.ops.sdq.addonly_gemm(*mod.bitplanes(), mod.scale, mod.mean, xt, xsum, *geometry)
    assert torch.equal(exact, y.reshape(2, 3, 24))
    if core().activation_transform_bf16_supported():
        # the int8 GEMMs' plans project in bf16 where the CPU can (sdq/linear_plan.h)
        xt, xsum = map(torch.from_numpy, core().activation_transform(
            x.reshape(6, 300).numpy(), cfg.block_size, cfg.osr,
            *(None if t is None else t.numpy() for t in mod.transform_constants()),
            projection="bf16"))
    if _auto_gemm(levels, 6) == "amx_ternary":
        y = torch.from_numpy(core().amx_gemm_ternary(
            mod.trits.numpy(), mod.trit_signs.numpy().view(np.uint32),
            mod.scale.numpy().view(np.uint16), mod.mean.numpy().view(np.uint16), xt.numpy(),
            xsum.numpy(), *geometry, 24))
    elif levels == "ternary":
        y = torch.ops.sdq.trit5_gemm(mod.trits, mod.trit_signs, mod.scale, mod.mean, xt, xsum,
                                     *geometry)
    elif _auto_gemm(levels, 6) == "amx_binary":
        y = torch.from_numpy(core().amx_gemm_binary(
            mod.lut_codes().numpy(), mod.scale.numpy().view(np.uint16),
            mod.mean.numpy().view(np.uint16), xt.numpy(), xsum.numpy(), *geometry, 24))
    else:
        y = torch.ops.sdq.lut_gemm_binary(mod.lut_codes(), mod.scale, mod.mean, xt, xsum,
                                          *geometry)
    assert torch.equal(fast, y.reshape(2, 3, 24))
    with pytest.raises(ValueError, match="xt"):
        torch.ops.sdq.trit5_gemm(mod.trits, mod.trit_signs, mod.scale, mod.mean, xt[:, :-3],
                                 xsum, *geometry) if levels == "ternary" else \
            torch.ops.sdq.lut_gemm_binary(mod.lut_codes(), mod.scale, mod.mean, xt[:, :-3], xsum,
                                          *geometry)


def test_op_kernels_equal_the_numpy_bindings_and_check_shapes():
    mod = _module(20, 200, "ternary")
    cfg, x = mod.config, torch.randn(5, 200)
    consts = mod.transform_constants()
    xt, xsum = torch.ops.sdq.activation_transform(x, *consts, 200, cfg.block_size, cfg.osr)
    xt_np, xsum_np = core().activation_transform(x.numpy(), cfg.block_size, cfg.osr,
                                                 *(t.numpy() for t in consts))
    assert torch.equal(xt, torch.from_numpy(xt_np)) and torch.equal(xsum, torch.from_numpy(xsum_np))
    assert torch.equal(torch.ops.sdq.addonly_gemm(*mod.bitplanes(), mod.scale, mod.mean, xt, xsum,
                                                  200, cfg.block_size, cfg.osr),
                       _two_ops(mod, x, gemm="addonly"))
    with pytest.raises(ValueError, match="down_last"):
        torch.ops.sdq.activation_transform(x, consts[0], consts[1], consts[1][:5], 200,
                                           cfg.block_size, cfg.osr)
    with pytest.raises(ValueError, match="xt"):
        torch.ops.sdq.addonly_gemm(*mod.bitplanes(), mod.scale, mod.mean, xt[:, :-32], xsum, 200,
                                   cfg.block_size, cfg.osr)


# ----------------------------------------------------------------------------- shared transform
def _hits():
    return core().linear_plan_transform_hits()


def test_layers_with_equal_constants_share_the_transform():
    q, k = _module(48, 200, "binary"), _module(16, 200, "ternary")
    other_signs = _module(16, 200, "binary", seed=1)
    no_hadamard = _module(16, 200, "binary", hadamard=False)
    assert _plan(q).shares_transform_with(_plan(k))
    assert not _plan(q).shares_transform_with(_plan(other_signs))
    assert not _plan(q).shares_transform_with(_plan(no_hadamard))
    assert not _plan(q).shares_transform_with(_plan(_module(16, 256, "binary")))


@torch.no_grad()
def test_shared_transform_is_reused_only_for_the_same_input():
    q, k, v = (_module(out, 200, "binary") for out in (32, 16, 16))
    x = torch.randn(3, 200)
    q(x)
    before = _hits()
    assert torch.equal(k(x), _two_ops(k, x)) and torch.equal(v(x), _two_ops(v, x))
    assert _hits() == before + 2  # k and v reused q's transform

    x.add_(1)  # in place: the version counter moves
    assert torch.equal(k(x), _two_ops(k, x))
    assert _hits() == before + 2
    assert torch.equal(v(x), _two_ops(v, x)) and _hits() == before + 3

    # Same address, same version, new contents (what a new tensor allocated where a freed one
    # was looks like): written through NumPy, which does not move the version counter.
    version = x._version
    x.numpy()[:] = np.random.default_rng(0).standard_normal((3, 200))
    assert x._version == version
    assert torch.equal(k(x), _two_ops(k, x))
    assert _hits() == before + 3

    x2 = torch.randn(3, 200)  # another input, then back to x: recomputed each time
    assert torch.equal(q(x2), _two_ops(q, x2)) and torch.equal(q(x), _two_ops(q, x))
    assert _hits() == before + 3

    # Equal contents in another buffer (a compiled graph gives q, k and v one copy each): reused.
    assert torch.equal(v(x.clone()), _two_ops(v, x)) and _hits() == before + 4
    y = x.clone()
    y[2, 199] = torch.nextafter(y[2, 199], torch.tensor(math.inf))  # the last value differs
    assert torch.equal(v(y), _two_ops(v, y)) and _hits() == before + 4
    assert torch.equal(k(x[:2].clone()), _two_ops(k, x[:2])) and _hits() == before + 4  # batch


@torch.no_grad()
@pytest.mark.parametrize("batch", [2, 8])  # the table GEMM; AMX's where the CPU has it
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_a_bf16_transform_serves_only_bf16_calls(levels, batch):
    """Before an int8 GEMM the plan projects in bf16 where the CPU can (sdq/linear_plan.h); an
    exact-kernel call on the same input and constants must not take that transform, nor the
    reverse. Where the CPU cannot, both run the float32 projection and share it."""
    q, k = _module(32, 300, levels), _module(16, 300, levels)
    x = torch.randn(batch, 300)
    bf16 = core().activation_transform_bf16_supported()
    q(x)
    before = _hits()
    with _cpu_gemm("addonly"):
        assert torch.equal(k(x), _two_ops(k, x, gemm="addonly"))
    assert _hits() == before + (0 if bf16 else 1)
    assert torch.equal(q(x), _two_ops(q, x))
    assert _hits() == before + (0 if bf16 else 2)


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_tables_built_with_the_transform(levels, batch):
    """The table GEMMs' int8 tables are built with the transform (linear_plan.cpp, TableSink)
    and kept with it: the next layer on the same input takes both, and a kept transform without
    them (an exact-kernel call's) does not serve a table call."""
    q, k, v = (_module(out, 300, levels) for out in (32, 16, 8))
    x = torch.randn(batch, 300)
    with _cpu_gemm("addonly"):
        v(x)
    before = _hits()
    assert torch.equal(q(x), _two_ops(q, x))
    assert _hits() == before
    assert torch.equal(k(x), _two_ops(k, x)) and _hits() == before + 1
    assert torch.equal(v(x), _two_ops(v, x)) and _hits() == before + 2


@torch.no_grad()
def test_one_levels_tables_do_not_serve_the_other():
    """Binary and ternary layers with equal constants share a transform, not its tables: a kept
    transform with the binary table GEMM's tables is computed again for a trit5 call."""
    b, t = _module(32, 300, "binary"), _module(16, 300, "ternary")
    assert _plan(b).shares_transform_with(_plan(t))
    x = torch.randn(2, 300)
    b(x)
    before = _hits()
    assert torch.equal(t(x), _two_ops(t, x)) and _hits() == before
    assert torch.equal(b(x), _two_ops(b, x)) and _hits() == before


@torch.no_grad()
def test_plans_with_other_constants_do_not_reuse():
    a, b = _module(16, 200, "binary"), _module(16, 200, "binary", hadamard=False)
    x = torch.randn(2, 200)
    a(x)
    before = _hits()
    assert torch.equal(b(x), _two_ops(b, x)) and _hits() == before


# ----------------------------------------------------------------------------- plan lifetime
@torch.no_grad()
def test_plan_rebuilt_after_load_state_dict():
    a, b = _module(24, 200, "binary"), _module(24, 200, "binary")
    x = torch.randn(2, 200)
    a(x)
    plan = _plan(a)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))
    assert _plan(a) is not plan


@torch.no_grad()
def test_plan_rebuilt_after_a_buffer_is_replaced():
    mod = _module(24, 200, "ternary")
    x = torch.randn(2, 200)
    y = mod(x)
    plan = _plan(mod)
    mod.scale, mod.mean = mod.scale * 2, mod.mean * 2  # exact in fp16: y doubles exactly
    assert torch.equal(mod(x), 2 * y)
    assert _plan(mod) is not plan


@torch.no_grad()
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_plan_follows_in_place_writes_to_scale_and_mean(levels):
    """The int8-table plans keep the scales and means laid out per tile: an in-place write to
    either must reach the next call."""
    mod = _module(40, 300, levels)
    x = torch.randn(1, 300)
    y = mod(x)
    mod.scale.mul_(2)
    mod.mean.mul_(2)  # exact in fp16: y doubles exactly
    assert torch.equal(mod(x), 2 * y)
    mod.mean.zero_()
    assert torch.equal(mod(x), _two_ops(mod, x))


def test_no_plan_under_grad_compile_or_float64():
    mod = _module(16, 256, "binary")
    x = torch.randn(4, 256)
    with torch.enable_grad():
        y = mod(x.clone().requires_grad_())
        assert y.requires_grad  # the exact ops: they have autograd
        assert torch.equal(y.detach(), _two_ops(mod, x, gemm="addonly"))
    mod(x.double())
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _two_ops(mod, x), rtol=0, atol=0)
    assert "_eager_plan" not in mod.__dict__
    with torch.no_grad():
        mod(x)
    assert "_eager_plan" in mod.__dict__


def test_plan_rejects_bad_arrays():
    mod = _module(8, 200, "binary")
    sign, _ = mod.bitplanes()
    consts = [t.numpy() for t in mod.transform_constants()]
    args = (200, 128, 1.5, sign.numpy().view(np.uint32), None, mod.scale.numpy().view(np.uint16),
            mod.mean.numpy().view(np.uint16), *consts)
    core().LinearPlan(*args)
    with pytest.raises(ValueError, match="scale"):
        core().LinearPlan(*args[:5], args[5][:, :1].copy(), *args[6:])
    with pytest.raises(TypeError, match="sign"):
        core().LinearPlan(*args[:3], sign.numpy(), *args[4:])
    with pytest.raises(ValueError, match="gemm"):
        core().LinearPlan(*args, gemm="nope")
    with pytest.raises(ValueError, match="x"):
        core().LinearPlan(*args).run(np.zeros((2, 199), np.float32))


@torch.no_grad()
def test_copies_and_pickles_build_their_own_plan():
    import copy
    import io
    mod = _module(16, 200, "binary")
    x = torch.randn(2, 200)
    y = mod(x)
    dup = copy.deepcopy(mod)
    dup.scale.mul_(2), dup.mean.mul_(2)
    assert torch.equal(dup(x), 2 * y) and torch.equal(mod(x), y)
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
