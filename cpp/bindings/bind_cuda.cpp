// Binding of the CUDA kernels (cuda.h). Arguments are device pointers passed as Python ints
// (torch: tensor.data_ptr()) and a stream handle (torch.cuda.current_stream().cuda_stream; 0 =
// the legacy default stream). Each call checks, in this order, and raises ValueError naming the
// argument: the sizes (non-negative counts, a valid layout, no int64 overflow of the buffers'
// extents), the required pointers (non-null), each pointer's alignment to its element type, and,
// only when there is work to do, that every pointer is memory the current device can read
// (device memory of the current device, or managed memory: cuda::pointer_info). Python
// (sdq.ops) checks dtype, device and contiguity of the tensors before; these checks are the
// native side's own, so that a wrong pointer is an error and not a crash or a wrong answer.
// Status::not_built, Status::cuda_error and internal errors raise RuntimeError.
// Nothing here initialises CUDA until a call has work: has_cuda() only reports whether the
// kernels were compiled in, the plan helpers are host arithmetic, and empty calls return early.
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

#include "common.h"
#include "sdq/cuda.h"
#include "sdq/fwht.h"
#include "sdq/layout.h"

namespace sdq::bind {
namespace {

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

std::string hex(uintptr_t p) {
  static const char digits[] = "0123456789abcdef";
  std::string s;
  do s.insert(s.begin(), digits[p % 16]); while (p /= 16);
  return "0x" + s;
}

cuda::GemmKernel parse_gemm_kernel(const std::string& name) {
  if (name == "auto") return cuda::GemmKernel::automatic;
  if (name == "table") return cuda::GemmKernel::table;
  if (name == "warp_rows") return cuda::GemmKernel::warp_rows;
  if (name == "tensor") return cuda::GemmKernel::tensor;
  throw py::value_error("kernel must be 'auto', 'table', 'warp_rows' or 'tensor', got '" + name +
                        "'");
}

void require_ptr(uintptr_t p, const char* name) {
  if (p == 0) throw py::value_error(std::string(name) + " must be a non-null device pointer");
}

// A misaligned float/half access faults the whole CUDA context, so refuse it here.
void require_aligned(uintptr_t p, size_t bytes, const char* name, const char* type) {
  if (p % bytes != 0)
    throw py::value_error(std::string(name) + " must be " + std::to_string(bytes) +
                          "-byte aligned (" + type + "), got address " + hex(p));
}

using NamedPtrs = std::initializer_list<std::pair<const char*, uintptr_t>>;

void require_floats_aligned(NamedPtrs ptrs) {
  for (const auto& [name, p] : ptrs) require_aligned(p, sizeof(float), name, "float32");
}

void require_positive(int64_t v, const char* name) {
  if (v < 1) throw py::value_error(std::string(name) + " must be >= 1, got " + std::to_string(v));
}

void require_nonneg(int64_t v, const char* name) {
  if (v < 0) throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(v));
}

// rows * cols elements of `elem` bytes must be addressable (a, b >= 0).
void require_extent(int64_t rows, int64_t cols, size_t elem, const char* what) {
  const int64_t max = std::numeric_limits<int64_t>::max() / static_cast<int64_t>(elem);
  if (cols != 0 && rows > max / cols)
    throw py::value_error(std::string(what) + " is too large: " + std::to_string(rows) + " x " +
                          std::to_string(cols) + " elements overflow int64");
}

// RuntimeError for a missing build or a CUDA failure (with the runtime's message), ValueError
// for argument errors, MemoryError / RuntimeError for the rest (common.h).
void check_cuda_status(Status s, const std::string& what) {
  if (s == Status::ok) return;
  if (s == Status::not_built)
    throw std::runtime_error(what + ": " + status_string(s) +
                             " (sdq was built without CUDA kernels)");
  if (s == Status::cuda_error)
    throw std::runtime_error(what + ": " + status_string(s) + ": " + cuda::last_error());
  check_status(s, what.c_str());
}

// ValueError unless p is memory a kernel on the current device may read: device memory of the
// current device, or managed memory. One cudaPointerGetAttributes per pointer (microseconds).
void require_device_memory(uintptr_t p, const char* name, const char* fn) {
  cuda::PointerInfo info{};
  check_cuda_status(cuda::pointer_info(as_ptr(p), &info),
                    std::string(fn) + ": cannot check " + name);
  if (info.usable()) return;
  const std::string arg = std::string(fn) + ": " + name + " (" + hex(p) + ")";
  switch (info.kind) {
    case cuda::MemoryKind::device:
      throw py::value_error(arg + " is memory of CUDA device " + std::to_string(info.device) +
                            ", but the current device is " + std::to_string(info.current_device) +
                            " (run under torch.cuda.device(tensor.device))");
    case cuda::MemoryKind::host:
      throw py::value_error(arg + " is pinned host memory, not device memory");
    default:
      throw py::value_error(arg + " is not CUDA memory (host memory or an invalid address); "
                            "pass tensor.data_ptr() of a CUDA tensor");
  }
}

// Every non-zero pointer of the list (zero ones are optional arguments already checked).
void require_device_memory(NamedPtrs ptrs, const char* fn) {
  for (const auto& [name, p] : ptrs)
    if (p != 0) require_device_memory(p, name, fn);
}

void fwht_py(uintptr_t x_ptr, int64_t rows, int64_t n, uintptr_t signs_ptr, bool inverse,
             uintptr_t stream) {
  require_nonneg(rows, "rows");
  if (n < 1 || n > (int64_t{1} << 24) || !is_power_of_two(n))
    throw py::value_error("n must be a power of two in [1, 2^24], got " + std::to_string(n));
  require_extent(rows, n, sizeof(float), "x (rows x n)");
  if (rows > 0) {
    require_ptr(x_ptr, "x_ptr");
    require_aligned(x_ptr, sizeof(float), "x_ptr", "float32");
    require_aligned(signs_ptr, sizeof(float), "signs_ptr", "float32");
    require_device_memory({{"x_ptr", x_ptr}, {"signs_ptr", signs_ptr}}, "cuda_fwht");
  }
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::fwht(static_cast<float*>(as_ptr(x_ptr)), rows, n,
                   static_cast<const float*>(as_ptr(signs_ptr)), inverse, as_ptr(stream));
  }
  check_cuda_status(s, "cuda_fwht");
}

void activation_transform_py(uintptr_t x_ptr, int64_t batch, int64_t in_features,
                             int64_t block_size, double osr, uintptr_t signs_ptr,
                             uintptr_t down_full_ptr, uintptr_t down_last_ptr, uintptr_t xt_ptr,
                             uintptr_t xsum_ptr, uintptr_t stream) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  require_nonneg(batch, "batch");
  if (L.padded(0) > 32768)
    throw py::value_error("block_size must be <= 32768 on CUDA, got " + std::to_string(block_size));
  require_extent(batch, in_features, sizeof(float), "x (batch x in_features)");
  require_extent(batch, L.total_code_cols(), sizeof(float), "xt (batch x total_code_cols)");
  const bool hadamard = signs_ptr != 0;
  if (batch > 0) {
    require_ptr(x_ptr, "x_ptr");
    require_ptr(down_last_ptr, "down_last_ptr");
    if (L.num_blocks() > 1) require_ptr(down_full_ptr, "down_full_ptr");
    require_ptr(xt_ptr, "xt_ptr");
    require_ptr(xsum_ptr, "xsum_ptr");
    require_floats_aligned({{"x_ptr", x_ptr}, {"signs_ptr", signs_ptr},
                            {"down_full_ptr", down_full_ptr}, {"down_last_ptr", down_last_ptr},
                            {"xt_ptr", xt_ptr}, {"xsum_ptr", xsum_ptr}});
    require_device_memory({{"x_ptr", x_ptr}, {"signs_ptr", signs_ptr},
                           {"down_full_ptr", L.num_blocks() > 1 ? down_full_ptr : 0},
                           {"down_last_ptr", down_last_ptr}, {"xt_ptr", xt_ptr},
                           {"xsum_ptr", xsum_ptr}},
                          "cuda_activation_transform");
  }
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::activation_transform(
        L, hadamard, static_cast<const float*>(as_ptr(signs_ptr)),
        static_cast<const float*>(as_ptr(down_full_ptr)),
        static_cast<const float*>(as_ptr(down_last_ptr)), static_cast<const float*>(as_ptr(x_ptr)),
        batch, static_cast<float*>(as_ptr(xt_ptr)), static_cast<float*>(as_ptr(xsum_ptr)),
        as_ptr(stream));
  }
  check_cuda_status(s, "cuda_activation_transform");
}

void addonly_gemm_py(uintptr_t sign_ptr, uintptr_t nonzero_ptr, uintptr_t scale_ptr,
                     uintptr_t mean_ptr, uintptr_t xt_ptr, uintptr_t xsum_ptr, uintptr_t y_ptr,
                     int64_t in_features, int64_t block_size, double osr,
                     const std::string& levels_name, int64_t out, int64_t batch,
                     uintptr_t stream, const std::string& kernel_name) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  const Levels levels = parse_levels(levels_name);
  const cuda::GemmKernel kernel = parse_gemm_kernel(kernel_name);
  require_nonneg(out, "out");
  require_nonneg(batch, "batch");
  if (levels == Levels::binary && nonzero_ptr != 0)
    throw py::value_error("nonzero_ptr must be 0 for levels='binary'");
  require_extent(out, L.words_per_row(), sizeof(word_t), "sign (out x words)");
  require_extent(batch, L.total_code_cols(), sizeof(float), "xt (batch x total_code_cols)");
  require_extent(batch, out, sizeof(float), "y (batch x out)");
  if (out > 0 && batch > 0) {
    require_ptr(sign_ptr, "sign_ptr");
    if (levels == Levels::ternary) require_ptr(nonzero_ptr, "nonzero_ptr");
    require_ptr(scale_ptr, "scale_ptr");
    require_ptr(mean_ptr, "mean_ptr");
    require_ptr(xt_ptr, "xt_ptr");
    require_ptr(xsum_ptr, "xsum_ptr");
    require_ptr(y_ptr, "y_ptr");
    require_aligned(sign_ptr, sizeof(word_t), "sign_ptr", "uint32 words");
    require_aligned(nonzero_ptr, sizeof(word_t), "nonzero_ptr", "uint32 words");
    require_aligned(scale_ptr, sizeof(uint16_t), "scale_ptr", "float16");
    require_aligned(mean_ptr, sizeof(uint16_t), "mean_ptr", "float16");
    require_floats_aligned({{"xt_ptr", xt_ptr}, {"xsum_ptr", xsum_ptr}, {"y_ptr", y_ptr}});
    require_device_memory({{"sign_ptr", sign_ptr}, {"nonzero_ptr", nonzero_ptr},
                           {"scale_ptr", scale_ptr}, {"mean_ptr", mean_ptr}, {"xt_ptr", xt_ptr},
                           {"xsum_ptr", xsum_ptr}, {"y_ptr", y_ptr}},
                          "cuda_addonly_gemm");
  }
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::addonly_gemm(L, levels, static_cast<const word_t*>(as_ptr(sign_ptr)),
                           static_cast<const word_t*>(as_ptr(nonzero_ptr)),
                           static_cast<const uint16_t*>(as_ptr(scale_ptr)),
                           static_cast<const uint16_t*>(as_ptr(mean_ptr)), out,
                           static_cast<const float*>(as_ptr(xt_ptr)),
                           static_cast<const float*>(as_ptr(xsum_ptr)), batch,
                           static_cast<float*>(as_ptr(y_ptr)), as_ptr(stream), kernel);
  }
  if (kernel == cuda::GemmKernel::tensor && s == Status::bad_value)
    throw py::value_error("cuda_addonly_gemm: kernel='tensor' needs a GPU of compute capability "
                          "8.0 or newer (bf16 mma.sync); use 'auto' or 'table'");
  if (kernel == cuda::GemmKernel::tensor && s == Status::bad_size)
    throw py::value_error("cuda_addonly_gemm: kernel='tensor' indexes with 32-bit offsets and "
                          "out * words, batch * code columns or their block counts exceed "
                          "2^31 - 1 here; use 'auto' or 'table'");
  check_cuda_status(s, "cuda_addonly_gemm");
}

py::dict warp_rows_plan_py(int64_t in_features, int64_t block_size, double osr, int64_t out,
                           int64_t batch) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  require_positive(out, "out");
  require_positive(batch, "batch");
  const cuda::WarpRowsPlan p = cuda::plan_warp_rows(L, out, batch);
  py::dict d;
  d["tokens"] = p.tokens;
  d["rows_per_warp"] = p.rows_per_warp;
  d["warps_per_cta"] = p.warps_per_cta;
  d["segments"] = p.segments;
  d["row_tiles"] = p.row_tiles;
  d["token_tiles"] = p.token_tiles;
  return d;
}

py::dict tensor_rows_plan_py(int64_t in_features, int64_t block_size, double osr, int64_t out,
                             int64_t batch, int num_sms) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  require_positive(out, "out");
  require_positive(batch, "batch");
  require_positive(num_sms, "num_sms");
  const cuda::TensorRowsPlan p = cuda::plan_tensor_rows(L, out, batch, num_sms);
  py::dict d;
  d["tokens"] = p.tokens;
  d["rows_per_cta"] = p.rows_per_cta;
  d["row_tiles"] = p.row_tiles;
  d["token_tiles"] = p.token_tiles;
  d["splits"] = p.splits;
  d["blocks_per_split"] = p.blocks_per_split;
  return d;
}

py::dict gemm_plan_py(int64_t in_features, int64_t block_size, double osr, int64_t out,
                      int64_t batch, int num_sms) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  require_positive(out, "out");
  require_positive(batch, "batch");
  require_positive(num_sms, "num_sms");
  const cuda::GemmPlan p = cuda::plan_addonly_gemm(L, out, batch, num_sms);
  py::dict d;
  d["threads"] = cuda::kGemmThreads;
  d["tokens"] = p.tokens;
  d["chunk_words"] = p.chunk_words;
  d["words"] = p.words;
  d["chunks"] = p.chunks;
  d["row_tiles"] = p.row_tiles;
  d["token_tiles"] = p.token_tiles;
  d["splits"] = p.splits;
  d["chunks_per_split"] = p.chunks_per_split;
  d["smem_bytes"] = p.smem_bytes;
  d["gemm_path"] = p.gemm_path();
  return d;
}

py::dict act_plan_py(int64_t in_features, int64_t block_size, double osr, int64_t batch) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  require_positive(batch, "batch");
  const cuda::ActPlan p = cuda::plan_activation_transform(L, batch);
  py::dict d;
  d["threads"] = cuda::kActThreads;
  d["cols_per_cta"] = cuda::kActCols;
  d["tokens"] = p.tokens;
  d["col_tiles"] = p.col_tiles;
  d["token_tiles"] = p.token_tiles;
  d["smem_bytes"] = p.smem_bytes;
  return d;
}

py::dict fwht_plan_py(int64_t rows, int64_t n, int64_t smem_optin) {
  require_positive(rows, "rows");
  if (n < 1 || n > (int64_t{1} << 24) || !is_power_of_two(n))
    throw py::value_error("n must be a power of two in [1, 2^24], got " + std::to_string(n));
  if (smem_optin < 48 * 1024)
    throw py::value_error("smem_optin must be >= 49152, got " + std::to_string(smem_optin));
  const cuda::FwhtPlan p = cuda::plan_fwht(rows, n, cuda::fwht_max_smem_n(smem_optin));
  py::dict d;
  d["threads"] = cuda::kFwhtThreads;
  d["two_pass"] = p.two_pass;
  d["n1"] = p.n1;
  d["n2"] = p.n2;
  d["rows_per_cta"] = p.rows_per_cta;
  d["cols_per_cta"] = p.cols_per_cta;
  d["smem_bytes_rows"] = p.smem_bytes_rows;
  d["smem_bytes_cols"] = p.smem_bytes_cols;
  return d;
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def("has_cuda", [] { return cuda::built(); },
        "True iff this build contains the CUDA kernels (does not initialise CUDA or need a GPU).");
  m.def("cuda_fwht", &fwht_py, py::arg("x_ptr"), py::arg("rows"), py::arg("n"),
        py::arg("signs_ptr") = 0, py::arg("inverse") = false, py::arg("stream") = 0,
        "In place on device float32 [rows, n] (contiguous), n a power of two <= 2^24:\n"
        "x <- H diag(signs) x / sqrt(n) (inverse: x <- diag(signs) H x / sqrt(n)).\n"
        "signs_ptr: device float32 [n] of +-1, or 0 for none.");
  m.def("cuda_activation_transform", &activation_transform_py, py::arg("x_ptr"),
        py::arg("batch"), py::arg("in_features"), py::arg("block_size"), py::arg("osr"),
        py::arg("signs_ptr"), py::arg("down_full_ptr"), py::arg("down_last_ptr"),
        py::arg("xt_ptr"), py::arg("xsum_ptr"), py::arg("stream") = 0,
        "Device version of activation_transform. x: float32 [batch, in_features];\n"
        "signs: float32 [block_size] (0: no Hadamard rotation); down_full / down_last: float32\n"
        "[padded, m] of a full / the last block; outputs xt: float32 [batch, total_code_cols],\n"
        "xsum: float32 [batch, num_blocks]. All contiguous.");
  m.def("cuda_addonly_gemm", &addonly_gemm_py, py::arg("sign_ptr"), py::arg("nonzero_ptr"),
        py::arg("scale_ptr"), py::arg("mean_ptr"), py::arg("xt_ptr"), py::arg("xsum_ptr"),
        py::arg("y_ptr"), py::arg("in_features"), py::arg("block_size"), py::arg("osr"),
        py::arg("levels"), py::arg("out"), py::arg("batch"), py::arg("stream") = 0,
        py::arg("kernel") = "auto",
        "Device version of addonly_gemm. sign / nonzero: uint32 (int32) bitplanes [out, words]\n"
        "(nonzero_ptr 0 for levels='binary'); scale / mean: fp16 [out, num_blocks];\n"
        "xt, xsum: from cuda_activation_transform; y: float32 [batch, out] output.\n"
        "kernel: 'auto' (today the table kernel), 'table' or 'warp_rows' (exact float kernels;\n"
        "the table kernel measured faster, bench/kernels_gpu.py), 'tensor' (bf16-rounded xt\n"
        "times the +-1 codes on the tensor cores, fp32 sums; compute capability 8.0+).");
  m.def("cuda_warp_rows_plan", &warp_rows_plan_py, py::arg("in_features"), py::arg("block_size"),
        py::arg("osr"), py::arg("out"), py::arg("batch"),
        "Launch geometry of the warp_rows kernel of cuda_addonly_gemm.");
  m.def("cuda_tensor_rows_plan", &tensor_rows_plan_py, py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"), py::arg("out"), py::arg("batch"),
        py::arg("num_sms"),
        "Launch geometry of the tensor kernel of cuda_addonly_gemm on num_sms multiprocessors.");
  m.def("cuda_last_error", [] { return std::string(cuda::last_error()); },
        "Text of the last CUDA runtime error seen by the kernels on this thread.");
  m.def("cuda_gemm_plan", &gemm_plan_py, py::arg("in_features"), py::arg("block_size"),
        py::arg("osr"), py::arg("out"), py::arg("batch"), py::arg("num_sms"),
        "Launch geometry cuda_addonly_gemm would use on a device with num_sms multiprocessors.");
  m.def("cuda_activation_transform_plan", &act_plan_py, py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"), py::arg("batch"),
        "Launch geometry of cuda_activation_transform.");
  m.def("cuda_fwht_plan", &fwht_plan_py, py::arg("rows"), py::arg("n"), py::arg("smem_optin"),
        "Launch geometry of cuda_fwht for a device with smem_optin bytes of shared memory.");
}

}  // namespace sdq::bind
