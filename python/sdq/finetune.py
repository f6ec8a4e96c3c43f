"""End-to-end tuning of a quantized model's continuous parameters, the discrete codes frozen.

    report = sdq.finetune(model, teacher, tokens, steps=100)

trains every SDQLinear's `scale` and `mean` (float32 master copies while training, written back as
fp16: the stored format does not change, only values) and the model's norm weights (RMSNorm /
LayerNorm; biases too with train_biases=True) to minimise KL(teacher || student) of the
next-token distributions on `tokens` (the calibration text). This is the step of AQLM +
PV-tuning that gives the largest single gain at 2 bits.

The teacher is either the full-precision model (run on the fly, full-vocabulary KL) or its top-k
next-token log-probabilities cached once by teacher_topk() (no teacher in memory while training;
KL over the teacher's top k tokens). sdq.quantize_(..., finetune_steps=N) caches them before it
quantizes, so it needs no second copy of the model.

Why a dense form: a layer's weight is linear in its scales and means,
W(s, mu)[o, j] = s[o, b(j)] A[o, j] + mu[o, b(j)] m[j], where A is the layer dequantized with s = 1,
mu = 0, m the mean's basis (dequantized with s = 0, mu = 1; the same for every row) and b(j) the
block of input column j. A and m are built once per layer from the frozen codes; each step then
runs dense matmuls, and the gradients of s and mu are block sums of dL/dW * A and dL/dW * m
(_DenseSDQ). On CPU that is far faster than the add-only ops' plain-torch backward (README).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import SDQConfig
from .nn import SDQLinear

__all__ = ["finetune", "teacher_topk", "cached_teacher", "TeacherTopK", "FinetuneReport"]

DEFAULT_LR = 1e-3  # relative: see _relative_groups
TOP_K = 64  # teacher tokens kept per position by the pipeline's cache


@dataclasses.dataclass
class TeacherTopK:
    """The teacher's top-k next-token log-probabilities on `tokens` [n, seq_len]:
    logprobs float32 [n, seq_len, k] (log-softmax over the whole vocabulary), indices int64."""
    tokens: torch.Tensor
    logprobs: torch.Tensor
    indices: torch.Tensor


@dataclasses.dataclass
class FinetuneReport:
    """What finetune did: the loss of every step (KL per token, nats), the KL on the first batch
    before and after, what was tuned and how long it took."""
    steps: int
    lr: float
    seed: int
    batch_size: int
    seq_len: int
    teacher: str                      # "model" (full KL on the fly) or "top-k=K"
    losses: list = dataclasses.field(default_factory=list)
    tuned_tensors: int = 0
    tuned_values: int = 0
    setup_seconds: float = 0.0        # building the dense form of every layer
    seconds: float = 0.0              # in all, setup included

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- the dense form
class _DenseSDQ(torch.autograd.Function):
    """y = x W(s, mu)^T (+ bias) with W built from the frozen basis; saves only x, so the
    memory of a step is the activations, not a dense copy of every weight per layer."""

    @staticmethod
    def forward(ctx, x, scale, mean, bias, basis, mean_basis, block_size):
        w = _weight(scale, mean, basis, mean_basis, block_size)
        ctx.save_for_backward(x, scale, mean, basis, mean_basis)
        ctx.block_size = block_size
        ctx.has_bias = bias is not None
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, mean, basis, mean_basis = ctx.saved_tensors
        bs = ctx.block_size
        grad_x = grad_s = grad_mu = grad_b = None
        if ctx.needs_input_grad[0]:
            w = _weight(scale, mean, basis, mean_basis, bs)
            grad_x = grad_y @ w.to(grad_y.dtype)
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).float()
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w = g2.T @ x.reshape(-1, x.shape[-1]).float()           # [out, in]
            if ctx.needs_input_grad[1]:
                grad_s = _block_sums(grad_w * basis, bs, scale.shape[1])
            if ctx.needs_input_grad[2]:
                grad_mu = _block_sums(grad_w * mean_basis, bs, mean.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g2.sum(0)
        return grad_x, grad_s, grad_mu, grad_b, None, None, None


def _weight(scale, mean, basis, mean_basis, block_size: int) -> torch.Tensor:
    n_in = basis.shape[1]
    s = scale.repeat_interleave(block_size, 1)[:, :n_in]
    mu = mean.repeat_interleave(block_size, 1)[:, :n_in]
    return s * basis + mu * mean_basis


def _block_sums(t: torch.Tensor, block_size: int, blocks: int) -> torch.Tensor:
    """[out, in] -> [out, blocks]: sums over each block's columns (a fixed order: deterministic)."""
    pad = blocks * block_size - t.shape[1]
    return F.pad(t, (0, pad)).unflatten(1, (blocks, block_size)).sum(-1)


class _TunableSDQLinear(nn.Module):
    """Stands in for one SDQLinear while tuning: float32 master scale / mean (/ bias) and the
    frozen basis of its codes (module doc)."""

    def __init__(self, packed: SDQLinear, train_bias: bool):
        super().__init__()
        qw = packed.quantized_weight()  # generic over how the codes are stored
        device = packed.scale.device
        ones, zeros = torch.ones_like(qw.scale), torch.zeros_like(qw.scale)
        self.register_buffer("basis", dataclasses.replace(qw, scale=ones, mean=zeros)
                             .dequantize().to(device))
        self.register_buffer("mean_basis", dataclasses.replace(qw, scale=zeros, mean=ones)
                             .dequantize()[:1].to(device))
        self.block_size = packed.config.block_size
        self.packed = [packed]  # a list: not a submodule (its buffers are not trained here)
        self.scale = nn.Parameter(packed.scale.detach().float().clone())
        self.mean = nn.Parameter(packed.mean.detach().float().clone())
        bias = packed.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=train_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DenseSDQ.apply(x, self.scale, self.mean, self.bias, self.basis, self.mean_basis,
                               self.block_size)

    def tuned(self) -> list[nn.Parameter]:
        return [p for p in (self.scale, self.mean, self.bias) if p is not None and p.requires_grad]

    def values(self) -> dict[str, torch.Tensor]:
        """The packed layer's new tensors in their stored dtypes (not written yet)."""
        packed = self.packed[0]
        new = {"scale": self.scale.detach().to(packed.scale.dtype),
               "mean": self.mean.detach().to(packed.mean.dtype)}
        if self.bias is not None and self.bias.requires_grad:
            new["bias"] = self.bias.detach().to(packed.bias.dtype)
        return new


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm"))


@contextlib.contextmanager
def _tuning_form(model: nn.Module, train_biases: bool):
    """Inside: every SDQLinear of `model` replaced by a _TunableSDQLinear, every parameter of the
    model frozen; yields (tunable layers, {norm parameter name: float32 master}, {that name: the
    model's parameter}). Restored on exit (new values are written by _write_back, not here)."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent._modules.items() if isinstance(child, SDQLinear)]
    if not swaps:
        raise ValueError("the model has no SDQLinear layers: quantize it with an SDQConfig first")
    flags = {p: p.requires_grad for p in model.parameters()}
    norm_params = {f"{mname}.{pname}" if mname else pname: p
                   for mname, m in model.named_modules() if _is_norm(m)
                   for pname, p in m.named_parameters(recurse=False)
                   if pname == "weight" or (train_biases and pname == "bias")}
    try:
        for p in flags:
            p.requires_grad_(False)
        layers = []
        for parent, name, child in swaps:
            layers.append(_TunableSDQLinear(child, train_biases))
            parent._modules[name] = layers[-1]
        masters = {n: nn.Parameter(p.detach().float().clone()) for n, p in norm_params.items()}
        yield layers, masters, norm_params
    finally:
        for parent, name, child in swaps:
            parent._modules[name] = child
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _write_back(layers: list[_TunableSDQLinear], masters: dict, norm_params: dict) -> None:
    """Every new value in its stored dtype, checked finite before any is written."""
    new = [(layer.packed[0], layer.values()) for layer in layers]
    norms = {n: masters[n].detach().to(p.dtype) for n, p in norm_params.items()}
    for tensors in [v for _, v in new] + [norms]:
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise RuntimeError(f"finetune diverged: {name} is not finite in its stored "
                                         "dtype; nothing was written (lower the learning rate)")
    with torch.no_grad():
        for packed, tensors in new:
            bias = tensors.pop("bias", None)
            if bias is not None:
                packed.bias.copy_(bias)
            for name, t in tensors.items():
                # new tensors, not copy_: the kernels' per-layer plans are keyed by the buffers
                packed._buffers[name] = t.contiguous()
            packed._dense = None  # the cached dequantized weight is stale
        for name, p in norm_params.items():
            p.copy_(norms[name])


# ----------------------------------------------------------------------------- the teacher
@torch.no_grad()
def teacher_topk(teacher: nn.Module, tokens: torch.Tensor, k: int = TOP_K, batch_size: int = 1,
                 progress: bool = True) -> TeacherTopK:
    """The teacher's top-k next-token log-probabilities on every position of `tokens` [n, L]
    (on the CPU: k = 64 costs 512 bytes per token)."""
    tokens = _check_tokens(tokens)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    device = _device(teacher)
    logprobs, indices = [], []
    for i in tqdm(range(0, len(tokens), batch_size), desc="teacher top-k", unit="batch",
                  disable=not progress):
        logits = teacher(input_ids=tokens[i:i + batch_size].to(device), use_cache=False).logits
        top = F.log_softmax(logits.float(), -1).topk(min(k, logits.shape[-1]), dim=-1)
        logprobs.append(top.values.cpu())
        indices.append(top.indices.cpu())
    return TeacherTopK(tokens, torch.cat(logprobs), torch.cat(indices))


def cached_teacher(model: nn.Module, config, calibration: torch.Tensor | None, steps: int,
                   batch_size: int = 1, progress: bool = True) -> TeacherTopK | None:
    """What quantize_(..., finetune_steps=steps) tunes against: the top-k of `model` (not yet
    quantized) on the calibration sequences that `steps` steps will draw; None when steps is 0.
    Raises, before any work, on a request finetune cannot serve."""
    _check_args(steps, DEFAULT_LR, batch_size, "cosine")
    if steps == 0:
        return None
    if not isinstance(config, SDQConfig):
        raise ValueError("finetune_steps tunes SDQ layers (their scales and means): use an "
                         "SDQConfig")
    if calibration is None:
        raise ValueError("finetune_steps needs calibration tokens (it tunes on them)")
    needed = min(len(_check_tokens(calibration)), steps * batch_size)
    return teacher_topk(model, calibration[:needed], TOP_K, progress=progress)


def _kl(student_logits: torch.Tensor, target) -> torch.Tensor:
    """Mean per-token KL(teacher || student); target: full teacher logits, or (logprobs,
    indices) of its top k, the rest of the vocabulary counting as one more outcome (the tail).

    Without the tail the top-k sum is no divergence: it rewards moving the student's mass from
    the tail into the top k whatever the teacher's tail holds (it even goes negative), and tuning
    it raised the full KL where the top k leave much mass out (tiny random models)."""
    logq = F.log_softmax(student_logits.float(), -1).flatten(0, -2)
    if isinstance(target, torch.Tensor):
        logp = F.log_softmax(target.float(), -1).flatten(0, -2)
        return F.kl_div(logq, logp, log_target=True, reduction="batchmean")
    logp, idx = (t.flatten(0, -2) for t in target)
    p = logp.exp()
    top = (p * (logp - logq.gather(-1, idx))).sum()
    if idx.shape[-1] >= logq.shape[-1]:  # the whole vocabulary: no tail
        return top / logp.shape[0]
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    logq_tail = logq.scatter(-1, idx, float("-inf")).logsumexp(-1)  # exact, no 1 - sum
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - logq_tail),
                       torch.zeros_like(p_tail)).sum()
    return (top + tail) / logp.shape[0]


# ----------------------------------------------------------------------------- the loop
def finetune(model: nn.Module, teacher, tokens: torch.Tensor | None, steps: int,
             lr: float = DEFAULT_LR, seed: int = 0, batch_size: int = 1, seq_len: int | None = None,
             schedule: str = "cosine", train_biases: bool = False,
             progress: bool = True) -> FinetuneReport:
    """Tune the continuous parameters of the quantized `model` in place (module doc).

    teacher:    the full-precision model (same vocabulary; run on the fly) or a TeacherTopK.
    tokens:     LongTensor [n, L] of calibration token ids; with a TeacherTopK its tokens (None
                takes them from it).
    steps:      optimizer steps (Adam); each takes `batch_size` sequences, drawn without
                replacement in an order fixed by `seed` (a new permutation per pass).
    seq_len:    split each sequence into windows of this many tokens (None: L as given).
    lr:         peak step of Adam relative to each tensor's RMS (_relative_groups).
    schedule:   "cosine" (to zero over the steps) or "constant".
    Runs on the model's device; the same seed and inputs give the same loss curve.
    """
    _check_args(steps, lr, batch_size, schedule)
    if isinstance(teacher, TeacherTopK):
        if tokens is not None and not torch.equal(_check_tokens(tokens), teacher.tokens):
            raise ValueError("tokens differ from the TeacherTopK's tokens: pass the same "
                             "tokens (or None)")
        tokens = teacher.tokens
    elif not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or a TeacherTopK, got "
                        f"{type(teacher).__name__}")
    tokens = _windows(_check_tokens(tokens), seq_len)
    if isinstance(teacher, TeacherTopK):
        teacher = TeacherTopK(tokens, *(_windows(t, seq_len) for t in (teacher.logprobs,
                                                                      teacher.indices)))
    report = FinetuneReport(steps, lr, seed, batch_size, tokens.shape[1],
                            "model" if isinstance(teacher, nn.Module) else
                            f"top-k={teacher.logprobs.shape[-1]}")
    if steps == 0:
        return report
    t0 = time.time()
    device = _device(model)
    was_training = model.training
    model.eval()  # no dropout: the loss curve is a function of the seed
    try:
        with torch.enable_grad(), _tuning_form(model, train_biases) as (layers, masters, norms):
            params = [p for layer in layers for p in layer.tuned()] + list(masters.values())
            report.setup_seconds = time.time() - t0
            report.tuned_tensors = len(params)
            report.tuned_values = sum(p.numel() for p in params)
            opt = torch.optim.Adam(_relative_groups(params), lr=lr)
            lr_at = _schedule(schedule, steps)
            order = _order(len(tokens), steps * batch_size, seed)
            bar = tqdm(range(steps), desc="finetune", unit="step", disable=not progress)
            for step in bar:
                rows = order[step * batch_size: (step + 1) * batch_size]
                ids = tokens[rows].to(device)
                subs = {n: m.to(norms[n].dtype) for n, m in masters.items()}
                logits = torch.func.functional_call(model, subs, (), {"input_ids": ids,
                                                                      "use_cache": False}).logits
                loss = _kl(logits, _target(teacher, rows, ids, device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for group in opt.param_groups:
                    group["lr"] = group["relative_to"] * lr * lr_at(step)
                opt.step()
                report.losses.append(loss.item())
                bar.set_postfix(kl=f"{report.losses[-1]:.4f}")
            _write_back(layers, masters, norms)
    finally:
        model.train(was_training)
    report.seconds = time.time() - t0
    return report


def _target(teacher, rows: torch.Tensor, ids: torch.Tensor, device):
    if isinstance(teacher, TeacherTopK):
        return teacher.logprobs[rows].to(device), teacher.indices[rows].to(device)
    with torch.no_grad():
        return teacher(input_ids=ids.to(_device(teacher)), use_cache=False).logits.to(device)


def _relative_groups(params: list[nn.Parameter]) -> list[dict]:
    """One Adam group per tensor, its step size scaled by the tensor's RMS: Adam moves every value
    by about lr per step whatever its magnitude, and scales (~0.3 on the default model), means
    (~0.01) and norm weights (~0.3) differ by 30x, so `lr` is relative: 1e-3 moves each tensor
    by about 0.1% of its typical value per step."""
    return [{"params": [p], "relative_to": max(p.detach().square().mean().sqrt().item(), 1e-8)}
            for p in params]


def _schedule(kind: str, steps: int):
    """The learning rate's factor at each step."""
    if kind == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))


def _order(n: int, needed: int, seed: int) -> torch.Tensor:
    """Sequence indices for `needed` draws: passes over a fresh permutation of range(n) each."""
    gen = torch.Generator().manual_seed(seed)
    passes = -(-needed // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])[:needed]


def _windows(t: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """[n, L, ...] -> [n * (L // seq_len), seq_len, ...] (the ragged tail of each row dropped)."""
    if seq_len is None or seq_len == t.shape[1]:
        return t
    if not isinstance(seq_len, int) or not 2 <= seq_len <= t.shape[1]:
        raise ValueError(f"seq_len must be an int in 2..{t.shape[1]} (the tokens' length), got "
                         f"{seq_len!r}")
    per = t.shape[1] // seq_len
    return t[:, : per * seq_len].reshape(t.shape[0] * per, seq_len, *t.shape[2:])


def _check_tokens(tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long \
            or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        got = (f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
               else type(tokens).__name__)
        raise ValueError(f"tokens must be a LongTensor [n >= 1, seq_len >= 2] of token ids "
                         f"(sdq.data.calibration_tokens), got {got}")
    return tokens


def _check_args(steps, lr, batch_size, schedule) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise ValueError(f"lr must be in (0, 1), got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device
