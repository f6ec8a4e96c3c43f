"""The calibrated defaults (gram codes, exact compensation, fp16 scale search, one refinement
pass, end-to-end tuning) on tiny random decoders of five families: every decoder linear is
packed, the calibrated model is closer to the full-precision one than the data-free one, tuning
lowers the calibration KL, and the int8 CPU path stays with the exact one.

Random weights: plumbing only, never a quality claim (bench/quality.py measures the real model).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import sdq
from sdq import ops
from sdq.nn import SDQLinear
from sdq.pipeline import quantize_

T = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
FAMILIES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=16, **SMALL)),
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=16, **SMALL)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, eos_token_id=1, bos_token_id=1, **SMALL)),
}
IDS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))


def _kl(model, reference) -> float:
    with torch.no_grad():
        p = F.log_softmax(reference(IDS).logits.float(), -1)
        q = F.log_softmax(model(IDS).logits.float(), -1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_calibrated_defaults_hold_across_families(family):
    torch.manual_seed(0)
    base = FAMILIES[family]().eval()
    cfg = sdq.SDQConfig(osr=2, codes="gram")  # the CLI's defaults
    data_free, calibrated, tuned = (copy.deepcopy(base) for _ in range(3))
    quantize_(data_free, cfg, progress=False)
    quantize_(calibrated, cfg, IDS, progress=False)
    report = quantize_(tuned, cfg, IDS, progress=False, finetune_steps=4, finetune_seed=0)
    linears = {n for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}  # Phi3's are fused
    for model in (data_free, calibrated, tuned):
        assert {n for n, m in model.named_modules() if isinstance(m, SDQLinear)} == linears
    kl_free, kl_cal = _kl(data_free, base), _kl(calibrated, base)
    assert kl_cal < kl_free, (kl_cal, kl_free)
    assert report.finetune["steps"] == 4
    assert _kl(tuned, base) < kl_cal  # tuning lowered the KL on the calibration text
    # The default int8-table CPU kernels compute what the exact kernel computes, up to rounding.
    with torch.no_grad():
        int8 = calibrated(IDS).logits
        previous = ops.set_cpu_gemm("addonly")
        exact = calibrated(IDS).logits
        ops.set_cpu_gemm(previous)
    assert float((int8 - exact).abs().max() / exact.std()) < 0.1
