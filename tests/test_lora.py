"""LoRA adapters on a quantized model: they train through the add-only ops, the codes stay frozen."""
import pytest
import torch

import sdq
import sdq.lora
from sdq.lora import LoRALinear
from sdq.nn import SDQLinear
from sdq.pipeline import quantize_
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _grad_on():
    """Other test modules switch autograd off at import; training needs it."""
    with torch.enable_grad():
        yield


def _quantized_llama():
    model = tiny_llama(vocab=64, intermediate=128)
    with torch.no_grad():
        quantize_(model, sdq.SDQConfig(osr=1.5, levels="binary"), progress=False)
    return model


def _packed(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".base." in k}


def test_adapters_start_at_the_quantized_model_and_train():
    model = _quantized_llama()
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    params = sdq.lora.add_lora(model, rank=4)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # up = 0
    packed = _packed(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(params) == 28
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert losses[-1] < 0.9 * losses[0], losses
    after = _packed(model)
    assert all(torch.equal(packed[k], after[k]) for k in packed)


def _sdq_layer():
    qw = sdq.quantize_weight(torch.randn(12, 200), sdq.SDQConfig(osr=2, levels="ternary"))
    return SDQLinear.from_quantized(qw), qw


def _wgm_layer():
    from sdq.methods.wgm import WGMConfig, quantize_weight_wgm
    from sdq.wgm_nn import WGMLinear
    qw = quantize_weight_wgm(torch.randn(12, 200), WGMConfig(groups=8))
    return WGMLinear.from_quantized(qw), qw


@pytest.mark.parametrize("make", [_sdq_layer, _wgm_layer])
def test_adapter_gradient_equals_dense_reference(make):
    base, qw = make()
    layer = LoRALinear(base, rank=3)
    torch.nn.init.normal_(layer.up.weight)
    x = torch.randn(5, 200)
    layer(x).square().sum().backward()
    down = layer.down.weight.detach().requires_grad_(True)
    up = layer.up.weight.detach().requires_grad_(True)
    y = x @ qw.dequantize().T + (x @ down.T @ up.T) * layer.scaling
    y.square().sum().backward()
    torch.testing.assert_close(layer.down.weight.grad, down.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.up.weight.grad, up.grad, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="no SDQLinear"):
        sdq.lora.add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    qw = sdq.quantize_weight(torch.randn(4, 128), sdq.SDQConfig(osr=1, levels="binary"))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(SDQLinear.from_quantized(qw), rank=0)
