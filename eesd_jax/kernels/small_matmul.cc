// y[N, O] = x[N, D] . w[O, D]^T for a few rows N (decode / verify / draft shapes) on x86 CPUs
// with AVX2 + FMA (AVX-512 where present); float32 or bfloat16 weights, float32 inputs,
// accumulation and outputs.
//
// Why: XLA:CPU's GEMM costs 2.5-3.7x a one-row GEMV for 2-8 rows, while the hardware needs
// little more than one pass over the weights. Here every weight row is read from memory once
// for up to 8 input rows (the rows re-read it from registers, x from L1).
//
// Contract (what the tests hold): y[n, o] depends only on x[n, :] and w[o, :], through the
// same arithmetic whatever N is: one 8-lane (AVX-512: 16-lane) FMA accumulator per (n, o)
// running over D in order, a zero-padded last chunk, then a fixed horizontal sum. Work is split over output
// columns only, so a row's rounding is identical in a one-row AR step and in a k + 1 row
// verification, and greedy EESD equals AR bit for bit.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {  // bfloat16: the high half of a float32.
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

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

// One weight of a call and its output: y[N, O] = x . w[O, D]^T (w float32 or bfloat16).
struct Segment {
  const void* w;
  float* y;
  int64_t O;
};

// The body (small_matmul_tiles.h) once per instruction set, each compiled for its own target
// (a template cannot take a target attribute from its parameters). Which one runs depends on
// the CPU only, never on the row count.
namespace avx2 {
#define EESD_TARGET __attribute__((target("avx2,fma")))
using Vec = __m256;
constexpr int kLanes = 8, kRegs = 16;
EESD_TARGET inline Vec vzero() { return _mm256_setzero_ps(); }
EESD_TARGET inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
EESD_TARGET inline Vec vload(const uint16_t* p) {  // bfloat16: the high half of a float32.
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
EESD_TARGET inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
EESD_TARGET inline float vhsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#include "small_matmul_tiles.h"
#undef EESD_TARGET
}  // namespace avx2

// 16 lanes and 32 registers: half the FMAs of AVX2 for the same rows, which is what 4-16 rows
// are bound by (a one-row call is bound by memory either way).
namespace avx512 {
#define EESD_TARGET __attribute__((target("avx512f,avx2,fma")))
using Vec = __m512;
constexpr int kLanes = 16, kRegs = 32;
EESD_TARGET inline Vec vzero() { return _mm512_setzero_ps(); }
EESD_TARGET inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
EESD_TARGET inline Vec vload(const uint16_t* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
EESD_TARGET inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
EESD_TARGET inline float vhsum(Vec v) {  // The two halves' sum, then AVX2's sum of 8.
  return avx2::vhsum(_mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
#include "small_matmul_tiles.h"
#undef EESD_TARGET
}  // namespace avx512

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// AVX-512 where the CPU has it, unless EESD_CPU_KERNEL_AVX512=0 (read once: tests run both
// paths in subprocesses on such CPUs).
bool use_avx512() {
  static const bool use = [] {
    const char* env = std::getenv("EESD_CPU_KERNEL_AVX512");
    return __builtin_cpu_supports("avx512f") && !(env && std::strcmp(env, "0") == 0);
  }();
  return use;
}

template <typename W>
void matmul(ffi::ThreadPool& pool, const float* x, const std::vector<Segment>& segs, int64_t N, int64_t D) {
  if (use_avx512()) return avx512::matmul<W>(pool, x, segs, N, D);
  avx2::matmul<W>(pool, x, segs, N, D);
}

// y_i = x . w_i^T for one x and one or more weights of one dtype (q/k/v, gate/up): one call,
// its columns balanced over the threads as one, where separate calls paid the pool's dispatch
// each and small weights (k, v) ran on fewer threads than there are.
ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || ws.size() < 1 || ws.size() != ys.size())
    return ffi::Error::InvalidArgument("eesd small_matmul: want x[N, D], weights w_i[O_i, D] and one output each");
  if (!cpu_supported()) return ffi::Error(ffi::ErrorCode::kUnimplemented, "eesd small_matmul: CPU lacks AVX2/FMA");
  const int64_t N = xd[0], D = xd[1];
  std::vector<Segment> segs;
  ffi::DataType dtype = ffi::DataType::INVALID;
  for (size_t i = 0; i < ws.size(); ++i) {
    auto w = ws.get<ffi::AnyBuffer>(i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("eesd small_matmul: bad operand");
    const auto wd = w->dimensions();
    if (wd.size() != 2 || wd[1] != D || (*y)->element_count() != N * wd[0])
      return ffi::Error::InvalidArgument("eesd small_matmul: want x[N, D], weights w_i[O_i, D] and y_i[N, O_i]");
    if (i > 0 && w->element_type() != dtype)
      return ffi::Error::InvalidArgument("eesd small_matmul: the weights of one call share a dtype");
    dtype = w->element_type();
    segs.push_back({w->untyped_data(), (*y)->typed_data(), wd[0]});
  }
  if (dtype == ffi::DataType::F32)
    matmul<float>(pool, x.typed_data(), segs, N, D);
  else if (dtype == ffi::DataType::BF16)
    matmul<uint16_t>(pool, x.typed_data(), segs, N, D);
  else
    return ffi::Error::InvalidArgument("eesd small_matmul: weights must be float32 or bfloat16");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EesdSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

// 1 when this CPU can run the kernel (checked before it is registered).
extern "C" int eesd_small_matmul_supported() { return cpu_supported() ? 1 : 0; }
