"""SDQExperts: the packed form of a fused mixture-of-experts module (3-D expert weights).

transformers' MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and others) hold their experts
as two fused parameters, gate_up_proj [E, 2*I, H] and down_proj [E, H, I], plus an act_fn: expert
e computes down_proj[e] @ (act(gate) * up) with gate, up = (gate_up_proj[e] @ x).chunk(2), and
each token's output is the routing-weighted sum over its top-k experts. Such a module is found
by structure (parameter shapes, act_fn, and a check of its forward), never by class name.

SDQExperts holds one SDQLinear per expert per projection, as nn.ModuleList children named like
the fused slices they replace (`experts.gate_up_proj.5`), so sdq.save stores them like any other
SDQLinear. A small `experts_meta` buffer marks the module in the checkpoint, so sdq.load can put
an SDQExperts shell back before it fills the SDQLinear children (`rebuild_experts`).
"""
from __future__ import annotations

import json
from typing import Callable, Iterator

import torch
from torch import nn

from .nn import SDQLinear
from .weight import CheckpointError

PROJECTIONS = ("gate_up_proj", "down_proj")
META = "experts_meta"
FORMAT = "sdq-experts-v1"
# transformers' experts decorator records the weight layout in these attributes; sdq supports the
# default layout only (concatenated [gate; up], not transposed, no biases, no post-expert norm).
_DEFAULT_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False,
                   "is_concatenated": True, "has_post_expert_norm": False}


# --- finding fused experts ----------------------------------------------------------------------


def fused_experts_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """(num_experts, intermediate, hidden) when `module` is laid out as standard fused experts:
    exactly the floating parameters gate_up_proj [E, 2I, H] and down_proj [E, H, I], an act_fn,
    and (when transformers recorded them) the default layout flags and gate function."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(PROJECTIONS) or not callable(getattr(module, "act_fn", None)):
        return None
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3 or not gate_up.is_floating_point():
        return None
    num_experts, double_inter, hidden = gate_up.shape
    inter = double_inter // 2
    if double_inter % 2 or tuple(down.shape) != (num_experts, hidden, inter) or num_experts == 0:
        return None
    if any(getattr(module, k, v) != v for k, v in _DEFAULT_LAYOUT.items()):
        return None
    if not _default_gate_function(module):
        return None
    return num_experts, inter, hidden


def _default_gate_function(module: nn.Module) -> bool:
    """A class that overrides transformers' `_apply_gate` (clamping, interleaving) computes
    something else than act(gate) * up."""
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is None:
        return True
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    return apply_gate is _default_apply_gate


@torch.no_grad()
def is_fused_experts(module: nn.Module) -> bool:
    """Standard fused experts (see fused_experts_shape) whose forward computes what SDQExperts
    computes: checked on a few random tokens, because a family may route or weight differently
    behind the same parameter layout."""
    shape = fused_experts_shape(module)
    if shape is None or module.gate_up_proj.device.type == "meta":
        return False
    num_experts, _, hidden = shape
    weight = module.gate_up_proj
    gen = torch.Generator().manual_seed(0)
    tokens, k = 6, min(2, num_experts)
    x = torch.randn(tokens, hidden, generator=gen).to(weight)
    index = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)])
    index = index.to(weight.device)
    weights = torch.rand(tokens, k, generator=gen).to(weight)
    try:
        got = module(x, index, weights)
    except Exception:  # noqa: BLE001 -- any failure means: not a layout sdq understands
        return False
    want = moe_forward(x, index, weights, num_experts, lambda e, h: _fused_expert(module, e, h))
    tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
    scale = float(want.abs().max()) or 1.0
    return got.shape == want.shape and bool(torch.allclose(got.float(), want.float(),
                                                           rtol=tol, atol=tol * scale))


# --- the computation ------------------------------------------------------------------------


def routed_tokens(top_k_index: torch.Tensor, num_experts: int
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, token indices, top-k positions) for every expert that received tokens, in expert
    order. Indices outside [0, num_experts) (transformers' padding expert) are skipped."""
    for expert in torch.unique(top_k_index).tolist():
        if 0 <= expert < num_experts:
            token_idx, top_k_pos = torch.where(top_k_index == expert)
            yield expert, token_idx, top_k_pos


def moe_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, num_experts: int,
                expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """transformers' experts forward: each routed token's expert output, scaled by its routing
    weight, summed into the token's row. hidden_states [T, H]; top_k_* [T, k]."""
    out = torch.zeros_like(hidden_states)
    for e, token_idx, top_k_pos in routed_tokens(top_k_index, num_experts):
        y = expert(e, hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _fused_intermediate(module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of expert e with the fused (float) weights: the input of its down_proj."""
    gate, up = nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _fused_expert(module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(_fused_intermediate(module, e, x), module.down_proj[e])


def expert_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Each expert's 2-D weight [out, in] of fused experts, under its name in SDQExperts
    ("gate_up_proj.5"): views into the fused parameters, no copies."""
    num_experts = fused_experts_shape(module)[0]
    return {f"{proj}.{e}": getattr(module, proj)[e].detach()
            for proj in PROJECTIONS for e in range(num_experts)}


# --- the packed module ----------------------------------------------------------------------


class _NotLoaded(nn.Module):
    """Stands for an expert projection until sdq.load puts its SDQLinear in place; carries the
    shape that load checks the packed weight against."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features

    def forward(self, x):
        raise RuntimeError("this expert's packed weight was never loaded")


class SDQExperts(nn.Module):
    """Drop-in replacement of fused experts: forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H], computed by one SDQLinear per expert per projection."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.act_fn = act_fn
        self.gate_up_proj = nn.ModuleList(_NotLoaded(2 * intermediate_dim, hidden_dim)
                                          for _ in range(num_experts))
        self.down_proj = nn.ModuleList(_NotLoaded(hidden_dim, intermediate_dim)
                                       for _ in range(num_experts))
        meta = {"format": FORMAT, "num_experts": num_experts, "hidden_dim": hidden_dim,
                "intermediate_dim": intermediate_dim}
        self.register_buffer(META, torch.frombuffer(bytearray(json.dumps(meta).encode()),
                                                    dtype=torch.uint8))

    @classmethod
    def from_quantized(cls, fused: nn.Module, results: dict) -> "SDQExperts":
        """Packed replacement of `fused`; results: {"gate_up_proj.5": QuantizedWeight, ...} for
        every expert and projection (as named by expert_weights)."""
        num_experts, inter, hidden = fused_experts_shape(fused)
        packed = cls(num_experts, hidden, inter, fused.act_fn)
        for name in expert_weights(fused):
            proj, e = name.split(".")
            getattr(packed, proj)[int(e)] = SDQLinear.from_quantized(results[name])
        return packed

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj[e](x).chunk(2, dim=-1)
        return self.down_proj[e](self.act_fn(gate) * up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return moe_forward(hidden_states, top_k_index, top_k_weights, self.num_experts,
                           self._expert)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}")


def write_dense(fused: nn.Module, results: dict) -> None:
    """Put a baseline's dequantized expert weights back into the fused parameters (baselines are
    evaluated dense, never packed)."""
    for name, result in results.items():
        proj, e = name.split(".")
        target = getattr(fused, proj).data[int(e)]
        target.copy_(result.weight.to(target.dtype))


def _read_meta(name: str, tensor: torch.Tensor) -> tuple[int, int, int]:
    """(num_experts, intermediate, hidden) from a saved experts_meta tensor."""
    try:
        meta = json.loads(bytes(tensor.to(torch.uint8).tolist()).decode())
        shape = tuple(int(meta[k]) for k in ("num_experts", "intermediate_dim", "hidden_dim"))
        known = meta["format"] == FORMAT
    except (ValueError, TypeError, KeyError) as e:  # bad UTF-8 or JSON are ValueErrors
        raise CheckpointError(f"corrupt checkpoint: {name}.{META} is not valid: {e}") from e
    if not known:
        raise CheckpointError(f"corrupt checkpoint: {name}.{META} has format {meta['format']!r}, "
                         f"not {FORMAT}")
    return shape


def rebuild_experts(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """For sdq.load: wherever the checkpoint holds an SDQExperts (its experts_meta tensor), put an
    empty SDQExperts in place of the fused experts that from_config built; the SDQLinear children
    are filled afterwards by name."""
    suffix = "." + META
    for key, tensor in tensors.items():
        if not key.endswith(suffix):
            continue
        name = key[: -len(suffix)]
        shape = _read_meta(name, tensor)
        try:
            fused = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint does not match the model: no module {name}") from None
        if fused_experts_shape(fused) != shape:
            raise CheckpointError(f"checkpoint does not match the model: {name} is not fused experts "
                             f"of [experts, intermediate, hidden] = {list(shape)}")
        num_experts, inter, hidden = shape
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                SDQExperts(num_experts, hidden, inter, fused.act_fn))


# --- calibration ---------------------------------------------------------------------------


class ExpertHessians:
    """Forward pre-hook on fused experts that accumulates, per expert, 2/n sum x x^T over the
    tokens routed to it: of the hidden states (gate_up_proj's input) and of act(gate) * up
    computed with the fused, not yet quantized, weights (down_proj's input). Experts that see no
    token get no Hessian (quantized data-free). Use as a context manager around forward passes.
    """

    _ARGS = ("hidden_states", "top_k_index", "top_k_weights")

    def __init__(self, module: nn.Module):
        self._module = module
        self._num_experts = fused_experts_shape(module)[0]
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handle = None

    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if name not in self._sums:  # allocated on first use: unrouted experts cost nothing
            self._sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self._counts[name] = 0
        self._sums[name].addmm_(x.T, x)
        self._counts[name] += x.shape[0]

    def _hook(self, module, args, kwargs):
        given = dict(zip(self._ARGS, args), **kwargs)
        hidden, top_k_index = given["hidden_states"], given["top_k_index"]
        with torch.no_grad():
            for e, token_idx, _ in routed_tokens(top_k_index, self._num_experts):
                x = hidden[token_idx]
                self._add(f"gate_up_proj.{e}", x)
                self._add(f"down_proj.{e}", _fused_intermediate(module, e, x))

    def __enter__(self):
        self._handle = self._module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None

    def counts(self) -> dict[str, int]:
        """Tokens routed to each expert projection (those no token reached are absent)."""
        return dict(self._counts)

    def hessians(self) -> dict[str, torch.Tensor]:
        """{"gate_up_proj.5": Tensor[in, in], ...} for the experts that received tokens."""
        return {n: s * (2.0 / self._counts[n]) for n, s in self._sums.items()}
