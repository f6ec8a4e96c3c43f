"""Mixture-of-experts models: fused 3-D experts packed into SDQExperts, routers kept, coverage.

Tiny random-weight models of transformers' MoE families (plumbing only, no quality claims).
"""
import copy
import json

import pytest
import torch
from torch import nn

import sdq
from sdq import experts as moe
from sdq.experts import ExpertHessians, SDQExperts
from sdq.io import load, save
from sdq.methods import BaselineConfig
from sdq.nn import SDQLinear
from sdq.pipeline import quantize_
from sdq.traversal import decoder_layers, plan_layer

T = pytest.importorskip("transformers")

torch.set_grad_enabled(False)
VOCAB, EXPERTS = 96, 4
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, eos_token_id=None,
              bos_token_id=None, pad_token_id=None)
CONFIGS = {
    "mixtral": lambda **kw: T.MixtralConfig(intermediate_size=32, num_local_experts=EXPERTS,
                                            **{**_SIZES, **kw}),
    "qwen2_moe": lambda **kw: T.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=32,
                                               num_experts=EXPERTS, **{**_SIZES, **kw}),
    "qwen3_moe": lambda **kw: T.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32,
                                               num_experts=EXPERTS, head_dim=16,
                                               **{**_SIZES, **kw}),
    "olmoe": lambda **kw: T.OlmoeConfig(intermediate_size=32, num_experts=EXPERTS,
                                        **{**_SIZES, **kw}),
}
IDS = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))


def tiny(family, **kw):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(CONFIGS[family](**kw)).eval()


def use_kernels(model, on: bool):
    for m in model.modules():
        if isinstance(m, SDQLinear):
            m.use_kernels = on


def dequantized_reference(original, quantized):
    """`original` with every quantized weight replaced by its dequantized value, computed by
    transformers' own (fused) forward."""
    ref = copy.deepcopy(original)
    for name, m in quantized.named_modules():
        if not isinstance(m, SDQLinear):
            continue
        parent, _, last = name.rpartition(".")
        if isinstance(quantized.get_submodule(parent), nn.ModuleList):  # an expert's slice
            experts, _, proj = parent.rpartition(".")
            getattr(ref.get_submodule(experts), proj).data[int(last)] = m.dense_weight()
        else:
            ref.get_submodule(name).weight.data.copy_(m.dense_weight())
    return ref


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fused_experts_and_routers_found_by_structure(family):
    plan = plan_layer(decoder_layers(tiny(family))[0])
    assert list(plan.experts) == ["mlp.experts"]
    assert not plan.unsupported
    gates = {"mlp.gate.weight"}
    if family == "qwen2_moe":
        gates.add("mlp.shared_expert_gate.weight")  # gate of the shared expert: one row
    assert set(plan.routers) == gates
    assert not any(n.startswith("mlp.gate") or "shared_expert_gate" in n for n in plan.linears)
    weights = plan.weights()
    assert weights["mlp.experts.gate_up_proj.3"].shape == (64, 64)
    assert weights["mlp.experts.down_proj.0"].shape == (64, 32)


def test_other_fused_layouts_are_not_taken_for_standard_experts():
    fused = tiny("mixtral").model.layers[0].mlp.experts
    assert moe.is_fused_experts(fused)
    fused.is_transposed = True  # what transformers records for a [E, H, 2I] layout
    assert moe.fused_experts_shape(fused) is None
    fused.is_transposed = False
    fused.act_fn = None
    assert not moe.is_fused_experts(fused)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_quantize_packs_experts_and_matches_dequantized_path(family, calibrated):
    original = tiny(family)
    model = copy.deepcopy(original)
    report = quantize_(model, sdq.SDQConfig(osr=2), IDS if calibrated else None, progress=False)
    packed = [m for m in model.modules() if isinstance(m, SDQExperts)]
    assert len(packed) == 2 and all(m.num_experts == EXPERTS for m in packed)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]  # no fused floats left
    shared = 3 if family == "qwen2_moe" else 0
    assert len(report.linears) == 2 * (4 + 2 * EXPERTS + shared)
    assert (1, "mlp.experts.down_proj.3") in report.linears
    logits = model(IDS).logits
    use_kernels(model, False)
    dense = model(IDS).logits
    torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-5)
    # SDQExperts computes what transformers' fused experts compute with the same weights.
    torch.testing.assert_close(dequantized_reference(original, model)(IDS).logits, dense,
                               rtol=1e-4, atol=1e-5)


def test_expert_hessians_come_from_routed_tokens():
    fused = tiny("olmoe").model.layers[0].mlp.experts
    x = torch.randn(10, 64)
    index = torch.tensor([[0, 1]] * 5 + [[1, 2]] * 5)  # expert 3 receives nothing
    weights = torch.rand(10, 2)
    with ExpertHessians(fused) as acc:
        fused(x, index, weights)
    hessians = acc.hessians()
    assert sorted(hessians) == sorted(f"{p}.{e}" for p in ("gate_up_proj", "down_proj")
                                      for e in (0, 1, 2))
    routed = x[5:]  # the tokens of expert 2
    torch.testing.assert_close(hessians["gate_up_proj.2"], 2 / 5 * routed.T @ routed)
    gate, up = (routed @ fused.gate_up_proj[2].T).chunk(2, dim=-1)
    inter = fused.act_fn(gate) * up
    torch.testing.assert_close(hessians["down_proj.2"], 2 / 5 * inter.T @ inter)
    assert hessians["gate_up_proj.1"].shape == (64, 64)


def test_expert_without_tokens_is_quantized_data_free(monkeypatch):
    import sdq.pipeline
    seen = {}
    real = sdq.pipeline.quantize_linear

    def spy(W, config, hessian=None, *, name=None):
        seen[name] = hessian is not None
        return real(W, config, hessian, name=name)

    monkeypatch.setattr(sdq.pipeline, "quantize_linear", spy)
    model = tiny("mixtral", num_experts_per_tok=1)
    quantize_(model, sdq.SDQConfig(osr=1), IDS[:1, :2], progress=False)  # 2 tokens, 4 experts
    experts = {n: h for n, h in seen.items() if ".experts." in n}
    assert len(experts) == 2 * 2 * EXPERTS
    assert any(experts.values()) and not all(experts.values())
    assert seen["layer 0 self_attn.q_proj"]
    assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_save_load_round_trip(tmp_path, family):
    model = tiny(family)
    quantize_(model, sdq.SDQConfig(osr=1.5, levels="binary"), progress=False)
    before = model(IDS).logits
    loaded = load(save(model, tmp_path / "q"))
    assert sum(isinstance(m, SDQExperts) for m in loaded.modules()) == 2
    assert not [n for n, p in loaded.named_parameters() if p.dim() == 3]
    assert torch.equal(loaded(IDS).logits, before)


def test_load_rejects_experts_of_another_shape(tmp_path):
    model = tiny("mixtral")
    quantize_(model, sdq.SDQConfig(osr=1), progress=False)
    out = save(model, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = 48
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="experts"):
        load(out)


def test_coverage_report():
    original = tiny("qwen2_moe")
    total = sum(p.numel() for p in original.parameters())
    report = quantize_(copy.deepcopy(original), sdq.SDQConfig(osr=1), progress=False)
    cov = report.coverage
    assert cov["total_params"] == total
    assert cov["quantized_params"] == sum(v["numel"] for v in report.linears.values())
    kept = cov["full_precision"]
    assert cov["quantized_params"] + sum(g["params"] for g in kept.values()) == total
    assert set(kept) == {"embeddings", "lm_head", "norms", "biases", "routers"}
    assert kept["embeddings"]["params"] == kept["lm_head"]["params"] == VOCAB * 64
    assert {w["name"] for w in kept["routers"]["weights"]} == {
        f"model.layers.{i}.mlp.{g}.weight" for i in (0, 1) for g in ("gate", "shared_expert_gate")}
    assert kept["routers"]["params"] == 2 * (EXPERTS + 1) * 64
    assert "weights" not in kept["norms"]  # grouped, not listed
    text = "\n".join(report.coverage_lines())
    assert "routers" in text and "model.layers.1.mlp.shared_expert_gate.weight" in text


def _unknown_experts_layout(model):
    """Mark layer 0's experts with a layout sdq does not know (transformers' transposed flag)."""
    model.model.layers[0].mlp.experts.is_transposed = True
    return model


def test_unsupported_3d_weights_are_reported_and_strict_raises():
    model = _unknown_experts_layout(tiny("mixtral"))
    with pytest.raises(ValueError, match=r"strict: 2 .*layer 0 mlp.experts.gate_up_proj \(3-D"):
        quantize_(model, sdq.SDQConfig(osr=1), IDS, strict=True, progress=False)
    assert not any(isinstance(m, SDQLinear) for m in model.modules())  # no work was done
    report = quantize_(model, sdq.SDQConfig(osr=1), progress=False)
    unsupported = report.coverage["full_precision"]["unsupported"]["weights"]
    assert [w["name"] for w in unsupported] == ["model.layers.0.mlp.experts.gate_up_proj",
                                                "model.layers.0.mlp.experts.down_proj"]
    assert all("3-D" in w["reason"] for w in unsupported)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3  # left as it was
    assert isinstance(model.model.layers[1].mlp.experts, SDQExperts)


def test_baseline_writes_dense_expert_weights():
    model = tiny("olmoe")
    before = model.model.layers[0].mlp.experts.down_proj.clone()
    report = quantize_(model, BaselineConfig("rtn", 4), progress=False)
    after = model.model.layers[0].mlp.experts.down_proj
    assert not any(isinstance(m, SDQExperts) for m in model.modules())
    assert not torch.equal(after, before)
    assert float((after - before).norm() / before.norm()) < 0.2
    assert (0, "mlp.experts.gate_up_proj.2") in report.linears


def test_filter_fn_excludes_fused_experts_as_a_whole():
    model = tiny("mixtral")
    report = quantize_(model, sdq.SDQConfig(osr=1), progress=False,
                       filter_fn=lambda i, name, m: not (i == 1 and name == "mlp.experts"))
    assert isinstance(model.model.layers[0].mlp.experts, SDQExperts)
    assert not isinstance(model.model.layers[1].mlp.experts, SDQExperts)
    excluded = report.coverage["full_precision"]["excluded"]["weights"]
    assert {w["name"] for w in excluded} == {"model.layers.1.mlp.experts.gate_up_proj",
                             "model.layers.1.mlp.experts.down_proj"}


# --- experts as a ModuleList of MLPs (more experts than layers) ------------------------------


class _Expert(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _MoELayer(nn.Module):
    def __init__(self, hidden, num_experts):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden) for _ in range(num_experts))

    def forward(self, x):
        x = x + self.proj(x)
        choice = self.gate(x).argmax(-1)  # top-1 routing
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = choice == e
            if mask.any():
                out[mask] = expert(x[mask])
        return x + out


class _ToyMoE(nn.Module):
    def __init__(self, vocab=32, hidden=16, layers=2, num_experts=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_MoELayer(hidden, num_experts) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_expert_list_model_calibrates_with_unrouted_experts():
    model = _ToyMoE()
    assert decoder_layers(model) is model.layers  # not the longer experts list
    report = quantize_(model, sdq.SDQConfig(osr=2), IDS[:1, :3] % 32, progress=False)
    assert len(report.linears) == 2 * (1 + 2 * 6)  # proj and every expert; never the gate
    assert isinstance(model.layers[0].gate, nn.Linear)
    assert {w["name"] for w in report.coverage["full_precision"]["routers"]["weights"]} == {
        "layers.0.gate.weight", "layers.1.gate.weight"}
    assert torch.isfinite(model(IDS % 32)).all()


def test_cli_prints_coverage_and_info_reads_it_back(capsys, tmp_path, monkeypatch):
    from sdq.cli import main

    class Tokenizer:
        def save_pretrained(self, path):
            pass

    monkeypatch.setattr("sdq.data.load_model", lambda *a, **kw: (tiny("mixtral"), Tokenizer()))
    out = tmp_path / "q"
    assert main(["quantize", "--calib-samples", "0", "--eval-tokens", "0", "--osr", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parameters quantized" in printed and "model.layers.1.mlp.gate.weight" in printed
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"quantized linears: {2 * (4 + 2 * EXPERTS)}" in info
    from sdq._native import core
    amx = "AMX prefill GEMMs yes" if core().amx_gemm_supported() else "AMX prefill GEMMs no"
    assert f"int8 tables {core().lut_kernel_name()}" in info and amx in info
    coverage = [line for line in printed.splitlines() if line.startswith("  ")]
    assert coverage and all(line in info for line in coverage)


def test_multi_osr_allocates_every_expert(capsys):
    from sdq.cli import _multi_osr
    model = tiny("olmoe")
    osr_for = _multi_osr(model, 2.0)
    report = quantize_(model, sdq.SDQConfig(osr=2), osr_for=osr_for, progress=False)
    assert report.average_osr == pytest.approx(2.0, abs=0.05)
    packed = model.model.layers[1].mlp.experts.down_proj[3]
    assert packed.config.osr == osr_for(1, "mlp.experts.down_proj.3")


def test_gptq_quantizes_an_expert_without_tokens():
    model = tiny("olmoe", num_experts_per_tok=1)
    report = quantize_(model, BaselineConfig("gptq", 4), IDS[:1, :2], progress=False)
    assert len(report.linears) == 2 * (4 + 2 * EXPERTS)
    assert torch.isfinite(model(IDS).logits).all()
