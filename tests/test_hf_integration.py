"""transformers integration: `import sdq` lets AutoModelForCausalLM.from_pretrained load an sdq
folder into packed layers (sdq.hf), and save_pretrained writes a folder both loaders read.

Tiny random models (plumbing); the default model is in tests/test_real_model.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sdq
import sdq.hf
from sdq.experts import SDQExperts
from sdq.io import CheckpointError
from sdq.nn import SDQLinear
from sdq.wgm_nn import WGMLinear

T = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (after the importorskip)
from tiny_models import ternary_then_binary, tiny_llama  # noqa: E402

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
PACKED = (SDQLinear, WGMLinear)


def tiny_qwen2():
    """Qwen2: q/k/v projections with a bias, untied head."""
    cfg = T.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return T.Qwen2ForCausalLM(cfg).eval()


def tiny_mixtral():
    cfg = T.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                          num_experts_per_tok=2)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def quantized(kind: str):
    if kind == "llama-ternary-binary":
        return ternary_then_binary(tiny_llama(seed=0))
    if kind == "wgm":
        from sdq.methods.wgm import WGMConfig
        model = tiny_llama(seed=0, tie=False)
        sdq.quantize_(model, WGMConfig(groups=4), progress=False)
        return model
    model = tiny_qwen2() if kind == "qwen2-bias" else tiny_mixtral()
    sdq.quantize_(model, sdq.SDQConfig(osr=1.5, levels="binary"), progress=False)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved folder per kind of model, written by sdq.save."""
    root = tmp_path_factory.mktemp("hf")
    with torch.no_grad():
        return {kind: sdq.save(quantized(kind), root / kind)
                for kind in ("llama-ternary-binary", "qwen2-bias", "wgm", "mixtral")}


def from_pretrained(path, **kwargs):
    return T.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def assert_same_model(a, b, logits=True):
    """Same packed modules, same state dict (tensor for tensor), same logits."""
    def kinds(m):
        return {n: type(x) for n, x in m.named_modules() if isinstance(x, PACKED)}
    assert kinds(a) == kinds(b) and kinds(a)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    if logits:
        with torch.no_grad():
            assert torch.equal(a(IDS).logits, b(IDS).logits)


@pytest.mark.parametrize("kind", ["llama-ternary-binary", "qwen2-bias", "wgm", "mixtral"])
def test_from_pretrained_builds_the_model_sdq_load_builds(folders, kind):
    model = from_pretrained(folders[kind])
    reference = sdq.load(folders[kind])
    assert_same_model(model, reference)
    assert model.config.quantization_config.quant_method == "sdq"
    assert not [n for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 3]
    packed = [m for m in model.modules() if isinstance(m, PACKED)]
    assert all(m.bias is None or not m.bias.requires_grad for m in packed)
    if kind == "mixtral":
        assert sum(isinstance(m, SDQExperts) for m in model.modules()) == 2
    if kind == "qwen2-bias":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_packed_tensors_keep_their_dtypes_under_another_dtype(folders):
    """dtype=bfloat16 casts what .bfloat16() casts: the bias and the unquantized weights, never
    the packed tensors (scales stay fp16)."""
    path = folders["qwen2-bias"]
    model = from_pretrained(path, dtype=torch.bfloat16)
    reference = sdq.load(path).bfloat16()
    assert_same_model(model, reference, logits=False)
    # transformers keeps the rotary frequencies (non-persistent) in float32 when it builds a
    # model in bfloat16, .bfloat16() rounds them: the logits differ by that rounding only
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=0.05, atol=0.05)
    q = model.model.layers[0].self_attn.q_proj
    assert q.scale.dtype == torch.float16 and q.bias.dtype == torch.bfloat16


def test_dtype_auto_is_the_stored_dtype(tmp_path):
    """sdq.save writes the stored dtype into config.json: from_pretrained's default
    (dtype="auto") builds the model in it, as sdq.load does."""
    path = sdq.save(quantized("llama-ternary-binary").bfloat16(), tmp_path / "bf16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    model = from_pretrained(path)
    assert model.dtype == torch.bfloat16
    assert_same_model(model, sdq.load(path))


@pytest.mark.parametrize("kind", ["llama-ternary-binary", "mixtral"])
def test_save_pretrained_writes_a_folder_both_loaders_read(folders, kind, tmp_path):
    model = from_pretrained(folders[kind])
    model.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    original = json.loads((folders[kind] / "config.json").read_text())["quantization_config"]
    q = config["quantization_config"]
    assert q["quant_method"] == "sdq" and q["format"] == "sdq-v1"
    assert {k: v for k, v in q.items() if k != "sha256"} == \
        {k: v for k, v in original.items() if k != "sha256"}
    assert_same_model(sdq.load(tmp_path / "again"), model)
    assert_same_model(from_pretrained(tmp_path / "again"), model)


def test_sdq_save_of_a_from_pretrained_model_loads_again(folders, tmp_path):
    model = from_pretrained(folders["qwen2-bias"])
    assert_same_model(sdq.load(sdq.save(model, tmp_path / "q")), model)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A sharded (sdq-v2) folder: a tiny Llama saved by transformers in shards, quantized by
    streaming (one shard per decoder layer, as tests/test_streaming.py does)."""
    from sdq.streaming import quantize_streaming
    root = tmp_path_factory.mktemp("streamed")
    tiny_llama(layers=3, seed=0).save_pretrained(root / "src", max_shard_size="60KB")
    quantize_streaming(root / "src", root / "out", sdq.SDQConfig(osr=1.25, levels="ternary"),
                       progress=False)
    return root / "out"


def _qconf(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_from_pretrained_loads_a_sharded_folder_as_sdq_load_does(streamed):
    assert _qconf(streamed)["format"] == "sdq-v2" and len(_qconf(streamed)["shards"]) == 4
    assert_same_model(from_pretrained(streamed), sdq.load(streamed))


def test_from_pretrained_checks_a_sharded_folder_as_sdq_load_does(streamed, tmp_path):
    import shutil
    folder = Path(shutil.copytree(streamed, tmp_path / "copy"))
    shard = sorted(_qconf(folder)["shards"])[1]
    data = bytearray((folder / shard).read_bytes())
    data[-1] ^= 1
    (folder / shard).write_bytes(bytes(data))
    for load in (from_pretrained, sdq.load):
        with pytest.raises(CheckpointError, match=f"{shard} is corrupt or truncated: its SHA-256"):
            load(folder)
    data[-1] ^= 1
    (folder / shard).write_bytes(bytes(data))
    # a stray model.safetensors, which transformers would load instead of the sealed shards
    shutil.copy(folder / shard, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="transformers would load"):
        from_pretrained(folder)


def test_save_pretrained_in_shards_then_in_one_file(streamed, tmp_path):
    """A small max_shard_size writes transformers' shards, sealed as sdq-v2; saving again into
    the same folder in one file seals it as sdq-v1 and drops the shards' index. Both load with
    both loaders into the model that was saved."""
    model = from_pretrained(streamed)
    out = tmp_path / "again"
    model.save_pretrained(out, max_shard_size="60KB")
    q = _qconf(out)
    assert q["format"] == "sdq-v2" and "sha256" not in q and len(q["shards"]) > 1
    assert q["shards"] == {f.name: sdq.io._sha256(f) for f in out.glob("model-*.safetensors")}
    assert {k: v for k, v in q.items() if k != "shards"} == \
        {k: v for k, v in _qconf(streamed).items() if k != "shards"}
    assert_same_model(sdq.load(out), model)
    assert_same_model(from_pretrained(out), model)
    model.save_pretrained(out)
    q = _qconf(out)
    assert q["format"] == "sdq-v1" and "shards" not in q
    assert not (out / sdq.io.INDEX).exists() and not list(out.glob("model-*.safetensors"))
    assert_same_model(sdq.load(out), model)
    assert_same_model(from_pretrained(out), model)


def _rewrite_weights(folder: Path, change) -> None:
    """Change model.safetensors and reseal config.json, as a crafted folder would."""
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["sha256"] = sdq.io._sha256(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def copy_of(folders, tmp_path):
    def copy(kind):
        import shutil
        return Path(shutil.copytree(folders[kind], tmp_path / kind))
    return copy


def test_from_pretrained_checks_the_sha256(copy_of):
    folder = copy_of("llama-ternary-binary")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        from_pretrained(folder)


def test_from_pretrained_checks_each_packed_weight(copy_of):
    """A resealed file with a bit in block padding: caught after transformers loads it, naming
    the module (the same check as sdq.load's)."""
    folder = copy_of("llama-ternary-binary")
    name = "model.layers.0.self_attn.q_proj"

    def set_padding_bit(tensors):
        # 64 inputs at OSR 1.25: 80 codes in 27 groups of 3, padded to 28: group 27 is padding
        tensors[f"{name}.trits"][0, -1, 0] |= 1 << 4

    _rewrite_weights(folder, set_padding_bit)
    with pytest.raises(CheckpointError, match=f"{name}.*padding"):
        from_pretrained(folder)
    with pytest.raises(CheckpointError, match=f"{name}.*padding"):
        sdq.load(folder)


def test_from_pretrained_names_a_missing_packed_tensor(copy_of):
    folder = copy_of("llama-ternary-binary")
    name = "model.layers.0.mlp.up_proj"
    _rewrite_weights(folder, lambda tensors: tensors.pop(f"{name}.scale"))
    with pytest.raises(CheckpointError, match=f"{name}.*scale"):
        from_pretrained(folder)


def test_quantizing_on_load_is_refused(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "plain")
    config = sdq.hf.quantizer.SDQQuantizationConfig()
    with pytest.raises(ValueError, match="pre-quantized"):
        from_pretrained(tmp_path / "plain", quantization_config=config)


def test_a_foreign_sdq_method_is_left_alone_with_a_warning(monkeypatch):
    from transformers.quantizers import auto

    class Foreign(T.utils.quantization_config.QuantizationConfigMixin):
        pass

    monkeypatch.setitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "sdq", Foreign)
    with pytest.warns(RuntimeWarning, match="already has a quantization method 'sdq'"):
        assert sdq.hf.register() is False
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["sdq"] is Foreign


def _run(script: str) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter (import order and reloads are per process)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, text=True,
                          capture_output=True, timeout=300)


def test_without_import_sdq_plain_linears_then_registration_survives_reloads(folders):
    """What transformers 5 does with an sdq folder when sdq was not imported (documented in
    sdq/hf/__init__.py and docs/format.md): it warns that it does not know quant_method "sdq"
    and builds plain nn.Linear layers, whose weights are missing from the file. Importing sdq
    afterwards registers at once; reloading sdq's modules keeps one working registration."""
    run = _run(f"""
        import importlib, sys, transformers
        from transformers.quantizers import auto
        path = {str(folders['llama-ternary-binary'])!r}
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path)
        print(type(load().model.layers[0].mlp.up_proj).__name__)
        print("IMPORT SDQ", file=sys.stderr)
        import sdq
        for step in range(2):
            print(type(load().model.layers[1].self_attn.q_proj).__name__)
            importlib.reload(sdq)
            importlib.reload(sdq.hf)
            importlib.reload(sdq.hf.quantizer)  # new classes: register() replaces its own
            assert sdq.hf.register()
        assert auto.AUTO_QUANTIZER_MAPPING["sdq"] is sdq.hf.quantizer.SDQHfQuantizer
        print(type(load().model.layers[0].mlp.up_proj).__name__)
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["Linear"] + ["SDQLinear"] * 3
    plain = run.stderr.split("IMPORT SDQ")[0]  # transformers' messages before sdq was imported
    assert "Unknown quantization type, got sdq" in plain
    assert "model.layers.{0, 1}.mlp.up_proj.weight" in plain and "MISSING" in plain


def test_import_sdq_does_not_import_transformers_but_registers_when_it_loads():
    run = _run("""
        import sys
        import sdq
        print("transformers.quantizers.auto" in sys.modules)
        from transformers.quantizers import auto
        print(auto.AUTO_QUANTIZER_MAPPING["sdq"] is sdq.hf.quantizer.SDQHfQuantizer)
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True"]
