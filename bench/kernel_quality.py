"""What the int8-table kernels cost in quality: the default model's perplexity through them beside
the exact float-table kernel and the dequantized weights, on the same quantized model.

Quantizes SmolLM2-135M once per setting (calibrated gram codes, as the main job), then scores the same
windows four ways: every linear through the default CPU GEMMs (sdq.ops.set_cpu_gemm("auto"): the
int8 tables, and on AMX CPUs, which these 512-token windows then use, the transform's projection
in bf16 and the int8 AMX GEMM), through the int8 tables alone ("tables"), through the exact
add-only GEMM ("addonly"), and through the dequantized weight (set_max_kernel_tokens(0)).
Writes bench/results/kernel_quality.json.

    python bench/kernel_quality.py [--eval-tokens 4096] [--calib-samples 16] [--only t2 b2]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import sdq
from sdq import ops
from sdq._native import core
from sdq.packed_linear import set_max_kernel_tokens

from _common import machine, write_json

SETTINGS = {"t2": sdq.SDQConfig(osr=2, levels="ternary", codes="gram"),
            "b2": sdq.SDQConfig(osr=2, levels="binary", codes="gram"),
            "b3": sdq.SDQConfig(osr=3, levels="binary", codes="gram")}


def score(model, eval_ids, path: str) -> tuple[float, float]:
    """(perplexity, seconds) with every linear on `path`: "auto", "tables", "addonly" or
    "dequantized"."""
    from sdq.evaluate import perplexity
    set_max_kernel_tokens(model, 0 if path == "dequantized" else None)
    previous = ops.set_cpu_gemm("auto" if path == "dequantized" else path)
    try:
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids)
        return ppl, time.perf_counter() - t0
    finally:
        ops.set_cpu_gemm(previous)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    from sdq.data import calibration_tokens, eval_tokens, load_model
    from sdq.pipeline import quantize_
    torch.set_grad_enabled(False)
    base, tok = load_model()
    eval_ids = eval_tokens(tok, args.eval_tokens)
    calib = calibration_tokens(tok, args.calib_samples, 512)
    rows = {}
    for name in args.only:
        model = copy.deepcopy(base)
        report = quantize_(model, SETTINGS[name], calib)
        row = {"config": SETTINGS[name].to_dict(), "bits_all_in": report.bits_per_weight_all_in}
        for path in ("auto", "tables", "addonly", "dequantized"):
            row[f"ppl_{path}"], row[f"seconds_{path}"] = score(model, eval_ids, path)
        row["int8_over_exact"] = row["ppl_auto"] / row["ppl_addonly"]
        row["tables_over_exact"] = row["ppl_tables"] / row["ppl_addonly"]
        rows[name] = row
        print(f"{name}: default {row['ppl_auto']:.4f} "
              f"({100 * (row['int8_over_exact'] - 1):+.2f}%), int8 tables {row['ppl_tables']:.4f} "
              f"({100 * (row['tables_over_exact'] - 1):+.2f}%), exact {row['ppl_addonly']:.4f}, "
              f"dequantized {row['ppl_dequantized']:.4f}", flush=True)
    write_json("kernel_quality.json", {"model": "SmolLM2-135M-Instruct", "eval_tokens":
                                       args.eval_tokens, "calib_samples": args.calib_samples,
                                       "amx": core().amx_gemm_supported(),
                                       "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
