"""trit5: ternary codes stored at 5 bits per 3 codes (docs/format.md, "Ternary codes: trit5").

The NumPy twin (sdq.ref.trit5) against the layout text and against the core; QuantizedWeight and
SDQLinear holding trits / trit_signs; folders written before trit5 (bitplanes) still loading;
validate() refusing each kind of damage; the stored bits per weight."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import sdq
from sdq import trit5
from sdq._native import core
from sdq.io import CheckpointError
from sdq.nn import SDQLinear
from sdq.ref import trit5 as twin
from sdq.weight import QuantizedWeight

# (out, in, block_size, osr): short last blocks, m not a multiple of 3 or of 32, rows not a
# multiple of 32, odd group counts (rounded up to even)
SHAPES = [(5, 200, 128, 1.5), (33, 64, 64, 1.25), (70, 300, 128, 2.0), (1, 7, 4, 1.0),
          (40, 129, 128, 3.0), (64, 1000, 32, 3.3)]


def _random_codes(out, n_in, block_size, osr, seed=0):
    per_block, _ = twin.groups(n_in, block_size, osr)
    cols = core().layout(n_in, block_size, osr)["total_code_cols"]
    rng = np.random.default_rng(seed)
    codes = np.zeros((out, cols), np.int8)
    for offset, m, _, _ in per_block:
        codes[:, offset: offset + m] = rng.integers(-1, 2, (out, m))
    return codes


def _planes(codes):
    sign, nonzero = core().pack_bitplanes(codes, "ternary")
    return (torch.from_numpy(sign.view(np.int32)), torch.from_numpy(nonzero.view(np.int32)))


# --- the layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("out,n_in,block_size,osr", SHAPES)
def test_twin_round_trip(out, n_in, block_size, osr):
    codes = _random_codes(out, n_in, block_size, osr)
    trits, signs = twin.pack(codes, n_in, block_size, osr)
    assert (trits.dtype, signs.dtype) == (np.uint8, np.uint32)
    assert (trits.shape, signs.shape) == trit5.shapes(out, n_in, block_size, osr)
    assert np.array_equal(twin.unpack(trits, signs, out, n_in, block_size, osr), codes)


def test_twin_follows_the_layout_text():
    """One row, hand-placed groups: v = 9 (t0+1) + 3 (t1+1) + (t2+1), idx = |v - 13| in the
    nibble of group g (low nibble for even g), neg = v < 13 in bit r of trit_signs[t, g]."""
    n_in, bs, osr = 8, 8, 1.0        # one block, m = 8: groups (0,1,2) (3,4,5) (6,7,pad), GP 4
    codes = np.zeros((35, 32), np.int8)
    codes[33, 0:3] = (1, -1, 0)      # v = 18 + 0 + 1 = 19: idx 6, neg 0
    codes[33, 3:6] = (-1, 1, 0)      # v = 0 + 6 + 1 = 7: idx 6, neg 1
    codes[33, 6:8] = (-1, -1)        # v = 0 + 0 + 1 = 1 (t2 padded 0): idx 12, neg 1
    trits, signs = twin.pack(codes, n_in, bs, osr)
    assert trits.shape == (2, 2, 32) and signs.shape == (2, 4)
    want_trits = np.zeros_like(trits)
    want_trits[1, 0, 1] = 6 | 6 << 4     # row 33 = tile 1, row 1; groups 0 and 1 share byte p = 0
    want_trits[1, 1, 1] = 12             # group 2: low nibble of byte p = 1
    want_signs = np.zeros_like(signs)
    want_signs[1, 1] = want_signs[1, 2] = 1 << 1
    assert np.array_equal(trits, want_trits) and np.array_equal(signs, want_signs)


@pytest.mark.parametrize("out,n_in,block_size,osr", SHAPES)
def test_twin_equals_the_core(out, n_in, block_size, osr):
    c = core()
    if not hasattr(c, "trit5_pack"):
        pytest.skip("this build of sdq._core has no trit5_pack yet")
    codes = _random_codes(out, n_in, block_size, osr, seed=out)
    sign, nonzero = c.pack_bitplanes(codes, "ternary")
    got_trits, got_signs = c.trit5_pack(sign, nonzero, n_in, block_size, osr)
    want_trits, want_signs = twin.pack(codes, n_in, block_size, osr)
    assert np.array_equal(got_trits, want_trits) and np.array_equal(got_signs, want_signs)
    back_sign, back_nonzero = c.trit5_unpack(want_trits, want_signs, out, n_in, block_size, osr)
    assert np.array_equal(back_sign, sign) and np.array_equal(back_nonzero, nonzero)


@pytest.mark.parametrize("out,n_in,block_size,osr", SHAPES[:3])
def test_bitplanes_round_trip_through_trit5(out, n_in, block_size, osr):
    sign, nonzero = _planes(_random_codes(out, n_in, block_size, osr))
    trits, signs = trit5.pack_bitplanes(sign, nonzero, n_in, block_size, osr)
    assert (trits.dtype, signs.dtype) == (torch.uint8, torch.int32)
    back = trit5.unpack_to_bitplanes(trits, signs, out, n_in, block_size, osr)
    assert torch.equal(back[0], sign) and torch.equal(back[1], nonzero)


# --- QuantizedWeight and SDQLinear --------------------------------------------------------------


def _weight(out=40, n_in=200, osr=1.5, seed=0) -> QuantizedWeight:
    W = torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed))
    return sdq.quantize_weight(W, sdq.SDQConfig(osr=osr, levels="ternary"))


def test_ternary_weight_stores_trit5_and_round_trips():
    qw = _weight()
    sd = qw.state_dict()
    assert set(sd) == {"trits", "trit_signs", "scale", "mean", "hadamard_signs", "meta"}
    assert json.loads(bytes(sd["meta"].tolist()).decode())["format"] == "sdq-trit5-v1"
    assert sd["trits"].dtype == torch.uint8 and sd["trit_signs"].dtype == torch.int32
    back = QuantizedWeight.from_state_dict(sd)
    assert torch.equal(back.dequantize(), qw.dequantize())
    codes = back.codes()
    assert set(np.unique(codes)) == {-1, 0, 1}
    assert np.array_equal(codes, twin.unpack(sd["trits"].numpy(), sd["trit_signs"].numpy(),
                                             40, 200, 128, 1.5))


def test_legacy_weight_is_converted():
    from legacy_format import legacy_state_dict
    qw = _weight()
    back = QuantizedWeight.from_state_dict(legacy_state_dict(qw), name="old")
    assert torch.equal(back.trits, qw.trits) and torch.equal(back.trit_signs, qw.trit_signs)


def test_module_holds_trit5_and_every_path_agrees():
    qw = _weight()
    layer = SDQLinear.from_quantized(qw)
    assert set(layer.state_dict()) == {"trits", "trit_signs", "scale", "mean", "hadamard_signs",
                                       "meta"}
    x = torch.randn(3, 200, dtype=torch.float64)
    want = x @ qw.dequantize().double().T
    # float64: sdq.torch_ops on derived bitplanes (the float32 dequantized weight: its rounding)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    assert layer.bitplane_sign is not None and "bitplane_sign" not in layer.state_dict()
    torch.testing.assert_close(layer(x.float()).double(), want, rtol=1e-4, atol=1e-4)
    layer.half()
    assert layer.trits.dtype == torch.uint8 and layer.trit_signs.dtype == torch.int32
    assert layer.bitplane_sign is None  # on the CPU, derived planes are dropped on _apply


def test_loading_new_codes_refreshes_the_derived_planes():
    layer = SDQLinear.from_quantized(_weight(seed=0))
    x = torch.randn(2, 200, dtype=torch.float64)
    layer(x)  # caches planes of the first codes
    other = _weight(seed=1)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), x @ other.dequantize().double().T, rtol=1e-4, atol=1e-4)


def test_empty_like_has_the_stored_shapes():
    qw = _weight()
    meta = bytes(qw.state_dict()["meta"].tolist()).decode()
    shell = SDQLinear.empty_like(meta, bias=False)
    shell.load_state_dict(qw.state_dict())
    assert torch.equal(shell.trits, qw.trits)


@torch.enable_grad()  # some test modules turn gradients off at import
def test_torch_compile_traces_a_ternary_layer_with_autograd():
    layer = SDQLinear.from_quantized(_weight(16, 256, 2.0))
    x = torch.randn(4, 256, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    want = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    fresh = SDQLinear.from_quantized(_weight(16, 256, 2.0))  # no cached planes: the op derives
    torch.compile(fresh, backend="aot_eager", fullgraph=True)(x).sum().backward()
    torch.testing.assert_close(x.grad, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_move_derives_planes_and_computes_the_same():
    qw = _weight()
    layer = SDQLinear.from_quantized(qw).to("cuda")
    assert layer.bitplane_sign is not None and layer.bitplane_sign.device.type == "cuda"
    x = torch.randn(3, 200)
    torch.testing.assert_close(layer(x.cuda()).cpu(), x @ qw.dequantize().T, rtol=1e-4,
                               atol=1e-4)


# --- bits per weight ---------------------------------------------------------------------------


def test_bits_per_weight_of_ternary_osr2_at_4096():
    """From the stored tensors' byte counts: 5 bits per group of 3 codes (groups rounded up to
    even per block), the fp16 scale and mean (0.25), the int8 Hadamard signs."""
    out = n_in = 4096
    cfg = sdq.SDQConfig(osr=2, levels="ternary")
    trits_shape, signs_shape = trit5.shapes(out, n_in, cfg.block_size, cfg.osr)
    nb = n_in // cfg.block_size
    qw = QuantizedWeight(out, n_in, cfg, torch.zeros(out, nb, dtype=torch.float16),
                         torch.zeros(out, nb, dtype=torch.float16),
                         torch.ones(cfg.block_size, dtype=torch.int8),
                         trits=torch.zeros(trits_shape, dtype=torch.uint8),
                         trit_signs=torch.zeros(signs_shape, dtype=torch.int32))
    qw.validate()
    stored = {k: t.numel() * t.element_size() for k, t in qw.state_dict().items() if k != "meta"}
    assert qw.bits_per_weight == 8 * (stored["trits"] + stored["trit_signs"]) / (out * n_in)
    assert qw.bits_per_weight_all_in == pytest.approx(8 * sum(stored.values()) / (out * n_in))
    m = math.floor(cfg.block_size * cfg.osr + 0.5)
    groups = 2 * math.ceil(math.ceil(m / 3) / 2)                     # per block, even
    assert qw.bits_per_weight == pytest.approx(5 * groups / cfg.block_size)
    assert qw.bits_per_weight == pytest.approx(5 / 3 * cfg.osr, rel=0.01)  # 3.36 vs 3.33
    assert qw.bits_per_weight_all_in - qw.bits_per_weight == pytest.approx(
        0.25 + 8 * cfg.block_size / (out * n_in))
    assert qw.bits_per_weight < 0.85 * 2 * cfg.osr                    # bitplanes: 4.0


# --- validate ----------------------------------------------------------------------------------


def _set_nibble(trits, row, group, value):
    t = trits.clone()
    byte = t[row // 32, group // 2, row % 32]
    shift = 4 * (group % 2)
    t[row // 32, group // 2, row % 32] = (int(byte) & ~(15 << shift) | value << shift) & 0xFF
    return t


def _set_sign(signs, row, group):
    s = signs.clone()
    s[row // 32, group] |= (1 << (row % 32)) if row % 32 < 31 else -(1 << 31)
    return s


def _zero_group(qw):
    zero = trit5.group_idx(qw.trits)[: qw.out_features] == 0
    return tuple(int(i) for i in zero.nonzero()[0])


# 40 rows, 200 inputs at OSR 1.5: two blocks of m = 192, 64 groups each (GP 64), rows 40..63 of
# the second tile are padding. (what is changed, the error it must give)
DAMAGE = {
    "nibble above 13": (lambda qw, sd: {"trits": _set_nibble(sd["trits"], 3, 5, 14)},
                        "tensor trits holds a magnitude above 13"),
    "code in a padding row": (lambda qw, sd: {"trits": _set_nibble(sd["trits"], 45, 0, 1)},
                              "tensor trits holds non-zero codes in a padding row"),
    "sign on an all-zero group": (lambda qw, sd: {"trit_signs": _set_sign(sd["trit_signs"],
                                                                          *_zero_group(qw))},
                                  "tensor trit_signs has a sign bit set on an all-zero group"),
    "sign in a padding row": (lambda qw, sd: {"trit_signs": _set_sign(sd["trit_signs"], 63, 2)},
                              "tensor trit_signs has a sign bit set on an all-zero group"),
    "trits of wrong dtype": (lambda qw, sd: {"trits": sd["trits"].to(torch.int16)},
                             "tensor trits should be torch.uint8"),
    "trit_signs of wrong shape": (lambda qw, sd: {"trit_signs": sd["trit_signs"][:, :-2]},
                                  "tensor trit_signs should be torch.int32"),
    "trit_signs missing": (lambda qw, sd: {"trit_signs": None}, "tensor trit_signs is missing"),
    "bitplanes beside trit5": (lambda qw, sd: {"sign": qw.bitplanes()[0]},
                               r"unexpected tensors \['sign'\]"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_validate_rejects_each_damage(case):
    change, message = DAMAGE[case]
    qw = _weight()
    sd = dict(qw.state_dict())
    for k, v in change(qw, sd).items():
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    with pytest.raises(CheckpointError, match=message) as e:
        QuantizedWeight.from_state_dict(sd, name="blocks.3.fc")
    assert "corrupt packed weight blocks.3.fc" in str(e.value)


@pytest.mark.parametrize("where", ["padding group", "code past m"])
def test_validate_rejects_codes_in_group_padding(where):
    lay = trit5.layout(64, 128, 1.25)  # m = 80: 27 groups, padded to 28
    assert lay.groups == (27,) and lay.total_groups == 28
    qw = _weight(8, 64, 1.25)
    # group 27: a padding group; group 26: codes 78, 79 and a padded third (t2 must be 0)
    group, idx = (27, 1) if where == "padding group" else (26, 1)   # idx 1: t2 = +1
    sd = dict(qw.state_dict(), trits=_set_nibble(qw.trits, 2, group, idx))
    with pytest.raises(CheckpointError, match="tensor trits holds non-zero codes in padding"):
        QuantizedWeight.from_state_dict(sd)


def test_binary_layer_in_trit5_format_is_refused():
    qw = sdq.quantize_weight(torch.randn(8, 128), sdq.SDQConfig(osr=1.5, levels="binary"))
    sd = dict(qw.state_dict())
    meta = json.loads(bytes(sd["meta"].tolist()).decode())
    sd["meta"] = torch.frombuffer(bytearray(json.dumps({**meta, "format": "sdq-trit5-v1"})
                                            .encode()), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="binary layer must be stored as sdq-bitplanes-v1"):
        QuantizedWeight.from_state_dict(sd)


# --- saved folders -----------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from tiny_models import ternary_then_binary, tiny_llama  # noqa: E402

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = ternary_then_binary(tiny_llama(vocab=128, seed=0, attention_bias=True))
    with torch.no_grad():
        logits = model(IDS).logits
    return sdq.save(model, tmp_path_factory.mktemp("trit5") / "q"), logits


def test_saved_folder_is_version_2_with_trit5(saved):
    from safetensors import safe_open
    folder, logits = saved
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 2
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.trits" in keys
    assert not any(k.endswith(".nonzero") for k in keys)
    with torch.no_grad():
        assert torch.equal(sdq.load(folder)(IDS).logits, logits)


def test_old_bitplane_folder_loads_and_computes_the_same(saved, tmp_path):
    from legacy_format import write_legacy_folder
    folder, logits = saved
    old = write_legacy_folder(folder, tmp_path / "old")
    q = json.loads((old / "config.json").read_text())["quantization_config"]
    assert "format_version" not in q
    model = sdq.load(old)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.trits is not None and layer.sign is None    # converted on load
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits)
    sdq.save(model, tmp_path / "resaved")                     # written anew as version 2
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["quantization_config"]["format_version"] == 2


def _reseal(folder, edit):
    import hashlib
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    config["quantization_config"]["sha256"] = hashlib.sha256(
        (folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))


def test_version_2_folder_with_bitplanes_is_refused(saved, tmp_path):
    from legacy_format import write_legacy_folder
    old = write_legacy_folder(saved[0], tmp_path / "old")
    _reseal(old, lambda q: q.update(format_version=2))
    with pytest.raises(CheckpointError, match="stores ternary layers as trit5"):
        sdq.load(old)


def test_unknown_folder_version_is_refused(saved, tmp_path):
    import shutil
    folder = tmp_path / "v3"
    shutil.copytree(saved[0], folder)
    _reseal(folder, lambda q: q.update(format_version=3))
    with pytest.raises(CheckpointError, match="format_version 3 is not one this sdq reads"):
        sdq.load(folder)
