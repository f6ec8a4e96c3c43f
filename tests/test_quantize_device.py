"""The fast, device-agnostic calibrated path: code selection loop, Hadamard rotation as a matmul
(what non-CPU devices use), dense forward of packed layers, the `device` plumbing of quantize_ and
the CLI; CUDA itself is exercised where a GPU is visible."""
import copy

import pytest
import torch
from tiny_models import tiny_llama

import sdq
from sdq import blocks, device
from sdq.dense_forward import dense_packed_layers
from sdq.gptq import damped_inverse_cholesky, gptq_columnwise
from sdq.methods.gram import _select_codes_torch, select_codes
from sdq.packed_linear import PackedLinear

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


def _reference_round(v, tau):
    if tau is None:
        return torch.where(v > 0, 1.0, -1.0)
    return torch.where(v >= tau, 1.0, torch.where(v <= -tau, -1.0, 0.0))


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("m", [64, 256])
def test_select_codes_matches_gptq_columnwise(ternary, m):
    """The torch code-selection loop (what non-CPU devices run) is GPTQ on the Gram matrix: same
    codes as the generic engine, whose lazy batches it shares. (The CPU's core loop is checked
    against its own float32 reference in test_gram_codes.py.)"""
    gen = torch.Generator().manual_seed(m + ternary)
    z = torch.randn(40, m, generator=gen, dtype=torch.float64)
    D = blocks.resampler(m, m // 2)
    X = torch.randn(3 * m, m // 2, generator=gen, dtype=torch.float64)
    Hinv, _ = damped_inverse_cholesky(D.T @ (X.T @ X) @ D, 0.2)
    Hinv = Hinv.float()
    tau = z.abs().quantile(0.55, dim=1).float() if ternary else None
    ref = gptq_columnwise(z.float(), Hinv, min(128, m), lambda j, w, _: _reference_round(w, tau))
    got = _select_codes_torch(z, Hinv, tau)
    assert torch.equal(got, ref)
    assert set(got.unique().tolist()) <= ({-1.0, 0.0, 1.0} if ternary else {-1.0, 1.0})


@pytest.mark.parametrize("ternary", [False, True])
def test_select_codes_stack_rounds_each_group_against_its_own_factor(ternary):
    """The code search's stacked call: group i of the rows gets exactly the codes that a call
    with its own Hinv alone gives (dampings differ, so the factors do)."""
    gen = torch.Generator().manual_seed(7 + ternary)
    m, n = 96, 24
    D = blocks.resampler(m, m // 2)
    X = torch.randn(2 * m, m // 2, generator=gen, dtype=torch.float64)
    factors = [damped_inverse_cholesky(D.T @ (X.T @ X) @ D, d)[0].float() for d in (0.2, 0.05, 0.5)]
    z = torch.randn(3 * n, m, generator=gen, dtype=torch.float64)
    tau = z.abs().quantile(0.55, dim=1).float() if ternary else None
    for select in (select_codes, _select_codes_torch):
        got = select(z, torch.stack(factors), tau)
        for i, Hinv in enumerate(factors):
            rows = slice(i * n, (i + 1) * n)
            assert torch.equal(got[rows], select(z[rows], Hinv,
                                                 None if tau is None else tau[rows]))


@pytest.mark.parametrize("n", [8, 128])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("with_signs", [False, True])
def test_hadamard_rotate_matches_core_fwht(n, inverse, with_signs):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    signs = blocks.hadamard_signs(128, 3) if with_signs else None
    torch.testing.assert_close(device.hadamard_rotate(x, signs, inverse),
                               blocks.rotate(x, signs, inverse), rtol=1e-5, atol=1e-5)


def test_resolve_device():
    assert device.resolve("cpu") == torch.device("cpu")
    assert device.resolve(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="meta"):
        device.resolve("meta")
    with pytest.raises(ValueError, match="not a torch device"):
        device.resolve("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            device.resolve("cuda")


def _calibrated(model, dev=None):
    calib = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    sdq.quantize_(model, sdq.SDQConfig(osr=2, levels="ternary", codes="gram"), calib,
                  progress=False, device=dev)
    return model


def test_device_cpu_is_the_default_path():
    base = tiny_llama(seed=0)
    a = _calibrated(copy.deepcopy(base))
    b = _calibrated(copy.deepcopy(base), "cpu")
    packed = [m for m in b.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 14 and all(m.scale.device.type == "cpu" for m in packed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_dense_forward_of_packed_layers_matches_kernels():
    model = _calibrated(tiny_llama(seed=0))
    layer = model.model.layers[0]
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        kernel = layer.mlp(x)
        with dense_packed_layers(layer):
            assert not any(isinstance(m, PackedLinear) for m in layer.modules())
            dense = layer.mlp(x)
    assert sum(isinstance(m, PackedLinear) for m in layer.modules()) == 7  # put back
    torch.testing.assert_close(dense, kernel, rtol=1e-4, atol=1e-4)


@CUDA
def test_cuda_quantization_matches_cpu():
    base = tiny_llama(seed=0)
    cpu = _calibrated(copy.deepcopy(base), "cpu")
    gpu = _calibrated(copy.deepcopy(base), "cuda")
    assert all(m.scale.device.type == "cuda" for m in gpu.modules() if isinstance(m, PackedLinear))
    for (name, a), b in zip(cpu.named_modules(), gpu.modules()):
        if isinstance(a, PackedLinear):
            wa, wb = a.quantized_weight().dequantize(), b.quantized_weight().dequantize()
            rel = float((wa - wb).norm() / wa.norm())
            agree = float((torch.from_numpy(a.quantized_weight().codes()) ==
                           torch.from_numpy(b.quantized_weight().codes())).float().mean())
            assert rel < 0.05 and agree > 0.97, (name, rel, agree)  # float rounding flips a few


def test_cli_device_flag_errors(capsys):
    from sdq.cli import main
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    assert main(["quantize", "--device", "cuda", "--calib-samples", "0",
                 "--eval-tokens", "0"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
