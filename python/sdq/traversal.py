"""Model traversal by structure (never by model-name substrings), and layer-by-layer calibration.

Calibration runs the model only up to decoder layer 0, keeps that layer's inputs (hidden states
plus the keyword arguments the model passes every layer: position embeddings, masks, position
ids, ...), then runs one layer at a time on them. Memory stays bounded by one layer's
activations for the calibration set.
"""

from __future__ import annotations

import torch
from torch import nn


def _holds_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer stack: the longest ModuleList of one class whose members hold Linears."""
    best = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1 or not _holds_linear(module[0]):
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of identical layers "
                         f"containing nn.Linear; cannot find its decoder layers")
    return best


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules inside `layer`, by qualified name, in `named_modules` order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


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
    Layers that return a tuple (older transformers, OPT) give their first element.
    """
    out = torch.empty_like(hidden)
    for i in range(hidden.shape[0]):
        result = layer(hidden[i:i + 1], **kwargs)
        out[i] = result[0][0] if isinstance(result, (tuple, list)) else result[0]
    return out


class HessianAccumulator:
    """Forward hooks that accumulate `H = 2/n * sum x x^T` of the inputs of chosen Linears.

    n counts tokens (every row of every batch). Sums are kept in float32 and scaled once at the
    end. Use as a context manager around forward passes, then read `hessians()`.
    """

    def __init__(self, layer: nn.Module, names=None):
        linears = linear_modules(layer)
        names = list(linears) if names is None else list(names)
        missing = [n for n in names if n not in linears]
        if missing:
            raise ValueError(f"not nn.Linear modules of this layer: {missing}; have {list(linears)}")
        self._sums = {n: torch.zeros(linears[n].in_features, linears[n].in_features,
                                     dtype=torch.float32, device=linears[n].weight.device)
                      for n in names}
        self._counts = dict.fromkeys(names, 0)
        self._linears = {n: linears[n] for n in names}
        self._handles = []

    def _hook(self, name):
        def hook(_module, args, _output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self._sums[name].addmm_(x.T, x)
            self._counts[name] += x.shape[0]
        return hook

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._linears.items()]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def hessians(self) -> dict[str, torch.Tensor]:
        """`{name: Tensor[in, in]}`; raises if a linear never saw an input."""
        unseen = [n for n, c in self._counts.items() if c == 0]
        if unseen:
            raise ValueError(f"no inputs reached {unseen}; run the layer inside the context")
        return {n: s * (2.0 / self._counts[n]) for n, s in self._sums.items()}


def collect_hessians(layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                     names=None) -> dict[str, torch.Tensor]:
    """Run `layer` on the captured inputs and return the input Gram matrix of each named Linear
    (all of them when `names` is None)."""
    with HessianAccumulator(layer, names) as acc:
        run_layer(layer, hidden, kwargs)
    return acc.hessians()
