// Binding of the CUDA kernels (cuda.h). Arguments are device pointers passed as Python ints
// (torch: tensor.data_ptr()) and a stream handle (torch.cuda.current_stream().cuda_stream; 0 =
// the legacy default stream). Sizes are validated here and raise ValueError naming the argument;
// Status::not_built and Status::cuda_error raise RuntimeError. Nothing here initialises CUDA:
// has_cuda() only reports whether the kernels were compiled in, and the plan helpers are host
// arithmetic.
#include <cstdint>
#include <string>

#include "common.h"
#include "sdq/cuda.h"
#include "sdq/fwht.h"
#include "sdq/layout.h"

namespace sdq::bind {
namespace {

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

void require_ptr(uintptr_t p, const char* name) {
  if (p == 0) throw py::value_error(std::string(name) + " must be a non-null device pointer");
}

void require_positive(int64_t v, const char* name) {
  if (v < 1) throw py::value_error(std::string(name) + " must be >= 1, got " + std::to_string(v));
}

void require_nonneg(int64_t v, const char* name) {
  if (v < 0) throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(v));
}

// RuntimeError for a missing build or a CUDA failure, ValueError for the rest.
void check_cuda_status(Status s, const char* what) {
  if (s == Status::ok) return;
  if (s == Status::not_built)
    throw std::runtime_error(std::string(what) + ": " + status_string(s) +
                             " (sdq was built without CUDA kernels)");
  if (s == Status::cuda_error)
    throw std::runtime_error(std::string(what) + ": " + status_string(s) + ": " +
                             cuda::last_error());
  check_status(s, what);
}

void fwht_py(uintptr_t x_ptr, int64_t rows, int64_t n, uintptr_t signs_ptr, bool inverse,
             uintptr_t stream) {
  require_nonneg(rows, "rows");
  if (n < 1 || n > (int64_t{1} << 24) || !is_power_of_two(n))
    throw py::value_error("n must be a power of two in [1, 2^24], got " + std::to_string(n));
  if (rows > 0) require_ptr(x_ptr, "x_ptr");
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
  if (batch > 0) {
    require_ptr(x_ptr, "x_ptr");
    require_ptr(down_last_ptr, "down_last_ptr");
    if (L.num_blocks() > 1) require_ptr(down_full_ptr, "down_full_ptr");
    require_ptr(xt_ptr, "xt_ptr");
    require_ptr(xsum_ptr, "xsum_ptr");
  }
  const bool hadamard = signs_ptr != 0;
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
                     uintptr_t stream) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  const Levels levels = parse_levels(levels_name);
  require_nonneg(out, "out");
  require_nonneg(batch, "batch");
  if (levels == Levels::binary && nonzero_ptr != 0)
    throw py::value_error("nonzero_ptr must be 0 for levels='binary'");
  if (out > 0 && batch > 0) {
    require_ptr(sign_ptr, "sign_ptr");
    if (levels == Levels::ternary) require_ptr(nonzero_ptr, "nonzero_ptr");
    require_ptr(scale_ptr, "scale_ptr");
    require_ptr(mean_ptr, "mean_ptr");
    require_ptr(xt_ptr, "xt_ptr");
    require_ptr(xsum_ptr, "xsum_ptr");
    require_ptr(y_ptr, "y_ptr");
    if (sign_ptr % 4 != 0 || nonzero_ptr % 4 != 0)
      throw py::value_error("sign_ptr and nonzero_ptr must be 4-byte aligned (uint32 words)");
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
                           static_cast<float*>(as_ptr(y_ptr)), as_ptr(stream));
  }
  check_cuda_status(s, "cuda_addonly_gemm");
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
        "Device version of addonly_gemm. sign / nonzero: uint32 (int32) bitplanes [out, words]\n"
        "(nonzero_ptr 0 for levels='binary'); scale / mean: fp16 [out, num_blocks];\n"
        "xt, xsum: from cuda_activation_transform; y: float32 [batch, out] output.");
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
