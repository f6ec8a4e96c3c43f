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


def _dense(model):
    """From now on every packed layer of model computes through its dequantized weight."""
    for m in model.modules():
        if isinstance(m, SDQLinear):
            m.use_kernels = False


def _kernels_and_dequantized(saved_default):
    """Greedy tokens of the saved default model through the kernels and through dense weights,
    and both paths' logits on the kernels' tokens."""
    path, tok = saved_default
    model = sdq.load(path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=6, do_sample=False)
        logits_fast = model(fast).logits
        _dense(model)
        slow = model.generate(ids, max_new_tokens=6, do_sample=False)
        logits_slow = model(fast).logits
    return fast, slow, logits_fast, logits_slow


def test_generate_through_kernels_matches_dequantized_path(saved_default):
    fast, slow, logits_fast, logits_slow = _kernels_and_dequantized(saved_default)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(logits_fast, logits_slow, rtol=1e-3, atol=1e-3)


@pytest.mark.int8_tables
def test_int8_tables_add_little_to_what_quantization_costs(saved_default):
    """The default CPU GEMMs round activations to int8 tables. Teacher-forced on a sentence, the
    divergence they add to the dequantized path's next-token distribution is under 2% of the
    divergence quantization itself costs against full precision (measured: 0.2-0.5%), and they
    pick the same next token almost everywhere. (Free-running greedy replies are no check here:
    they part after a few tokens where two candidates are close; the exact kernel's replies are
    identical, test above.)"""
    from sdq.data import load_model
    path, tok = saved_default
    full, _ = load_model()
    model = sdq.load(path)
    ids = tok("The capital of France is Paris. It is known for the Eiffel Tower, which was built "
              "in 1889 for the World's Fair.", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = full(ids).logits.log_softmax(-1)
        fast = model(ids).logits.log_softmax(-1)
        _dense(model)
        dense = model(ids).logits.log_softmax(-1)

    def kl(p, q):
        return float((p.exp() * (p - q)).sum(-1).mean())

    added, quantization = kl(dense, fast), kl(reference, dense)
    assert 0 < added < 0.02 * quantization, (added, quantization)
    agree = (fast.argmax(-1) == dense.argmax(-1)).float().mean().item()
    assert agree >= 0.85, agree


def test_from_pretrained_after_import_sdq_gives_the_logits_of_sdq_load(saved_default):
    """transformers' own loader (sdq.hf registers quant_method "sdq") builds the same model."""
    from transformers import AutoModelForCausalLM
    path, tok = saved_default
    model = AutoModelForCausalLM.from_pretrained(path)
    reference = sdq.load(path)
    assert sum(isinstance(m, SDQLinear) for m in model.modules()) == 30 * 7
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_saved_size_matches_bits(saved_default):
    path, _ = saved_default
    model = sdq.load(path)
    quantized = [m for m in model.modules() if isinstance(m, SDQLinear)]
    assert len(quantized) == 30 * 7
    # what is stored: the persistent buffers (the transform constants are derived, not stored)
    packed = sum(b.numel() * b.element_size() for m in quantized for b in m.state_dict().values())
    weights = sum(m.in_features * m.out_features for m in quantized)
    # ternary OSR 2 in trit5: 2 codes x 5/3 bits + 0.25 (+ group and tile padding, metadata)
    assert 3.55 < 8 * packed / weights < 3.7
    # everything else (tied embedding, norms) is stored once, in fp32
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "lm_head" not in n)
    size = (path / "model.safetensors").stat().st_size
    assert packed + other <= size <= packed + other + 256 * 1024  # + the JSON header


def test_sdq_generate_streams_the_greedy_chat_reply(saved_default, capsys):
    """`sdq generate` on a saved default model: the reply through the chat template on stdout,
    the same through the kernels and the dequantized weights, the speed on stderr."""
    import re

    from sdq.cli import main
    path, tok = saved_default
    question = [{"role": "user", "content": "What is the capital of France?"}]
    args = ["generate", str(path), "--prompt", question[0]["content"], "--max-new-tokens", "8",
            "--no-compile"]  # the compiled step: tests/test_decode.py, bench/generate.py
    assert main(args) == 0
    kernels = capsys.readouterr()
    assert main(args + ["--dequantized"]) == 0
    dense = capsys.readouterr()
    text = tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = sdq.load(path).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                      do_sample=False)
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert want.strip() and kernels.out == dense.out == want + "\n"
    stats = re.search(r"\[(\d+) new tokens in [\d.]+ s: [\d.]+ tokens/s; prefill (\d+) tokens",
                      kernels.err)
    assert stats and (int(stats[1]), int(stats[2])) == (out.shape[1] - ids.shape[1], ids.shape[1])
