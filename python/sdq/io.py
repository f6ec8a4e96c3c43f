"""save / load: a Hugging Face-style folder holding the packed model.

Layout of the folder:
  config.json        the model's config with a `quantization_config` (method "sdq", every
                     SDQConfig field, the per-linear OSR, the quantized module names, and the
                     SHA-256 of model.safetensors; a WGM model adds `method: "wgm"`, holds a
                     WGMConfig and per-linear group counts, and packs WGMLinear modules)
  model.safetensors  packed codes (int32 words), fp16 scales and means, int8 Hadamard signs and a
                     uint8 JSON metadata tensor per SDQLinear; the other parameters (embeddings,
                     norms, an untied LM head) in their own dtype. Never dequantized weights.
  tokenizer files    when a tokenizer is given
The folder is written to a temporary sibling and renamed into place, so a crash leaves nothing
half-written; an existing folder is replaced only with overwrite=True, and only once the new one is
complete (it is kept as a backup sibling until the new one is in place).

load() checks everything before any kernel reads it (docs/format.md, "What load checks"): the
SHA-256, config.json's quantization_config, each packed weight's metadata and invariants
(QuantizedWeight.validate), and that every other tensor is the one the model expects, finite.
A file that fails raises CheckpointError (a ValueError) naming the module and the tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SDQConfig
from .methods.wgm import WGMConfig
from .nn import SDQLinear
from .weight import STATE_KEYS, CheckpointError, QuantizedWeight
from .wgm_nn import WGMLinear
from .wgm_weight import STATE_KEYS as WGM_STATE_KEYS
from .wgm_weight import WGMWeight

WEIGHTS = "model.safetensors"
FORMAT = "sdq-v1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantized_modules(model: nn.Module) -> dict[str, SDQLinear | WGMLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (SDQLinear, WGMLinear))}


def _module_entry(m: SDQLinear | WGMLinear) -> dict:
    """config.json's entry of one packed module: its OSR (SDQ) or group count (WGM), and bias."""
    if isinstance(m, WGMLinear):
        return {"method": "wgm", "groups": m.config.groups, "bias": m.bias is not None}
    return {"osr": m.config.osr, "bias": m.bias is not None}


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share storage (tied embeddings) stored once, under the
    first name: load() re-ties them."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen or t.numel() == 0:  # empty tensors (WGM G = 1 index) tie nothing
            seen.add(key)
            out[name] = t.contiguous()
    return out


def save(model: nn.Module, directory, tokenizer=None, *, overwrite: bool = False,
         extra: dict | None = None) -> Path:
    """Write `model` (quantized in place by sdq.quantize_) to `directory`; returns its path.

    With overwrite=True an existing folder is replaced only once the new one is complete: if
    anything fails, the old folder is left as it was and no temporary folder is left beside it."""
    directory = Path(directory)
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("the model has no SDQLinear modules: quantize it with sdq.quantize_ first")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder; not replacing it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_folder(tmp, model, modules, tokenizer, extra)
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _write_folder(folder: Path, model: nn.Module, modules: dict[str, SDQLinear], tokenizer,
                  extra: dict | None) -> None:
    save_file(_unique_tensors(model), str(folder / WEIGHTS))
    first = next(iter(modules.values()))
    qconf = {"quant_method": "sdq", "format": FORMAT, "config": first.config.to_dict(),
             "modules": {n: _module_entry(m) for n, m in modules.items()},
             "sha256": _sha256(folder / WEIGHTS), **(extra or {})}
    if isinstance(first, WGMLinear):
        qconf["method"] = "wgm"  # `config` is then a WGMConfig
    config = model.config.to_dict()
    config["quantization_config"] = qconf
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _move_into_place(new: Path, target: Path) -> None:
    """Rename the complete folder `new` to `target`. An existing target is renamed to a backup
    sibling first and removed only once `new` is in place (put back if that rename fails), so a
    complete folder is always at `target` or in the backup, never a half-written one."""
    if not target.exists():
        os.replace(new, target)
        return
    backup = new.with_name(new.name + ".old")
    os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException as e:
        try:
            os.replace(backup, target)
        except OSError as restore_error:
            raise OSError(f"could not move the new folder to {target} ({e}) nor the old one back: "
                          f"the old one is at {backup}") from restore_error
        raise
    shutil.rmtree(backup, ignore_errors=True)  # the new folder is in place: the save succeeded


def read_quantization_config(directory) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a saved sdq model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"corrupt {path}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"corrupt {path}: not a JSON object")
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "sdq" or q.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an sdq ({FORMAT}) checkpoint")
    return config


def _check_quantization_config(q: dict, directory: Path) -> dict:
    """config.json's quantization_config, its fields checked (the format was checked on reading)."""
    where = f"corrupt {directory / 'config.json'}: quantization_config"
    sha = q.get("sha256")
    if not (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha)):
        raise CheckpointError(f"{where}: sha256 should be 64 hex digits, got {sha!r}")
    try:
        (WGMConfig if q.get("method") == "wgm" else SDQConfig).from_dict(q.get("config"))
    except (ValueError, TypeError, AttributeError) as e:  # AttributeError: not an object
        raise CheckpointError(f"{where}: config is invalid: {e}") from e
    modules = q.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{where}: modules should name at least one quantized module")
    for name, info in modules.items():
        if not all(name.split(".")):
            raise CheckpointError(f"{where}: {name!r} is not a module name")
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: modules[{name!r}] should be an object")
        osr, bias = info.get("osr"), info.get("bias")
        if info.get("method") == "wgm":
            groups = info.get("groups")
            if isinstance(groups, bool) or not isinstance(groups, int):
                raise CheckpointError(f"{where}: modules[{name!r}].groups should be an integer, "
                                      f"got {groups!r}")
        elif isinstance(osr, bool) or not isinstance(osr, (int, float)):
            raise CheckpointError(f"{where}: modules[{name!r}].osr should be a number, got {osr!r}")
        if not isinstance(bias, bool):
            raise CheckpointError(f"{where}: modules[{name!r}].bias should be true or false, "
                                  f"got {bias!r}")
    return q


def _load_tensors(path: Path, expected_sha: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if _sha256(path) != expected_sha:
        raise CheckpointError(f"{path} is corrupt or truncated: its SHA-256 does not match "
                              f"config.json")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from e


def _check_packed_weights(tensors: dict[str, torch.Tensor], modules: dict[str, dict]) -> dict:
    """Every quantized module's packed tensors through QuantizedWeight.from_state_dict (metadata,
    shapes, invariants), and its metadata against config.json's entry (OSR, bias). Returns the
    checked packed weights by module name, which load() builds the layers from (so nothing is
    checked twice). Replaces each metadata tensor by its canonical JSON, so that the file's
    tensors match the layers' whatever the file's JSON spacing."""
    checked = {}
    for name, info in modules.items():
        wgm = info.get("method") == "wgm"
        packed = {k: tensors[f"{name}.{k}"] for k in (*(WGM_STATE_KEYS if wgm else STATE_KEYS),
                                                      "meta") if f"{name}.{k}" in tensors}
        if not packed:
            raise CheckpointError(f"corrupt checkpoint: no packed weight for {name} in {WEIGHTS}")
        qw = (WGMWeight if wgm else QuantizedWeight).from_state_dict(packed, name=name)
        if wgm and qw.config.groups != info["groups"]:
            raise CheckpointError(f"corrupt packed weight {name}: tensor meta says groups "
                                  f"{qw.config.groups}, config.json says {info['groups']!r}")
        if not wgm and qw.config.osr != info["osr"]:  # exact: both from the same float at save
            raise CheckpointError(f"corrupt packed weight {name}: tensor meta says osr "
                                  f"{qw.config.osr:g}, config.json says {info['osr']!r}")
        if (f"{name}.bias" in tensors) != info["bias"]:
            raise CheckpointError(f"corrupt packed weight {name}: config.json says bias "
                                  f"{info['bias']}, {WEIGHTS} "
                                  f"{'has' if f'{name}.bias' in tensors else 'has no'} tensor "
                                  f"{name}.bias")
        tensors[f"{name}.meta"] = qw.state_dict()["meta"]
        checked[name] = qw
    return checked


def _build_model(config_dict: dict, dtype: torch.dtype, directory: Path):
    """(hf_config, model) from config.json, random weights, built on the CPU (not on "meta") so
    non-persistent buffers such as rotary frequencies are computed exactly as the original model
    computed them."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        hf_config = AutoConfig.for_model(**config_dict)
        return hf_config, AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as e:  # config.json is data: transformers rejects bad values in many types
        raise CheckpointError(f"corrupt {directory / 'config.json'}: transformers cannot build "
                              f"the model it describes: {type(e).__name__}: {e}") from e


def _slot_parent(model: nn.Module, name: str, shell: SDQLinear | WGMLinear) -> nn.Module:
    """The parent of module `name` in the model config.json describes, after checking that the
    module there is one the shell can replace: the shells take their shapes from the packed
    metadata, so without this check a config.json that changed a layer's width (e.g. its
    number of key-value heads) would go unnoticed."""
    parent, _, child = name.rpartition(".")
    try:
        slot = getattr(model.get_submodule(parent), child)
    except AttributeError as e:
        raise CheckpointError(f"corrupt checkpoint: quantized module {name} is not in the "
                              f"model config.json describes") from e
    want = (getattr(slot, "out_features", None), getattr(slot, "in_features", None))
    got = (shell.out_features, shell.in_features)
    if want != (None, None) and want != got:  # slots without a shape: experts placeholders
        raise CheckpointError(f"corrupt checkpoint: {name} is [out, in] = {list(want)} in the "
                              f"model config.json describes, {list(got)} in its packed weight")
    if isinstance(slot, nn.Linear) and (slot.bias is None) != (shell.bias is None):
        raise CheckpointError(f"corrupt checkpoint: {name} has "
                              f"{'no ' if slot.bias is None else ''}bias in the model config.json "
                              f"describes, but config.json's quantization_config says bias "
                              f"{shell.bias is not None}")
    return model.get_submodule(parent)


def _check_tensors_fit(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The file holds exactly the tensors save() writes for this model (tied ones once), each
    with the dtype and shape the model expects, the floating ones finite."""
    expected = _unique_tensors(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint does not match the model config.json describes: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")
    for key, want in expected.items():
        t = tensors[key]
        if t.dtype != want.dtype or t.shape != want.shape:
            raise CheckpointError(f"corrupt checkpoint: tensor {key} should be {want.dtype} "
                                  f"{tuple(want.shape)}, got {t.dtype} {tuple(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"corrupt checkpoint: tensor {key} has non-finite values")


def load(directory, *, device: str | torch.device = "cpu", with_tokenizer: bool = False):
    """Rebuild a model saved by `save`; its SDQLinear modules compute from the packed codes."""
    directory = Path(directory)
    config_dict = read_quantization_config(directory)
    qconf = _check_quantization_config(config_dict.pop("quantization_config"), directory)
    tensors = _load_tensors(directory / WEIGHTS, qconf["sha256"])
    packed = _check_packed_weights(tensors, qconf["modules"])
    hf_config, model = _build_model(config_dict, _dtype_of(tensors), directory)
    from .experts import rebuild_experts
    rebuild_experts(model, tensors)  # SDQExperts shells first: their packed children follow
    for name, qw in packed.items():
        layer_class = WGMLinear if isinstance(qw, WGMWeight) else SDQLinear
        layer = layer_class.from_quantized(qw, tensors.get(f"{name}.bias"))
        parent, _, child = name.rpartition(".")
        setattr(_slot_parent(model, name, layer), child, layer)
    _check_tensors_fit(model, tensors)
    # The packed layers already hold their checked tensors: load the rest into the model.
    held = {f"{name}.{k}" for name, qw in packed.items() for k in qw.state_dict()}
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in tensors.items() if k not in held}, strict=False)
    missing = [k for k in missing if k not in held]
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
    """The dtype of the unquantized parameters (the floating tensors that are not SDQ metadata):
    the one that holds most of their elements, so that a single tensor of another dtype is the
    one reported as wrong, not all the others."""
    elements: dict[torch.dtype, int] = {}
    for name, t in tensors.items():
        if t.is_floating_point() and not name.endswith((".scale", ".mean")):
            elements[t.dtype] = elements.get(t.dtype, 0) + t.numel()
    return max(elements, key=elements.get) if elements else torch.float32
