"""Quantization spread over the ranks of a torch.distributed process group (launched by torchrun).

    torchrun --nproc_per_node 2 -m sdq quantize --out DIR ...

Calibrated: the calibration sequences are split across the ranks; every rank runs decoder layer l
on its share and accumulates each linear's Hessian H_r and token count n_r; the n_r H_r are
reduced (`dist.reduce`) to one owner rank per weight, chosen by bin-packing (cost rows x in x
OSR, longest first onto the least-loaded rank), which normalises by the global token count (the
same 2/n sum x x^T as one process), quantizes, and broadcasts the packed tensors (`state_dict()`).
Every rank then holds the quantized layer and runs it on its share to make layer l+1's inputs.
Data-free: the weights of all layers are bin-packed across the ranks at once.

The result does not depend on the number of ranks: data-free, bit for bit; calibrated, up to the
order of the float32 Hessian sums. Only rank 0 prints and writes (`run`); a rank that fails exits
with its error and its peers, blocked in a collective, fail too (lost connection, or the process
group timeout, SDQ_DIST_TIMEOUT seconds, default 3600). Gloo on CPU, NCCL when CUDA is available
(SDQ_DIST_BACKEND overrides).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import warnings
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import experts as moe
from .methods import DenseQuantized
from .pipeline import (
    QuantizeReport, _apply, _apply_experts, _layer_hessians, _Quantizer, prepare, quantize_,
)
from .traversal import capture_layer_inputs, decoder_layers, run_layer
from .weight import QuantizedWeight
from .wgm_weight import WGMWeight

TIMEOUT_ENV = "SDQ_DIST_TIMEOUT"
BACKEND_ENV = "SDQ_DIST_BACKEND"


# --- launch --------------------------------------------------------------------------------


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK and
    WORLD_SIZE for the env:// rendezvous)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether this process is inside a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Rank 0 of the process group, or a process outside any group: the one that prints and
    writes."""
    return not active() or dist.get_rank() == 0


def quantizer() -> Callable:
    """The quantize_ of this process: quantize_distributed inside a process group, else
    pipeline.quantize_ (same signature)."""
    return quantize_distributed if active() else quantize_


def _backend() -> str:
    """SDQ_DIST_BACKEND, else NCCL when every rank of this node has a GPU of its own, else gloo
    (NCCL refuses two ranks on one GPU: "Duplicate GPU detected")."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    own_gpus = torch.cuda.is_available() and local <= torch.cuda.device_count()
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if own_gpus else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"{BACKEND_ENV} must be gloo or nccl, got {backend!r}")
    return backend


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "3600")
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {text}")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group():
    """Join the env:// process group (torchrun's rendezvous) for the duration of the block."""
    backend, timeout = _backend(), _timeout()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:  # all ranks leave together: a peer tearing down its pairs mid-collective of
            dist.barrier()  # another can abort gloo's threads ("terminate called ...")
        dist.destroy_process_group()


@contextlib.contextmanager
def _quiet():
    """Silence a non-main rank while it works: no output, progress bars or warnings (rank 0
    reports for all). Its error, if any, is printed after the block by the caller."""
    with contextlib.ExitStack() as stack:
        devnull = stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(devnull))
        stack.enter_context(contextlib.redirect_stderr(devnull))  # tqdm's bars
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        yield


def run(command: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> dict:
    """Run a CLI command on every rank of a torchrun launch. Rank 0 runs it as given; the other
    ranks run it silently without evaluation or output files (they only take part in the
    quantization). Returns only when every rank succeeded: a rank whose peer failed raises too."""
    with process_group():
        if not is_main():
            args = argparse.Namespace(**{**vars(args), "eval_tokens": 0, "out": None,
                                         "json": None})
        with contextlib.nullcontext() if is_main() else _quiet():
            result = command(args)
        # Every rank waits here for the others (rank 0 evaluates and saves after the last
        # collective): a rank that failed has exited, and the lost connection fails this one.
        _Comm().all_reduce(torch.ones(1), "the final check that every rank succeeded")
    return result


# --- communication -------------------------------------------------------------------------


class _Comm:
    """The collectives quantize_distributed uses, on the backend's device (CPU for gloo, this
    rank's GPU for NCCL); a lost peer becomes a RuntimeError that says so."""

    def __init__(self):
        if not active():
            raise RuntimeError("quantize_distributed needs a torch.distributed process group "
                               "(launch with torchrun; sdq.distributed.process_group() joins it)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend() == "nccl" else torch.device("cpu"))

    @contextlib.contextmanager
    def _collective(self, what: str):
        try:
            yield
        except RuntimeError as e:  # DistBackendError and gloo's transport errors
            raise RuntimeError(f"rank {self.rank} of {self.world}: {what} failed: another rank "
                               f"stopped (see its error) or timed out: {e}") from e

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        buf = t.to(self.device)
        with self._collective(what):
            dist.all_reduce(buf)
        return buf.to(t.device)

    def reduce(self, t: torch.Tensor, dst: int, what: str) -> torch.Tensor:
        """The sum over the ranks of t, on rank dst (other ranks get an undefined tensor)."""
        buf = t.to(self.device)
        with self._collective(what):
            dist.reduce(buf, dst)
        return buf.to(t.device)

    def broadcast(self, obj, src: int, what: str):
        box = [obj if self.rank == src else None]
        with self._collective(what):
            dist.broadcast_object_list(box, src, device=self.device)
        return box[0]


# --- work assignment -----------------------------------------------------------------------


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Greedy longest-processing-time bin-packing: items in decreasing cost (ties: first item
    first) each go to the least-loaded rank (ties: lowest rank). Deterministic."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


@dataclasses.dataclass
class _Task:
    """One weight to quantize: a linear's, or one expert's slice of fused experts."""
    index: int
    name: str  # relative to the layer; experts' slices as "mlp.experts.gate_up_proj.5"
    weight: torch.Tensor
    cost: float
    owner: int = 0

    @property
    def key(self) -> tuple[int, str]:
        return self.index, self.name


def _layer_tasks(index: int, linears: dict, experts: dict, config, osr_for) -> list[_Task]:
    """The layer's weights, each with its cost rows x in x OSR (the encoder's work grows with
    the samples it chooses; OSR 1 for methods without one)."""
    weights = {name: m.weight.data for name, m in linears.items()}
    for name, fused in experts.items():
        weights.update({f"{name}.{sub}": w for sub, w in moe.expert_weights(fused).items()})
    tasks = []
    for name, w in weights.items():
        osr = osr_for(index, name) if osr_for is not None else getattr(config, "osr", 1.0)
        tasks.append(_Task(index, name, w, float(w.shape[0] * w.shape[1] * osr)))
    return tasks


def _assign(tasks: list[_Task], world: int) -> None:
    for task, owner in zip(tasks, assign_owners([t.cost for t in tasks], world)):
        task.owner = owner


# --- packed results across ranks -----------------------------------------------------------


def _pack(result):
    """A quantizer's result as plain CPU tensors, for broadcast_object_list."""
    if isinstance(result, DenseQuantized):
        return "dense", result.weight.cpu(), result.bits_per_weight_all_in
    kind = {QuantizedWeight: "sdq", WGMWeight: "wgm"}[type(result)]
    return kind, {k: v.cpu() for k, v in result.state_dict().items()}


def _unpack(packed, name: str):
    if packed[0] == "dense":
        return DenseQuantized(packed[1], packed[2])
    cls = {"sdq": QuantizedWeight, "wgm": WGMWeight}[packed[0]]
    return cls.from_state_dict(packed[1], name=name)


def _quantize_owned(comm: _Comm, tasks: list[_Task], quantize: _Quantizer, hessians: dict,
                    bar: tqdm | None = None) -> dict:
    """Quantize this rank's tasks: key -> (result, report entry, warnings raised)."""
    done = {}
    for task in tasks:
        if task.owner != comm.rank:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = quantize(task.index, task.name, task.weight, hessians.pop(task.name, None))
        entry = quantize.report.linears.pop(task.key)
        done[task.key] = (result, entry, [(w.category, str(w.message)) for w in caught])
        if bar is not None:
            bar.update(1)
    return done


def _exchange(comm: _Comm, tasks: list[_Task], done: dict, report: QuantizeReport) -> dict:
    """Broadcast every rank's packed results; returns key -> result for all tasks, records the
    report entries in task order and re-raises each weight's warnings (shown by rank 0)."""
    received = {}
    for src in range(comm.world):
        mine = {k: (_pack(r), e, w) for k, (r, e, w) in done.items()} if src == comm.rank else None
        received.update(comm.broadcast(mine, src, f"sending rank {src}'s packed weights"))
    results = {}
    for task in tasks:
        packed, entry, caught = received[task.key]
        local = done.get(task.key)
        results[task.key] = local[0] if local else _unpack(packed, f"layer {task.index} "
                                                                   f"{task.name}")
        report.linears[task.key] = entry
        for category, message in caught if comm.rank == 0 else ():
            warnings.warn(message, category, stacklevel=3)
    return results


def _apply_layer(index: int, layer: nn.Module, linears: dict, experts: dict,
                 results: dict) -> None:
    for name, linear in linears.items():
        _apply(layer, name, linear, results[(index, name)])
    for name, fused in experts.items():
        _apply_experts(layer, name, fused, {sub: results[(index, f"{name}.{sub}")]
                                            for sub in moe.expert_weights(fused)})


# --- calibration: Hessians reduced to their owners -----------------------------------------


def _hessian_sums(layer: nn.Module, linears: dict, experts: dict, hidden: torch.Tensor,
                  kwargs: dict) -> tuple[dict, dict]:
    """This rank's n_r H_r (= 2 sum x x^T over its tokens) and token count n_r, by weight name.
    Unseen linears are checked on the global counts (_reduce_hessians)."""
    hessians, counts = _layer_hessians(layer, linears, experts, set(linears), hidden, kwargs)
    return {n: h * counts[n] for n, h in hessians.items()}, counts


def _reduce_hessians(comm: _Comm, tasks: list[_Task], sums: dict, counts: dict,
                     optional: set) -> dict[str, torch.Tensor]:
    """Sum each weight's n_r H_r onto its owner, normalised there by the global token count N:
    2/N sum x x^T over all ranks' sequences. Returns this rank's owned Hessians."""
    local = torch.tensor([counts.get(t.name, 0) for t in tasks], dtype=torch.int64)
    total = comm.all_reduce(local, "summing token counts").tolist()
    unseen = [t.name for t, n in zip(tasks, total) if n == 0 and t.name not in optional]
    if unseen:
        raise ValueError(f"no inputs reached {unseen} in layer {tasks[0].index}")
    owned = {}
    for task, n in zip(tasks, total):
        if n == 0:
            continue  # an expert no token reached: quantized data-free, as in one process
        s = sums.pop(task.name, None)
        if s is None:  # no token of this rank's share reached it
            s = torch.zeros(task.weight.shape[1], task.weight.shape[1], device=task.weight.device)
        s = comm.reduce(s, task.owner, f"reducing the Hessian of layer {task.index} {task.name}")
        if task.owner == comm.rank:
            owned[task.name] = s * (1.0 / n)
    return owned


def _share(calibration: torch.Tensor, comm: _Comm) -> torch.Tensor:
    n = calibration.shape[0]
    if n < comm.world:
        raise ValueError(f"{n} calibration sequences for {comm.world} ranks: need at least one "
                         f"per rank")
    return calibration[comm.rank * n // comm.world: (comm.rank + 1) * n // comm.world]


# --- the driver ----------------------------------------------------------------------------


@torch.no_grad()
def quantize_distributed(model: nn.Module, config, calibration: torch.Tensor | None = None, *,
                         osr_for: Callable[[int, str], float] | None = None,
                         filter_fn: Callable[[int, str, nn.Module], bool] | None = None,
                         strict: bool = False, progress: bool = True) -> QuantizeReport:
    """pipeline.quantize_ across the ranks of the current process group: same arguments and
    result, on every rank (see the module docstring). Every rank passes the same model, config
    and full calibration set (each takes its share); progress shows on rank 0."""
    comm = _Comm()
    layers = decoder_layers(model)
    plans, selected, planned = prepare(model, config, calibration is not None, osr_for=osr_for,
                                       filter_fn=filter_fn, strict=strict)
    report = planned.report
    # Owners record into a scratch report; _exchange fills `report` in one order on every rank.
    quantize = _Quantizer(config, osr_for, QuantizeReport(config.to_dict(), False))
    tasks = [_layer_tasks(i, *selected[i], config, osr_for) for i in range(len(layers))]
    show = progress and comm.rank == 0
    if calibration is None:
        _data_free(comm, layers, selected, tasks, quantize, report, show)
    else:
        _calibrated(comm, model, layers, plans, selected, tasks, quantize, report,
                    _share(calibration, comm), show)
    return report


def _data_free(comm, layers, selected, tasks, quantize, report, show: bool) -> None:
    """All layers' weights bin-packed at once; one exchange."""
    flat = [t for layer_tasks in tasks for t in layer_tasks]
    _assign(flat, comm.world)
    mine = sum(t.owner == comm.rank for t in flat)
    with tqdm(total=mine, desc=f"quantize (rank 0 of {comm.world})", unit="weight",
              disable=not show) as bar:
        done = _quantize_owned(comm, flat, quantize, {}, bar)
    results = _exchange(comm, flat, done, report)
    for index, layer in enumerate(layers):
        _apply_layer(index, layer, *selected[index], results)


def _calibrated(comm, model, layers, plans, selected, tasks, quantize, report, share,
                show: bool) -> None:
    """Layer by layer: local Gram sums, reduce to owners, quantize, exchange, run the quantized
    layer on this rank's share."""
    hidden, kwargs = capture_layer_inputs(model, share)
    bar = tqdm(list(enumerate(layers)), desc=f"quantize ({comm.world} ranks)", unit="layer",
               disable=not show)
    for index, layer in bar:
        linears, experts = selected[index]
        layer_tasks = tasks[index]
        _assign(layer_tasks, comm.world)
        sums, counts = _hessian_sums(layer, linears, experts, hidden, kwargs)
        optional = (plans[index].routed & set(linears)) | {
            t.name for t in layer_tasks if t.name not in linears}
        hessians = _reduce_hessians(comm, layer_tasks, sums, counts, optional) if layer_tasks \
            else {}
        del sums
        done = _quantize_owned(comm, layer_tasks, quantize, hessians)
        results = _exchange(comm, layer_tasks, done, report)
        _apply_layer(index, layer, linears, experts, results)
        hidden = run_layer(layer, hidden, kwargs)
