"""The CPU int8-table GEMMs as torch.library custom ops, for paths that go through the op
dispatcher (torch.compile; eager calls use the layer's LinearPlan, sdq.ops._eager_cpu):

  sdq::lut_pack_binary(sign, in_features, block_size, osr) -> lut_codes uint8 [bytes]
  sdq::lut_gemm_binary(lut_codes, scale, mean, xt, xsum, in_features, block_size, osr) -> y
  sdq::trit5_gemm(trits, trit_signs, scale, mean, xt, xsum, in_features, block_size, osr) -> y

Same contract as sdq::addonly_gemm (xt, xsum from sdq::activation_transform; fp16 scale and mean;
y float32 [batch, out]) but the activations are rounded to int8 tables (cpp/include/sdq/
lut_gemm.h, trit5.h). CPU only, inference only (no autograd): sdq.ops.sdq_linear calls them only
for CPU float32 activations that need no gradient, and the exact ops otherwise.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from . import blocks, trit5
from ._native import core

TILE = 32  # rows per tile of the binary repack (kLutTileRows)


def lut_bytes(out_features: int, in_features: int, block_size: int, osr: float) -> int:
    """Bytes of a binary layer's lut_codes: tiles of 32 rows of the sign bitplanes."""
    words = blocks.packed_shape(in_features, block_size, osr)[0] // 32
    return -(-out_features // TILE) * TILE * 4 * words


@torch.library.custom_op("sdq::lut_pack_binary", mutates_args=())
def lut_pack_binary(sign: Tensor, in_features: int, block_size: int, osr: float) -> Tensor:
    if sign.device.type != "cpu":
        raise NotImplementedError("sdq::lut_pack_binary: the int8-table kernels are CPU only")
    words = np.ascontiguousarray(sign.detach().numpy()).view(np.uint32)
    return torch.from_numpy(core().lut_pack_binary(words, in_features, block_size, osr))


@lut_pack_binary.register_fake
def _(sign, in_features, block_size, osr):
    n = lut_bytes(sign.shape[0], in_features, block_size, osr)
    return sign.new_empty(n, dtype=torch.uint8)


@functools.lru_cache(maxsize=1024)
def _expected(op: str, out: int, batch: int, in_features: int, block_size: int,
              osr: float) -> dict:
    """name -> (shape, dtype) of every tensor an op reads (cached: a decode step calls the ops
    once per layer with the same few geometries)."""
    cols, nb = blocks.packed_shape(in_features, block_size, osr)
    want = {"scale": ((out, nb), torch.float16), "mean": ((out, nb), torch.float16),
            "xt": ((batch, cols), torch.float32), "xsum": ((batch, nb), torch.float32)}
    if op == "trit5_gemm":
        trits_shape, signs_shape = trit5.shapes(out, in_features, block_size, osr)
        want.update(trits=(trits_shape, torch.uint8), trit_signs=(signs_shape, torch.int32))
    else:
        want["lut_codes"] = ((lut_bytes(out, in_features, block_size, osr),), torch.uint8)
    return want


def _check(op: str, in_features: int, block_size: int, osr: float, **tensors: Tensor) -> None:
    """The core reads raw pointers: dtypes, devices and shapes are checked here."""
    want = _expected(op, tensors["scale"].shape[0], tensors["xt"].shape[0], in_features,
                     block_size, osr)
    for name, t in tensors.items():
        shape, dtype = want[name]
        if not t.is_cpu:
            raise NotImplementedError(f"sdq::{op}: CPU only, {name} is on {t.device}")
        if t.dtype != dtype or t.shape != shape:
            raise ValueError(f"sdq::{op}: {name} must be {dtype} {tuple(shape)}, got "
                             f"{t.dtype} {tuple(t.shape)}")


@torch.library.custom_op("sdq::lut_gemm_binary", mutates_args=())
def lut_gemm_binary(lut_codes: Tensor, scale: Tensor, mean: Tensor, xt: Tensor, xsum: Tensor,
                    in_features: int, block_size: int, osr: float) -> Tensor:
    out = scale.shape[0]
    _check("lut_gemm_binary", in_features, block_size, osr, lut_codes=lut_codes, scale=scale,
           mean=mean, xt=xt, xsum=xsum)
    lut_codes, scale, mean = lut_codes.contiguous(), scale.contiguous(), mean.contiguous()
    xt, xsum = xt.contiguous(), xsum.contiguous()
    y = xt.new_empty(xt.shape[0], out)
    core().lut_gemm_binary_ptr(lut_codes.data_ptr(), scale.data_ptr(), mean.data_ptr(),
                               xt.data_ptr(), xsum.data_ptr(), y.data_ptr(), in_features,
                               block_size, osr, out, xt.shape[0], torch.get_num_threads())
    return y


@torch.library.custom_op("sdq::trit5_gemm", mutates_args=())
def trit5_gemm(trits: Tensor, trit_signs: Tensor, scale: Tensor, mean: Tensor, xt: Tensor,
               xsum: Tensor, in_features: int, block_size: int, osr: float) -> Tensor:
    out = scale.shape[0]
    _check("trit5_gemm", in_features, block_size, osr, trits=trits, trit_signs=trit_signs,
           scale=scale, mean=mean, xt=xt, xsum=xsum)
    trits, trit_signs = trits.contiguous(), trit_signs.contiguous()
    scale, mean, xt, xsum = scale.contiguous(), mean.contiguous(), xt.contiguous(), \
        xsum.contiguous()
    y = xt.new_empty(xt.shape[0], out)
    core().trit5_gemm_ptr(trits.data_ptr(), trit_signs.data_ptr(), scale.data_ptr(),
                          mean.data_ptr(), xt.data_ptr(), xsum.data_ptr(), y.data_ptr(),
                          in_features, block_size, osr, out, xt.shape[0],
                          torch.get_num_threads())
    return y


@lut_gemm_binary.register_fake
def _(lut_codes, scale, mean, xt, xsum, in_features, block_size, osr):
    return xt.new_empty(xt.shape[0], scale.shape[0], dtype=torch.float32)


@trit5_gemm.register_fake
def _(trits, trit_signs, scale, mean, xt, xsum, in_features, block_size, osr):
    return xt.new_empty(xt.shape[0], scale.shape[0], dtype=torch.float32)
