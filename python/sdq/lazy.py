"""Lazy reads of a Hugging Face model folder of (sharded) safetensors.

The model is built as a skeleton from config.json: its parameters on the meta device (no memory),
its buffers real (non-persistent ones such as rotary frequencies are computed at construction,
exactly as a normal load computes them). Tensors are then read from the files only for the module
being materialised, with `safetensors.safe_open`, and each file is closed after the read, so its
pages do not stay mapped (they would count in the resident memory).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .io import INDEX, WEIGHTS, read_header
from .shard_writer import DTYPES
from .weight import CheckpointError

_TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


@contextlib.contextmanager
def empty_weights():
    """Every parameter registered inside the context is moved to the meta device (buffers stay
    real): what accelerate's init_empty_weights does, without the dependency."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class LazyCheckpoint:
    """The tensors of a folder holding model.safetensors, or shards listed by
    model.safetensors.index.json; nothing is read until `read`."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"corrupt {index}: {e}") from e
            self.weight_map = {k: self.folder / f for k, f in weight_map.items()}
        elif (self.folder / WEIGHTS).exists():
            with safe_open(str(self.folder / WEIGHTS), "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), self.folder / WEIGHTS)
        else:
            raise FileNotFoundError(f"{self.folder} has neither {INDEX} nor {WEIGHTS}: streaming "
                                    f"reads a folder of safetensors")

    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    def _check_names(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"{self.folder} lacks tensors the model config.json describes "
                                  f"needs: {missing[:5]} (streaming reads checkpoints whose tensor "
                                  f"names are the model's state-dict names)")

    def specs(self, names) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each named tensor, from the files' headers (no data read)."""
        names = list(names)
        self._check_names(names)
        headers = {p: read_header(p) for p in {self.weight_map[n] for n in names}}
        return {n: (_TORCH_DTYPES[headers[self.weight_map[n]][n]["dtype"]],
                    tuple(headers[self.weight_map[n]][n]["shape"])) for n in names}

    def read_one(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype. Its file is closed again at once: pages of the
        mapping would otherwise stay resident while other tensors are read."""
        self._check_names([name])
        with safe_open(str(self.weight_map[name]), "pt") as f:
            return f.get_tensor(name)

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors, in their stored dtype."""
        names = list(names)
        self._check_names(names)
        return {n: self.read_one(n) for n in names}


def skeleton(folder) -> nn.Module:
    """The model config.json describes, in eval mode, its parameters on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(folder))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    with empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def state_names(module: nn.Module, skip_prefix: str | None = None) -> list[str]:
    """The names of the tensors a checkpoint stores for `module`: its persistent state, tensors
    shared by several names (tied embeddings) once, under the first; those under `skip_prefix`
    left out."""
    seen, names = set(), []
    for name, t in module.state_dict(keep_vars=True).items():
        if skip_prefix and name.startswith(skip_prefix + "."):
            continue
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def materialise(module: nn.Module, prefix: str, checkpoint: LazyCheckpoint) -> nn.Module:
    """A copy of skeleton `module` holding the checkpoint's tensors `prefix.<name>` (the stored
    dtype); the skeleton stays on meta."""
    module = copy.deepcopy(module)
    names = state_names(module)
    tensors = checkpoint.read(f"{prefix}.{n}" for n in names)
    module.load_state_dict({n: tensors[f"{prefix}.{n}"] for n in names}, strict=True, assign=True)
    return module


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of `module` inside `model`."""
    return next(n for n, m in model.named_modules() if m is module)
