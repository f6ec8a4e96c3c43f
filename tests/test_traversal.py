"""Traversal, layer-by-layer calibration and perplexity on tiny random-weight models."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

from sdq.evaluate import perplexity
from sdq.traversal import (
    HessianAccumulator, capture_layer_inputs, collect_hessians, decoder_layers, linear_modules,
    plan_layer, run_layer,
)

VOCAB = 128
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)
# family -> (config, the final norm the model applies after its last layer, expected linears)
FAMILIES = {
    "llama": (lambda: T.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **_SIZES),
              lambda m: m.model.norm,
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "opt": (lambda: T.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **_SIZES),
            lambda m: m.model.decoder.final_layer_norm,
            ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
             "fc1", "fc2"]),
    "qwen2": (lambda: T.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **_SIZES),
              lambda m: m.model.norm,
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
}


def tiny_model(family):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(FAMILIES[family][0]()).eval()


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def test_decoder_layers_and_linears(family):
    model = tiny_model(family)
    layers = decoder_layers(model)
    assert len(layers) == 2
    assert len({type(layer) for layer in layers}) == 1
    linears = linear_modules(layers[0])
    assert list(linears) == FAMILIES[family][2]
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert linears["self_attn.q_proj"] is layers[0].get_submodule("self_attn.q_proj")


def test_decoder_layers_prefers_longest_uniform_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    model = nn.Module()
    model.short = nn.ModuleList([Block(), Block()])
    model.mixed = nn.ModuleList([Block(), nn.Linear(4, 4), Block(), Block()])
    model.no_linear = nn.ModuleList([nn.ReLU() for _ in range(5)])
    model.stack = nn.ModuleList([Block() for _ in range(3)])
    assert decoder_layers(model) is model.stack


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)


class _MoeLayer(nn.Module):
    def __init__(self, num_experts):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.router = nn.Linear(4, num_experts, bias=False)
        self.experts = nn.ModuleList([_Mlp() for _ in range(num_experts)])


def test_decoder_layers_never_picks_a_nested_experts_list():
    model = nn.Module()
    model.layers = nn.ModuleList([_MoeLayer(8) for _ in range(2)])  # 8 experts > 2 layers
    assert decoder_layers(model) is model.layers


def test_decoder_layers_when_the_model_itself_is_the_stack():
    stack = nn.ModuleList([_MoeLayer(8) for _ in range(3)])
    assert decoder_layers(stack) is stack


def test_plan_of_an_expert_list_layer():
    plan = plan_layer(_MoeLayer(3))
    assert list(plan.linears) == ["attn"] + [f"experts.{e}.{p}" for e in range(3)
                                             for p in ("up", "down")]
    assert set(plan.routers) == {"router.weight"}  # one row per expert: kept, not quantized
    assert plan.routed == set(plan.linears) - {"attn"}
    assert not plan.experts and not plan.unsupported


def test_plan_of_a_dense_layer_is_its_linears(family):
    layer = decoder_layers(tiny_model(family))[0]
    plan = plan_layer(layer)
    assert plan.linears == linear_modules(layer)
    assert not (plan.experts or plan.routers or plan.unsupported or plan.routed)


def test_plan_reports_weights_outside_linears():
    layer = nn.Module()
    layer.fc = nn.Linear(4, 4)
    layer.table = nn.Parameter(torch.zeros(4, 4))
    layer.cube = nn.Parameter(torch.zeros(2, 4, 4))
    layer.emb = nn.Embedding(5, 4)  # a lookup table: not a weight to quantize
    plan = plan_layer(layer)
    assert set(plan.unsupported) == {"table", "cube"}
    assert "3-D" in plan.unsupported["cube"][1]
    assert "not an nn.Linear" in plan.unsupported["table"][1]


def test_decoder_layers_error():
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_layer_by_layer_reproduces_model(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hidden, kwargs = capture_layer_inputs(model, ids)
    assert hidden.shape == (3, 16, 64)
    torch.testing.assert_close(hidden, ref.hidden_states[0])
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        hidden = run_layer(layer, hidden, kwargs)
        if i + 1 < len(layers):  # the last entry of hidden_states is after the final norm
            torch.testing.assert_close(hidden, ref.hidden_states[i + 1])
    with torch.no_grad():
        final = FAMILIES[family][1](model)(hidden)
        torch.testing.assert_close(final, ref.hidden_states[-1])
        torch.testing.assert_close(model.lm_head(final), ref.logits)


def test_hessian_matches_hand_computation(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    hidden, kwargs = capture_layer_inputs(model, ids)
    layer = decoder_layers(model)[0]
    names = FAMILIES[family][2][:1] + FAMILIES[family][2][-1:]  # an attention and an MLP input
    seen = {n: [] for n in names}
    handles = [layer.get_submodule(n).register_forward_hook(
        lambda _m, args, _o, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1])))
        for n in names]
    hessians = collect_hessians(layer, hidden, kwargs, names)
    for h in handles:
        h.remove()
    assert set(hessians) == set(names)
    for n in names:
        x = torch.cat(seen[n]).double()
        assert x.shape[0] == 3 * 16
        expected = 2.0 / x.shape[0] * x.T @ x
        torch.testing.assert_close(hessians[n].double(), expected, rtol=1e-5, atol=1e-5)
        assert hessians[n].dtype == torch.float32


def test_hessian_accumulator_errors():
    layer = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="not nn.Linear"):
        HessianAccumulator(layer, ["nope"])
    with pytest.raises(ValueError, match="no inputs"):
        HessianAccumulator(layer).hessians()


def test_hessian_of_an_unrouted_expert_may_be_missing():
    layer = nn.ModuleDict({"seen": nn.Linear(3, 2), "idle": nn.Linear(3, 2)})
    with HessianAccumulator(layer) as acc:
        layer["seen"](torch.ones(4, 3))
    assert set(acc.hessians(optional={"idle"})) == {"seen"}
    with pytest.raises(ValueError, match="idle"):
        acc.hessians()


def test_hessian_hooks_removed():
    layer = nn.Sequential(nn.Linear(3, 2))
    with HessianAccumulator(layer) as acc:
        layer(torch.ones(4, 3))
    layer(torch.ones(5, 3))  # outside the context: must not count
    torch.testing.assert_close(acc.hessians()["0"], torch.full((3, 3), 2.0))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_matches_hand_computation(batch_size):
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (3 * 16 + 5,), generator=torch.Generator().manual_seed(3))
    windows = tokens[:48].view(3, 16)  # the ragged tail of 5 is dropped
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    got = perplexity(model, tokens, seqlen=16, batch_size=batch_size, progress=False)
    assert got == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_perplexity_rejects_short_input():
    with pytest.raises(ValueError, match="window"):
        perplexity(tiny_model("llama"), torch.zeros(10, dtype=torch.long), seqlen=16)
