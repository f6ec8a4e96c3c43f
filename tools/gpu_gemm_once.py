"""One cuda_addonly_gemm call per kernel family on random codes, for a profiler to watch.

Usage (a CUDA build of sdq on PYTHONPATH):
  ncu --clock-control none --section SpeedOfLight -k regex:"warp_rows|addonly|tensor_rows" \\
      python3 tools/gpu_gemm_once.py [out in osr levels batch]
"""
import argparse

import torch

import sdq._core as core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=int, nargs="?", default=8192)
    ap.add_argument("in_features", type=int, nargs="?", default=8192)
    ap.add_argument("osr", type=float, nargs="?", default=2.0)
    ap.add_argument("levels", nargs="?", default="binary", choices=["binary", "ternary"])
    ap.add_argument("batch", type=int, nargs="?", default=1)
    args = ap.parse_args()
    out, n_in, osr, levels, batch = (args.out, args.in_features, args.osr, args.levels,
                                     args.batch)
    lay = core.layout(n_in, 128, osr)
    words, nb, cols = lay["words_per_row"], lay["num_blocks"], lay["total_code_cols"]
    g = torch.Generator(device="cuda").manual_seed(0)
    plane = lambda: torch.randint(-2**31, 2**31 - 1, (out, words), dtype=torch.int32,  # noqa: E731
                                  device="cuda", generator=g)
    sign, nz = plane(), plane() if levels == "ternary" else None
    scale = torch.rand(out, nb, device="cuda", generator=g).half()
    mean = torch.rand(out, nb, device="cuda", generator=g).half()
    xt = torch.randn(batch, cols, device="cuda", generator=g)
    xsum = torch.randn(batch, nb, device="cuda", generator=g)
    y = torch.empty(batch, out, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    for kernel in ("table", "warp_rows", "tensor"):
        core.cuda_addonly_gemm(sign.data_ptr(), nz.data_ptr() if nz is not None else 0,
                               scale.data_ptr(), mean.data_ptr(), xt.data_ptr(), xsum.data_ptr(),
                               y.data_ptr(), n_in, 128, osr, levels, out, batch, stream,
                               kernel=kernel)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
