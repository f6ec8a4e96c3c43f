"""sdq::plan_linear (sdq.plan_op), the whole CPU layer call as one op for compiled graphs: it
computes what the transform and the int8-table GEMM compute (the NumPy bindings, called one after
the other), sees in-place writes to every tensor it reads, checks its input, keeps its cache
bounded, and is what a compiled SDQLinear runs.
"""
import pytest
import torch

import sdq
from sdq import plan_op
from sdq.nn import SDQLinear

from test_linear_plan import _two_ops

pytestmark = pytest.mark.int8_tables


def _module(out, n_in, levels, osr=1.5, hadamard=True, seed=0):
    W = torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed))
    cfg = sdq.SDQConfig(osr=osr, levels=levels, hadamard=hadamard, seed=seed)
    return SDQLinear.from_quantized(sdq.quantize_weight(W, cfg))


def _args(mod):
    codes = (mod.trits, mod.trit_signs) if mod.ternary else (mod.lut_codes(), None)
    cfg = mod.config
    return (*codes, mod.scale, mod.mean, mod.transform_signs, mod.down_full, mod.down_last,
            mod.in_features, cfg.block_size, cfg.osr)


def _op(mod, x):
    return torch.ops.sdq.plan_linear(x, *_args(mod))


# odd widths (a short last block), OSR 1.5 and 2.5, no Hadamard, one row, a 33-row tile tail
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("out,n_in,osr,hadamard", [(33, 300, 1.5, True), (1, 128, 2.5, True),
                                                   (70, 200, 2.0, False)])
def test_equals_transform_then_table_gemm(levels, out, n_in, osr, hadamard):
    mod = _module(out, n_in, levels, osr, hadamard)
    for batch in (1, 5, 17):
        x = torch.randn(batch, n_in)
        with torch.no_grad():
            assert torch.equal(_op(mod, x), _two_ops(mod, x))


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_follows_set_cpu_gemm_tables(levels):
    """set_cpu_gemm("tables") keeps the op on the int8 tables at prefill batches too (layers on
    AMX CPUs otherwise run the AMX GEMMs from 6 or 8 tokens), and "auto" restores that."""
    from sdq import ops
    mod = _module(40, 300, levels)
    x = torch.randn(16, 300)  # on AMX CPUs "auto" runs the AMX GEMMs at this batch
    previous = ops.set_cpu_gemm("tables")
    try:
        with torch.no_grad():
            assert torch.equal(_op(mod, x), _two_ops(mod, x, gemm="tables"))
            ops.set_cpu_gemm("auto")
            assert torch.equal(_op(mod, x), _two_ops(mod, x, gemm="auto"))
    finally:
        ops.set_cpu_gemm(previous)


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_sees_in_place_writes_to_what_it_reads(levels):
    """Scales and codes are read through pointers; the transform constants are copied into the
    plan, so their version counters are part of the cache key."""
    mod, other = _module(40, 300, levels), _module(40, 300, levels, seed=5)
    x = torch.randn(3, 300)
    with torch.no_grad():
        _op(mod, x)
        mod.scale.mul_(2)
        assert torch.equal(_op(mod, x), _two_ops(mod, x))
        if levels == "ternary":
            mod.trits.copy_(other.trits)
            mod.trit_signs.copy_(other.trit_signs)
        else:
            mod.sign.copy_(other.sign)  # lut_codes() repacks on the next call
        assert torch.equal(_op(mod, x), _two_ops(mod, x))
        before = _op(mod, x)
        mod.down_full.mul_(-1)
        assert torch.equal(_op(mod, x), _two_ops(mod, x))
        assert not torch.equal(_op(mod, x), before)


def test_checks_its_input():
    mod = _module(16, 256, "binary")
    with torch.no_grad(), pytest.raises(ValueError, match="float32"):
        _op(mod, torch.randn(2, 256, dtype=torch.float64))
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[batch, 256\]"):
        _op(mod, torch.randn(2, 255))
    with torch.no_grad(), pytest.raises(ValueError, match="contiguous"):
        args = list(_args(mod))
        args[2] = torch.empty(mod.scale.shape[::-1], dtype=torch.float16).t()  # scale, strided
        torch.ops.sdq.plan_linear(torch.randn(2, 256), *args)


def test_cache_is_bounded_and_keeps_what_it_reads_alive(monkeypatch):
    monkeypatch.setattr(plan_op, "_MAX_PLANS", 3)
    plan_op.clear_cache()
    mods = [_module(8, 128, "ternary", seed=s) for s in range(5)]
    x = torch.randn(1, 128)
    with torch.no_grad():
        for m in mods:
            _op(m, x)
    assert len(plan_op._plans) == 3
    assert all(any(t is m.trits for t in entry[1]) for entry, m in
               zip(plan_op._plans.values(), mods[2:]))
    plan_op.clear_cache()
    assert not plan_op._plans


def test_moving_a_layer_drops_the_plans_that_keep_its_old_tensors():
    mod = _module(8, 128, "ternary")
    with torch.no_grad():
        _op(mod, torch.randn(1, 128))
    assert any(any(t is mod.trits for t in entry[1]) for entry in plan_op._plans.values())
    mod.float()  # replaces the module's tensors (SDQLinear._apply)
    assert not plan_op._plans


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_compiled_layer_runs_the_op(levels):
    """Under torch.compile (inductor) a CPU inference call is one sdq::plan_linear per layer and
    gives the eager call's result."""
    mod = _module(48, 320, levels, osr=2.0)
    x = torch.randn(1, 320)
    compiled = torch.compile(mod, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(x)  # compile outside the profile
        with torch.profiler.profile() as prof:
            y = compiled(x)
        assert torch.equal(y, mod(x))
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("sdq::plan_linear") == 1
    assert "sdq::activation_transform" not in calls
