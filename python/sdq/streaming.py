"""Streaming quantization: a model larger than memory, one decoder layer at a time, resumable.

The source folder (Hugging Face, (sharded) safetensors) is read lazily (sdq.lazy): the model is a
skeleton on the meta device; each decoder layer is materialised only when it is quantized, written
to its own shard, then freed. Peak memory is the embeddings and head, about two layers and the
calibration activations, not the model.

Work in progress lives in `.OUT.partial/` beside the output folder `OUT`:
  run.json                       what the run quantizes and how (a resume must match it)
  model-00001-of-NNNNN...        embeddings, final norm, LM head: the tensors outside the layers
  model-0000k-of-NNNNN...        decoder layer k-2, written as soon as it is done
  inputs.safetensors             calibrated runs: the next layer's inputs (`hidden`, metadata
                                 `layer`), i.e. layer k's calibration activations
Every file is written to a temporary name and renamed, so a killed run leaves only complete
files; a resumed run keeps every finished layer (a calibrated run restarts at the layer whose
inputs it holds). When all shards are written, the index and config.json are added and the folder
is renamed to OUT (sdq.io's sharded format, sdq-v2): OUT appears only complete.

Test hook: with SDQ_STREAMING_EXIT_AFTER_LAYER=k set the process exits hard (os._exit, like a
kill) right after layer k's shard is in place.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import io
from .lazy import LazyCheckpoint, materialise, module_name, skeleton, state_names
from .pipeline import QuantizeReport, _selected, prepare, quantize_layer
from .traversal import capture_layer_inputs, decoder_layers, plan_layer

RUN = "run.json"
INPUTS = "inputs.safetensors"
EXIT_HOOK = "SDQ_STREAMING_EXIT_AFTER_LAYER"


def partial_folder(out) -> Path:
    """Where a streaming run into `out` keeps its work until it is complete."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def shard_name(k: int, count: int) -> str:
    """Hugging Face's shard naming, 1-based: shard 1 holds the tensors outside the layers, shard
    l + 2 decoder layer l."""
    return f"model-{k:05d}-of-{count:05d}.safetensors"


def _fingerprint(source: Path, checkpoint: LazyCheckpoint, config, calibration) -> dict:
    """What a resumed run must share with the run that wrote the partial folder."""
    calib = None
    if calibration is not None:
        calib = hashlib.sha256(calibration.cpu().contiguous().numpy().tobytes()).hexdigest()
        calib = f"{tuple(calibration.shape)} {calib}"
    return {"format": io.SHARDED_FORMAT, "source": str(source.resolve()),
            "source_config": hashlib.sha256((source / "config.json").read_bytes()).hexdigest(),
            "source_files": {p.name: p.stat().st_size for p in checkpoint.files()},
            "config": config.to_dict(), "calibration": calib}


def _open_partial(out: Path, fingerprint: dict, resume: bool) -> Path:
    """The partial folder, empty for a new run or as the killed run left it (its temporary files
    removed) for a resume of the same run."""
    partial = partial_folder(out)
    if partial.exists() and (partial / RUN).exists():
        if not resume:
            raise FileExistsError(f"{partial} holds an unfinished run into {out}: pass "
                                  f"--resume (resume=True) to continue it, or remove it")
        before = json.loads((partial / RUN).read_text())
        changed = sorted(k for k in fingerprint if before.get(k) != fingerprint[k])
        if changed:
            raise ValueError(f"cannot resume {partial}: it was started with another "
                             f"{', '.join(changed)}; rerun with the same model and options, "
                             f"or remove it")
        for tmp in partial.glob(".*.tmp"):
            tmp.unlink()
        return partial
    shutil.rmtree(partial, ignore_errors=True)  # killed before run.json: nothing to keep
    partial.mkdir(parents=True)
    (partial / (RUN + ".tmp")).write_text(json.dumps(fingerprint, indent=2))
    os.replace(partial / (RUN + ".tmp"), partial / RUN)
    return partial


def _write_rest(path: Path, model, checkpoint: LazyCheckpoint, prefix: str, calibrated: bool):
    """Shard 1: the tensors outside the decoder layers, read from the checkpoint and written as
    they are. A calibrated run also loads them into the skeleton (the embeddings feed layer 0)."""
    names = state_names(model, skip_prefix=prefix)
    if not path.exists():  # one tensor in memory at a time
        specs = checkpoint.specs(names)
        dtype = io._dtype_of({n: torch.empty(shape, dtype=dt, device="meta")
                              for n, (dt, shape) in specs.items()})
        io.write_shard_lazily(path, specs, checkpoint.read_one,
                              {"sdq_dtype": str(dtype).removeprefix("torch.")})
    if calibrated:
        model.load_state_dict(checkpoint.read(names), strict=False, assign=True)
        model.tie_weights()


def _layer_shard(layer, prefix: str, index: int, report: QuantizeReport) -> tuple[dict, dict]:
    """(tensors, metadata) of a quantized layer's shard: its state under the model's names; the
    metadata keeps its config.json module entries and report lines for the final folder."""
    name = f"{prefix}.{index}"
    tensors = {f"{name}.{k}": t for k, t in io.unique_tensors(layer.state_dict()).items()}
    modules = {f"{name}.{n}": io._module_entry(m) for n, m in io.quantized_modules(layer).items()}
    linears = [[n, v] for (i, n), v in report.linears.items() if i == index]
    return tensors, {"sdq_modules": json.dumps(modules), "sdq_linears": json.dumps(linears)}


def _release_freed_memory() -> None:
    """Hand the memory freed with the finished layer back to the system (glibc's malloc_trim):
    without it, fragments of each layer's buffers stay resident and the process grows a few MB
    per layer. A no-op where there is no glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _shard_metadata(path: Path) -> dict:
    return io.read_header(path).get("__metadata__", {})


def _resume_point(partial: Path, shards: list[str],
                  calibrated: bool) -> tuple[int, torch.Tensor | None]:
    """The first layer to quantize, and (calibrated) its inputs as the killed run left them."""
    if calibrated:
        if not (partial / INPUTS).exists():
            return 0, None
        with safe_open(str(partial / INPUTS), "pt") as f:
            return int(f.metadata()["layer"]), f.get_tensor("hidden")
    done = 0
    while done < len(shards) and (partial / shards[done]).exists():
        done += 1
    return done, None


@torch.no_grad()
def quantize_streaming(source, out, config, calibration: torch.Tensor | None = None, *,
                       tokenizer=None, resume: bool = False, overwrite: bool = False,
                       strict: bool = False, extra=None, progress: bool = True) -> QuantizeReport:
    """Quantize the model in folder `source` layer by layer into the sharded sdq folder `out`.

    config: SDQConfig or WGMConfig (packed methods). calibration: LongTensor [n, seqlen] of token
    ids (calibrated SDQ, as quantize_). resume: continue the killed run into `out` from its
    partial folder (a new run when there is none). overwrite: replace an existing `out` once the
    new folder is complete. tokenizer: saved into `out` when given. extra: a dict, or a function
    of the finished report giving one, added to config.json's quantization_config. The folder's
    tensors equal those quantize_ + save write for the model in memory.
    """
    source, out = Path(source), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    checkpoint = LazyCheckpoint(source)
    model = skeleton(source)
    layers = decoder_layers(model)
    prefix = module_name(model, layers)
    calibrated = calibration is not None
    _, _, quantize = prepare(model, config, calibrated, strict=strict)  # checks, coverage
    report = quantize.report
    partial = _open_partial(out, _fingerprint(source, checkpoint, config, calibration), resume)
    count = len(layers) + 1
    rest_shard = shard_name(1, count)
    shards = [shard_name(index + 2, count) for index in range(len(layers))]
    _write_rest(partial / rest_shard, model, checkpoint, prefix, calibrated)
    start, hidden = _resume_point(partial, shards, calibrated)
    kwargs = None
    if calibrated:
        captured, kwargs = capture_layer_inputs(model, calibration)
        hidden = captured if hidden is None else hidden
        del captured
    if start and progress:
        print(f"resuming {partial}: {start} of {len(layers)} layers already done", flush=True)
    exit_after = os.environ.get(EXIT_HOOK)
    bar = tqdm(range(len(layers)), desc="quantize (streaming)", unit="layer", initial=start,
               total=len(layers), disable=not progress)
    for index in range(start, len(layers)):
        if not calibrated and (partial / shards[index]).exists():
            continue  # finished by the killed run (data-free layers are independent)
        layer = materialise(layers[index], f"{prefix}.{index}", checkpoint)
        plan = plan_layer(layer)
        hidden = quantize_layer(index, layer, plan, _selected(index, plan, None), quantize,
                                hidden, kwargs)
        io.write_shard(partial / shards[index], *_layer_shard(layer, prefix, index, report))
        del layer, plan
        _release_freed_memory()
        if calibrated:  # after the layer's shard: a kill in between redoes this layer
            io.write_shard(partial / INPUTS, {"hidden": hidden}, {"layer": str(index + 1)})
        bar.update()
        if exit_after is not None and index == int(exit_after):
            os._exit(75)
    bar.close()
    _finish(partial, out, model, [rest_shard, *shards], config, report, tokenizer, extra,
            overwrite)
    return report


def _finish(partial: Path, out: Path, model, shards: list[str], config, report: QuantizeReport,
            tokenizer, extra, overwrite: bool) -> None:
    """Collect the layers' module entries and report lines from their shards, write the index,
    config.json and tokenizer, and rename the folder to `out`."""
    modules = {}
    for index, shard in enumerate(shards[1:]):
        meta = _shard_metadata(partial / shard)
        modules.update(json.loads(meta["sdq_modules"]))
        report.linears.update({(index, n): v for n, v in json.loads(meta["sdq_linears"])})
    report.linears = dict(sorted(report.linears.items()))
    if not modules:
        raise ValueError("no layer was quantized: nothing to write")
    hf_config = model.config.to_dict()
    hf_config["dtype"] = _shard_metadata(partial / shards[0])["sdq_dtype"]
    extra = extra(report) if callable(extra) else extra
    io.write_sharded_config(partial, hf_config, io.quantization_entry(config, modules, extra),
                            shards)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(partial))
    (partial / INPUTS).unlink(missing_ok=True)
    (partial / RUN).unlink()
    if overwrite:
        io._move_into_place(partial, out)
    else:
        os.replace(partial, out)
