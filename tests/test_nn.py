"""SDQLinear: the add-only path equals x @ dequantize().T; the ops pass torch.library.opcheck."""
import pytest
import torch

import sdq
from sdq.nn import SDQLinear

torch.set_grad_enabled(False)


def _module(out, n_in, osr, levels, hadamard=True, bias=False):
    W = torch.randn(out, n_in)
    qw = sdq.quantize_weight(W, sdq.SDQConfig(osr=osr, levels=levels, hadamard=hadamard))
    return SDQLinear.from_quantized(qw, torch.randn(out) if bias else None), qw


@pytest.mark.parametrize("out,n_in", [(1, 128), (7, 200), (33, 64), (64, 1000), (16, 576)])
@pytest.mark.parametrize("osr", [1.0, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_kernel_path_equals_dequantized_matmul(out, n_in, osr, levels, batch):
    mod, qw = _module(out, n_in, osr, levels, hadamard=(out % 2 == 1))
    x = torch.randn(batch, n_in)
    y = mod(x)
    want = (x.double() @ qw.dequantize().double().T)
    # float32 sums over in*osr terms: tolerance relative to the magnitude of the terms.
    scale = (x.double().abs() @ qw.dequantize().double().abs().T) + 1e-6
    assert (y.double() - want).abs().div(scale).max() < 1e-4


@pytest.mark.int8_tables
@pytest.mark.parametrize("out,n_in", [(1, 128), (7, 200), (33, 64), (64, 1000), (40, 576)])
@pytest.mark.parametrize("osr", [1.0, 1.5, 2.5])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("batch", [1, 64])
def test_default_int8_path_stays_close_to_dequantized_matmul(out, n_in, osr, levels, batch):
    """The default CPU GEMMs round activations to int8 tables per (token, block): the error of
    each output is bounded by the kernels' rounding (at most half a table step per group, see
    lut_gemm.h / trit5.h); summed over blocks it stays within a few percent of the terms."""
    mod, qw = _module(out, n_in, osr, levels, hadamard=(out % 2 == 1))
    x = torch.randn(batch, n_in)
    x[0, : n_in // 3] *= 1e3  # one token with a few large activations
    with torch.no_grad():
        y = mod(x)
    want = x.double() @ qw.dequantize().double().T
    scale = (x.double().abs() @ qw.dequantize().double().abs().T) + 1e-6
    assert (y.double() - want).abs().div(scale).max() < 0.05


def test_leading_dims_dtypes_and_bias():
    mod, qw = _module(24, 300, 2.0, "ternary", bias=True)
    x = torch.randn(2, 3, 300)
    y = mod(x)
    assert y.shape == (2, 3, 24)
    mod.use_kernels = False
    torch.testing.assert_close(y, mod(x), rtol=1e-4, atol=1e-4)
    mod.use_kernels = True
    assert mod(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_opcheck(levels):
    mod, _ = _module(8, 200, 1.5, levels)
    signs, down_full, down_last = mod.transform_constants()
    x = torch.randn(3, 200)
    torch.library.opcheck(torch.ops.sdq.activation_transform.default,
                          (x, signs, down_full, down_last, 200, 128, 1.5))
    xt, xsum = torch.ops.sdq.activation_transform(x, signs, down_full, down_last, 200, 128, 1.5)
    torch.library.opcheck(torch.ops.sdq.addonly_gemm.default,
                          (*mod.bitplanes(), mod.scale, mod.mean, xt, xsum, 200, 128, 1.5))


def test_torch_compile_traces_the_ops():
    mod, _ = _module(16, 256, 2.0, "ternary")
    x = torch.randn(4, 256)
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x))


def test_state_dict_is_packed():
    mod, qw = _module(8, 128, 2.0, "binary")
    sd = mod.state_dict()
    assert set(sd) == {"sign", "scale", "mean", "hadamard_signs", "meta"}
    assert sd["sign"].dtype == torch.int32 and sd["scale"].dtype == torch.float16
    empty = SDQLinear.empty_like(bytes(sd["meta"].tolist()).decode(), bias=False)
    empty.load_state_dict(sd)
    x = torch.randn(2, 128)
    torch.testing.assert_close(empty(x), mod(x))


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_fast_path_equals_the_ops(levels, dtype):
    """Plain eager CPU calls skip the op dispatch; they must compute exactly what the ops do."""
    from sdq import ops
    mod, _ = _module(40, 300, 1.5, levels)
    x = torch.randn(3, 300).to(dtype)
    assert ops._eager_cpu_ok(mod, x)
    fast = mod(x)
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        assert not ops._eager_cpu_ok(mod, xg)
        through_ops = mod(xg)
    assert torch.equal(fast, through_ops.detach())
    # a replaced buffer (a load, an assignment) rebuilds the prepared views
    mod.scale, mod.mean = mod.scale * 2, mod.mean * 2  # exact in fp16: y doubles exactly
    assert torch.equal(mod(x), 2 * fast)
