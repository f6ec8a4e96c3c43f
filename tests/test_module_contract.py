"""SDQLinear keeps PyTorch's module contract: dtype casts leave the packed form alone, device moves
apply, every dtype computes, torch.compile traces a whole quantized model."""
import copy

import pytest
import torch

import sdq
from sdq.nn import SDQLinear
from sdq.pipeline import quantize_
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def _quantized_llama():
    model = tiny_llama()
    quantize_(model, sdq.SDQConfig(osr=1.5, levels="ternary"), progress=False,
              osr_for=lambda i, name: 2.0 if "mlp" in name else 1.5)
    return model


def _packed(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("sign", "trits", "trit_signs", "scale", "mean", "hadamard_signs",
                                         "meta")}


CASTS = [  # (cast, dtype, tolerance on logits relative to their spread: the dtype's rounding)
    (lambda m: m.bfloat16(), torch.bfloat16, 0.06),
    (lambda m: m.half(), torch.float16, 0.01),
    (lambda m: m.to(torch.bfloat16), torch.bfloat16, 0.06),
    (lambda m: m.to(dtype=torch.float16), torch.float16, 0.01),
    (lambda m: m.float(), torch.float32, 0.0),
]


@torch.no_grad()
def test_each_cast_computes_in_its_dtype_from_the_same_codes():
    model = _quantized_llama()
    assert sum(isinstance(m, SDQLinear) for m in model.modules()) == 14
    packed = _packed(model)
    want = model(IDS).logits
    for cast, dtype, tol in CASTS:
        moved = cast(copy.deepcopy(model))
        for m in moved.modules():
            if isinstance(m, SDQLinear):
                assert m.scale.dtype == torch.float16 and m.down_full.dtype == torch.float32
        got = moved(IDS).logits
        assert got.dtype == dtype
        err = float((got.float() - want).abs().max() / want.std())
        assert err <= tol, (dtype, err)
        assert _same(packed, _packed(moved))


@torch.no_grad()
def test_round_trip_through_every_dtype_keeps_the_packed_tensors_bit_identical():
    model = _quantized_llama()
    packed = _packed(model)
    want = model(IDS).logits
    model.bfloat16().half().float().to(torch.float64).to(torch.float32)
    assert _same(packed, _packed(model))
    # the dense parameters (embeddings, norms) were rounded to bf16 on the way: that much differs
    err = float((model(IDS).logits - want).abs().max() / want.std())
    assert err < 0.06


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype
                                        for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("use_kernels", [True, False])
@torch.no_grad()
def test_every_dtype_in_same_dtype_out(dtype, use_kernels):
    qw = sdq.quantize_weight(torch.randn(24, 200), sdq.SDQConfig(osr=1.5, levels="ternary"))
    layer = SDQLinear.from_quantized(qw, torch.randn(24))
    layer.use_kernels = use_kernels
    x = torch.randn(3, 200)
    want = x.double() @ qw.dequantize().double().T + layer.bias.double()
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    rel = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}
    assert ((y.double() - want).abs().max() / want.abs().max()) < rel[dtype]


@torch.no_grad()
def test_bias_follows_the_cast_and_packed_do_not():
    qw = sdq.quantize_weight(torch.randn(8, 128), sdq.SDQConfig(osr=2, levels="binary"))
    layer = SDQLinear.from_quantized(qw, torch.randn(8)).half()
    assert layer.bias.dtype == torch.float16
    assert layer.scale.dtype == torch.float16 and layer.sign.dtype == torch.int32
    assert layer.transform_signs.dtype == torch.float32
    layer.float()
    assert torch.equal(layer.scale, qw.scale) and torch.equal(layer.mean, qw.mean)


def test_meta_device_move_and_device_mismatch_error():
    qw = sdq.quantize_weight(torch.randn(8, 128), sdq.SDQConfig(osr=2, levels="binary"))
    layer = SDQLinear.from_quantized(qw).to("meta")
    assert all(t.device.type == "meta" for t in layer.buffers())
    assert layer.scale.dtype == torch.float16
    with pytest.raises(RuntimeError, match="move one of them"):
        layer(torch.randn(2, 128))


@torch.no_grad()
def test_bad_inputs_raise_clearly():
    layer = SDQLinear.from_quantized(
        sdq.quantize_weight(torch.randn(8, 128), sdq.SDQConfig(osr=1, levels="binary")))
    with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
        layer(torch.randn(2, 100))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 128, dtype=torch.int64))


@torch.no_grad()
def test_torch_compile_whole_model_fullgraph():
    model = _quantized_llama()
    want = model(IDS, use_cache=False).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(IDS, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_wrappers_refuse_tensors_on_another_device():
    """The CUDA kernels read raw pointers: a tensor left on another device must be an error."""
    from sdq import ops
    with pytest.raises(RuntimeError, match="scale is on cpu, expected cuda:0"):
        ops._check_cuda("addonly_gemm", torch.device("cuda", 0), scale=torch.zeros(2),
                        nonzero=None)


def test_load_state_dict_checks_what_it_loads():
    """Direct load_state_dict goes through the same checks as sdq.load."""
    W = torch.randn(8, 200)
    layer = SDQLinear.from_quantized(sdq.quantize_weight(W, sdq.SDQConfig(osr=2)))
    other = sdq.quantize_weight(W, sdq.SDQConfig(osr=1.5)).state_dict()
    with pytest.raises(sdq.CheckpointError, match="osr=1.5"):
        layer.load_state_dict(other)
    bad = {k: v.clone() for k, v in layer.state_dict().items()}
    bad["trits"][0, 0, 0] = 0xEE  # 4-bit magnitudes of 14: above trit5's 13
    with pytest.raises(sdq.CheckpointError, match="trits"):
        layer.load_state_dict(bad)
    same = sdq.quantize_weight(W * 2, sdq.SDQConfig(osr=2)).state_dict()
    layer.load_state_dict(same)
    assert torch.equal(layer.scale, same["scale"])
