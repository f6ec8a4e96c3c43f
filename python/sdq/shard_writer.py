"""A safetensors writer that holds one tensor at a time.

safetensors' save_file serialises every tensor to bytes before writing, so writing N bytes of
tensors needs N more bytes of memory; streaming quantization writes the embeddings and head this
way and would double them. Here the header is written from the tensors' dtypes and shapes, then
each tensor's bytes straight from its memory, fetched only when its turn comes (`get`). The file
is the safetensors format (https://github.com/huggingface/safetensors#format): an 8-byte
little-endian header size, the JSON header padded with spaces to a multiple of 8, the data.
"""
from __future__ import annotations

import json
from typing import Callable

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      get: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors named by `specs` (name -> (dtype, shape)) to `path`; `get(name)` gives each
    tensor when it is written, which must have that dtype and shape. Larger items first, as
    save_file orders them, so every tensor starts aligned to its item size."""
    order = sorted(specs, key=lambda n: (-specs[n][0].itemsize, n))
    header, offset = {}, 0
    for name in order:
        dtype, shape = specs[name]
        if dtype not in DTYPES:
            raise TypeError(f"cannot write {name}: dtype {dtype} is not supported")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            t = get(name)
            if t.dtype != specs[name][0] or tuple(t.shape) != tuple(specs[name][1]):
                raise ValueError(f"{name}: expected {specs[name][0]} {tuple(specs[name][1])}, "
                                 f"got {t.dtype} {tuple(t.shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
