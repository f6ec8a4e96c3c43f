"""The quality table: every method on the default model (SmolLM2-135M) at equal all-in bits.

Perplexity on the held-out Wikipedia text (sdq.data.eval_tokens) against all-in bits per weight of
the quantized linears (codes + scales + means + signs), one line per method, full precision as a
horizontal line. Runs are resumable: each finished run is saved to bench/results/quality.json at
once, and a rerun skips what is there (--redo NAME to repeat one). --plot-only redraws the PNG.

    python bench/quality.py [--calib-samples 16] [--eval-tokens 8192] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import sdq
from sdq.methods import BaselineConfig, WGMConfig

from _common import RESULTS, machine, write_json

SDQ = sdq.SDQConfig


def _runs():
    """(name, family, config, calibrated, multi_osr) in priority order: most telling first."""
    runs = []
    add = lambda name, fam, cfg, cal=False, multi=False: runs.append((name, fam, cfg, cal, multi))  # noqa: E731
    for b in (4, 3, 2):
        add(f"rtn-{b}", "RTN g128", BaselineConfig("rtn", b))
    add("absmean-ternary", "BitNet absmean ternary", BaselineConfig("absmean_ternary"))
    add("sign-rowscale", "sign x row scale", BaselineConfig("sign_rowscale"))
    add("sdq-paper-t2", "SDQ paper, ternary, data-free", SDQ(osr=2))
    add("sdq-gram-gptq-t2", "SDQ+gram+GPTQ (sdq), ternary", SDQ(osr=2, codes="gram"), True)
    add("sdq-gram-gptq-b2", "SDQ+gram+GPTQ (sdq), binary",
        SDQ(osr=2, levels="binary", codes="gram"), True)
    for b in (4, 3, 2):
        add(f"gptq-{b}", "GPTQ g128", BaselineConfig("gptq", b), True)
    add("sdq-paper-gptq-t2", "SDQ paper + GPTQ, ternary", SDQ(osr=2), True)
    for o in (1.0, 1.5):
        add(f"sdq-gram-gptq-t{o:g}", "SDQ+gram+GPTQ (sdq), ternary", SDQ(osr=o, codes="gram"), True)
    for o in (1.0, 3.0, 4.0, 1.5, 2.5):
        add(f"sdq-gram-gptq-b{o:g}", "SDQ+gram+GPTQ (sdq), binary",
            SDQ(osr=o, levels="binary", codes="gram"), True)
    add("sdq-gram-t2", "SDQ+gram, ternary, data-free", SDQ(osr=2, codes="gram"))
    add("sdq-gram-b2", "SDQ+gram, binary, data-free", SDQ(osr=2, levels="binary", codes="gram"))
    for o in (2.0, 3.0, 4.0):
        add(f"sdq-paper-b{o:g}", "SDQ paper, binary, data-free", SDQ(osr=o, levels="binary"))
    for o in (1.0, 1.5):
        add(f"sdq-paper-t{o:g}", "SDQ paper, ternary, data-free", SDQ(osr=o))
    add("sdq-paper-gptq-t1.5", "SDQ paper + GPTQ, ternary", SDQ(osr=1.5), True)
    add("sdq-paper-gptq-b3", "SDQ paper + GPTQ, binary", SDQ(osr=3, levels="binary"), True)
    add("sdq-paper-t2-nohad", "SDQ paper, ternary, data-free, no Hadamard",
        SDQ(osr=2, hadamard=False))
    add("sdq-gram-gptq-t2-nohad", "SDQ+gram+GPTQ, ternary, no Hadamard",
        SDQ(osr=2, codes="gram", hadamard=False), True)
    add("sdq-gram-gptq-t1.5-multi", "SDQ+gram+GPTQ+MultiOSR, ternary",
        SDQ(osr=1.5, codes="gram"), True, True)
    add("sdq-gram-gptq-b2.5-multi", "SDQ+gram+GPTQ+MultiOSR, binary",
        SDQ(osr=2.5, levels="binary", codes="gram"), True, True)
    # WGM (dynamic grouping, data-free): 1 sign + ceil(log2 G) index bits + fp16 scales
    for g in (32, 8, 4):
        add(f"wgm-g{g}", "WGM dynamic grouping, per matrix, data-free",
            WGMConfig(groups=g, method="windowed"))
    add("wgm-block-g4", "WGM dynamic grouping, 64-weight blocks, data-free",
        WGMConfig(groups=4, block_mode=True, method="windowed"))
    # Greedy merging from singletons: the 512-weight windows of the default cannot isolate the
    # largest weights (the top group spans the top 512 |w|), greedy can, at the same bits.
    for g in (32, 8, 4):
        add(f"wgm-g{g}-greedy", "WGM greedy (from singletons), per matrix, data-free",
            WGMConfig(groups=g, method="greedy"))
    return runs


def _load_results() -> dict:
    path = RESULTS / "quality.json"
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def _multi_osr(model, budget):
    from sdq.allocate import multi_osr, weight_stats
    from sdq.traversal import decoder_layers, linear_modules
    stats = weight_stats([linear_modules(layer) for layer in decoder_layers(model)])
    alloc = multi_osr(stats, budget)
    return lambda i, n: alloc[(i, n)]


def run_one(base, tok, spec, calib, eval_ids) -> dict:
    from sdq.evaluate import perplexity
    from sdq.packed_linear import set_max_kernel_tokens
    from sdq.pipeline import quantize_
    name, family, cfg, calibrated, multi = spec
    model = copy.deepcopy(base)
    t0 = time.time()
    report = quantize_(model, cfg, calib if calibrated else None,
                       osr_for=_multi_osr(model, cfg.osr) if multi else None)
    t_quant = time.time() - t0
    set_max_kernel_tokens(model, 32)
    ppl = perplexity(model, eval_ids)
    return {"family": family, "config": cfg.to_dict(), "calibrated": calibrated,
            "multi_osr": multi, "bits_all_in": report.bits_per_weight_all_in,
            "average_osr": report.average_osr, "perplexity": ppl, "quantize_s": t_quant}


def plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fams: dict[str, list] = {}
    for r in results["runs"].values():
        fams.setdefault(r["family"], []).append((r["bits_all_in"], r["perplexity"]))
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.get_cmap("tab20").colors
    for k, (fam, pts) in enumerate(sorted(fams.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^Dv"[k % 5],
                color=colors[k % 20], ls="--" if "data-free" in fam else "-", label=fam)
    if "fp32_perplexity" in results:
        ax.axhline(results["fp32_perplexity"], color="k", ls="--",
                   label=f"full precision ({results['fp32_perplexity']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("all-in bits per weight of the decoder linears")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M, held-out Wikipedia text")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = RESULTS / "quality.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(RESULTS / "quality.png")


def table(results: dict) -> str:
    lines = ["| run | method | bits/weight (all-in) | perplexity |", "|---|---|---|---|"]
    if "fp32_perplexity" in results:
        lines.append(f"| fp32 | full precision | 32 | {results['fp32_perplexity']:.2f} |")
    for name, r in sorted(results["runs"].items(), key=lambda kv: (kv[1]["family"],
                                                                   kv[1]["bits_all_in"])):
        lines.append(f"| {name} | {r['family']} | {r['bits_all_in']:.2f} | {r['perplexity']:.4g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--only", nargs="*", default=None, help="run only these names")
    ap.add_argument("--redo", nargs="*", default=[], help="rerun these names")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    results = _load_results()
    if not args.plot_only:
        from sdq.data import calibration_tokens, eval_tokens, load_model
        from sdq.evaluate import perplexity
        torch.set_grad_enabled(False)
        base, tok = load_model()
        eval_ids = eval_tokens(tok, args.eval_tokens)
        calib = calibration_tokens(tok, args.calib_samples, 512)
        results.update({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF expanded to fp32)",
                        "eval_tokens": args.eval_tokens, "calib_samples": args.calib_samples,
                        "seqlen": 512, "machine": machine()})
        if "fp32_perplexity" not in results:
            results["fp32_perplexity"] = perplexity(base, eval_ids)
            write_json("quality.json", results)
        for spec in _runs():
            name = spec[0]
            if (args.only and name not in args.only) or (name in results["runs"]
                                                         and name not in args.redo):
                continue
            print(f"== {name}", flush=True)
            results["runs"][name] = run_one(base, tok, spec, calib, eval_ids)
            r = results["runs"][name]
            print(f"   {r['bits_all_in']:.3f} bits, perplexity {r['perplexity']:.4g}, "
                  f"{r['quantize_s']:.0f} s", flush=True)
            write_json("quality.json", results)
            plot(results)
    plot(results)
    print(table(results))


if __name__ == "__main__":
    main()
