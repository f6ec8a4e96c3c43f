"""Model traversal by structure (never by model-name substrings), and layer-by-layer calibration.

Calibration runs the model only up to decoder layer 0, keeps that layer's inputs (hidden states
plus the keyword arguments the model passes every layer: position embeddings, masks, position
ids, ...), then runs one layer at a time on them. Memory stays bounded by one layer's
activations for the calibration set.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


def _holds_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def _is_uniform_stack(module: nn.Module) -> bool:
    """A non-empty ModuleList of one class whose members hold Linears."""
    return (isinstance(module, nn.ModuleList) and len(module) > 0
            and len({type(child) for child in module}) == 1 and _holds_linear(module[0]))


def _inside(name: str, outer: str) -> bool:
    """Whether the module called `name` sits strictly inside the module called `outer`."""
    return name != outer and (outer == "" or name.startswith(outer + "."))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer stack: the longest ModuleList of one class whose members hold Linears,
    among the outermost ones. A list nested inside another such list's members (the experts of
    an MoE layer) is never chosen, even when it is longer than the layer stack."""
    stacks = {name: m for name, m in model.named_modules() if _is_uniform_stack(m)}
    outermost = [m for name, m in stacks.items() if not any(_inside(name, o) for o in stacks)]
    if not outermost:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of identical layers "
                         f"containing nn.Linear; cannot find its decoder layers")
    return max(outermost, key=len)  # the first of the longest, in named_modules order


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules inside `layer`, by qualified name, in `named_modules` order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@dataclasses.dataclass
class LayerPlan:
    """What quantize_ does with each weight of one decoder layer (names relative to the layer).

    linears:     nn.Linear modules, quantized into SDQLinear
    experts:     fused 3-D experts modules, quantized into SDQExperts (sdq.experts)
    routed:      the names of `linears` inside an expert list (an nn.ModuleList of expert
                 modules): calibration may route no token to them
    routers:     weight name -> tensor of the MoE routers and expert gates: full precision
    unsupported: weight name -> (tensor, reason) of linear-like weights sdq cannot quantize
    """
    linears: dict[str, nn.Module]
    experts: dict[str, nn.Module]
    routed: set[str]
    routers: dict[str, torch.Tensor]
    unsupported: dict[str, tuple[torch.Tensor, str]]

    def weights(self) -> dict[str, torch.Tensor]:
        """Every 2-D weight to quantize, by name: each linear's, and each expert's slice of
        fused experts ("mlp.experts.gate_up_proj.5")."""
        from .experts import expert_weights
        out = {name: m.weight for name, m in self.linears.items()}
        for name, m in self.experts.items():
            out.update({f"{name}.{sub}": w for sub, w in expert_weights(m).items()})
        return out


def _join(*names: str) -> str:
    return ".".join(n for n in names if n)


def is_linear_like(name: str, p: torch.Tensor) -> bool:
    """A floating weight of two or more dimensions that is not a bias: what sdq quantizes."""
    return p.is_floating_point() and p.dim() >= 2 and not name.endswith("bias")


def _routers(modules: dict[str, nn.Module], blocks: dict[str, int]) -> dict[str, torch.Tensor]:
    """The routers of MoE blocks (the modules whose children are experts): leaf children with a
    2-D weight of one row per expert, or a single row (the gate of a shared expert)."""
    routers = {}
    for block_name, num_experts in blocks.items():
        for child_name, child in modules[block_name].named_children():
            weight = getattr(child, "weight", None)
            if (next(child.children(), None) is None and isinstance(weight, torch.Tensor)
                    and weight.dim() == 2 and weight.shape[0] in (num_experts, 1)):
                routers[_join(block_name, child_name, "weight")] = weight
    return routers


def _unsupported_reason(module: nn.Module, p: torch.Tensor) -> str:
    if p.dim() == 3:
        return "3-D weight of an unknown layout, not standard fused experts"
    return f"{p.dim()}-D weight of {type(module).__name__}, not an nn.Linear"


def plan_layer(layer: nn.Module) -> LayerPlan:
    """Classify the weights of one decoder layer by structure (see LayerPlan)."""
    from .experts import SDQExperts, is_fused_experts
    modules = dict(layer.named_modules())
    experts = {n: m for n, m in modules.items() if is_fused_experts(m)}
    expert_lists = {n: m for n, m in modules.items() if n and _is_uniform_stack(m) and len(m) > 1}
    # MoE blocks (parents of experts) -> number of experts; a module holding 3-D weights of an
    # unknown layout counts as experts too, so that its block's router is still recognised.
    blocks = {n.rpartition(".")[0]: m.gate_up_proj.shape[0] for n, m in experts.items()}
    blocks.update({n.rpartition(".")[0]: len(m) for n, m in expert_lists.items()})
    blocks.update({n.rpartition(".")[0]: p.shape[0] for n, m in modules.items() if n not in experts
                   for p in m.parameters(recurse=False) if p.dim() == 3})
    blocks.update({n.rpartition(".")[0]: m.num_experts for n, m in modules.items()
                   if isinstance(m, SDQExperts)})  # already quantized
    routers = _routers(modules, blocks)
    router_modules = {n.rpartition(".")[0] for n in routers}
    linears = {n: m for n, m in linear_modules(layer).items() if n not in router_modules}
    routed = {n for n in linears if any(_inside(n, lst) for lst in expert_lists)}
    covered = {id(m.weight) for m in linears.values()} | {id(w) for w in routers.values()}
    covered |= {id(p) for m in experts.values() for p in m.parameters()}
    unsupported = {}
    for name, module in modules.items():
        if isinstance(module, nn.Embedding):
            continue  # a lookup table, reported with the embeddings
        for pname, p in module.named_parameters(recurse=False):
            if is_linear_like(pname, p) and id(p) not in covered:
                unsupported[_join(name, pname)] = (p, _unsupported_reason(module, p))
    return LayerPlan(linears, experts, routed, routers, unsupported)


class _ReachedLayer(Exception):
    """Raised by the capture hook to stop the forward pass at decoder layer 0."""


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor):
    """Inputs of decoder layer 0 for each calibration sequence.

    input_ids: LongTensor[n, seqlen]. Returns `(hidden, kwargs)`: hidden is Tensor[n, seqlen,
    hidden_size] on the model's device; kwargs are the keyword arguments layer 0 received for a
    batch of one sequence (identical for every sequence of the same length, since no padding
    mask is given), ready for `run_layer`.
    """
    layer0 = decoder_layers(model)[0]
    device = next(model.parameters()).device
    captured: dict = {}

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _ReachedLayer

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    hidden = []
    try:
        for row in input_ids:
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _ReachedLayer:
                pass
            hidden.append(captured["hidden"][0])
    finally:
        handle.remove()
    return torch.stack(hidden), captured["kwargs"]


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run one decoder layer on each sequence of `hidden` [n, seqlen, d]; returns [n, seqlen, d].

    Sequence by sequence, so the layer's internal activations exist for one sequence at a time.
    Layers that return a tuple (older transformers, OPT) give their first element. Packed
    (already quantized) layers compute from their dequantized weights here: the same values at
    dense matmul speed (sdq.dense_forward).
    """
    from .dense_forward import dense_packed_layers
    out = torch.empty_like(hidden)
    with dense_packed_layers(layer):
        for i in range(hidden.shape[0]):
            result = layer(hidden[i:i + 1], **kwargs)
            out[i] = result[0][0] if isinstance(result, (tuple, list)) else result[0]
    return out


class _GramSum:
    """sum x^T x over the inputs given to a group of Linears that all received the same tensors
    (q/k/v of one attention read one normalised input, gate/up of one MLP another): each distinct
    input is multiplied once. `last` is the last input added; `members` the Linears' names."""

    def __init__(self, n: int, device, members: list[str]):
        self.sum = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.count = 0
        self.last: torch.Tensor | None = None
        self.members = members

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]
        self.last = x


class HessianAccumulator:
    """Forward hooks that accumulate `H = 2/n * sum x x^T` of the inputs of chosen Linears.

    n counts tokens (every row of every batch). Sums are kept in float32 and scaled once at the
    end. Use as a context manager around forward passes, then read `hessians()`.
    Linears that receive the very same input tensor (q/k/v, gate/up) share one sum: a Linear whose
    first input is the tensor its predecessor just received joins that one's group, and its later
    calls only count when they pass that same tensor again. Should a group's members ever receive
    different tensors, the group splits into exact per-Linear sums; the result never depends on
    the sharing, only the work does.
    """

    def __init__(self, layer: nn.Module, names=None):
        linears = linear_modules(layer)
        names = list(linears) if names is None else list(names)
        missing = [n for n in names if n not in linears]
        if missing:
            raise ValueError(f"not nn.Linear modules of this layer: {missing}; have {list(linears)}")
        self._groups = {n: _GramSum(linears[n].in_features, linears[n].weight.device, [n])
                        for n in names}
        self._counts = dict.fromkeys(names, 0)
        self._linears = {n: linears[n] for n in names}
        self._previous: tuple[str, torch.Tensor] | None = None  # the last hook's (name, input)
        self._handles = []

    def _hook(self, name):
        def hook(_module, args, _output):
            self._accumulate(name, args[0])  # not detach(): that makes a new tensor object
        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        rows = x.numel() // x.shape[-1]
        group = self._groups[name]
        if group.last is x and self._counts[name] < group.count:  # a group-mate added it
            self._counts[name] += rows
        elif self._joins_previous(name, x):
            pass
        else:
            if any(self._counts[m] != group.count for m in group.members):
                self._split(group)
                group = self._groups[name]
            group.add(x)
            self._counts[name] += rows
        self._previous = (name, x)

    def _joins_previous(self, name: str, x: torch.Tensor) -> bool:
        """On its first call, `name` joins the group of the Linear called just before it with
        this same tensor, while that group has seen nothing else."""
        if self._previous is None or self._counts[name] or self._previous[1] is not x:
            return False
        group = self._groups[self._previous[0]]
        rows = x.numel() // x.shape[-1]
        if group.last is not x or group.count != rows or group.sum.shape != \
                self._groups[name].sum.shape:
            return False
        group.members.append(name)
        self._groups[name] = group
        self._counts[name] = rows
        return True

    def _split(self, group: _GramSum) -> None:
        """Exact sums per member: a member that has not received the group's last input yet gets
        the sum without it."""
        last_term = None
        for m in group.members:
            own = _GramSum(group.sum.shape[0], group.sum.device, [m])
            own.sum.copy_(group.sum)
            own.count = self._counts[m]
            if own.count != group.count:
                if last_term is None:
                    rows = group.last.detach().reshape(-1, group.last.shape[-1]).float()
                    last_term = rows.T @ rows
                own.sum -= last_term
            self._groups[m] = own

    def _settle(self) -> None:
        """Split the groups whose members do not all count the same inputs (a forward that
        stopped between group-mates), while their last input is still at hand."""
        for group in {id(g): g for g in self._groups.values()}.values():
            if any(self._counts[m] != group.count for m in group.members):
                self._split(group)

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._linears.items()]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._previous = None
        self._settle()
        for group in self._groups.values():
            group.last = None  # the inputs themselves are not needed any more

    def counts(self) -> dict[str, int]:
        """Input rows (tokens) each linear saw: the weights of a sum of Hessians across ranks."""
        return dict(self._counts)

    def hessians(self, optional=()) -> dict[str, torch.Tensor]:
        """`{name: Tensor[in, in]}`; raises if a linear never saw an input, unless it is named
        in `optional` (an expert no token was routed to), which is then left out. Linears that
        shared their inputs get the same tensor object."""
        unseen = [n for n, c in self._counts.items() if c == 0 and n not in optional]
        if unseen:
            raise ValueError(f"no inputs reached {unseen}; run the layer inside the context")
        self._settle()
        scaled: dict[int, torch.Tensor] = {}
        out = {}
        for n, group in self._groups.items():
            if self._counts[n]:
                if id(group) not in scaled:
                    scaled[id(group)] = group.sum * (2.0 / self._counts[n])
                out[n] = scaled[id(group)]
        return out


def collect_hessians(layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                     names=None) -> dict[str, torch.Tensor]:
    """Run `layer` on the captured inputs and return the input Gram matrix of each named Linear
    (all of them when `names` is None)."""
    with HessianAccumulator(layer, names) as acc:
        run_layer(layer, hidden, kwargs)
    return acc.hessians()
