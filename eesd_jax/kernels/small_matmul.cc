// y[N, O] = x[N, D] . w[O, D]^T for a few rows N (decode / verify / draft shapes) on x86 CPUs
// with AVX2 + FMA; float32 or bfloat16 weights, float32 inputs, accumulation and outputs.
//
// Why: XLA:CPU's GEMM costs 2.5-3.7x a one-row GEMV for 2-8 rows, while the hardware needs
// little more than one pass over the weights. Here every weight row is read from memory once
// for all N input rows (the rows re-read it from L1).
//
// Contract (what the tests hold): y[n, o] depends only on x[n, :] and w[o, :], through the
// same arithmetic whatever N is: one 8-lane FMA accumulator per (n, o) running over D in
// order, a zero-padded last chunk, then a fixed horizontal sum. Work is split over output
// columns only, so a row's rounding is identical in a one-row AR step and in a k + 1 row
// verification, and greedy EESD equals AR bit for bit.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define EESD_TARGET __attribute__((target("avx2,fma")))

// 8 consecutive weights as float32 lanes.
EESD_TARGET inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
EESD_TARGET inline __m256 load8(const uint16_t* p) {  // bfloat16: the high half of a float32.
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

EESD_TARGET inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R input rows x C weight rows over the whole of D: R * C accumulators, C weight vectors in
// registers, x read as a memory operand (R * C + C <= 16 ymm registers). `tail_x` holds each
// row's last D % 8 values zero-padded to 8 and `tail_w` the C weight rows' (as float32).
template <int R, int C, typename W>
EESD_TARGET void tile(const float* x, const float* tail_x, const W* w, const float* tail_w, float* y,
                      int64_t D, int64_t O) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t body = D - D % 8;
  for (int64_t d = 0; d < body; d += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load8(w + c * D + d);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * D + d);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (body < D) {
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(tail_x + r * 8);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(tail_w + c * 8), acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * O + c] = hsum(acc[r][c]);
}

template <int C, typename W>
EESD_TARGET void rows_tile(int64_t rows, const float* x, const float* tail_x, const W* w, const float* tail_w,
                           float* y, int64_t D, int64_t O) {
  if (rows == 2) return tile<2, C>(x, tail_x, w, tail_w, y, D, O);
  return tile<1, C>(x, tail_x, w, tail_w, y, D, O);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Output columns [o0, o1): four weight rows at a time (two or one at the chunk's end), each
// streamed from memory once for all N rows, which take them two at a time from L1: 2 x 4
// independent accumulators keep both FMA units busy. A dot's own arithmetic is the same in
// every tile shape.
template <typename W>
EESD_TARGET void columns(const float* x, const float* tail_x, const W* w, float* y, int64_t N, int64_t D,
                         int64_t O, int64_t o0, int64_t o1) {
  const int64_t body = D - D % 8;
  float tail_w[4 * 8];
  std::memset(tail_w, 0, sizeof(tail_w));
  int64_t o = o0;
  while (o < o1) {
    const int C = o + 4 <= o1 ? 4 : (o + 2 <= o1 ? 2 : 1);
    for (int c = 0; c < C; ++c)
      for (int64_t d = body; d < D; ++d) tail_w[c * 8 + (d - body)] = to_float(w[(o + c) * D + d]);
    for (int64_t n = 0; n < N; n += 2) {
      const int64_t rows = std::min<int64_t>(2, N - n);
      const float* xn = x + n * D;
      const float* tn = tail_x + n * 8;
      float* yn = y + n * O + o;
      const W* wo = w + o * D;
      if (C == 4) rows_tile<4>(rows, xn, tn, wo, tail_w, yn, D, O);
      else if (C == 2) rows_tile<2>(rows, xn, tn, wo, tail_w, yn, D, O);
      else rows_tile<1>(rows, xn, tn, wo, tail_w, yn, D, O);
    }
    o += C;
  }
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

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

template <typename W>
void matmul(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t N, int64_t D, int64_t O) {
  // Each row's zero-padded last chunk, shared by every column.
  const int64_t body = D - D % 8;
  std::unique_ptr<float[]> tail_x(new float[N * 8]());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = body; d < D; ++d) tail_x[n * 8 + (d - body)] = x[n * D + d];
  // Chunks of columns (a multiple of 4) small enough to balance, large enough to stream.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = std::max<int64_t>(64, (O / (4 * threads) + 3) / 4 * 4);
  const int64_t chunks = (O + per - 1) / per;
  const float* tx = tail_x.get();
  parallel_for(pool, chunks, std::min(threads, chunks) - 1,
               [=](int64_t i) { columns(x, tx, w, y, N, D, O, i * per, std::min(O, (i + 1) * per)); });
}

ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("eesd small_matmul: want x[N, D] and w[O, D]");
  if (!cpu_supported()) return ffi::Error(ffi::ErrorCode::kUnimplemented, "eesd small_matmul: CPU lacks AVX2/FMA");
  const int64_t N = xd[0], D = xd[1], O = wd[0];
  if (w.element_type() == ffi::DataType::F32)
    matmul(pool, x.typed_data(), static_cast<const float*>(w.untyped_data()), y->typed_data(), N, D, O);
  else if (w.element_type() == ffi::DataType::BF16)
    matmul(pool, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()), y->typed_data(), N, D, O);
  else
    return ffi::Error::InvalidArgument("eesd small_matmul: weights must be float32 or bfloat16");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EesdSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 when this CPU can run the kernel (checked before it is registered).
extern "C" int eesd_small_matmul_supported() { return cpu_supported() ? 1 : 0; }
