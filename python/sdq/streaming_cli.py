"""`sdq quantize` in streaming mode: when it applies, and the run (sdq.streaming does the work).

Policy: stream with --streaming or --resume, and on its own when MODEL is a local folder of
safetensors larger than half the available memory (said on stdout). A streamed model is never in
memory whole, so perplexity before/after is not measured: `sdq eval OUT` measures the quantized
folder, which is several times smaller.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .io import INDEX, WEIGHTS


def add_arguments(p) -> None:
    p.add_argument("--streaming", action="store_true",
                   help="read MODEL (a local folder of (sharded) safetensors) one decoder layer at "
                   "a time and write each quantized layer as soon as it is done: memory holds the "
                   "embeddings, the head and about two layers, not the model. On by itself when "
                   "the folder's weights exceed half the available memory. Writes a sharded "
                   "folder; skips perplexity (run `sdq eval OUT`)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed streaming run into the same --out from its partial "
                   "folder .OUT.partial beside it (finished layers are not redone; a new run if "
                   "there is none); implies --streaming")


def _weights_bytes(folder: Path) -> int | None:
    """Size of the folder's safetensors weights, None if it has none."""
    if (folder / INDEX).exists():
        files = set(json.loads((folder / INDEX).read_text())["weight_map"].values())
        return sum((folder / f).stat().st_size for f in files)
    if (folder / WEIGHTS).exists():
        return (folder / WEIGHTS).stat().st_size
    return None


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def wanted(args, folder: Path | None) -> bool:
    """Whether `sdq quantize` streams (see the module's policy); folder: MODEL if local."""
    if args.streaming or args.resume:
        return True
    size = None if folder is None else _weights_bytes(folder)
    if size is None or size <= _available_memory() / 2:
        return False
    print(f"{folder}: {size / 2**30:.1f} GiB of weights, more than half the available memory: "
          f"streaming layer by layer", flush=True)
    return True


def run(args, config, folder: Path | None, error) -> dict:
    """Quantize MODEL by streaming into --out; `error` is the CLI's user-error class."""
    if folder is None or _weights_bytes(folder) is None:
        raise error("streaming needs MODEL to be a local folder of safetensors "
                    f"({WEIGHTS} or {INDEX})")
    if args.method not in ("sdq", "wgm") or args.out is None:
        raise error("streaming writes a packed model: use --method sdq or wgm with --out")
    if args.multi_osr:
        raise error("--multi-osr needs every weight at once; it does not stream")
    t0 = time.time()
    tok = _tokenizer(folder)
    calib = None
    if args.calib_samples and args.method != "wgm":
        if tok is None:
            raise error(f"{folder} has no tokenizer to make calibration text: pass "
                        f"--calib-samples 0 (data-free)")
        from .data import calibration_tokens
        calib = calibration_tokens(tok, args.calib_samples, args.seqlen)
    if args.eval_tokens:
        print("streaming: perplexity is not measured (the model is never in memory whole); "
              f"`sdq eval {args.out}` measures the quantized folder", flush=True)
    summary = {"model": str(folder), "method": args.method, "config": config.to_dict(),
               "streaming": True, "calibration_samples": 0 if calib is None else len(calib)}
    from .streaming import quantize_streaming
    report = quantize_streaming(folder, args.out, config, calib, tokenizer=tok,
                                resume=args.resume, overwrite=args.overwrite, strict=args.strict,
                                extra=lambda r: {"summary": {**summary, **_figures(r)}})
    summary.update(_figures(report), seconds=time.time() - t0)
    print(f"quantized linears: {report.bits_per_weight_all_in:.3f} bits/weight all-in", flush=True)
    print(f"saved {args.out} (sharded)", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


def _figures(report) -> dict:
    return {"bits_per_weight_all_in": report.bits_per_weight_all_in,
            "average_osr": report.average_osr, "coverage": report.coverage}


def _tokenizer(folder: Path):
    """The folder's tokenizer, None when it has no tokenizer files."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))
