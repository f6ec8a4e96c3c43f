"""WGM (dynamic-grouping binary quantization): config, quantizer, packed form, CPU kernel, op,
module, checks, and the plumbing through quantize_, save/load and the CLI."""
import copy
import json
import pathlib

import numpy as np
import pytest
import torch

import sdq
from sdq._native import core
from sdq.methods import quantize_linear
from sdq.methods.wgm import WGMConfig, quantize_weight_wgm
from sdq.wgm_nn import WGMLinear
from sdq.wgm_weight import BLOCK, WGMWeight, index_bits, pack_bits, unpack_index
from tiny_models import tiny_llama

torch.set_grad_enabled(False)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _weight(out, n_in, seed=0):
    return torch.from_numpy(_rng(seed).standard_normal((out, n_in)).astype(np.float32))


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_round_trip_and_replace():
    c = WGMConfig()
    assert (c.groups, c.window, c.lam, c.block_mode, c.method) == (32, 512, 0.75, False,
                                                                   "greedy")
    assert c.index_bits == 5
    assert WGMConfig.from_dict(c.to_dict()) == c
    assert WGMConfig.from_json(c.to_json()) == c
    assert c.replace(groups=4).groups == 4 and c.groups == 32


@pytest.mark.parametrize("kwargs, err, match", [
    ({"groups": 0}, ValueError, "groups"), ({"groups": 257}, ValueError, "groups"),
    ({"groups": True}, TypeError, "groups"), ({"groups": 2.0}, TypeError, "groups"),
    ({"window": 0}, ValueError, "window"), ({"lam": -0.1}, ValueError, "lam"),
    ({"lam": float("nan")}, ValueError, "lam"), ({"lam": float("inf")}, ValueError, "lam"),
    ({"block_mode": 1}, TypeError, "block_mode"), ({"method": "kmeans"}, ValueError, "method"),
])
def test_config_rejects_bad_values(kwargs, err, match):
    with pytest.raises(err, match=match):
        WGMConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="osr"):
        WGMConfig.from_dict({"groups": 4, "osr": 2})


def test_index_bits_is_ceil_log2():
    assert [index_bits(g) for g in (1, 2, 3, 4, 5, 32, 33, 256)] == [0, 1, 2, 2, 3, 5, 6, 8]


# --- quantizer --------------------------------------------------------------------------------


def _reference_reconstruction(W, qw):
    """sign(w) * fp16(mean |w| of its group), from the stored group indices, per matrix or per
    64-weight block."""
    W = W.double()
    group = qw.group_index()
    out, n_in = W.shape
    want = torch.empty_like(W)
    spans = [(0, n_in)] if not qw.config.block_mode else \
        [(s, min(n_in, s + BLOCK)) for s in range(0, n_in, BLOCK)]
    for r in range(out if qw.config.block_mode else 1):
        rows = slice(r, r + 1) if qw.config.block_mode else slice(None)
        for s, e in spans:
            a, g = W[rows, s:e].abs(), group[rows, s:e]
            for k in g.unique().tolist():
                mean = a[g == k].mean().half().double()
                want[rows, s:e][g == k] = mean
    return torch.where(W >= 0, want, -want)


@pytest.mark.parametrize("shape", [(6, 40), (3, 130)])
@pytest.mark.parametrize("groups", [1, 3, 8])
@pytest.mark.parametrize("block_mode", [False, True])
def test_each_weight_is_sign_times_its_group_mean(shape, groups, block_mode):
    W = _weight(*shape)
    qw = quantize_weight_wgm(W, WGMConfig(groups=groups, block_mode=block_mode))
    torch.testing.assert_close(qw.dequantize().double(), _reference_reconstruction(W, qw),
                               rtol=0, atol=0)
    assert int(qw.group_index().max()) < groups


def test_groups_are_contiguous_in_sorted_magnitude():
    W = _weight(16, 48)
    qw = quantize_weight_wgm(W, WGMConfig(groups=8))
    a, g = W.abs().flatten(), qw.group_index().flatten()
    order = torch.argsort(a, stable=True)
    assert bool((g[order].diff() >= 0).all())          # groups follow |w| upwards
    assert len(g.unique()) == 8
    assert bool((qw.scale[1:] >= qw.scale[:-1]).all())  # so do their scales


def test_block_mode_partitions_each_block_on_its_own():
    W = _weight(3, 150)  # two full blocks and one of 22
    cfg = WGMConfig(groups=4, block_mode=True)
    qw = quantize_weight_wgm(W, cfg)
    assert tuple(qw.scale.shape) == (3, 3, 4)
    got = qw.dequantize()
    for r in range(3):
        for s in range(0, 150, BLOCK):
            alone = quantize_weight_wgm(W[r:r + 1, s:s + BLOCK], cfg.replace(block_mode=False))
            assert torch.equal(got[r:r + 1, s:s + BLOCK], alone.dequantize())


def test_zeros_get_sign_plus_and_the_smallest_group():
    W = _weight(4, 32)
    W[0, :3] = 0.0
    W[2, 5] = -0.0
    qw = quantize_weight_wgm(W, WGMConfig(groups=4))
    g, W_hat = qw.group_index(), qw.dequantize()
    for r, c in [(0, 0), (0, 1), (0, 2), (2, 5)]:
        assert int(g[r, c]) == 0 and float(W_hat[r, c]) == float(qw.scale[0]) >= 0
    assert torch.equal(quantize_weight_wgm(torch.zeros(3, 40)).dequantize(), torch.zeros(3, 40))


def test_fewer_weights_than_groups_leaves_empty_groups_at_zero():
    W = torch.tensor([[0.5, -2.0, 1.0]])
    qw = quantize_weight_wgm(W, WGMConfig(groups=8))
    assert torch.equal(qw.dequantize(), W)              # each weight alone in its group
    assert torch.equal(qw.scale[3:], torch.zeros(5, dtype=torch.float16))


@pytest.mark.parametrize("W, err, match", [
    (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN"),
    (torch.zeros(0, 4), ValueError, "empty"),
    (torch.zeros(4), ValueError, "2-D"),
    (torch.zeros(2, 2, dtype=torch.int32), TypeError, "floating"),
    ("weights", TypeError, "torch.Tensor"),
])
def test_bad_weights_raise_clearly(W, err, match):
    with pytest.raises(err, match=match):
        quantize_weight_wgm(W, WGMConfig(groups=2))


def test_bad_config_and_huge_weights_raise_clearly():
    with pytest.raises(TypeError, match="WGMConfig"):
        quantize_weight_wgm(torch.ones(2, 2), sdq.SDQConfig())
    with pytest.raises(ValueError, match="fp16"):
        quantize_weight_wgm(torch.full((2, 2), 1e6), WGMConfig(groups=1))


def test_dispatch_takes_wgm_and_refuses_a_hessian():
    W = _weight(4, 32)
    qw = quantize_linear(W, WGMConfig(groups=2))
    assert isinstance(qw, WGMWeight)
    with pytest.raises(ValueError, match="data-free"):
        quantize_linear(W, WGMConfig(groups=2), torch.eye(32))


# --- packed form ------------------------------------------------------------------------------


def test_bit_order_matches_the_core_bitplanes():
    codes = _rng(1).integers(0, 2, (5, 70)).astype(np.int8) * 2 - 1
    sign, _ = core().pack_bitplanes(codes, "binary")
    assert np.array_equal(pack_bits(codes > 0).numpy().view(np.uint32), sign)


@pytest.mark.parametrize("groups", [1, 2, 3, 32, 256])
def test_index_planes_round_trip(groups):
    group = _rng(2).integers(0, groups, (7, 45))
    planes = np.stack([(group >> b) & 1 for b in range(index_bits(groups))]).astype(bool) \
        if groups > 1 else np.zeros((0, 7, 45), bool)
    packed = pack_bits(planes)
    assert tuple(packed.shape) == (index_bits(groups), 7, 2)
    assert np.array_equal(unpack_index(packed, 45).numpy(), group)


@pytest.mark.parametrize("groups, block_mode, n_in", [(32, False, 96), (3, False, 100),
                                                       (1, False, 64), (8, True, 150)])
def test_bits_are_counted_from_what_is_stored(groups, block_mode, n_in):
    out = 10
    qw = quantize_weight_wgm(_weight(out, n_in), WGMConfig(groups=groups, block_mode=block_mode))
    sd = qw.state_dict()
    stored_bits = 8 * sum(sd[k].numel() * sd[k].element_size() for k in ("sign", "index"))
    scale_bits = 8 * sd["scale"].numel() * sd["scale"].element_size()
    assert qw.bits_per_weight == stored_bits / (out * n_in)
    assert qw.bits_per_weight_all_in == pytest.approx((stored_bits + scale_bits) / (out * n_in))
    words = -(-n_in // 32)
    assert qw.bits_per_weight == (1 + index_bits(groups)) * 32 * words / n_in
    nb_scales = out * -(-n_in // BLOCK) * groups if block_mode else groups
    assert sd["scale"].numel() == nb_scales


def test_default_costs_six_bits_not_one():
    qw = quantize_weight_wgm(_weight(64, 256))
    assert qw.bits_per_weight == 6.0
    assert qw.bits_per_weight_all_in == pytest.approx(6 + 32 * 16 / (64 * 256))


@pytest.mark.parametrize("block_mode", [False, True])
def test_state_dict_round_trip(block_mode):
    qw = quantize_weight_wgm(_weight(5, 70), WGMConfig(groups=3, block_mode=block_mode))
    back = WGMWeight.from_state_dict({k: v.clone() for k, v in qw.state_dict().items()},
                                     name="layer")
    assert back.config == qw.config and torch.equal(back.dequantize(), qw.dequantize())


def _corrupt(sd, fn):
    sd = {k: v.clone() for k, v in sd.items()}
    fn(sd)
    return sd


def _set_index_three(sd):
    sd["index"][:, 1, 0] |= 1  # group 3 in column 0 of row 1: both planes set


CORRUPTIONS = [
    ("index", _set_index_three, "group 3"),
    ("sign padding", lambda sd: sd["sign"][0, -1].__ior__(1 << 20), "sign.*beyond column"),
    ("index padding", lambda sd: sd["index"][1, 2, -1].__ior__(1 << 30), "index.*beyond"),
    ("scale nan", lambda sd: sd["scale"].__setitem__(1, float("nan")), "scale"),
    ("scale negative", lambda sd: sd["scale"].__setitem__(0, -1.0), "scale"),
    ("scale dtype", lambda sd: sd.__setitem__("scale", sd["scale"].float()), "scale.*float16"),
    ("index shape", lambda sd: sd.__setitem__("index", sd["index"][:1]), "index"),
    ("missing sign", lambda sd: sd.pop("sign"), "sign is missing"),
    ("extra", lambda sd: sd.__setitem__("mean", sd["scale"]), "unexpected"),
    ("format", lambda sd: sd.__setitem__("meta", torch.frombuffer(bytearray(
        json.dumps({**json.loads(bytes(sd["meta"].tolist())), "format": "x"}).encode()),
        dtype=torch.uint8)), "format"),
    ("config", lambda sd: sd.__setitem__("meta", torch.frombuffer(bytearray(
        json.dumps({**json.loads(bytes(sd["meta"].tolist())),
                    "config": {"groups": 0}}).encode()), dtype=torch.uint8)), "config"),
]


@pytest.mark.parametrize("what, corrupt, match", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_state_dict_raises_checkpoint_error(what, corrupt, match):
    qw = quantize_weight_wgm(_weight(4, 40), WGMConfig(groups=3))
    bad = _corrupt(qw.state_dict(), corrupt)
    with pytest.raises(sdq.CheckpointError, match=match) as info:
        WGMWeight.from_state_dict(bad, name="model.layers.0.q")
    assert "model.layers.0.q" in str(info.value)


# --- CPU kernel -------------------------------------------------------------------------------


def _kernel(qw, x, threads=0):
    block = BLOCK if qw.config.block_mode else 0
    return core().wgm_gemm(x, qw.sign.numpy().view(np.uint32), qw.index.numpy().view(np.uint32),
                           qw.scale.numpy().view(np.uint16), block, threads)


def _assert_matches_reference(qw, x, y):
    W = qw.dequantize().double().numpy()
    want = x.astype(np.float64) @ W.T
    bound = np.abs(x).astype(np.float64) @ np.abs(W).T  # float32 rounding scales with this
    assert np.all(np.abs(y - want) <= 1e-5 * bound + 1e-30)


@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (9, 100), (4, 64), (3, 130), (17, 257)])
@pytest.mark.parametrize("groups", [1, 2, 3, 32, 256])
@pytest.mark.parametrize("block_mode", [False, True])
def test_kernel_matches_numpy_reference(shape, groups, block_mode):
    qw = quantize_weight_wgm(_weight(*shape, seed=groups),
                             WGMConfig(groups=groups, block_mode=block_mode))
    x = _rng(3).standard_normal((3, shape[1])).astype(np.float32)
    _assert_matches_reference(qw, x, _kernel(qw, x))


@pytest.mark.parametrize("batch", [1, 2, 8, 9, 17])
def test_kernel_batches_of_any_size(batch):
    """Tokens run in chunks of 8 (a lone last token alone): every split must give the product."""
    qw = quantize_weight_wgm(_weight(11, 75), WGMConfig(groups=6, block_mode=True))
    x = _rng(5).standard_normal((batch, 75)).astype(np.float32)
    y = _kernel(qw, x)
    _assert_matches_reference(qw, x, y)
    np.testing.assert_allclose(y[-1:], _kernel(qw, x[-1:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_kernel_threads_agree_and_zero_rows_give_zero(threads):
    W = _weight(37, 90)
    W[[0, 5, 36]] = 0.0
    qw = quantize_weight_wgm(W, WGMConfig(groups=5))
    x = _rng(4).standard_normal((6, 90)).astype(np.float32)
    y = _kernel(qw, x, threads)
    _assert_matches_reference(qw, x, y)
    assert np.array_equal(y, _kernel(qw, x, 1))  # rows are independent: bit-identical
    zero = quantize_weight_wgm(torch.zeros(37, 90), WGMConfig(groups=5))
    assert not np.any(_kernel(zero, x, threads))
    blocks = quantize_weight_wgm(W, WGMConfig(groups=5, block_mode=True))  # zero rows: 0 scales
    y = _kernel(blocks, x, threads)
    _assert_matches_reference(blocks, x, y)
    assert not np.any(y[:, [0, 5, 36]]) and np.all(y[:, 1] != 0)


def test_kernel_ignores_an_out_of_range_index_memory_safely():
    """A forged index >= G (validation refuses it) must not read past the G scales."""
    qw = quantize_weight_wgm(_weight(4, 40), WGMConfig(groups=3))
    W = qw.dequantize().numpy()
    W[1, 0] = 0.0  # what the kernel computes for the forged weight: nothing
    _set_index_three({"index": qw.index})
    x = np.ones((1, 40), np.float32)
    np.testing.assert_allclose(_kernel(qw, x), x @ W.T, rtol=1e-5, atol=1e-5)


def test_kernel_checks_its_arguments():
    qw = quantize_weight_wgm(_weight(4, 40), WGMConfig(groups=4))
    x = np.zeros((2, 40), np.float32)
    with pytest.raises(ValueError, match="sign"):
        core().wgm_gemm(x, np.zeros((4, 1), np.uint32), qw.index.numpy().view(np.uint32),
                        qw.scale.numpy().view(np.uint16))
    with pytest.raises(ValueError, match="index"):
        core().wgm_gemm(x, qw.sign.numpy().view(np.uint32), np.zeros((1, 4, 2), np.uint32),
                        qw.scale.numpy().view(np.uint16))
    with pytest.raises(ValueError, match="scale"):
        core().wgm_gemm(x, qw.sign.numpy().view(np.uint32), qw.index.numpy().view(np.uint32),
                        qw.scale.numpy().view(np.uint16), 64)
    with pytest.raises(TypeError, match="x"):
        core().wgm_gemm(x.astype(np.float64), qw.sign.numpy().view(np.uint32),
                        qw.index.numpy().view(np.uint32), qw.scale.numpy().view(np.uint16))


# --- op and module ----------------------------------------------------------------------------


def _layer(block_mode=False, bias=True, shape=(12, 70), groups=3):
    qw = quantize_weight_wgm(_weight(*shape), WGMConfig(groups=groups, block_mode=block_mode))
    return qw, WGMLinear.from_quantized(qw, torch.randn(shape[0]) if bias else None)


@pytest.mark.parametrize("block_mode", [False, True])
def test_op_passes_opcheck_and_gradcheck(block_mode):
    import sdq.wgm_ops  # noqa: F401
    qw, layer = _layer(block_mode)
    block = BLOCK if block_mode else 0
    x = torch.randn(3, 70)
    with torch.enable_grad():
        torch.library.opcheck(torch.ops.sdq.wgm_gemm.default,
                              (x, qw.sign, qw.index, qw.scale, block))
        x64 = torch.randn(2, 70, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda t: torch.ops.sdq.wgm_gemm(t, qw.sign, qw.index, qw.scale, block), (x64,))


@pytest.mark.parametrize("block_mode", [False, True])
def test_kernel_path_equals_dequantized_path(block_mode):
    qw, layer = _layer(block_mode)
    x = torch.randn(2, 5, 70)
    y = layer(x)
    layer.use_kernels = False
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 5, 12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12),
                                        (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_every_dtype_in_same_dtype_out(dtype, tol):
    qw, layer = _layer()
    x = torch.randn(4, 70)
    want = x.double() @ qw.dequantize().double().T + layer.bias.double()
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    assert float((y.double() - want).abs().max() / want.abs().max()) < tol


def test_casts_keep_the_packed_tensors_and_cast_the_bias():
    qw, layer = _layer(block_mode=True)
    packed = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.half().bfloat16().to(torch.float64)
    assert layer.bias.dtype == torch.float64
    for k, v in packed.items():
        assert getattr(layer, k).dtype == v.dtype and torch.equal(getattr(layer, k), v)
    meta = layer.to("meta")
    assert meta.scale.device.type == "meta" and meta.scale.dtype == torch.float16


def test_module_state_dict_round_trip_and_checks():
    qw, layer = _layer()
    shell = WGMLinear.empty_like(bytes(layer.meta.tolist()).decode(), bias=True)
    shell.load_state_dict(layer.state_dict())
    x = torch.randn(3, 70)
    assert torch.equal(shell(x), layer(x))
    bad = _corrupt(layer.state_dict(), _set_index_three)
    with pytest.raises(sdq.CheckpointError, match="group 3"):
        shell.load_state_dict(bad)
    other = quantize_weight_wgm(_weight(12, 70), WGMConfig(groups=4)).state_dict()
    with pytest.raises(sdq.CheckpointError, match="groups=4"):
        shell.load_state_dict({**other, "bias": layer.bias})


def test_module_compiles_fullgraph():
    _, layer = _layer(block_mode=True)
    x = torch.randn(3, 70)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


def test_module_input_errors():
    _, layer = _layer()
    with pytest.raises(ValueError, match=r"\[\.\.\., 70\]"):
        layer(torch.randn(2, 60))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 70, dtype=torch.int64))


# --- pipeline, save / load, CLI ---------------------------------------------------------------

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))


def _llama():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def wgm_model():
    model = _llama()
    report = sdq.quantize_(model, WGMConfig(groups=4, block_mode=True), progress=False)
    return model, report


def test_quantize_makes_wgm_linears_whose_kernels_equal_the_dense_path(wgm_model):
    model, report = wgm_model
    layers = [m for m in model.modules() if isinstance(m, WGMLinear)]
    assert len(layers) == 14 and len(report.linears) == 14
    numel = [m.in_features * m.out_features for m in layers]
    stored = sum(m.bits_per_weight_all_in * n for m, n in zip(layers, numel)) / sum(numel)
    assert report.bits_per_weight_all_in == pytest.approx(stored)
    # 1 sign + 2 index bits + 4 fp16 scales per 64 weights; more where 64 does not divide in (160)
    assert 1 + 2 + 4 * 16 / 64 < stored < 4.1
    assert report.average_osr is None
    logits = model(IDS).logits
    assert torch.isfinite(logits).all()
    dense = copy.deepcopy(model)
    for m in dense.modules():
        if isinstance(m, WGMLinear):
            m.use_kernels = False
    torch.testing.assert_close(dense(IDS).logits, logits, rtol=1e-4, atol=1e-4)


def test_quantize_refuses_calibration_for_wgm():
    with pytest.raises(ValueError, match="data-free"):
        sdq.quantize_(_llama(), WGMConfig(groups=2), IDS, progress=False)


def test_quantize_refuses_fused_experts_for_wgm():
    from sdq.pipeline import _check_wgm_request
    with pytest.raises(ValueError, match="fused MoE experts"):
        _check_wgm_request(WGMConfig(), None, [({}, {"mlp.experts": object()})])
    _check_wgm_request(sdq.SDQConfig(), IDS, [({}, {"mlp.experts": object()})])  # not wgm: fine


def test_save_load_round_trip_gives_identical_logits(tmp_path, wgm_model):
    model, _ = wgm_model
    sdq.save(model, tmp_path / "m")
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert q["method"] == "wgm" and q["config"]["groups"] == 4
    loaded = sdq.load(tmp_path / "m")
    assert sum(isinstance(m, WGMLinear) for m in loaded.modules()) == 14
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_save_load_with_one_group_keeps_every_empty_index(tmp_path):
    """G = 1 has no index planes: the empty index tensors (all at address 0) must not be taken
    for tied tensors."""
    model = _llama()
    sdq.quantize_(model, WGMConfig(groups=1), progress=False)
    loaded = sdq.load(sdq.save(model, tmp_path / "m"))
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_load_detects_a_forged_index(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _llama()
    sdq.quantize_(model, WGMConfig(groups=3), progress=False)
    folder = sdq.save(model, tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.index"][:, 0, 0] |= 1
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    import hashlib
    config["quantization_config"]["sha256"] = hashlib.sha256(
        (folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(sdq.CheckpointError, match="model.layers.1.mlp.up_proj.*group 3"):
        sdq.load(folder)


class _Tokenizer:
    def save_pretrained(self, path):
        pathlib.Path(path, "tokenizer.json").write_text("{}")


def test_cli_quantize_wgm_saves_a_model_that_info_and_load_read(tmp_path, monkeypatch, capsys):
    from sdq.cli import main
    model = _llama()
    monkeypatch.setattr("sdq.data.load_model", lambda *a, **kw: (model, _Tokenizer()))
    out = tmp_path / "q"
    assert main(["quantize", "--method", "wgm", "--groups", "8", "--window", "64", "--lambda",
                 "0.5", "--eval-tokens", "0", "--out", str(out)]) == 0
    assert "4.0" in capsys.readouterr().out  # 1 + 3 bits; 8 scales per matrix: ~4.00x
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wgm" in text and "groups 8" in text
    loaded = sdq.load(out)
    cfgs = {m.config for m in loaded.modules() if isinstance(m, WGMLinear)}
    assert cfgs == {WGMConfig(groups=8, window=64, lam=0.5)}
    assert main(["quantize", "--method", "wgm", "--groups", "0", "--eval-tokens", "0"]) == 2
