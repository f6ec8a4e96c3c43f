"""Streaming quantization of a model larger than it needs memory: time and peak RSS.

Makes a synthetic Llama-shaped model (random weights, no download) as a Hugging Face folder of
sharded safetensors with model.safetensors.index.json and config.json, then quantizes it with
`sdq quantize MODEL --out DIR --streaming` in a child process and reports the child's wall time
and peak resident memory (its own ru_maxrss, interpreter and libraries included) against the
model's size. Default shape: hidden 2048, intermediate 5632, 32 heads (4 key-value), 31 layers,
vocabulary 32000, untied head: 1.50B parameters, 3.0 GB in fp16.

  python bench/scale.py                              # data-free, the headline
  python bench/scale.py --kill-after 3               # also: killed after layer 3, then --resume
  python bench/scale.py --calib-samples 4 --seqlen 128   # calibrated (random token ids)

Writes bench/results/scale.json (or --json). The model and outputs live under --workdir
(default: a folder in the system temp dir), reused across runs; --clean removes them after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402

# This process never imports torch: a child's ru_maxrss starts from its parent's peak (Linux
# carries the high-water mark across fork and exec), so the parent must stay small for the
# children's peaks to be theirs. The model is made by a child too (--make-only).

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)


def make_model(folder: Path, layers: int, dtype, shard_bytes: int = 1 << 30) -> int:
    """Write the synthetic model (if not already there); returns its parameter count. config.json
    is written last: a folder that has it is complete."""
    import torch
    import transformers
    from tqdm.auto import tqdm
    from sdq.io import INDEX, write_shard
    from sdq.lazy import skeleton
    config = transformers.LlamaConfig(num_hidden_layers=layers, dtype=dtype, **SHAPE)
    scratch = folder.with_name(folder.name + ".config")
    shutil.rmtree(scratch, ignore_errors=True)
    config.save_pretrained(scratch)
    shapes = {k: (tuple(t.shape)) for k, t in skeleton(scratch).state_dict().items()}
    shutil.rmtree(scratch)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    if (folder / "config.json").exists():
        return params
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():  # state-dict order: embeddings, layer by layer, head
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map = {}
    for k, names in enumerate(tqdm(groups, desc="write synthetic model", unit="shard")):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: _random(shapes[n], n, dtype, gen) for n in names}
        write_shard(folder / file, tensors)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    return params


def _random(shape, name: str, dtype, gen):
    import torch
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)  # norm scales
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def run_child(argv: list[str], env: dict | None = None) -> dict:
    """Run a child process; its exit status, wall time and own peak RSS (os.wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def quantize_argv(args, model: Path, out: Path, resume: bool) -> list[str]:
    if args.calib_samples:  # a synthetic model has no tokenizer: random token ids, via the API
        code = ("import sys, torch, sdq; from sdq.streaming import quantize_streaming; "
                f"quantize_streaming(sys.argv[1], sys.argv[2], sdq.SDQConfig(osr={args.osr}, "
                f"levels={args.levels!r}, codes={args.codes!r}), torch.randint(0, "
                f"{SHAPE['vocab_size']}, ({args.calib_samples}, {args.seqlen}), "
                f"generator=torch.Generator().manual_seed(0)), resume={resume}, overwrite=True)")
        return [sys.executable, "-c", code, str(model), str(out)]
    return [sys.executable, "-m", "sdq.cli", "quantize", str(model), "--out", str(out),
            "--streaming", "--calib-samples", "0", "--eval-tokens", "0", "--overwrite",
            "--levels", args.levels, "--osr", str(args.osr), "--codes", args.codes,
            *(["--resume"] if resume else [])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sdq-scale",
                    help="where the synthetic model and the quantized folder are written")
    ap.add_argument("--layers", type=int, default=31, help="decoder layers (31: 1.50B params)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--levels", choices=["binary", "ternary"], default="binary")
    ap.add_argument("--osr", type=float, default=1.0)
    ap.add_argument("--codes", choices=["sigma_delta", "gram"], default="sigma_delta",
                    help="sigma_delta is the fast modulator; gram is slower (several times)")
    ap.add_argument("--calib-samples", type=int, default=0,
                    help="calibration sequences of random token ids (0: data-free)")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--kill-after", type=int, default=None,
                    help="first run exits hard after this layer (test hook), then --resume")
    ap.add_argument("--json", default="scale.json", help="result file (bench/results/NAME)")
    ap.add_argument("--clean", action="store_true", help="remove --workdir's outputs after")
    ap.add_argument("--make-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_only is not None:  # the child that writes the model
        import torch
        params = make_model(args.make_only, args.layers, getattr(torch, args.dtype))
        print(json.dumps({"params": params}))
        return 0
    # The children import the sdq this process imports (a staged build on PYTHONPATH, or ./python).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [*filter(None, [os.environ.get("PYTHONPATH")]), str(ROOT / "python")])
    model, out = args.workdir / f"llama-{args.layers}l-{args.dtype}", args.workdir / "quantized"
    t0 = time.perf_counter()
    made = subprocess.run([sys.executable, __file__, "--make-only", str(model), "--layers",
                           str(args.layers), "--dtype", args.dtype], check=True, cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    params = json.loads(made.stdout.strip().splitlines()[-1])["params"]
    model_bytes = params * 2  # fp16 and bf16
    print(f"model: {params / 1e9:.3f}B parameters, {model_bytes / 2**30:.2f} GiB "
          f"({time.perf_counter() - t0:.0f} s to make or find)", flush=True)
    runs = {}
    if args.kill_after is not None:
        runs["killed"] = run_child(quantize_argv(args, model, out, False),
                                   {"SDQ_STREAMING_EXIT_AFTER_LAYER": str(args.kill_after)})
        partial = out.parent / f".{out.name}.partial"
        kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("model-*.safetensors")}
        runs["resumed"] = run_child(quantize_argv(args, model, out, True))
        runs["resumed"]["shards_kept_unchanged"] = sum(
            (out / n).stat().st_mtime_ns == t for n, t in kept.items())
    else:
        runs["full"] = run_child(quantize_argv(args, model, out, False))
    final = runs.get("resumed", runs.get("full"))
    if final["returncode"] != 0:
        print(f"quantize failed: {runs}", file=sys.stderr)
        return 1
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    peak = max(r["peak_rss_bytes"] for r in runs.values())
    result = {"model": {"params": params, "dtype": args.dtype, "bytes": model_bytes,
                        "layers": args.layers, **SHAPE},
              "quantize": {"levels": args.levels, "osr": args.osr, "codes": args.codes,
                           "calib_samples": args.calib_samples, "seqlen": args.seqlen},
              "runs": runs, "output_bytes": out_bytes, "peak_rss_bytes": peak,
              "peak_rss_fraction_of_model": round(peak / model_bytes, 4),
              "machine": machine(), "load_average": os.getloadavg()}
    path = write_json(args.json, result)
    print(json.dumps({k: result[k] for k in ("runs", "peak_rss_fraction_of_model")}, indent=2))
    print(f"peak RSS {peak / 2**30:.2f} GiB = {100 * peak / model_bytes:.1f}% of the "
          f"{model_bytes / 2**30:.2f} GiB model; wrote {path}")
    if args.clean:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
