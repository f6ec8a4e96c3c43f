"""sdq.decode.StaticDecoder: the same greedy tokens as HF generate() on tiny random Llama and
Qwen2 models, fp32 and sdq, eager and compiled; clear errors when the static cache is too small;
reproducible sampling; the eager fallback when torch.compile cannot work.
"""
import copy

import pytest
import torch

import sdq
from sdq import decode
from sdq.decode import CacheFull, StaticDecoder
from tiny_models import tiny_llama

pytest.importorskip("transformers")

PROMPT = torch.tensor([[1, 5, 7, 9, 11, 3]])


def tiny_qwen2(seed: int = 0):
    import transformers
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, initializer_range=0.3,
                                   eos_token_id=None)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def models(kind: str):
    """(fp32 model, its sdq-quantized copy); initializer_range 0.3: prompt-dependent replies; no
    eos token, so that generate() makes every token it is asked for (min_new_tokens would make
    it by banning the eos token, which changes the greedy choice)."""
    fp = tiny_llama(layers=2, seed=0, initializer_range=0.3, eos_token_id=None) \
        if kind == "llama" else tiny_qwen2()
    q = copy.deepcopy(fp)
    sdq.quantize_(q, sdq.SDQConfig(osr=2, levels="ternary"), progress=False)
    return fp, q


def hf_greedy(model, ids, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_eager_static_decode_matches_hf_generate(kind):
    for model in models(kind):
        dec = StaticDecoder(model, max_cache_len=64, compile=False)
        for ids in (PROMPT, PROMPT[:, :2]):  # the cache is reused across calls
            out = dec.generate(ids, 16)
            assert torch.equal(out.tokens, hf_greedy(model, ids, 16))
            assert out.new == out.tokens[0, ids.shape[1]:].tolist()
        assert not dec.compiled and dec.warm.compiled_step_seconds is None
        assert out.stats.new_tokens == 16 and out.stats.decode_tokens_per_s > 0


def test_compiled_static_decode_matches_hf_generate_without_recompiles():
    from torch._dynamo.utils import counters
    for model in models("llama"):
        dec = StaticDecoder(model, max_cache_len=64, compile=True)
        warm = dec.warm_up()
        assert dec.compiled and warm.compile_seconds > 0 and warm.compiled_step_seconds > 0
        graphs = counters["stats"]["unique_graphs"]
        for ids in (PROMPT, PROMPT[:, :3]):  # other prompt lengths: prefill is eager
            assert torch.equal(dec.generate(ids, 12).tokens, hf_greedy(model, ids, 12))
        assert counters["stats"]["unique_graphs"] == graphs  # no recompile, no graph break


def test_auto_keeps_the_faster_step_and_falls_back_to_eager(monkeypatch):
    fp, _ = models("llama")
    monkeypatch.setattr(decode, "compile_unavailable_reason", lambda: "no C++ compiler (test)")
    dec = StaticDecoder(fp, max_cache_len=32)  # compile=None: measure and choose
    warm = dec.warm_up()
    assert not warm.compiled and warm.reason == "no C++ compiler (test)"
    assert "decode step: eager (no C++ compiler (test)" in warm.line()
    assert torch.equal(dec.generate(PROMPT, 8).tokens, hf_greedy(fp, PROMPT, 8))
    with pytest.raises(RuntimeError, match="cannot compile the decode step: no C"):
        StaticDecoder(fp, max_cache_len=32, compile=True).warm_up()


def test_static_cache_limits_give_clear_errors():
    fp, _ = models("llama")
    dec = StaticDecoder(fp, max_cache_len=16, compile=False)
    dec.generate(PROMPT, 11)  # 6 + 11 - 1 = 16 tokens: the last token is never fed back
    with pytest.raises(CacheFull, match=r"prompt \(6 tokens\) and max_new_tokens 12 need a cache "
                       r"of 17 tokens; this decoder's static cache holds 16"):
        dec.generate(PROMPT, 12)
    with pytest.raises(ValueError, match="exceeds the model's context of 2048"):
        StaticDecoder(fp, max_cache_len=4096)
    with pytest.raises(ValueError, match="max_cache_len must be >= 3"):
        StaticDecoder(fp, max_cache_len=2)
    with pytest.raises(ValueError, match=r"batch 1"):
        dec.generate(PROMPT.repeat(2, 1), 4)
    with pytest.raises(ValueError, match="top_p must be in"):
        dec.generate(PROMPT, 4, temperature=1.0, top_p=0.0)


def test_sampling_is_reproducible_with_a_seeded_generator():
    _, q = models("llama")
    dec = StaticDecoder(q, max_cache_len=64, compile=False)

    def sample(seed: int, **kw) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return dec.generate(PROMPT, 20, temperature=1.5, generator=g, **kw).new

    assert sample(3) == sample(3) and sample(3, top_p=0.8) == sample(3, top_p=0.8)
    assert sample(3) != sample(4)  # 20 draws at temperature 1.5 from 96 tokens
    # a nucleus that holds only the most likely token is greedy
    greedy = hf_greedy(q, PROMPT, 20)[0, PROMPT.shape[1]:].tolist()
    assert sample(5, top_p=1e-6) == greedy


def test_eos_ends_the_reply_and_streams_every_token():
    fp, _ = models("llama")
    dec = StaticDecoder(fp, max_cache_len=64, compile=False)
    full = dec.generate(PROMPT, 10).new
    eos = full[4]
    seen = []
    out = dec.generate(PROMPT, 10, eos_token_id=[eos, 95], on_token=seen.append)
    assert out.new == full[:full.index(eos) + 1] == seen
    assert out.stats.new_tokens == len(seen)


def test_compiled_step_skips_module_guards_only_in_an_isolated_region(monkeypatch):
    """The guard filter is used only together with isolate_recompiles (two decoders must not share
    a graph once the module guards are gone); a torch without either gets the mode alone."""
    kwargs = decode._compile_kwargs("max-autotune-no-cudagraphs")
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):
        assert kwargs["isolate_recompiles"] is True
        assert kwargs["options"]["guard_filter_fn"] is \
            torch.compiler.skip_guard_on_all_nn_modules_unsafe
        assert kwargs["options"]["max_autotune"] is True  # the mode's own options kept
        assert "mode" not in kwargs  # torch.compile takes a mode or options, not both
    monkeypatch.delattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")
    assert decode._compile_kwargs("default") == {"mode": "default"}
