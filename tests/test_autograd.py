"""Autograd through the add-only ops: gradcheck in float64, kernel-path gradients, frozen codes.

sdq.torch_ops is the ops' plain-torch path (any dtype/device) and their backward; it is checked
against the compiled kernels here, and the backward against finite differences (gradcheck).
"""
import pytest
import torch

import sdq
from sdq import torch_ops
from sdq.nn import SDQLinear



@pytest.fixture(autouse=True)
def _grad_on():
    """Other test modules switch autograd off at import; these tests need it."""
    with torch.enable_grad():
        yield


SHAPES = [(5, 128, 1.0), (7, 200, 1.5), (3, 64, 2.5), (9, 300, 2.0)]  # short last blocks, odd OSR


def _module(out, n_in, osr, levels, hadamard=True):
    W = torch.randn(out, n_in)
    qw = sdq.quantize_weight(W, sdq.SDQConfig(osr=osr, levels=levels, hadamard=hadamard))
    return SDQLinear.from_quantized(qw), qw


def _geometry(mod):
    return mod.in_features, mod.config.block_size, mod.config.osr


@pytest.mark.parametrize("out,n_in,osr", SHAPES)
@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("hadamard", [True, False])
def test_torch_path_equals_kernels(out, n_in, osr, levels, hadamard):
    mod, _ = _module(out, n_in, osr, levels, hadamard)
    signs, down_full, down_last = mod.transform_constants()
    x = torch.randn(6, n_in) * torch.logspace(-3, 3, 6)[:, None]  # tiny to large activations
    args = (signs, down_full, down_last, *_geometry(mod))
    xt, xsum = torch.ops.sdq.activation_transform(x, *args)  # float32: the compiled kernel
    xt_ref, xsum_ref = torch_ops.activation_transform(x.double(), *args)
    scale = x.double().abs().amax(1, keepdim=True)
    assert ((xt.double() - xt_ref).abs() / scale).max() < 1e-5
    assert ((xsum.double() - xsum_ref).abs() / scale).max() < 1e-5
    gemm = (*mod.bitplanes(), mod.scale, mod.mean)
    y = torch.ops.sdq.addonly_gemm(*gemm, xt, xsum, *_geometry(mod))
    y_ref = torch_ops.addonly_gemm(*gemm, xt.double(), xsum.double(), *_geometry(mod))
    assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-4 * float(y_ref.abs().max()))


def test_unpack_codes_matches_the_core():
    for levels in ("binary", "ternary"):
        _, qw = _module(11, 300, 1.5, levels)
        got = torch_ops.unpack_codes(*qw.bitplanes(), torch.float32)
        want = torch.from_numpy(qw.codes()).float()
        assert torch.equal(got, want)  # binary padding bits (0) read -1 in both


@pytest.mark.parametrize("out,n_in,osr", SHAPES[:3])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_gradcheck_activation_transform(out, n_in, osr, levels):
    mod, _ = _module(out, n_in, osr, levels)
    signs, down_full, down_last = mod.transform_constants()
    x = torch.randn(3, n_in, dtype=torch.float64, requires_grad=True)
    fn = lambda x: torch.ops.sdq.activation_transform(  # noqa: E731
        x, signs, down_full, down_last, *_geometry(mod))
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("out,n_in,osr", SHAPES[:3])
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_gradcheck_addonly_gemm(out, n_in, osr, levels):
    """Gradients to scale, mean, xt and xsum (the codes are integers: frozen)."""
    mod, _ = _module(out, n_in, osr, levels)
    planes = mod.bitplanes()
    cols = planes[0].shape[1] * 32
    nb = mod.scale.shape[1]
    leaf = lambda t: t.detach().double().requires_grad_(True)  # noqa: E731
    scale, mean = leaf(mod.scale), leaf(mod.mean)
    xt, xsum = leaf(torch.randn(2, cols)), leaf(torch.randn(2, nb))
    fn = lambda s, m, a, b: torch.ops.sdq.addonly_gemm(  # noqa: E731
        *planes, s, m, a, b, *_geometry(mod))
    assert torch.autograd.gradcheck(fn, (scale, mean, xt, xsum))


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_gradcheck_whole_layer_float64(levels):
    mod, _ = _module(6, 200, 1.5, levels)
    x = torch.randn(4, 200, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mod, (x,))


@pytest.mark.parametrize("out,n_in,osr", SHAPES)
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_kernel_path_gradients(out, n_in, osr, levels):
    """float32 input through the compiled kernels: d/dx equals grad_y W_hat, and the scale and mean
    gradients equal the float64 path's."""
    mod, qw = _module(out, n_in, osr, levels)
    mod.scale.requires_grad_(True)
    mod.mean.requires_grad_(True)
    x = torch.randn(2, 3, n_in, requires_grad=True)
    g = torch.randn(2, 3, out)
    (mod(x) * g).sum().backward()
    want_x = (g.double().reshape(-1, out) @ qw.dequantize().double()).reshape(x.shape)
    assert torch.allclose(x.grad.double(), want_x, rtol=1e-4, atol=1e-4 * float(want_x.abs().max()))
    got_scale, got_mean = mod.scale.grad.double(), mod.mean.grad.double()
    assert mod.scale.grad.dtype == torch.float16  # a gradient has its tensor's dtype

    ref = SDQLinear.from_quantized(qw)
    ref.scale = ref.scale.detach().double().requires_grad_(True)
    ref.mean = ref.mean.detach().double().requires_grad_(True)
    (ref(x.detach().double()) * g.double()).sum().backward()
    for got, want in ((got_scale, ref.scale.grad), (got_mean, ref.mean.grad)):
        # fp16 gradients: compare within fp16 rounding of the largest entry
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_codes_receive_no_gradient_and_stay_frozen():
    mod, _ = _module(8, 256, 2.0, "ternary")
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    x = torch.randn(4, 256, requires_grad=True)
    mod(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(torch.equal(before[k], v) for k, v in mod.state_dict().items())
    assert not any(t.requires_grad for t in mod.buffers())


def test_torch_compile_backward():
    mod, _ = _module(16, 256, 2.0, "binary")
    x = torch.randn(4, 256, requires_grad=True)
    mod(x).sum().backward()
    want = x.grad.clone()
    x.grad = None
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, want)
