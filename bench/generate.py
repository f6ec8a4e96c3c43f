"""Tokens/s of greedy generate() on the default model: quantized (add-only kernels) vs fp32.

Quantizes SmolLM2-135M with data-free SDQ (speed does not depend on the code values), saves and
reloads it (so the model computes from the packed file, as a user's would), then times
generate() at batch 1 for: the fp32 model, the loaded model through the add-only kernels, and the
same model through its dequantized weights (the reference path). Checks that the kernels and the
dequantized path give the same tokens. Writes bench/results/generate.json.

    python bench/generate.py [--new-tokens 32] [--osr 2] [--levels ternary]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import sdq
from sdq.data import load_model
from sdq.nn import SDQLinear

from _common import machine, write_json

PROMPT = "The history of the city begins in"


def tokens_per_s(model, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--osr", type=float, default=2.0)
    ap.add_argument("--levels", default="ternary", choices=["binary", "ternary"])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_model()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    fp_tps, _ = tokens_per_s(model, ids, args.new_tokens)
    print(f"fp32: {fp_tps:.1f} tokens/s", flush=True)
    sdq.quantize_(model, sdq.SDQConfig(osr=args.osr, levels=args.levels))
    with tempfile.TemporaryDirectory() as d:
        sdq.save(model, f"{d}/q", tok)
        qmodel = sdq.load(f"{d}/q")
    kern_tps, kern_out = tokens_per_s(qmodel, ids, args.new_tokens)
    for m in qmodel.modules():
        if isinstance(m, SDQLinear):
            m.use_kernels = False
    deq_tps, deq_out = tokens_per_s(qmodel, ids, args.new_tokens)
    same = bool(torch.equal(kern_out, deq_out))
    print(f"sdq add-only kernels: {kern_tps:.1f} tokens/s ({kern_tps / fp_tps:.2f}x fp32); "
          f"dequantized path {deq_tps:.1f} tokens/s; same tokens: {same}")
    print("text:", tok.decode(kern_out[0][ids.shape[1]:]))
    path = write_json("generate.json", {
        "model": "SmolLM2-135M-Instruct", "prompt": PROMPT, "new_tokens": args.new_tokens,
        "config": {"osr": args.osr, "levels": args.levels}, "fp32_tokens_per_s": fp_tps,
        "sdq_kernels_tokens_per_s": kern_tps, "sdq_dequantized_tokens_per_s": deq_tps,
        "kernels_over_fp32": kern_tps / fp_tps, "same_tokens_as_dequantized": same,
        "threads": torch.get_num_threads(), "machine": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
