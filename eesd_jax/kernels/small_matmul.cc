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

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "kernel_common.h"

namespace eesd {

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
#define EESD_TARGET EESD_AVX2
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

namespace {

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
}  // namespace eesd

XLA_FFI_DEFINE_HANDLER_SYMBOL(EesdSmallMatmul, eesd::SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

// 1 when this CPU can run the kernel (checked before it is registered).
extern "C" int eesd_small_matmul_supported() { return eesd::cpu_supported() ? 1 : 0; }
