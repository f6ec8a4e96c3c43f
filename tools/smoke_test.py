"""Smoke test of an INSTALLED sdq (a wheel), run inside the environment it was installed in.

tools/wheel_smoke.py runs it in a fresh virtual environment with no compiler on PATH; cibuildwheel
runs it as its test-command. It checks that sdq comes from that environment's site-packages (not
a source tree), that the declared dependencies are met, that the compiled core quantizes and that
the add-only kernels agree with the dense product of the dequantized weight, and (transformers
needed) a quantize_ / save / load round trip of a tiny random Llama.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import sys
import tempfile
import time
from pathlib import Path

COMPILERS = ("cc", "gcc", "c++", "g++", "clang", "clang++", "nvcc")


class SmokeFailure(Exception):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SmokeFailure(message)


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging; the environment always has pip
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def check_installation(expect_cuda: str, no_compiler: bool) -> None:
    if no_compiler:
        found = {c: shutil.which(c) for c in COMPILERS if shutil.which(c)}
        check(not found, f"a compiler is visible on PATH: {found}")
    import sdq
    from sdq import _core
    prefix = Path(sys.prefix).resolve()
    for module in (sdq, _core):
        where = Path(module.__file__).resolve()
        check(where.is_relative_to(prefix) and "site-packages" in where.parts,
              f"{module.__name__} is imported from {where}, not from this environment's "
              f"site-packages ({prefix})")
    version = importlib.metadata.version("sdq")
    check(version.split("+")[0] == sdq.__version__,
          f"installed metadata says {version}, sdq.__version__ is {sdq.__version__}")
    # The CUDA variant carries the local tag "+cuda" (pyproject.toml); it must contain the kernels.
    cuda = sdq.has_cuda()
    check(cuda or not version.endswith("+cuda"), f"{version} is the CUDA variant but has no CUDA")
    if expect_cuda != "any":
        check(cuda == (expect_cuda == "yes"), f"sdq.has_cuda() is {cuda}, expected {expect_cuda}")
    # The wheel is installed without its dependencies (--no-deps): check them here.
    Requirement = _requirement_class()
    for text in importlib.metadata.requires("sdq") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra
        have = importlib.metadata.version(req.name)
        check(req.specifier.contains(have, prereleases=True),
              f"sdq requires {req}, found {req.name} {have}")
    import torch
    print(f"sdq {version} from {Path(sdq.__file__).parent}; torch {torch.__version__}; "
          f"CUDA kernels {'built' if cuda else 'not built'}; "
          f"CPU kernel {_core.addonly_kernel_name()}")


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def check_kernels(device: str) -> None:
    """quantize_weight of a random matrix; SDQLinear must compute F.linear of its dequantized
    weight (batch 1 and batch 7 take different kernels)."""
    import torch
    import torch.nn.functional as F

    import sdq
    torch.manual_seed(0)
    out_f, in_f = 96, 320  # 320: not a multiple of the 128-column block, so blocks are padded
    W = torch.randn(out_f, in_f)
    bias = torch.randn(out_f)
    for levels, codes in (("ternary", "sigma_delta"), ("binary", "gram")):
        qw = sdq.quantize_weight(W, sdq.SDQConfig(osr=2, levels=levels, codes=codes))
        W_hat = qw.dequantize()
        check(W_hat.shape == W.shape and torch.isfinite(W_hat).all(), "bad dequantized weight")
        err = _relative(W_hat, W)
        check(err < 0.7, f"{levels}/{codes}: relative weight error {err:.3f}, expected < 0.7")
        layer = sdq.SDQLinear.from_quantized(qw, bias).to(device)
        # The exact kernels match F.linear to float rounding; the default CPU kernels round the
        # activations to int8 tables (sdq.ops.set_cpu_gemm): about 1% relative difference.
        for gemm, tol in (("addonly", 1e-4), ("auto", 3e-2)):
            previous = sdq.ops.set_cpu_gemm(gemm)
            for batch in (1, 7):
                x = torch.randn(batch, in_f)
                y = layer(x.to(device)).cpu()
                diff = _relative(y, F.linear(x, W_hat, bias))
                check(diff < tol, f"{levels} batch {batch} on {device} ({gemm} GEMM): kernel vs "
                                  f"dense relative difference {diff:.2e}, expected < {tol}")
            sdq.ops.set_cpu_gemm(previous)
        print(f"quantize_weight {levels}/{codes} OSR 2: {qw.bits_per_weight_all_in:.2f} bits, "
              f"weight error {err:.3f}; SDQLinear on {device} matches F.linear (batch 1, 7)")


def check_wgm() -> None:
    import torch
    import torch.nn.functional as F

    from sdq.methods.wgm import WGMConfig, quantize_weight_wgm
    from sdq.wgm_nn import WGMLinear
    W = torch.randn(64, 256)
    ww = quantize_weight_wgm(W, WGMConfig(groups=8))
    layer = WGMLinear.from_quantized(ww)
    x = torch.randn(3, 256)
    diff = _relative(layer(x), F.linear(x, ww.dequantize()))
    check(diff < 1e-4, f"WGMLinear vs dense: relative difference {diff:.2e}")
    print("quantize_weight_wgm G=8: WGMLinear matches F.linear")


def check_save_load() -> None:
    """quantize_ a tiny random Llama, save, load: same logits, packed layers."""
    import torch
    try:
        import transformers
    except ImportError as e:
        raise SmokeFailure("the save/load check needs transformers (pip install "
                           "'transformers>=4.56')") from e

    import sdq
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sdq.quantize_(model, sdq.SDQConfig(osr=2, levels="ternary"), progress=False)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        with tempfile.TemporaryDirectory() as tmp:
            loaded = sdq.load(sdq.save(model, Path(tmp) / "tiny"))
            after = loaded(ids).logits
    packed = sum(isinstance(m, sdq.SDQLinear) for m in loaded.modules())
    check(packed == 14, f"loaded model has {packed} SDQLinear modules, expected 14 (2 x 7)")
    check(torch.isfinite(before).all() and torch.equal(before, after),
          "logits after save/load differ from before")
    print(f"quantize_ / save / load of a tiny Llama: {packed} packed linears, same logits")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-compiler", action="store_true",
                    help=f"fail if any of {', '.join(COMPILERS)} is on PATH")
    ap.add_argument("--expect-cuda", choices=("yes", "no", "any"), default="any",
                    help="whether the installed build must contain the CUDA kernels")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        check_installation(args.expect_cuda, args.no_compiler)
        check_kernels("cpu")
        import torch
        if torch.cuda.is_available():
            import sdq
            if sdq.has_cuda():
                check_kernels("cuda")
        check_wgm()
        check_save_load()
    except SmokeFailure as e:
        print(f"smoke test FAILED: {e}", file=sys.stderr)
        return 1
    print(f"smoke test passed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
