"""quantize_ on tiny random models of two families, save/load, corruption, and the CLI's errors.

Random-weight models are for plumbing only; quality is measured on the real model in bench/.
"""
import copy
import json
import os

import pytest
import torch

import sdq
from sdq.io import load, save
from sdq.methods import BaselineConfig
from sdq.nn import SDQLinear
from sdq.pipeline import quantize_
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


def _llama():
    return tiny_llama()


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(cfg).eval()


torch.set_grad_enabled(False)  # inference only; keeps float() conversions warning-free
IDS = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [_llama, _qwen2])
@pytest.mark.parametrize("calibrated", [False, True])
def test_quantize_replaces_decoder_linears_only(make, calibrated):
    model = make()
    embed = model.get_input_embeddings().weight.clone()
    report = quantize_(model, sdq.SDQConfig(osr=1.5), IDS if calibrated else None, progress=False)
    assert len(report.linears) == 2 * 7
    quantized = [n for n, m in model.named_modules() if isinstance(m, SDQLinear)]
    assert len(quantized) == 14 and all(".layers." in n for n in quantized)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, SDQLinear)
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert torch.isfinite(model(IDS).logits).all()
    assert report.average_osr == pytest.approx(1.5)


def test_qwen2_biases_are_kept():
    model = _qwen2()
    bias = model.model.layers[0].self_attn.q_proj.bias.clone()
    quantize_(model, sdq.SDQConfig(osr=2), progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, bias)


def test_calibration_lowers_output_error():
    base = _llama()
    ref = base(IDS).logits
    errs = {}
    for calibrated in (False, True):
        m = copy.deepcopy(base)
        quantize_(m, sdq.SDQConfig(osr=2, codes="gram"), IDS if calibrated else None,
                  progress=False)
        errs[calibrated] = float((m(IDS).logits - ref).norm() / ref.norm())
    assert errs[True] < errs[False]


def test_baselines_and_gptq_need_calibration():
    m = _llama()
    with pytest.raises(ValueError, match="calibration"):
        quantize_(m, BaselineConfig("gptq", 4), progress=False)
    r = quantize_(m, BaselineConfig("rtn", 4), progress=False)
    assert r.bits_per_weight_all_in == pytest.approx(4 + 32 / 64, rel=0.2)


def test_osr_allocation_is_applied():
    m = _llama()
    r = quantize_(m, sdq.SDQConfig(osr=2), osr_for=lambda i, n: 1.0 if i == 0 else 3.0,
                  progress=False)
    assert m.model.layers[0].mlp.up_proj.config.osr == 1.0
    assert m.model.layers[1].mlp.up_proj.config.osr == 3.0
    assert r.average_osr == pytest.approx(2.0)


@pytest.mark.parametrize("make", [_llama, _qwen2])
def test_save_load_round_trip(tmp_path, make):
    model = make()
    quantize_(model, sdq.SDQConfig(osr=2, levels="binary"), progress=False)
    before = model(IDS).logits
    out = save(model, tmp_path / "q")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folder left
    loaded = load(out)
    assert torch.equal(loaded(IDS).logits, before)
    gen = loaded.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, model.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["config"]["levels"] == "binary" and len(cfg["modules"]) == 14


def test_file_size_matches_reported_bits(tmp_path):
    model = _llama()
    report = quantize_(model, sdq.SDQConfig(osr=2), progress=False)
    out = save(model, tmp_path / "q")
    packed = sum(v["bits_all_in"] * v["numel"] for v in report.linears.values()) / 8
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    size = (out / "model.safetensors").stat().st_size
    meta = sum(m.meta.numel() for m in model.modules() if isinstance(m, SDQLinear))
    assert packed + other + meta <= size <= packed + other + meta + 32 * 1024  # + JSON header


def test_save_refuses_to_overwrite_and_unquantized(tmp_path):
    with pytest.raises(ValueError, match="no SDQLinear"):
        save(_llama(), tmp_path / "plain")
    model = _llama()
    quantize_(model, sdq.SDQConfig(osr=1), progress=False)
    save(model, tmp_path / "q")
    with pytest.raises(FileExistsError):
        save(model, tmp_path / "q")
    save(model, tmp_path / "q", overwrite=True)


@pytest.fixture
def saved(tmp_path):
    model = _llama()
    quantize_(model, sdq.SDQConfig(osr=1), progress=False)
    return save(model, tmp_path / "q")


def test_corrupted_file_is_detected(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load(saved)


def test_truncated_file_is_detected(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        load(saved)


def test_missing_or_foreign_folder(tmp_path, saved):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing")
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an sdq"):
        load(saved)


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "--method", "rtn", "--out", "x"], "only --method sdq"),
    (["quantize", "--method", "rtn"], "needs --bits"),
    (["quantize", "--method", "gptq", "--bits", "4", "--calib-samples", "0"], "calib-samples"),
    (["quantize", "--method", "rtn", "--bits", "4", "--multi-osr"], "multi-osr"),
    (["quantize", "--osr", "40", "--calib-samples", "0"], "osr"),
    (["info", "/definitely/not/here"], "not found"),
])
def test_cli_errors_are_one_line(capsys, argv, msg):
    from sdq.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["quantize", "--osr", "-2"], ["quantize", "--levels", "quad"],
                                  ["frobnicate"]])
def test_cli_argument_errors(capsys, argv):
    from sdq.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_info_on_saved_model(capsys, saved):
    from sdq.cli import main
    assert main(["info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "quantized linears: 14" in out and "bits/weight" in out
