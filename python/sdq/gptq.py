"""GPTQ error compensation: one engine for the GPTQ baseline and for calibrated SDQ.

With the layer-input Hessian H = 2/n * sum(x x^T), quantizing the input columns in order and
pushing each column's error onto the columns not yet quantized (weighted by the upper Cholesky
factor of H^-1) greedily reduces the layer's output error ||(W - W_hat) X||^2
(Frantar et al., GPTQ, arXiv 2210.17323). The engine never decides how weights are rounded:
callers pass a callback, so a uniform grid and a Sigma-Delta modulator share one propagation.
A callback that also needs the codes (to pack them) can collect them in a closure.

The min-max uniform grid lives here too, because both RTN (sdq.methods.baselines) and the
GPTQ baseline must use the very same grid for their comparison to be fair.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .calibration_warnings import CalibrationNotes
from .validate import check_weight

__all__ = [
    "check_bits", "check_positive_int", "uniform_grid", "uniform_round", "dead_blocks",
    "damped_inverse_cholesky", "prepare_hessian", "gptq_blockwise", "gptq_columnwise",
    "gptq_quantize",
]

SUPPORTED_BITS = (2, 3, 4, 8)
# The largest finite fp16; scales and offsets are stored in fp16, so they must fit.
_FP16_MAX = 65504.0
# The smallest positive fp16 (subnormal): a scale that rounds below it would divide by zero.
_FP16_TINY = 2.0 ** -24


# ---------------------------------------------------------------------------- validation
def check_bits(bits: Any) -> None:
    """Raise ValueError unless `bits` is one of the supported uniform bit widths."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def check_positive_int(value: Any, name: str) -> None:
    """Raise ValueError unless `value` is an int >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------- uniform grid
def uniform_grid(w: Tensor, bits: int, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Min-max grid of each row of `w` [rows, g]: returns (scale, offset), each [rows, 1] float32.

    The grid is offset + k * scale, k = 0 .. 2^bits - 1. Asymmetric (the default) spans
    [min, max] of the row: the zero-point is kept as a float offset (the row minimum) rather than
    an integer, so both ends of the range lie on the grid; scale and offset are rounded to fp16
    because that is how they are stored (the "+32 / group_size" in the all-in bit count).
    Symmetric spans [-m, m], m = max|w| (GPTQ's sym=True): the zero-point is the fixed code
    2^(bits-1), so only the fp16 scale is stored ("+16 / group_size"). A constant (asymmetric) or
    all-zero (symmetric) row gets scale 1: every weight then takes one code.
    """
    maxq = 2 ** bits - 1
    lo = w.amin(dim=1, keepdim=True).float()
    hi = w.amax(dim=1, keepdim=True).float()
    if bool((lo < -_FP16_MAX).any() or (hi > _FP16_MAX).any()):
        raise ValueError(f"weights exceed the fp16 range (+-{_FP16_MAX}) of the stored offset")
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.half().float().clamp_min(_FP16_TINY)
    if symmetric:  # the offset is implied by the scale: exact in float32, nothing to store
        return scale, -(2 ** (bits - 1)) * scale
    return scale, lo.half().float()


def uniform_round(w: Tensor, scale: Tensor, offset: Tensor, bits: int) -> Tensor:
    """Round `w` to the grid offset + k * scale (k clipped to 0 .. 2^bits - 1); float32 result.

    `scale` and `offset` broadcast against `w` (e.g. [rows, 1] for a [rows, g] block).
    """
    codes = torch.round((w.float() - offset) / scale).clamp_(0, 2 ** bits - 1)
    return codes * scale + offset


# ---------------------------------------------------------------------------- Hessian
def _check_hessian(H: Any, n_in: int) -> None:
    if not isinstance(H, Tensor) or not H.is_floating_point():
        raise TypeError(f"H must be a float torch.Tensor, got {type(H).__name__}")
    if tuple(H.shape) != (n_in, n_in):
        raise ValueError(f"H must have shape ({n_in}, {n_in}) to match W, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H has NaN or Inf entries")
    if bool((torch.diagonal(H) < 0).any()):
        raise ValueError("H has negative diagonal entries: it is not a Gram matrix 2/n X X^T")


def _upper_cholesky_of_inverse(H: Tensor) -> Tensor | None:
    """Upper U with U^T U = H^-1, or None when H is not (numerically) positive definite."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U


# Damping grows tenfold per try until the damping term is this many times H's largest entry:
# H + damp I is then the identity to float32's eyes, and positive definite for any symmetric H of
# fewer than this many columns (Gershgorin), so the search always ends with a factor.
_DAMP_TO_IDENTITY = 1e8


def _damping_schedule(percdamp: float, largest_over_mean_diag: float) -> Iterator[float]:
    """percdamp, then tenfold steps (at least 0.01: GPTQ's default) up to 'effectively identity'."""
    damp = percdamp
    yield damp
    while damp < _DAMP_TO_IDENTITY * largest_over_mean_diag:
        damp = max(damp * 10, 0.01)
        yield damp


def damped_inverse_cholesky(H: Tensor, percdamp: float) -> tuple[Tensor | None, float]:
    """(U, damp): upper U with U^T U = (H + damp * mean(diag H) I)^-1, in H's dtype (use float64).

    damp is the first of percdamp, then tenfold increases (at least 0.01), for which both
    Cholesky factorisations succeed; a rank-deficient H (few tokens, MoE experts) needs only
    percdamp > 0, a badly conditioned one may need more. Returns (None, last damp tried) when H has
    no positive mean diagonal or nothing factorises before the damping dwarfs H (non-finite H).
    """
    mean_diag = float(torch.diagonal(H).mean())
    if not (math.isfinite(mean_diag) and mean_diag > 0):
        return None, percdamp
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    largest = max(float(H.max()), -float(H.min()))  # max |H| without an [in, in] temporary
    damp = percdamp
    for damp in _damping_schedule(percdamp, largest / mean_diag):
        U = _upper_cholesky_of_inverse(H + (damp * mean_diag) * eye)
        if U is not None:
            return U, damp
    return None, damp


def _reject_non_gram(H: Tensor) -> None:
    """ValueError if some |H[i, j]| > sqrt(H[i, i] H[j, j]): no Gram matrix X^T X has that, and no
    damping should paper over it (checked only when the damping had to grow; rows in chunks)."""
    d = torch.diagonal(H)
    for r in range(0, H.shape[0], 1024):
        rows = H[r: r + 1024]
        bound = d[r: r + 1024, None] * d[None, :]
        bad = rows.square() > bound * (1 + 1e-2) + 1e-300  # 1%: far beyond float rounding
        if bool(bad.any()):
            i, j = (int(k) for k in bad.nonzero()[0])
            raise ValueError(f"H is not positive definite: |H[{r + i}, {j}]| exceeds "
                             f"sqrt(H[{r + i}, {r + i}] * H[{j}, {j}]), so it is not a Gram matrix "
                             "2/n X^T X: check the calibration activations")


def dead_blocks(H: Tensor, block_size: int) -> list[int]:
    """Indices of the blocks of `block_size` input columns whose inputs were all zero
    (H[i, i] == 0 for every column i of the block)."""
    dead = torch.diagonal(H) == 0
    return [b for b, start in enumerate(range(0, H.shape[0], block_size))
            if bool(dead[start: start + block_size].all())]


def _check_percdamp(percdamp: Any) -> None:
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")


def prepare_hessian(H: Tensor, W: Tensor, percdamp: float = 0.01, *,
                    block_size: int | None = None,
                    notes: CalibrationNotes | None = None) -> tuple[Tensor, Tensor]:
    """Turn the Hessian H [in, in] into GPTQ's Hinv; returns (Hinv [in, in], W [out, in]).

    Both outputs are new float32 tensors on W's device; the inputs are not modified.
    Dead input columns (H[i, i] == 0: the input is always zero there) get H[i, i] = 1 and a
    zeroed weight column (GPTQ's rule): they do not change the layer's output on the data seen,
    and zero is free to quantize. With `block_size`, a whole dead block of that many columns keeps
    its weights instead, to be quantized uncalibrated: zeroing it would erase the block for inputs
    that calibration never showed (an MoE expert that saw no token). Dead columns have no
    off-diagonal entries, so no error is propagated into or out of them.
    H is dampened by percdamp * mean(diag H) and inverted in float64 (the Cholesky factors of
    ill-conditioned Hessians lose too much in float32). If Cholesky fails, the damping grows
    tenfold until it succeeds (damped_inverse_cholesky), which is reported once in `notes`, or
    as a CalibrationWarning right away when no notes are given. An H that is no Gram matrix
    (|H[i, j]| > sqrt(H[i, i] H[j, j])) is a ValueError rather than something to damp away.
    Hinv is upper triangular with Hinv^T Hinv = (H + damp I)^-1.
    """
    check_weight(W)
    _check_hessian(H, W.shape[1])
    _check_percdamp(percdamp)
    if block_size is not None:
        check_positive_int(block_size, "block_size")
    own_notes = notes is None
    notes = CalibrationNotes() if own_notes else notes
    H = H.detach().to(device=W.device, dtype=torch.float64, copy=True)
    W = W.detach().to(dtype=torch.float32, copy=True)
    dead = torch.diagonal(H) == 0
    zeroed = dead.clone()
    for b in dead_blocks(H, block_size) if block_size is not None else ():
        zeroed[b * block_size: (b + 1) * block_size] = False
        notes.add("no calibration data (inputs always zero): quantized uncalibrated", b)
    H[dead, dead] = 1.0
    W[:, zeroed] = 0.0
    U, damp = damped_inverse_cholesky(H, percdamp)
    if U is None or damp != percdamp:
        _reject_non_gram(H)
    if U is None:  # unreachable for a finite symmetric H: the damping ends at the identity
        raise ValueError(f"H is not positive definite even with percdamp={damp:g}: "
                         "check the calibration activations")
    if damp != percdamp:
        notes.add(f"Cholesky of H failed with percdamp={percdamp:g}; succeeded with "
                  f"percdamp={damp:g}")
    if own_notes:
        notes.warn(stacklevel=2)
    return U.float(), W


# ---------------------------------------------------------------------------- engines
def _working_copy(W: Tensor, Hinv: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Validated float32 copies of W and Hinv that the engines may overwrite."""
    check_weight(W)
    check_weight(Hinv, "Hinv")
    check_positive_int(block_size, "block_size")
    n_in = W.shape[1]
    if tuple(Hinv.shape) != (n_in, n_in):
        raise ValueError(f"Hinv must have shape ({n_in}, {n_in}), got {tuple(Hinv.shape)}")
    if bool((torch.diagonal(Hinv) <= 0).any()):
        raise ValueError("Hinv must have a positive diagonal: pass prepare_hessian's output")
    W = W.detach().to(dtype=torch.float32, copy=True)
    return W, Hinv.detach().to(device=W.device, dtype=torch.float32)


def _checked_result(result: Any, shape: tuple[int, ...], what: str) -> Tensor:
    """A callback's output as float32, or ValueError: a bad callback must not poison W."""
    if not isinstance(result, Tensor) or tuple(result.shape) != shape:
        got = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        raise ValueError(f"{what} must return a tensor of shape {shape}, got {got}")
    if not bool(torch.isfinite(result).all()):
        raise ValueError(f"{what} returned NaN or Inf")
    return result.float()


def gptq_blockwise(W: Tensor, Hinv: Tensor, block_size: int,
                   quantize_block: Callable[[int, int, Tensor], Tensor]) -> Tensor:
    """Quantize W [out, in] block by block, propagating each block's error to later blocks.

    Blocks are `block_size` input columns, in order (the last may be shorter).
    `quantize_block(b, start, W_b)` gets the block index, its first column and a copy of the
    current, already compensated block [out, width]; it returns that block's reconstruction.
    Then Err = (W_b - W_hat_b) / diag(Hinv)[cols] and W[:, later] -= Err @ Hinv[cols, later]
    (method.md 1.6, step 6). No error is propagated inside a block: the block quantizer sees it
    whole. Returns the reconstruction [out, in] float32; W itself is not modified.
    """
    W, Hinv = _working_copy(W, Hinv, block_size)
    n_in = W.shape[1]
    W_hat = torch.empty_like(W)
    diag = torch.diagonal(Hinv)
    for b, start in enumerate(range(0, n_in, block_size)):
        end = min(start + block_size, n_in)
        W_b = W[:, start:end]
        W_hat_b = _checked_result(quantize_block(b, start, W_b.clone()), tuple(W_b.shape),
                                  "quantize_block")
        W_hat[:, start:end] = W_hat_b
        err = (W_b - W_hat_b) / diag[start:end]
        W[:, end:] -= err @ Hinv[start:end, end:]
    return W_hat


def gptq_columnwise(W: Tensor, Hinv: Tensor, block_size: int,
                    quantize_column: Callable[[int, Tensor, Any], Tensor],
                    group_params: Callable[[int, Tensor], Any] | None = None,
                    group_size: int | None = None) -> Tensor:
    """Classical GPTQ: quantize W [out, in] column by column with lazy batch updates.

    Inside a block of `block_size` columns each column j is quantized as
    q = quantize_column(j, w_j, params) (w_j: copy of the current column, [out]; q: [out]),
    its error err = (w_j - q) / Hinv[j, j] is pushed onto the rest of the block at once, and
    the block's errors reach later columns in one matmul after the block. The batching only
    saves memory traffic: any block_size gives the same result up to float rounding.
    If given, `group_params(start, W_group)` is called at the first column of every group of
    `group_size` columns (default: block_size) on a copy of the current, compensated weights
    of that group, so group scales see the compensation; its return value is the `params`
    passed to quantize_column (None without group_params). For the compensated weights to
    be complete at that point, one of block_size and group_size must divide the other.
    Returns the reconstruction [out, in] float32; W itself is not modified.
    """
    W, Hinv = _working_copy(W, Hinv, block_size)
    group_size = block_size if group_size is None else group_size
    check_positive_int(group_size, "group_size")
    if block_size % group_size and group_size % block_size:
        raise ValueError(f"one of block_size ({block_size}) and group_size ({group_size}) "
                         "must divide the other")
    n_out, n_in = W.shape
    W_hat = torch.empty_like(W)
    params = None
    for start in range(0, n_in, block_size):
        end = min(start + block_size, n_in)
        errs = torch.empty(n_out, end - start, dtype=W.dtype, device=W.device)
        for j in range(start, end):
            if group_params is not None and j % group_size == 0:
                params = group_params(j, W[:, j:j + group_size].clone())
            q = _checked_result(quantize_column(j, W[:, j].clone(), params), (n_out,),
                                "quantize_column")
            W_hat[:, j] = q
            err = (W[:, j] - q) / Hinv[j, j]
            W[:, j + 1:end] -= torch.outer(err, Hinv[j, j + 1:end])
            errs[:, j - start] = err
        W[:, end:] -= errs @ Hinv[start:end, end:]
    return W_hat


# ---------------------------------------------------------------------------- GPTQ baseline
def gptq_quantize(W: Tensor, H: Tensor, bits: int, group_size: int = 128,
                  percdamp: float = 0.01, *, symmetric: bool = False, act_order: bool = False,
                  name: str | None = None) -> Tensor:
    """The GPTQ baseline: W [out, in] -> dequantized W_hat [out, in] float32.

    Min-max uniform grid (uniform_grid: asymmetric, or symmetric with `symmetric`) per row and
    group of `group_size` input columns, fitted on the compensated weights at the start of each
    group. H [in, in] is 2/n * sum(x x^T) of the layer's inputs. Columns in natural order, or
    with `act_order` by decreasing H[i, i] (GPTQ's desc_act) with the groups taken in that
    permuted order, as GPTQ's reference does without static groups: group g holds the g-th
    `group_size` columns of the permutation, so the stored form needs the permutation as well
    (baselines.bits_all_in counts it). A group whose inputs were all zero is quantized like RTN
    (prepare_hessian keeps its weights and isolates it); that and any extra damping give one
    CalibrationWarning naming `name`.
    """
    check_bits(bits)
    check_positive_int(group_size, "group_size")
    if act_order:
        _check_hessian(H, W.shape[1])
        # Stable, so equal diagonals (dead columns above all) keep their natural order.
        perm = torch.argsort(torch.diagonal(H).to(W.device), descending=True, stable=True)
        W_hat = torch.empty(W.shape, dtype=torch.float32, device=W.device)
        W_hat[:, perm] = gptq_quantize(W[:, perm], H[perm][:, perm.to(H.device)], bits,
                                       group_size, percdamp, symmetric=symmetric, name=name)
        return W_hat
    notes = CalibrationNotes(name)
    Hinv, W = prepare_hessian(H, W, percdamp, block_size=group_size, notes=notes)

    def grid(start: int, W_group: Tensor) -> tuple[Tensor, Tensor]:
        return uniform_grid(W_group, bits, symmetric)

    def column(j: int, w: Tensor, params: tuple[Tensor, Tensor]) -> Tensor:
        scale, offset = params
        return uniform_round(w, scale[:, 0], offset[:, 0], bits)

    # 128 columns per lazy batch as in GPTQ, unless the groups do not tile it.
    block_size = 128 if group_size % 128 == 0 or 128 % group_size == 0 else group_size
    W_hat = gptq_columnwise(W, Hinv, block_size, column, grid, group_size)
    notes.warn(stacklevel=2)
    return W_hat
