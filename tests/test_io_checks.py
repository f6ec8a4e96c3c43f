"""The checks of sdq.load, one invariant at a time (docs/format.md, "What load checks"), and the
safe overwrite of sdq.save."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import sdq
import sdq.io
from sdq._native import core
from sdq.io import CheckpointError
from sdq.nn import SDQLinear
from sdq.weight import QuantizedWeight, _code_mask

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (after the importorskip)
from legacy_format import legacy_state_dict  # noqa: E402
from tiny_models import ternary_then_binary, tiny_llama  # noqa: E402

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
Q = "model.layers.0.self_attn.q_proj"  # ternary, OSR 1.25: 16 padding columns per row
B = "model.layers.1.self_attn.q_proj"  # binary, OSR 1.25


# --- QuantizedWeight.validate ------------------------------------------------------------------


@pytest.mark.parametrize("in_features,block_size,osr", [
    (64, 128, 1.25), (160, 128, 1.25), (300, 128, 0.75), (200, 64, 1.5), (256, 128, 2.0),
    (1000, 32, 3.3)])
def test_code_mask_is_where_the_packer_puts_codes(in_features, block_size, osr):
    """The mask of code bits, against the C++ packer given +1 codes at the columns that
    layout() says hold codes and 0 in the padding."""
    lay = core().layout(in_features, block_size, osr)
    codes = np.zeros((1, lay["total_code_cols"]), dtype=np.int8)
    for offset, m in zip(lay["code_offset"], lay["m"]):
        codes[0, offset: offset + m] = 1
    _, nonzero = core().pack_bitplanes(codes, "ternary")
    mask = _code_mask(in_features, block_size, osr)
    assert np.array_equal(mask.numpy().view(np.uint32), nonzero[0])


def _weight(levels: str, in_features: int = 160, osr: float = 1.25) -> QuantizedWeight:
    torch.manual_seed(0)
    return sdq.quantize_weight(torch.randn(6, in_features), sdq.SDQConfig(osr=osr, levels=levels))


@pytest.mark.parametrize("levels", ["binary", "ternary"])
@pytest.mark.parametrize("in_features,osr", [(160, 1.25), (200, 1.5), (64, 0.75)])
def test_quantized_weights_pass_their_checks(levels, in_features, osr):
    qw = _weight(levels, in_features, osr)
    qw.validate()
    back = QuantizedWeight.from_state_dict(qw.state_dict(), name="layer")
    assert torch.equal(back.dequantize(), qw.dequantize())


def _set_bit(t: torch.Tensor, row: int, col: int) -> torch.Tensor:
    t = t.clone()
    word, bit = divmod(col, 32)
    t.view(torch.int32)[row, word] |= (1 << bit) if bit < 31 else -(1 << 31)
    return t


def _json_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def _meta(qw: QuantizedWeight, **changes) -> torch.Tensor:
    meta = json.loads(bytes(qw.state_dict()["meta"].tolist()).decode())
    for k, v in changes.items():
        if k in meta["config"]:
            meta["config"][k] = v
        else:
            meta[k] = v
    return _json_tensor(meta)


def _padding_column(qw: QuantizedWeight) -> int:
    g = qw.groups[-1]  # 160 columns at OSR 1.25: the last block has m = 40 of 64 code columns
    assert g.m < g.code_cols
    return g.code_offset + g.m


# (levels, what is changed, the error it must give). Each entry breaks one invariant once.
# "legacy": a ternary layer stored as bitplanes (before trit5), still read; trit5's own damage
# cases are in test_trit5_format.py.
BROKEN = {
    "sign padding bit (binary)": ("binary", lambda qw, sd: {
        "sign": _set_bit(sd["sign"], 1, _padding_column(qw))},
        "tensor sign has a bit set in block padding"),
    "sign padding bit (ternary)": ("legacy", lambda qw, sd: {
        "sign": _set_bit(sd["sign"], 2, _padding_column(qw)),
        "nonzero": _set_bit(sd["nonzero"], 2, _padding_column(qw))}, "block padding"),
    "nonzero padding bit": ("legacy", lambda qw, sd: {
        "nonzero": _set_bit(sd["nonzero"], 0, sd["nonzero"].shape[1] * 32 - 1)},
        "tensor nonzero has a bit set in block padding"),
    "sign of a zero code": ("legacy", lambda qw, sd: {
        "sign": sd["sign"] | ~sd["nonzero"] & _code_mask(160, 128, 1.25)},
        "the sign bit of a zero code must be 0"),
    "scale NaN": ("binary", lambda qw, sd: {
        "scale": sd["scale"].index_put((torch.tensor([3]), torch.tensor([1])),
                                       torch.tensor(float("nan"), dtype=torch.float16))},
        r"tensor scale is not finite \(nan at row 3, block 1\)"),
    "mean inf": ("ternary", lambda qw, sd: {"mean": torch.full_like(sd["mean"], float("-inf"))},
                 "tensor mean is not finite"),
    "hadamard sign 0": ("binary", lambda qw, sd: {
        "hadamard_signs": sd["hadamard_signs"].clone().index_fill_(0, torch.tensor([5]), 0)},
        "tensor hadamard_signs should hold only \\+1 and -1, got 0 at index 5"),
    "sign of wrong dtype": ("binary", lambda qw, sd: {"sign": sd["sign"].to(torch.int64)},
                            "tensor sign should be torch.int32"),
    "nonzero missing": ("legacy", lambda qw, sd: {"nonzero": None}, "tensor nonzero is missing"),
    "nonzero in a binary layer": ("binary", lambda qw, sd: {"nonzero": sd["sign"]},
                                  r"unexpected tensors \['nonzero'\]"),
    "metadata not JSON": ("binary", lambda qw, sd: {"meta": sd["meta"][:-1]}, "metadata is not"),
    "metadata out_features -6": ("binary", lambda qw, sd: {"meta": _meta(qw, out_features=-6)},
                                 "out_features should be a positive integer"),
    "metadata in_features a string": ("binary", lambda qw, sd: {
        "meta": _meta(qw, in_features="160")}, "in_features should be a positive integer"),
    "metadata extra field": ("binary", lambda qw, sd: {"meta": _meta(qw, note=1)},
                             "metadata should have the fields"),
    "metadata format": ("binary", lambda qw, sd: {"meta": _meta(qw, format="sdq-bitplanes-v9")},
                        "unknown packed format"),
    "metadata config levels": ("binary", lambda qw, sd: {"meta": _meta(qw, levels="quad")},
                               "metadata config is invalid: levels"),
    "metadata config hadamard": ("binary", lambda qw, sd: {"meta": _meta(qw, hadamard="yes")},
                                 "hadamard must be a bool"),
    "metadata osr leaves no samples": ("binary", lambda qw, sd: {
        "meta": _meta(qw, osr=0.01)}, "impossible block layout"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_invariant_gives_its_error(case):
    levels, change, message = BROKEN[case]
    qw = _weight("ternary" if levels == "legacy" else levels)
    sd = legacy_state_dict(qw) if levels == "legacy" else dict(qw.state_dict())
    for k, v in change(qw, sd).items():
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    with pytest.raises(CheckpointError, match=message) as e:
        QuantizedWeight.from_state_dict(sd, name="blocks.3.fc")
    assert "corrupt packed weight blocks.3.fc" in str(e.value)
    assert isinstance(e.value, ValueError)


# --- sdq.load ------------------------------------------------------------------------------


def _tiny_model() -> torch.nn.Module:
    """Two layers, the first ternary and the second binary, OSR 1.25, attention biases."""
    return ternary_then_binary(tiny_llama(vocab=128, seed=0, attention_bias=True))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    return sdq.save(model, tmp_path_factory.mktemp("checks") / "q")


def _variant(saved: Path, folder: Path, tensors: dict | None = None, edit_config=None) -> Path:
    """A copy of the saved folder with some tensors replaced (None: removed) and config.json
    edited, its SHA-256 recomputed so the checks behind the hash are reached."""
    all_tensors = load_file(str(saved / "model.safetensors"))
    for k, v in (tensors or {}).items():
        if v is None:
            del all_tensors[k]
        else:
            all_tensors[k] = v
    folder.mkdir()
    save_file(all_tensors, str(folder / "model.safetensors"))
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["sha256"] = hashlib.sha256(
        (folder / "model.safetensors").read_bytes()).hexdigest()
    if edit_config is not None:
        edit_config(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _tensor(saved: Path, key: str) -> torch.Tensor:
    return load_file(str(saved / "model.safetensors"))[key]


def test_invariant_errors_name_the_module_and_the_tensor(saved, tmp_path):
    sign = _set_bit(_tensor(saved, f"{B}.sign"), 0, 80)  # in = 64: codes 0..79, padding 80..95
    with pytest.raises(CheckpointError, match=rf"corrupt packed weight {B}: tensor sign has a bit "
                                              r"set in block padding \(row 0, code column 80"):
        sdq.load(_variant(saved, tmp_path / "v", {f"{B}.sign": sign}))


def test_sign_of_a_zero_group_is_refused(saved, tmp_path):
    from sdq import trit5
    zero = trit5.group_idx(_tensor(saved, f"{Q}.trits")) == 0       # [rows, groups]
    signs = _tensor(saved, f"{Q}.trit_signs").clone()
    row, group = (int(i) for i in zero.nonzero()[0])
    signs[row // 32, group] |= 1 << (row % 32)
    with pytest.raises(CheckpointError, match=f"{Q}: tensor trit_signs has a sign bit set on an "
                                              f"all-zero group"):
        sdq.load(_variant(saved, tmp_path / "v", {f"{Q}.trit_signs": signs}))


def _set(key: str, value):
    def edit(config):
        target = config
        *path, last = key.split("/")
        for p in path:
            target = target[p]
        target[last] = value
    return edit


@pytest.mark.parametrize("tensors,edit,message", [
    pytest.param(None, _set(f"quantization_config/modules/{Q}/osr", 2.0),
                 f"{Q}: tensor meta says osr 1.25, config.json says 2.0", id="osr"),
    pytest.param(None, _set(f"quantization_config/modules/{Q}/bias", False),
                 f"{Q}: config.json says bias False, model.safetensors has tensor {Q}.bias",
                 id="bias flag"),
    pytest.param({f"{Q}.bias": None}, None,
                 f"{Q}: config.json says bias True, model.safetensors has no", id="bias missing"),
    pytest.param(None, _set("quantization_config/sha256", "abc"),
                 "sha256 should be 64 hex digits", id="sha256"),
    pytest.param(None, _set("quantization_config/modules", {}),
                 "modules should name at least one", id="no modules"),
    pytest.param(None, _set("quantization_config/config/levels", "quad"), "config is invalid",
                 id="config"),
    pytest.param(None, _set("model_type", "no-such-model"), "transformers cannot build",
                 id="model_type"),
    pytest.param(None, _set("num_hidden_layers", 1),
                 r"quantized module model\.layers\.1\.\S+ is not in the model", id="layers"),
    pytest.param(None, _set("num_key_value_heads", 4),
                 r"k_proj is \[out, in\] = \[64, 64\] in the model config.json describes, "
                 r"\[32, 64\] in its packed weight", id="kv heads"),
    pytest.param(None, _set("attention_bias", False),
                 r"self_attn\.k_proj has no bias in the model config.json describes",
                 id="attention_bias"),
    pytest.param(None, _set("tie_word_embeddings", False), r"missing \['lm_head.weight'\]",
                 id="untied"),
    pytest.param({"model.norm.weight": torch.ones(63)}, None,
                 r"tensor model.norm.weight should be torch.float32 \(64,\), got "
                 r"torch.float32 \(63,\)", id="norm shape"),
    pytest.param({"model.norm.weight": torch.ones(64, dtype=torch.float64)}, None,
                 "tensor model.norm.weight should be torch.float32", id="norm dtype"),
    pytest.param({"model.embed_tokens.weight": torch.full((128, 64), float("nan"))}, None,
                 "tensor model.embed_tokens.weight has non-finite values", id="embedding NaN"),
    pytest.param({f"{Q}.bias": torch.full((64,), float("inf"))}, None,
                 f"tensor {Q}.bias has non-finite", id="bias inf"),
    pytest.param({"model.layers.0.input_layernorm.weight": None}, None,
                 r"missing \['model.layers.0.input_layernorm.weight'\]", id="missing norm"),
    pytest.param({"model.layers.0.extra": torch.ones(2)}, None,
                 r"unexpected \['model.layers.0.extra'\]", id="extra tensor"),
    pytest.param({f"{Q}.meta": None}, None, f"corrupt packed weight {Q}: tensor meta",
                 id="no metadata"),
])
def test_model_level_checks(saved, tmp_path, tensors, edit, message):
    with pytest.raises(CheckpointError, match=message):
        sdq.load(_variant(saved, tmp_path / "v", tensors, edit))


def test_metadata_json_spacing_is_not_part_of_the_format(saved, tmp_path, model):
    """Any JSON spelling of valid metadata loads (old folders keep loading); the loaded module
    holds the canonical form."""
    meta = json.loads(bytes(_tensor(saved, f"{Q}.meta").tolist()).decode())
    spaced = torch.frombuffer(bytearray(json.dumps(meta, indent=4).encode()), dtype=torch.uint8)
    loaded = sdq.load(_variant(saved, tmp_path / "v", {f"{Q}.meta": spaced}))
    assert torch.equal(_logits(loaded), _logits(model))
    assert torch.equal(loaded.get_submodule(Q).meta, model.get_submodule(Q).meta)


def test_a_saved_folder_loads_unchanged(saved, model):
    loaded = sdq.load(saved)
    assert torch.equal(_logits(loaded), _logits(model))
    for m in loaded.modules():
        if isinstance(m, SDQLinear):
            m.use_kernels = False
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-4, atol=1e-4)


# --- safe overwrite ----------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class _FailingTokenizer:
    """Writes part of its files, then fails: the save stops after the weights are written."""

    def save_pretrained(self, directory):
        (Path(directory) / "tokenizer.json").write_text("{")
        raise OSError("disk full")


def _fail_saving_weights(monkeypatch):
    def save_file_then_fail(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(sdq.io, "save_file", save_file_then_fail)


def _fail_moving_the_new_folder(monkeypatch):
    """os.replace fails for the rename of the complete new folder onto the target."""
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".") and not Path(src).name.endswith(".old") \
                and not Path(dst).name.startswith("."):
            raise OSError("rename failed")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fail", ["weights", "tokenizer", "rename"])
def test_failed_overwrite_keeps_the_old_folder(model, tmp_path, monkeypatch, fail):
    """A failure while writing (weights, tokenizer) or while swapping the folders (the rename
    of the new one onto the old one's place, after the old one went to its backup)."""
    target = sdq.save(model, tmp_path / "q")
    before = _snapshot(target)
    tokenizer = None
    if fail == "weights":
        _fail_saving_weights(monkeypatch)
    elif fail == "tokenizer":
        tokenizer = _FailingTokenizer()
    else:
        _fail_moving_the_new_folder(monkeypatch)
    with pytest.raises(OSError, match="disk full|rename failed"):
        sdq.save(model, target, tokenizer, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["q"]  # no temporary or backup folder left
    assert _snapshot(target) == before
    assert torch.equal(_logits(sdq.load(target)), _logits(model))


def test_overwrite_replaces_the_folder(model, tmp_path):
    target = tmp_path / "q"
    target.mkdir()
    (target / "stale.txt").write_text("from an older save")
    sdq.save(model, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert torch.equal(_logits(sdq.load(target)), _logits(model))


def test_overwrite_refuses_a_file(model, tmp_path):
    (tmp_path / "q").write_text("not a folder")
    with pytest.raises(FileExistsError, match="not a folder"):
        sdq.save(model, tmp_path / "q", overwrite=True)
    assert (tmp_path / "q").read_text() == "not a folder"
    assert sorted(os.listdir(tmp_path)) == ["q"]
