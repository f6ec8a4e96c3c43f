#!/usr/bin/env bash
# A GPU machine's checks in one go: build the extension with the CUDA kernels, run the tests that
# need a GPU, the GPU benchmarks, then the whole suite with the GPU visible (a GPU changes some
# defaults, e.g. device="auto"). Results go to OUTDIR: log.txt (tests, benchmarks), build.log,
# the two benchmarks' JSON, a profiler view (ncu_*.txt) and the tensor kernel's SASS.
# Usage (repo root, nvcc and a GPU present): tools/gpu_check.sh OUTDIR [CUDA architectures]
# Knobs for a short lease: KERNEL_ARGS (bench/kernels_gpu.py's, e.g. "--shapes 8192x8192
# --osrs 2"), LAYER=0 (skip bench/layer_gpu.py), SUITE=0 (skip the whole suite).
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUTDIR [archs]}; archs=${2:-90}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
bdir=build/gpu; stage=build/stage-gpu
t0=$(date +%s)
if ! { cmake -S . -B $bdir -G Ninja -DSDQ_PYTHON=ON -DSDQ_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
         -DCMAKE_CUDA_ARCHITECTURES="$archs" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
       && cmake --build $bdir -j "$(nproc)"; } > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
rm -rf $stage && mkdir -p $stage && cp -r python/sdq $stage/sdq && cp $bdir/_core*.so $stage/sdq/
export PYTHONPATH=$PWD/$stage
python3 -c "import sdq; assert sdq.has_cuda(), 'CUDA kernels missing from the build'"
python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 -rf --maxfail=40 tests/test_cuda.py \
  tests/test_boundary.py tests/test_quantize_device.py tests/test_trit5_format.py 2>&1 \
  | tee -a "$out/log.txt" | tail -15
for lv in binary ternary; do  # profiler view of one 8192x8192 OSR 2 GEMV per kernel family
  timeout 120 ncu --clock-control none --section SpeedOfLight --section Occupancy \
    --section WarpStateStats -k regex:"${NCU_KERNELS:-warp_rows|addonly|tensor_rows}" \
    python3 tools/gpu_gemm_once.py 8192 8192 2.0 $lv 1 > "$out/ncu_$lv.txt" 2>&1
done
cuobjdump -sass $bdir/CMakeFiles/sdq_cuda.dir/cuda/tensor_rows.cu.o > "$out/tensor_rows.sass" 2>&1
# shellcheck disable=SC2086  # KERNEL_ARGS is a list of arguments
python3 bench/kernels_gpu.py ${KERNEL_ARGS:-} --out "$out/kernels_gpu.json" 2>&1 | tee -a "$out/log.txt"
[ "${LAYER:-1}" = 0 ] || python3 bench/layer_gpu.py --out "$out/layer_gpu.json" 2>&1 | tee -a "$out/log.txt"
[ "${SUITE:-1}" = 0 ] || timeout "${SUITE_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n "$(nproc)" \
  -m "not wheel and not slow" tests 2>&1 | tee -a "$out/log.txt" | tail -25
echo "total: $(( $(date +%s) - t0 )) s"
