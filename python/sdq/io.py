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
from .weight import PACKED_FORMAT, READ_KEYS, CheckpointError, QuantizedWeight
from .wgm_nn import WGMLinear
from .wgm_weight import STATE_KEYS as WGM_STATE_KEYS
from .wgm_weight import WGMWeight

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # Hugging Face's shard index: tensor name -> file
FORMAT = "sdq-v1"  # one model.safetensors, its SHA-256 in quantization_config.sha256
SHARDED_FORMAT = "sdq-v2"  # shards listed by INDEX, each one's SHA-256 in quantization_config.shards
FORMATS = (FORMAT, SHARDED_FORMAT)
# quantization_config.format_version: 1 (absent; before trit5): ternary layers stored as bitplanes;
# 2: ternary layers stored as trit5 (docs/format.md). Both are read, 2 is written.
FOLDER_VERSION = 2
READ_VERSIONS = (1, 2)


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
    return unique_tensors(model.state_dict())


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a state dict or a part of one) with tensors that share storage kept once, under
    the first name, each made contiguous."""
    seen, out = set(), {}
    for name, t in state.items():
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


def quantization_entry(config, modules: dict[str, dict], extra: dict | None = None) -> dict:
    """config.json's quantization_config but for the format and the checksums: the method's
    config, each packed module's entry (_module_entry), and `extra` (e.g. the CLI's summary)."""
    entry = {"quant_method": "sdq", "format_version": FOLDER_VERSION,
             "config": config.to_dict(), "modules": modules, **(extra or {})}
    if isinstance(config, WGMConfig):
        entry["method"] = "wgm"  # `config` is then a WGMConfig
    return entry


def _write_folder(folder: Path, model: nn.Module, modules: dict[str, SDQLinear], tokenizer,
                  extra: dict | None) -> None:
    tensors = _unique_tensors(model)
    save_file(tensors, str(folder / WEIGHTS))
    first = next(iter(modules.values()))
    qconf = {"format": FORMAT, "sha256": _sha256(folder / WEIGHTS),
             **quantization_entry(first.config, {n: _module_entry(m) for n, m in modules.items()},
                                  extra)}
    config = model.config.to_dict()
    # the stored dtype, which from_pretrained's dtype="auto" reads (sdq.load uses the same)
    config["dtype"] = str(_dtype_of(tensors)).removeprefix("torch.")
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


# --- sharded folders: written shard by shard (sdq.streaming), read by load() -----------------


def write_shard(path: Path, tensors: dict[str, torch.Tensor],
                metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file to a temporary sibling, then rename it onto `path`: `path` is
    absent or complete even if the process is killed. (No fsync: this guards against a killed
    process, not a power cut.)"""
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    write_shard_lazily(path, specs, tensors.__getitem__, metadata)


def write_shard_lazily(path: Path, specs: dict, get, metadata: dict[str, str] | None = None):
    """write_shard for tensors fetched one at a time: `specs` name -> (dtype, shape), `get(name)`
    the tensor (sdq.shard_writer), so only one is in memory at a time."""
    from .data import atomic_write
    from .shard_writer import write_safetensors
    atomic_write(Path(path), lambda tmp: write_safetensors(tmp, specs, get, metadata))


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets; and
    `__metadata__`), read without touching the tensor data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt {path}: its safetensors header is not a JSON object")
    return header


def write_sharded_config(folder: Path, config: dict, qconf: dict, shards: list[str]) -> None:
    """Complete a folder whose shards are written: INDEX (every tensor -> its shard, and the
    total size of the tensors, as Hugging Face writes it) and config.json, whose
    quantization_config is `qconf` with format sdq-v2 and each shard's SHA-256."""
    weight_map, total = {}, 0
    for shard in shards:
        for key, info in read_header(folder / shard).items():
            if key != "__metadata__":
                weight_map[key] = shard
                total += info["data_offsets"][1] - info["data_offsets"][0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    qconf = {**qconf, "quant_method": "sdq", "format": SHARDED_FORMAT,
             "shards": {shard: _sha256(folder / shard) for shard in shards}}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qconf},
                                                   indent=2, sort_keys=True))


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
    if not isinstance(q, dict) or q.get("quant_method") != "sdq" or q.get("format") not in FORMATS:
        raise CheckpointError(f"{path} is not an sdq ({' or '.join(FORMATS)}) checkpoint")
    return config


def _check_quantization_config(q: dict, directory: Path) -> dict:
    """config.json's quantization_config, its fields checked (the format was checked on reading)."""
    where = f"corrupt {directory / 'config.json'}: quantization_config"
    version = folder_version(q)
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise CheckpointError(f"{where}: format_version {version!r} is not one this sdq reads "
                              f"{list(READ_VERSIONS)} (written by a newer sdq?)")
    if q.get("format") == SHARDED_FORMAT:
        _check_shard_list(q.get("shards"), where)
    else:
        _check_sha(q.get("sha256"), f"{where}: sha256")
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


def folder_version(q: dict):
    """quantization_config.format_version: 1 when absent (folders written before trit5)."""
    return q.get("format_version", 1)


def _check_sha(sha, where: str) -> None:
    if not (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha)):
        raise CheckpointError(f"{where} should be 64 hex digits, got {sha!r}")


def _check_shard_list(shards, where: str) -> None:
    """quantization_config.shards: {file name in the folder: its SHA-256}, at least one."""
    if not isinstance(shards, dict) or not shards:
        raise CheckpointError(f"{where}: shards should map each weights file to its SHA-256")
    for name, sha in shards.items():
        if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
            raise CheckpointError(f"{where}: shard {name!r} is not a .safetensors file name")
        _check_sha(sha, f"{where}: shards[{name!r}]")


def _read_index(directory: Path, shards: dict[str, str]) -> dict[str, str]:
    """The weight_map of INDEX (tensor name -> shard), checked to name exactly the shards that
    config.json lists."""
    path = directory / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: a sharded sdq folder needs its index") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"corrupt {path}: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"corrupt {path}: weight_map should map tensor names to files")
    if set(weight_map.values()) != set(shards):
        raise CheckpointError(f"corrupt {path}: its files {sorted(set(weight_map.values()))[:5]} "
                              f"are not the shards config.json lists {sorted(shards)[:5]}")
    return weight_map


def _read_weights(directory: Path, q: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, once check_weight_files has checked the files."""
    tensors = {}
    for path in check_weight_files(directory, q):
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is corrupt or truncated: {e}") from e
    return tensors


def check_weight_files(directory, q: dict) -> dict[Path, set[str]]:
    """The weights files of a saved folder (q: its checked quantization_config), each checked
    against its SHA-256, with the tensor names its header lists. A sharded folder's index must
    name exactly the shards config.json lists, and each shard hold exactly the tensors the index
    maps to it. Reads headers only: sdq.load and from_pretrained (sdq.hf) both check with this."""
    directory = Path(directory)
    sharded = q.get("format") == SHARDED_FORMAT
    weight_map = _read_index(directory, q["shards"]) if sharded else {}
    shas = q["shards"].values() if sharded else [q["sha256"]]
    files = {}
    for path, sha in zip(weight_files(directory, q), shas):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        if _sha256(path) != sha:
            raise CheckpointError(f"{path} is corrupt or truncated: its SHA-256 does not match "
                                  f"config.json")
        try:
            names = set(read_header(path)) - {"__metadata__"}
        except (ValueError, OSError) as e:  # JSON or UTF-8 errors are ValueErrors
            raise CheckpointError(f"{path} is corrupt or truncated: {e}") from e
        want = {k for k, f in weight_map.items() if f == path.name}
        if sharded and names != want:
            raise CheckpointError(f"corrupt checkpoint: {path.name} holds "
                                  f"{sorted(names - want)[:5]} that {INDEX} does not map to it, "
                                  f"lacks {sorted(want - names)[:5]}")
        files[path] = names
    return files


def weight_files(directory, q: dict) -> list[Path]:
    """The weights files of a saved folder (q: its quantization_config): model.safetensors, or
    its shards."""
    directory = Path(directory)
    if q.get("format") == SHARDED_FORMAT:
        return [directory / shard for shard in q["shards"]]
    return [directory / WEIGHTS]


def _check_packed_weights(tensors: dict[str, torch.Tensor], modules: dict[str, dict],
                          version: int = FOLDER_VERSION) -> dict:
    """Every quantized module's packed tensors through QuantizedWeight.from_state_dict (metadata,
    shapes, invariants), and its metadata against config.json's entry (OSR, bias) and the folder
    version (ternary bitplanes only in version 1). Returns the checked packed weights by module
    name, which load() builds the layers from (so nothing is checked twice). Replaces each
    module's packed tensors by the checked weight's (canonical metadata JSON, whatever the file's
    spacing; ternary bitplanes of a version-1 folder converted to trit5), so that they match the
    layers'."""
    checked = {}
    for name, info in modules.items():
        wgm = info.get("method") == "wgm"
        packed = {k: tensors[f"{name}.{k}"] for k in (*(WGM_STATE_KEYS if wgm else READ_KEYS),
                                                      "meta") if f"{name}.{k}" in tensors}
        if not packed:
            raise CheckpointError(f"corrupt checkpoint: no packed weight for {name} in its "
                                  f"weights files")
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
        if not wgm and version > 1 and "nonzero" in packed:
            raise CheckpointError(f"corrupt packed weight {name}: a version {version} folder "
                                  f"stores ternary layers as trit5, not {PACKED_FORMAT} bitplanes")
        for k in packed:
            del tensors[f"{name}.{k}"]
        tensors.update({f"{name}.{k}": t for k, t in qw.state_dict().items()})
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
    tensors = _read_weights(directory, qconf)
    packed = _check_packed_weights(tensors, qconf["modules"], folder_version(qconf))
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
