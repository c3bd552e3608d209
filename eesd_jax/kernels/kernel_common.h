// What the CPU kernels (small_matmul.cc, attention.cc) share: bfloat16 reads, the AVX2 + FMA
// vector primitives and the loop over XLA's intra-op thread pool.
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace eesd {

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {  // bfloat16: the high half of a float32.
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// Runs fn(chunk) for chunk in [0, chunks) on the calling thread and up to `helpers` tasks of
// XLA's intra-op pool (no threads of our own: XLA's are sized to the cores). Chunks are
// claimed from a shared counter, so the caller never waits on a task that has not started;
// tasks that start late find nothing left and only drop their reference to the shared state.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t chunks, int64_t helpers, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// 8 float32 lanes, float32 or bfloat16 memory.
namespace avx2 {
#define EESD_AVX2 __attribute__((target("avx2,fma")))
using Vec = __m256;
constexpr int kLanes = 8, kRegs = 16;
EESD_AVX2 inline Vec vzero() { return _mm256_setzero_ps(); }
EESD_AVX2 inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
EESD_AVX2 inline Vec vload(const uint16_t* p) {  // bfloat16: the high half of a float32.
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
EESD_AVX2 inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
EESD_AVX2 inline float vhsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
}  // namespace avx2

}  // namespace eesd
