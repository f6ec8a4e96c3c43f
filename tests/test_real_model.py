"""The default model end to end: quantize, save, load, and generate through the add-only kernels.

Uses the real SmolLM2-135M (converted once into the cache, ~30 s on a fresh machine). Data-free
SDQ keeps it quick; quality is measured in bench/quality.py, not here.
"""
import pytest
import torch

import sdq
from sdq.nn import SDQLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved_default(tmp_path_factory):
    from sdq.data import load_model
    torch.set_grad_enabled(False)
    model, tok = load_model()
    sdq.quantize_(model, sdq.SDQConfig(osr=2, levels="ternary", codes="gram"), progress=False)
    out = sdq.save(model, tmp_path_factory.mktemp("q") / "smollm2", tok)
    return out, tok


def test_generate_through_kernels_matches_dequantized_path(saved_default):
    path, tok = saved_default
    model = sdq.load(path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=6, do_sample=False)
        logits_fast = model(fast).logits
        for m in model.modules():
            if isinstance(m, SDQLinear):
                m.use_kernels = False
        slow = model.generate(ids, max_new_tokens=6, do_sample=False)
        logits_slow = model(fast).logits
    assert torch.equal(fast, slow)
    torch.testing.assert_close(logits_fast, logits_slow, rtol=1e-3, atol=1e-3)


def test_saved_size_matches_bits(saved_default):
    path, _ = saved_default
    model = sdq.load(path)
    quantized = [m for m in model.modules() if isinstance(m, SDQLinear)]
    assert len(quantized) == 30 * 7
    # what is stored: the persistent buffers (the transform constants are derived, not stored)
    packed = sum(b.numel() * b.element_size() for m in quantized for b in m.state_dict().values())
    weights = sum(m.in_features * m.out_features for m in quantized)
    assert 4.2 < 8 * packed / weights < 4.35  # ternary OSR 2: 4 + 0.25 (+ padding, metadata)
    # everything else (tied embedding, norms) is stored once, in fp32
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "lm_head" not in n)
    size = (path / "model.safetensors").stat().st_size
    assert packed + other <= size <= packed + other + 256 * 1024  # + the JSON header
