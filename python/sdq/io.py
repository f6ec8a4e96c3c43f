"""save / load: a Hugging Face-style folder holding the packed model.

Layout of the folder:
  config.json        the model's config with a `quantization_config` (method "sdq", every
                     SDQConfig field, the per-linear OSR, the quantized module names, and the
                     SHA-256 of model.safetensors)
  model.safetensors  packed codes (int32 words), fp16 scales and means, int8 Hadamard signs and a
                     uint8 JSON metadata tensor per SDQLinear; the other parameters (embeddings,
                     norms, an untied LM head) in their own dtype. Never dequantized weights.
  tokenizer files    when a tokenizer is given
The folder is written to a temporary sibling and renamed into place, so a crash leaves nothing
half-written; an existing folder is replaced only with overwrite=True.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .nn import SDQLinear

WEIGHTS = "model.safetensors"
FORMAT = "sdq-v1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantized_modules(model: nn.Module) -> dict[str, SDQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SDQLinear)}


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share storage (tied embeddings) stored once, under the
    first name: load() re-ties them."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


def save(model: nn.Module, directory, tokenizer=None, *, overwrite: bool = False,
         extra: dict | None = None) -> Path:
    """Write `model` (quantized in place by sdq.quantize_) to `directory`; returns its path."""
    directory = Path(directory)
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("the model has no SDQLinear modules: quantize it with sdq.quantize_ first")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(_unique_tensors(model), str(tmp / WEIGHTS))
        first = next(iter(modules.values()))
        qconf = {"quant_method": "sdq", "format": FORMAT, "config": first.config.to_dict(),
                 "modules": {n: {"osr": m.config.osr, "bias": m.bias is not None}
                             for n, m in modules.items()},
                 "sha256": _sha256(tmp / WEIGHTS), **(extra or {})}
        config = model.config.to_dict()
        config["quantization_config"] = qconf
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_quantization_config(directory) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a saved sdq model folder") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {path}: {e}") from e
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "sdq" or q.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sdq ({FORMAT}) checkpoint")
    return config


def _load_tensors(path: Path, expected_sha: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if _sha256(path) != expected_sha:
        raise ValueError(f"{path} is corrupt or truncated: its SHA-256 does not match config.json")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt or truncated: {e}") from e


def load(directory, *, device: str | torch.device = "cpu", with_tokenizer: bool = False):
    """Rebuild a model saved by `save`; its SDQLinear modules compute from the packed codes."""
    from transformers import AutoConfig, AutoModelForCausalLM
    directory = Path(directory)
    config_dict = read_quantization_config(directory)
    qconf = config_dict.pop("quantization_config")
    tensors = _load_tensors(directory / WEIGHTS, qconf["sha256"])
    hf_config = AutoConfig.for_model(**config_dict)
    # Built on the CPU (not on "meta") so non-persistent buffers such as rotary frequencies are
    # computed exactly as the original model computed them.
    model = AutoModelForCausalLM.from_config(hf_config, dtype=_dtype_of(tensors))
    for name, info in qconf["modules"].items():
        meta = tensors.get(f"{name}.meta")
        if meta is None:
            raise ValueError(f"corrupt checkpoint: no packed weight for {name}")
        shell = SDQLinear.empty_like(bytes(meta.tolist()).decode(), info["bias"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, shell)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if getattr(hf_config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]  # re-tied below
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model = model.to(device).eval()
    if not with_tokenizer:
        return model
    from transformers import AutoTokenizer
    return model, AutoTokenizer.from_pretrained(str(directory))


def _dtype_of(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the unquantized parameters (the floating tensors that are not SDQ metadata)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not name.endswith((".scale", ".mean")):
            return t.dtype
    return torch.float32
