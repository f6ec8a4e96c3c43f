"""transformers' side of an sdq folder: its quantization config and HfQuantizer (transformers 5.x).

`AutoModelForCausalLM.from_pretrained(folder)` (after `import sdq`) builds the model on the meta
device, then calls the quantizer, which
  1. checks config.json's quantization_config and the weights files as sdq.load does
     (sdq.io.check_weight_files: model.safetensors and its SHA-256 for sdq-v1; for sdq-v2 the
     index, each shard's SHA-256 and that it holds the tensors the index maps to it);
  2. reads only the packed weights' metadata tensors and puts an empty SDQLinear / WGMLinear (and
     SDQExperts) shell, on the CPU, in the place of every quantized module, so that the model's
     state-dict keys are the file's;
transformers then loads every tensor by name into those shells (the packed ones keep their dtypes:
transformers casts a tensor to the dtype of the slot it fills), and the quantizer finally
  3. checks each packed weight as loaded, like sdq.load does (format invariants, metadata against
     config.json), and rebuilds the layers' derived constants on the device they landed on.
The folder formats are sdq.save's and sdq.streaming's (docs/format.md): the same for sdq.load
and from_pretrained. save_pretrained of such a model writes them too: one model.safetensors
(sdq-v1) or, when max_shard_size splits it, transformers' shards and index (sdq-v2); it then seals
config.json with the SHA-256 of each weights file it has just written.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import types
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import io
from ..config import SDQConfig
from ..experts import rebuild_experts
from ..methods.wgm import WGMConfig
from ..nn import SDQLinear
from ..weight import PACKED_FORMAT, PACKED_FORMATS, CheckpointError, parse_meta
from ..wgm_nn import WGMLinear
from ..wgm_weight import PACKED_FORMAT as WGM_PACKED_FORMAT

QUANT_METHOD = "sdq"


class SDQQuantizationConfig(QuantizationConfigMixin):
    """config.json's quantization_config of an sdq folder, as written by sdq.save (every field
    kept as is, so that save_pretrained writes it back unchanged). sdq quantizes with
    sdq.quantize_ or `sdq quantize`, not on loading: this config only loads sdq folders."""

    def __init__(self, **fields):
        method = fields.setdefault("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method should be {QUANT_METHOD!r}, got {method!r}")
        self.__dict__.update(copy.deepcopy(fields))

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}


class SDQHfQuantizer(HfQuantizer):
    """Loads an sdq folder into SDQLinear / WGMLinear / SDQExperts modules (module doc)."""

    requires_calibration = True  # sdq folders only: quantizing on load is not what sdq does

    def validate_environment(self, *args, **kwargs):
        import transformers
        major = int(transformers.__version__.split(".")[0])
        if major < 5:
            raise ImportError(f"from_pretrained of an sdq folder needs transformers 5.x "
                              f"(installed: {transformers.__version__}); use sdq.load(folder)")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qconf = self.quantization_config.to_dict()
        files = _checked_weight_files(model, checkpoint_files, qconf)
        with torch.device("cpu"):  # real shells (the rest of the model is on meta)
            _put_shells(model, files, qconf["modules"])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        modules = io.quantized_modules(model)
        tensors = {f"{name}.{k}": t.detach().cpu() for name, m in modules.items()
                   for k, t in m.state_dict().items()}
        io._check_packed_weights(tensors, self.quantization_config.modules)  # as sdq.load
        for m in modules.values():
            if m.bias is not None:
                m.bias.requires_grad_(False)  # transformers loads a float tensor as a trainable one
            m._dense = None
            m._after_load()  # derived constants, on the device the packed tensors landed on
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False  # adapters: sdq.lora (PEFT does not know the packed layers)

    @property
    def is_compileable(self) -> bool:
        return True


def _checked_weight_files(model, checkpoint_files, qconf: dict) -> dict[Path, set[str]]:
    """The folder's weights files, checked as sdq.load checks them (io.check_weight_files), with
    the tensor names each holds. checkpoint_files is what transformers resolved (5.24 passes it:
    model.safetensors, else the files the index names); they must be the files config.json seals,
    or transformers would load tensors nothing checked (e.g. a stray model.safetensors, which it
    prefers to an index)."""
    if checkpoint_files:
        directory = Path(checkpoint_files[0]).parent
    else:  # the folder of config.json, resolved as transformers resolves a weights file
        from transformers.utils import cached_file
        directory = Path(cached_file(model.config.name_or_path, "config.json")).parent
    if qconf.get("format") not in io.FORMATS:
        raise CheckpointError(f"{directory / 'config.json'} is not an sdq "
                              f"({' or '.join(io.FORMATS)}) checkpoint: quantization_config "
                              f"format is {qconf.get('format')!r}")
    io._check_quantization_config(qconf, directory)
    files = io.check_weight_files(directory, qconf)
    if checkpoint_files and {Path(f) for f in checkpoint_files} != set(files):
        loading = sorted(Path(f).name for f in checkpoint_files)
        raise CheckpointError(f"transformers would load {loading} from {directory}, but "
                              f"config.json's quantization_config ({qconf['format']}) seals "
                              f"{sorted(f.name for f in files)}")
    return files


def _put_shells(model, files: dict[Path, set[str]], modules: dict[str, dict]) -> None:
    """Put an empty packed layer, shaped by the files' metadata tensors, in place of every module
    config.json names (SDQExperts first: their packed children go inside)."""
    with ExitStack() as stack:
        opened = {path: stack.enter_context(safe_open(str(path), framework="pt"))
                  for path in files}
        where = {k: opened[path] for path, names in files.items() for k in names}
        keys = set(where)
        experts = {k: where[k].get_tensor(k) for k in keys if k.endswith(".experts_meta")}
        metas = {name: where[f"{name}.meta"].get_tensor(f"{name}.meta") for name in modules
                 if f"{name}.meta" in keys}
    by_module: dict[str, set[str]] = {}
    for key in keys:
        by_module.setdefault(key.rpartition(".")[0], set()).add(key)
    rebuild_experts(model, experts)
    for name, info in modules.items():
        if name not in metas:
            raise CheckpointError(f"corrupt checkpoint: no packed weight for {name} in "
                                  f"{sorted(f.name for f in files)}")
        shell = _shell(name, info, metas[name], f"{name}.bias" in keys)
        want = {f"{name}.{k}" for k in shell.state_dict()}
        have = by_module.get(name, set())
        if want != have:
            raise CheckpointError(f"corrupt packed weight {name}: the checkpoint has tensors "
                                  f"{sorted(have)}, a layer with its metadata has {sorted(want)}")
        parent, _, child = name.rpartition(".")
        setattr(io._slot_parent(model, name, shell), child, shell)


def _shell(name: str, info: dict, meta: torch.Tensor, bias: bool):
    """An SDQLinear or WGMLinear of the metadata's shapes, zeros until transformers fills it; its
    meta buffer is the file's own (same length, whatever its JSON spacing)."""
    wgm = info.get("method") == "wgm"
    layer_class = WGMLinear if wgm else SDQLinear
    *_, config, fmt = parse_meta(meta, f"packed weight {name}",
                                 WGM_PACKED_FORMAT if wgm else PACKED_FORMATS,
                                 WGMConfig if wgm else SDQConfig, with_format=True)
    if not wgm and config.levels == "ternary" and fmt == PACKED_FORMAT:
        raise CheckpointError(f"packed weight {name} is a ternary layer stored as bitplanes (a "
                              f"folder written before trit5): from_pretrained reads only trit5; "
                              f"sdq.load reads it (converting), and sdq.save writes it anew")
    shell = layer_class.empty_like(bytes(meta.tolist()).decode(), bias)
    shell.meta = meta.clone()
    return shell


def _save_pretrained(model, save_directory, *args, **kwargs):
    """PreTrainedModel.save_pretrained, then config.json sealed with the SHA-256 of the weights
    it just wrote (transformers writes config.json before the weights). An earlier save's
    model.safetensors or index is removed first: the new save writes one of them, and a stale
    model.safetensors beside a new index is what transformers would load."""
    folder = Path(save_directory)
    if kwargs.get("is_main_process", True):
        for stale in (io.WEIGHTS, io.INDEX):
            (folder / stale).unlink(missing_ok=True)
    out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        _seal(folder)
    return out


def _seal(folder: Path) -> None:
    """Seal config.json as sdq-v1 (one model.safetensors) or sdq-v2 (transformers' shards, listed
    by its index), whichever save_pretrained wrote."""
    sharded = (folder / io.INDEX).exists()
    if not sharded and not (folder / io.WEIGHTS).exists():
        raise CheckpointError(f"save_pretrained wrote neither {io.WEIGHTS} nor {io.INDEX} into "
                              f"{folder} (a variant?): sdq cannot seal it")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    qconf = {k: v for k, v in config.pop("quantization_config").items()
             if k not in ("format", "sha256", "shards")}
    qconf["format_version"] = io.FOLDER_VERSION  # what the layers now hold, whatever was read
    if sharded:
        index = json.loads((folder / io.INDEX).read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
        io.write_sharded_config(folder, config, qconf, shards)  # also rewrites the index, same map
        return
    config["quantization_config"] = {**qconf, "format": io.FORMAT,
                                     "sha256": io._sha256(folder / io.WEIGHTS)}
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder / "config.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
