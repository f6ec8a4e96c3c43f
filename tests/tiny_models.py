"""Tiny random Llama models for plumbing tests (quality is measured on the real model in bench/)."""
from __future__ import annotations

import copy

import torch


def tiny_llama(vocab: int = 96, intermediate: int = 160, layers: int = 2, tie: bool = True,
               seed: int | None = None, **extra):
    """LlamaForCausalLM in eval mode: hidden 64, 4 heads, 2 key-value heads; `extra` goes to
    LlamaConfig. seed: torch.manual_seed before the weights are drawn (None: the current state)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=tie, **extra)
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def ternary_then_binary(base, osr: float = 1.25, osr_for=None):
    """A copy of 2-layer `base` quantized with layer 0 ternary and layer 1 binary."""
    import sdq
    models = {}
    for levels in ("ternary", "binary"):
        models[levels] = copy.deepcopy(base)
        sdq.quantize_(models[levels], sdq.SDQConfig(osr=osr, levels=levels), osr_for=osr_for,
                      progress=False)
    models["ternary"].model.layers[1] = models["binary"].model.layers[1]
    return models["ternary"]
