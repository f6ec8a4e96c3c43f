"""Packed weights and saved folders in the layout sdq wrote before trit5 (folder version 1:
ternary layers as `sign` + `nonzero` bitplanes, format sdq-bitplanes-v1), built from current
ones, for the tests that prove such files still load. Written here, never committed as binaries."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdq.weight import PACKED_FORMAT, QuantizedWeight


def legacy_state_dict(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """qw's state dict as sdq-bitplanes-v1 wrote it (ternary: sign and nonzero planes)."""
    sd = dict(qw.state_dict())
    meta = json.loads(bytes(sd["meta"].tolist()).decode())
    meta["format"] = PACKED_FORMAT
    sd["meta"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    if qw.config.levels == "ternary":
        del sd["trits"], sd["trit_signs"]
        sd["sign"], sd["nonzero"] = qw.bitplanes()
    return sd


def write_legacy_folder(saved: Path, folder: Path) -> Path:
    """A copy of the sdq-v1 folder `saved` as a version-1 folder: every ternary layer as
    bitplanes, no quantization_config.format_version, the SHA-256 recomputed."""
    shutil.copytree(saved, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    for name in q["modules"]:
        keys = [k for k in tensors if k.rpartition(".")[0] == name and not k.endswith(".bias")]
        packed = {k.rpartition(".")[2]: tensors.pop(k) for k in keys}
        qw = QuantizedWeight.from_state_dict(packed, name=name)
        tensors.update({f"{name}.{k}": v.contiguous()
                        for k, v in legacy_state_dict(qw).items()})
    save_file(tensors, str(folder / "model.safetensors"))
    del q["format_version"]
    q["sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))
    return folder
