"""SDQ: Sigma-Delta quantization of a weight matrix (method.md section 1, steps 1-5 and 6).

Data flow per block: rotate (Hadamard) -> up-sample (U) -> normalise (mean, quantile scale) ->
choose codes (the paper's modulator, or the Gram-matrix rounding of gram.py) -> pack.
With the modulator every step runs in the core's encoder (cpp/include/sdq/encode.h); the Gram
path runs in gram.py, batched over rows.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import blocks, device
from .._native import core
from ..calibration_warnings import CalibrationNotes
from ..config import SDQConfig
from ..gptq import dead_blocks, gptq_blockwise, prepare_hessian
from ..validate import as_weight_matrix
from ..weight import QuantizedWeight
from .gram import Note, encode_gram


def encode_planes(W: torch.Tensor, cfg: SDQConfig, signs: np.ndarray):
    """The modulator path (method.md steps 1-4 and packing) of every row of W [n, in] (CPU), whole
    in the core (cpp/include/sdq/encode.h): (sign, nonzero | None) uint32 [n, words] and fp16
    (scale, mean) [n, blocks]."""
    sign, nonzero, s, mu = core().encode_rows(
        np.ascontiguousarray(W.numpy(), dtype=np.float32), signs, cfg.levels, cfg.osr,
        cfg.block_size, cfg.order, cfg.hadamard, cfg.sd_scale, cfg.p_scale, cfg.p_cut)
    as_f16 = lambda a: torch.from_numpy(a.view(np.float16))  # noqa: E731  (fp16 bits in)
    return sign, nonzero, as_f16(s), as_f16(mu)


def encode_rows(rows: torch.Tensor, g: blocks.BlockGroup, cfg: SDQConfig, signs: np.ndarray,
                C: torch.Tensor | None = None, note: Note | None = None):
    """Rows [n, padded] of one block geometry -> (codes int8 [n, m], scale fp16 [n], mean fp16 [n]).

    C: the rotated input covariance of this block ("gram" codes only; None = identity).
    note: told what had to be done when C could not be used as is ("gram" codes only).
    """
    if cfg.codes == "gram":
        return encode_gram(rows, g, cfg, signs, C, note)
    # The core encodes the padded rows as a layer of one block, on the CPU; scale and mean go
    # back to the rows' device.
    sign, nonzero, s, mu = encode_planes(rows.cpu(), cfg, signs)
    codes = core().unpack_bitplanes(sign, nonzero, sign.shape[1] * 32)[:, : g.m]
    return codes, s[:, 0].to(rows.device), mu[:, 0].to(rows.device)


def decode_rows(codes: np.ndarray, s: torch.Tensor, mu: torch.Tensor, g: blocks.BlockGroup,
                cfg: SDQConfig, signs: np.ndarray) -> torch.Tensor:
    """Step 5 for rows of one block geometry: (s * D(q) + mu), rotated back; float32 [n, padded]
    on the device of s and mu."""
    q = torch.from_numpy(codes).to(s.device).double()
    rows = s.double()[:, None] * (q @ device.resampler(g.m, g.padded, s.device).T) \
        + mu.double()[:, None]
    if cfg.hadamard:
        rows = device.rotate(rows.float(), signs, inverse=True)
    return rows.float()


def _as_i32(words: np.ndarray | None) -> torch.Tensor | None:
    """uint32 packed words as the int32 tensor QuantizedWeight stores (no copy)."""
    return None if words is None else torch.from_numpy(words.view(np.int32))


class _Assembler:
    """Collects per-block codes, scales and means into the packed QuantizedWeight."""

    def __init__(self, out: int, in_features: int, cfg: SDQConfig, signs: np.ndarray):
        self.out, self.in_features, self.cfg, self.signs = out, in_features, cfg, signs
        cols, nb = blocks.packed_shape(in_features, cfg.block_size, cfg.osr)
        # Padding columns pack to bit 0 in every plane: code -1 (binary) or 0 (ternary).
        self.codes = np.full((out, cols), -1 if cfg.levels == "binary" else 0, np.int8)
        self.scale = torch.zeros(out, nb, dtype=torch.float16)
        self.mean = torch.zeros(out, nb, dtype=torch.float16)

    def put(self, g: blocks.BlockGroup, first: int, count: int, codes, s, mu) -> None:
        """Codes [out * count, m] of blocks first..first+count-1 of group g."""
        if not (torch.isfinite(s).all() and torch.isfinite(mu).all()):
            # Every path refits or falls back before this; a NaN here would be a bug, and must
            # never reach a saved model.
            raise ValueError(f"non-finite scale or mean in blocks {first}..{first + count - 1}: "
                             "this is a bug in sdq, please report it")
        c0 = g.code_offset + (first - g.first) * g.code_cols
        view = self.codes[:, c0: c0 + count * g.code_cols].reshape(self.out, count, g.code_cols)
        view[:, :, : g.m] = codes.reshape(self.out, count, g.m)
        self.scale[:, first: first + count] = s.reshape(self.out, count)
        self.mean[:, first: first + count] = mu.reshape(self.out, count)

    def finish(self) -> QuantizedWeight:
        return QuantizedWeight.from_codes(self.out, self.in_features, self.cfg, self.codes,
                                          self.scale, self.mean,
                                          torch.from_numpy(self.signs.astype(np.int8)))


def quantize_weight(W, config: SDQConfig | None = None) -> QuantizedWeight:
    """Data-free SDQ of W [out, in] (method.md steps 1-5). The paper's modulator runs whole in
    the core (encode_planes); "gram" codes batch all blocks of a geometry."""
    cfg = config or SDQConfig()
    if not isinstance(cfg, SDQConfig):
        raise TypeError(f"config must be an SDQConfig, got {type(cfg).__name__}")
    W = as_weight_matrix(W)
    out = W.shape[0]
    signs = blocks.hadamard_signs(cfg.block_size, cfg.seed)
    if cfg.codes != "gram":
        sign, nonzero, s, mu = encode_planes(W, cfg, signs)
        return QuantizedWeight.from_bitplanes(out, W.shape[1], cfg, _as_i32(sign),
                                              _as_i32(nonzero), s, mu,
                                              torch.from_numpy(signs.astype(np.int8)))
    asm = _Assembler(out, W.shape[1], cfg, signs)
    for g in blocks.block_groups(W.shape[1], cfg.block_size, cfg.osr):
        codes, s, mu = encode_rows(blocks.gather_blocks(W, g), g, cfg, signs)
        asm.put(g, g.first, g.count, codes, s, mu)
    return asm.finish()


def _rotated_block_hessian(Hbb_in: torch.Tensor, g: blocks.BlockGroup, cfg: SDQConfig,
                           signs: np.ndarray) -> torch.Tensor:
    """Hb^T Hbb Hb / mean diag: a block's weighting [width, width] in the rotated, zero-padded
    coordinates."""
    Hbb = torch.zeros(g.padded, g.padded, dtype=torch.float64, device=Hbb_in.device)
    Hbb[: g.width, : g.width] = Hbb_in
    if cfg.hadamard:
        Hbb = device.rotate(device.rotate(Hbb.float(), signs).T.contiguous(), signs).double()
    return Hbb / Hbb.diagonal().mean().clamp_min(1e-30)


def _exact_compensation(Hinv: torch.Tensor, block_size: int) -> tuple[torch.Tensor, list]:
    """GPTQ's factor made exact for blocks quantized jointly, and each block's weighting.

    With U = Hinv (upper, U^T U = H^-1) and the columns before block b already fixed, the best
    update of the later columns for a block error E is E U_bb^-1 U[b, later], and the error left
    after it is E S_b E^T with S_b = (U_bb^T U_bb)^-1, the Schur complement of the later columns
    in H. gptq_blockwise applies (E / diag U_bb) Hinv[b, later] (exact only for a diagonal U_bb),
    so the returned factor has rows diag(U_bb) U_bb^-1 U[b, later]: the engine then applies the
    exact update. Returns (that factor, [S_b float64 per block]).
    """
    U = Hinv.double()
    out = U.clone()
    weights = []
    for start in range(0, U.shape[0], block_size):
        end = min(start + block_size, U.shape[0])
        Ubb = U[start:end, start:end]
        Ui = torch.linalg.solve_triangular(Ubb, torch.eye(end - start, dtype=U.dtype,
                                                          device=U.device), upper=True)
        weights.append(Ui @ Ui.T)
        out[start:end, end:] = torch.diagonal(Ubb)[:, None] * (Ui @ U[start:end, end:])
    return out.float(), weights


def quantize_weight_calibrated(W, H: torch.Tensor, config: SDQConfig | None = None,
                               percdamp: float | None = None, *, name: str | None = None
                               ) -> QuantizedWeight:
    """SDQ with GPTQ-style error compensation between blocks (method.md step 6).

    H [in, in] = 2/n sum x x^T of the layer's inputs. Blocks are quantized in input order; each
    block's weighted error is pushed onto the later blocks (config.compensation: "exact", the
    best update for a block quantized as a whole, or "diagonal", GPTQ's per-column one). With
    config.codes == "gram" the codes of each block are also chosen against that block's
    (rotated) weighting: the Schur complement of the later columns in H ("exact": the error
    left after their compensation), or H's diagonal block ("diagonal").
    Dead or rank-deficient inputs never fail: dead columns follow GPTQ's rule, a block with no
    data at all is quantized uncalibrated (as quantize_weight would), damping grows until the
    factorisations succeed, a block covariance that no damping makes usable is replaced by the
    identity, and a weighted scale/mean fit it cannot pin down by the unweighted one (gram.py).
    Any of that gives one CalibrationWarning naming the layer (`name`) and the blocks.
    percdamp: H's damping, overriding config.percdamp (None: the config's).
    Everything runs on H's device (the layer's: sdq.device); the result is on the CPU.
    """
    cfg = config or SDQConfig()
    if not isinstance(cfg, SDQConfig):
        raise TypeError(f"config must be an SDQConfig, got {type(cfg).__name__}")
    W = as_weight_matrix(W).to(H.device if isinstance(H, torch.Tensor) else "cpu")
    out, n_in = W.shape
    signs = blocks.hadamard_signs(cfg.block_size, cfg.seed)
    asm = _Assembler(out, n_in, cfg, signs)
    groups = blocks.block_groups(n_in, cfg.block_size, cfg.osr)
    group_of = {g.first + i: g for g in groups for i in range(g.count)}
    notes = CalibrationNotes(name)
    percdamp = cfg.percdamp if percdamp is None else percdamp
    Hinv, W = prepare_hessian(H, W, percdamp, block_size=cfg.block_size, notes=notes)
    uncalibrated = set(dead_blocks(H, cfg.block_size))
    if cfg.compensation == "exact":
        Hinv, block_weights = _exact_compensation(Hinv, cfg.block_size)

    def quantize_block(b: int, start: int, W_b: torch.Tensor) -> torch.Tensor:
        g = group_of[b]
        rows = torch.nn.functional.pad(W_b, (0, g.padded - g.width))
        C = None
        if cfg.codes == "gram" and b not in uncalibrated:
            Hbb = block_weights[b] if cfg.compensation == "exact" else \
                H[start: start + g.width, start: start + g.width]
            C = _rotated_block_hessian(Hbb, g, cfg, signs)
        codes, s, mu = encode_rows(rows, g, cfg, signs, C, notes.for_block(b))
        asm.put(g, b, 1, codes, s, mu)
        return decode_rows(codes, s, mu, g, cfg, signs)[:, : g.width]

    with device.single_thread_on_cpu(W.device):
        gptq_blockwise(W, Hinv, cfg.block_size, quantize_block)
    qw = asm.finish()
    notes.warn(stacklevel=2)
    return qw
