"""Where calibrated quantization computes, and the per-block transforms on any torch device.

The calibrated pipeline (capture, Hessians, code selection, GPTQ compensation, refits) works on
the tensors of the layer being quantized, on whatever device that layer is: the CPU goes through
the core's multithreaded FWHT (sdq.blocks), other devices through the same transform written as a
matmul with the Hadamard matrix (the two agree to float32 rounding).
"""
from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from . import blocks


def resolve(device: str | torch.device | None) -> torch.device:
    """`device`, or by default the first GPU when one is visible, else the CPU. A CUDA device
    that is not available is a clear error, not a crash deep inside the run."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"not a torch device: {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is visible to torch "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    if dev.type == "meta":
        raise ValueError("the meta device holds no values: quantization needs real tensors")
    return dev


@functools.lru_cache(maxsize=16)
def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix H / sqrt(n), float32 [n, n] on `device`."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=torch.float32)


def rotate(x: torch.Tensor, signs: np.ndarray | None, inverse: bool = False) -> torch.Tensor:
    """Rows of x [rows, n] (n a power of two) rotated like blocks.rotate, float32 on x's device:
    forward x S H / sqrt(n), inverse x H S / sqrt(n) (S = diag(signs))."""
    if x.device.type == "cpu":
        return blocks.rotate(x, signs, inverse)
    return hadamard_rotate(x, signs, inverse)


def hadamard_rotate(x: torch.Tensor, signs: np.ndarray | None, inverse: bool = False
                    ) -> torch.Tensor:
    """rotate() as a matmul with the Hadamard matrix, on x's device (what non-CPU devices use)."""
    n = x.shape[1]
    h = _hadamard(n, x.device)
    s = None if signs is None else torch.as_tensor(signs[:n], dtype=torch.float32,
                                                   device=x.device)
    x = x.float()
    if inverse:
        y = x @ h
        return y if s is None else y * s
    return (x if s is None else x * s) @ h


@functools.lru_cache(maxsize=64)
def resampler(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """blocks.resampler (float64 [n_out, n_in]) on `device`, cached per device."""
    return blocks.resampler(n_in, n_out).to(device)


_caller_threads: int | None = None  # torch's threads outside single_thread_on_cpu


@contextlib.contextmanager
def single_thread_on_cpu(dev: torch.device):
    """One torch intra-op thread inside the block, on the CPU only. Code selection is thousands of
    small ops per block ([rows, <=256] updates), where the threads' fork and join cost more than
    they save: measured 2-30x slower per block with 2 threads on 2 busy cores, never faster.
    The core's own loops inside still use the caller's threads (caller_threads())."""
    global _caller_threads
    if dev.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    outer, _caller_threads = _caller_threads, threads if _caller_threads is None else _caller_threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _caller_threads = outer


def caller_threads() -> int:
    """The threads the caller gave torch (torch.get_num_threads() outside single_thread_on_cpu):
    what a core routine called inside such a block should use."""
    return _caller_threads or torch.get_num_threads()
