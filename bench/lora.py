"""The README's LoRA example, measured: adapters trained on a quantized default model.

Quantizes SmolLM2-135M data-free (ternary, OSR 2, --codes: the paper's modulator by default, which
is fast and leaves much to recover), or loads a saved sdq folder (--model DIR, e.g. the README's main
job's output), saves and reloads it (the model then computes from the packed file, as a user's
would), wraps every SDQLinear in a rank-8
LoRA adapter (sdq.lora), trains the adapters for --steps AdamW steps on calibration text (next-token
loss, gradients through the add-only ops' backward), and reports the training loss per step, the
held-out perplexity before and after, and whether the packed tensors are bit-identical after
training. Writes bench/results/lora.json.

    python bench/lora.py [--steps 20] [--batch 4] [--seqlen 128] [--lr 2e-3]
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
import time

import torch

import sdq
import sdq.lora
from sdq.data import calibration_tokens, eval_tokens, load_model
from sdq.evaluate import perplexity
from sdq.nn import SDQLinear, set_max_kernel_tokens

from _common import machine, write_json


def packed_digest(model) -> str:
    """SHA-256 over every SDQLinear's packed tensors (codes, scales, means, signs), in module
    order: independent of module names, which change when the adapters wrap the layers."""
    h = hashlib.sha256()
    for m in model.modules():
        if isinstance(m, SDQLinear):
            for k, t in m.state_dict().items():
                h.update(k.encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--codes", default="sigma_delta", choices=["sigma_delta", "gram"])
    ap.add_argument("--model", default=None, help="a saved sdq folder to start from")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.model:
        model, tok = sdq.load(args.model, with_tokenizer=True)
    else:
        model, tok = load_model()
        with torch.no_grad():
            sdq.quantize_(model, sdq.SDQConfig(osr=2, levels="ternary", codes=args.codes))
        with tempfile.TemporaryDirectory() as d:
            sdq.save(model, f"{d}/q", tok)
            model = sdq.load(f"{d}/q")
    quantize_s = time.perf_counter() - t0
    evals = eval_tokens(tok, args.eval_tokens)
    set_max_kernel_tokens(model, 32)  # 512-token windows: the dequantized weight is faster
    with torch.no_grad():
        ppl_before = perplexity(model, evals, seqlen=512)
    set_max_kernel_tokens(model, None)  # training runs through the add-only ops and their backward
    digest = packed_digest(model)

    params = sdq.lora.add_lora(model, rank=args.rank, alpha=2 * args.rank)
    opt = torch.optim.AdamW(params, lr=args.lr)
    data = calibration_tokens(tok, args.steps * args.batch, args.seqlen, seed=1)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        ids = data[step * args.batch: (step + 1) * args.batch]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
        print(f"step {step + 1:3d}  loss {losses[-1]:.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    set_max_kernel_tokens(model, 32)
    with torch.no_grad():
        ppl_after = perplexity(model, evals, seqlen=512)
    unchanged = packed_digest(model) == digest
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps ({train_s:.0f} s); "
          f"held-out perplexity {ppl_before:.1f} -> {ppl_after:.1f}; packed tensors unchanged: "
          f"{unchanged}")
    path = write_json("lora.json", {
        "model": args.model or "SmolLM2-135M-Instruct, quantized data-free: ternary OSR 2",
        "args": vars(args), "losses": losses, "ppl_before": ppl_before, "ppl_after": ppl_after,
        "eval_tokens": args.eval_tokens, "packed_unchanged": unchanged,
        "prepare_seconds": quantize_s, "train_seconds": train_s,
        "threads": torch.get_num_threads(), "machine": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
