// Thread-local scratch buffers (scratch.h). Freed when their thread exits; the pool's workers
// live as long as the process, so their buffers are reused by every call.
#include "scratch.h"

#include <memory>
#include <new>

namespace sdq::detail {
namespace {

constexpr std::align_val_t kAlign{64};  // a cache line: SIMD loads never split one

struct Free {
  void operator()(void* p) const noexcept { ::operator delete(p, kAlign); }
};

struct Buffer {
  std::unique_ptr<void, Free> data;
  size_t bytes = 0;
};

thread_local Buffer t_buffers[static_cast<int>(ScratchSlot::count)];

}  // namespace

void* scratch_bytes(ScratchSlot slot, size_t bytes) {
  Buffer& b = t_buffers[static_cast<int>(slot)];
  if (bytes > b.bytes) {
    b.data.reset();  // release first: the old and the new buffer need not fit together
    b.bytes = 0;
    b.data.reset(::operator new(bytes, kAlign));  // uninitialised: callers write what they read
    b.bytes = bytes;
  }
  return b.data.get();
}

}  // namespace sdq::detail
