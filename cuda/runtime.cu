// Build marker, error text and cached device queries of the CUDA entry points.
#include <atomic>
#include <cstdio>

#include "common.cuh"
#include "sdq/cuda.h"

namespace sdq::cuda {

namespace {
thread_local char g_last_error[256] = "";
constexpr int kMaxDevices = 64;
std::atomic<int> g_sms[kMaxDevices];         // 0: not queried yet
std::atomic<int> g_smem_optin[kMaxDevices];
std::atomic<int> g_cc_major[kMaxDevices];
}  // namespace

bool built() noexcept { return true; }

const char* last_error() noexcept { return g_last_error; }

Status pointer_info(const void* p, PointerInfo* info) noexcept {
  if (!p || !info) return Status::null_pointer;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return detail::fail(e);
  cudaPointerAttributes attr{};
  e = cudaPointerGetAttributes(&attr, p);
  if (e == cudaErrorInvalidValue) {
    // Runtimes before CUDA 11 report an unknown pointer this way; it is an answer, not a failure,
    // so clear it before a later launch check mistakes it for a launch error.
    (void)cudaGetLastError();
    attr.type = cudaMemoryTypeUnregistered;
    attr.device = -1;
  } else if (e != cudaSuccess) {
    return detail::fail(e);
  }
  info->current_device = dev;
  info->device = -1;
  switch (attr.type) {
    case cudaMemoryTypeDevice: info->kind = MemoryKind::device; info->device = attr.device; break;
    case cudaMemoryTypeManaged: info->kind = MemoryKind::managed; info->device = attr.device; break;
    case cudaMemoryTypeHost: info->kind = MemoryKind::host; break;
    default: info->kind = MemoryKind::unregistered; break;
  }
  return Status::ok;
}

namespace detail {

Status fail(cudaError_t e) noexcept {
  std::snprintf(g_last_error, sizeof(g_last_error), "%s: %s", cudaGetErrorName(e),
                cudaGetErrorString(e));
  // Reported now: clear the runtime's last-error slot so that a later launch check does not report
  // the same (non-sticky) error again as its own.
  (void)cudaGetLastError();
  return Status::cuda_error;
}

Status device_info(DeviceInfo* info) noexcept {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return fail(e);
  if (dev >= 0 && dev < kMaxDevices) {
    const int sms = g_sms[dev].load(std::memory_order_acquire);
    if (sms > 0) {
      info->sms = sms;
      info->smem_optin = g_smem_optin[dev].load(std::memory_order_relaxed);
      info->cc_major = g_cc_major[dev].load(std::memory_order_relaxed);
      return Status::ok;
    }
  }
  int sms = 0, optin = 0, major = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return fail(e);
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return fail(e);
  e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return fail(e);
  info->sms = sms < 1 ? 1 : sms;
  info->smem_optin = optin;
  info->cc_major = major;
  if (dev >= 0 && dev < kMaxDevices) {
    g_smem_optin[dev].store(optin, std::memory_order_relaxed);
    g_cc_major[dev].store(major, std::memory_order_relaxed);
    g_sms[dev].store(info->sms, std::memory_order_release);
  }
  return Status::ok;
}

}  // namespace detail
}  // namespace sdq::cuda
