// Attention of a few query rows (decode / verify / draft shapes) over one layer of the stacked
// KV cache and, in a verification, the block's own new keys/values, with one softmax, on x86
// CPUs with AVX2 + FMA; float32 or bfloat16 keys/values, float32 arithmetic and outputs.
//
// Why: XLA copies the layer out of the stacked cache for its dots (a copy per layer and step),
// its batched dots read every slot, visible or not, and its bfloat16 dots are slow on CPU. Here
// the cache is read in place, and only the slots a row sees.
//
// Contract (what the tests hold): out[b, t, h] depends only on q[b, t, h] and the keys/values
// of the slots that row sees, taken in order (cache slots ascending, then new tokens
// ascending), through the same arithmetic whatever B, T or the threads: each score one 8-lane
// FMA chain over E and a fixed horizontal sum; the max; exp lane by lane; the sum and the
// weighted values accumulated over the visible list in order. A query sees the same list in an
// AR step (all its slots in the cache) and in a verification (the earlier ones in the cache,
// the block's own new), so AR and EESD round identically. One row never spans threads.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernel_common.h"

namespace eesd {
namespace {

using avx2::kLanes;
using avx2::Vec;
using avx2::vfma;
using avx2::vhsum;
using avx2::vload;
using avx2::vzero;

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n).
EESD_AVX2 inline Vec vexp(Vec x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));  // Below: 2^n is no longer a normal float.
  Vec n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  Vec r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  Vec y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// The operands of one call. Cache layer: [B, K, S, E] at `layer` of [L, B, K, S, E]; new: [B, Tn, K, E].
template <typename W>
struct Operands {
  const float* q;                // [B, T, H, E]
  const W *k_cache, *v_cache;    // the layer's [B, K, S, E]
  const bool* visible;           // [B, T, S]
  const W *k_new, *v_new;        // [B, Tn, K, E]; Tn = 0 when there are none
  const bool* visible_new;       // [B, T, Tn]
  float* out;                    // [B, T, H, E]
  int64_t B, T, H, K, S, E, Tn;
  float scale;
};

// Per-thread scratch: the keys and values a unit's heads see, their scores and probabilities.
template <typename W>
struct Scratch {
  std::vector<const W*> keys, values;
  std::vector<float> p;  // [heads][padded]
};

// Scores p[g * stride + i] = q_g . key_i * scale of NG query heads (rows of q at stride E), two
// keys at a time (2 * NG independent FMA chains), each key loaded once for the NG heads. A
// (head, key) pair's arithmetic is its own: one FMA chain over E from zero, a fixed horizontal sum.
template <int NG, typename W>
EESD_AVX2 void scores(const float* q, const W* const* keys, int64_t n, int64_t E, float scale, float* p,
                      int64_t stride) {
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    Vec s0[NG], s1[NG];
    for (int g = 0; g < NG; ++g) s0[g] = vzero(), s1[g] = vzero();
    for (int64_t e = 0; e < E; e += kLanes) {
      const Vec k0 = vload(keys[i] + e), k1 = vload(keys[i + 1] + e);
      for (int g = 0; g < NG; ++g) {
        const Vec qg = vload(q + g * E + e);
        s0[g] = vfma(qg, k0, s0[g]), s1[g] = vfma(qg, k1, s1[g]);
      }
    }
    for (int g = 0; g < NG; ++g) p[g * stride + i] = vhsum(s0[g]) * scale, p[g * stride + i + 1] = vhsum(s1[g]) * scale;
  }
  for (; i < n; ++i) {
    Vec s0[NG];
    for (int g = 0; g < NG; ++g) s0[g] = vzero();
    for (int64_t e = 0; e < E; e += kLanes) {
      const Vec k0 = vload(keys[i] + e);
      for (int g = 0; g < NG; ++g) s0[g] = vfma(vload(q + g * E + e), k0, s0[g]);
    }
    for (int g = 0; g < NG; ++g) p[g * stride + i] = vhsum(s0[g]) * scale;
  }
}

// Scores p[0, n) -> probabilities in place (zero past n, up to `padded`): the max (exact in any
// order), exp lane by lane, the sum over the list in 8 lanes and a fixed horizontal sum.
EESD_AVX2 void softmax(float* p, int64_t n, int64_t padded) {
  Vec m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) m8 = _mm256_max_ps(m8, vload(p + i));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float top = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
  for (; i < n; ++i) top = std::max(top, p[i]);
  const Vec m = _mm256_set1_ps(top);
  Vec sum8 = vzero();
  for (i = 0; i < padded; i += kLanes) {
    Vec e = vexp(_mm256_sub_ps(vload(p + i), m));
    if (i + kLanes > n) {  // The padding lanes count nothing.
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - i), lane)));
    }
    _mm256_storeu_ps(p + i, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  const Vec sum = _mm256_set1_ps(vhsum(sum8));
  for (i = 0; i < padded; i += kLanes) _mm256_storeu_ps(p + i, _mm256_div_ps(vload(p + i), sum));
}

// Columns [c0, c0 + 8 * NC) of NG heads' outputs (rows of out at stride E): sum_i p_i v_i in
// order, each value vector loaded once for the NG heads; NG * NC accumulators in registers.
template <int NG, int NC, typename W>
EESD_AVX2 void weighted_values(const float* p, int64_t stride, const W* const* values, int64_t n, int64_t c0,
                               float* out, int64_t E) {
  Vec acc[NG][NC];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) acc[g][c] = vzero();
  for (int64_t i = 0; i < n; ++i) {
    Vec pi[NG];
    for (int g = 0; g < NG; ++g) pi[g] = _mm256_broadcast_ss(p + g * stride + i);
    const W* v = values[i] + c0;
    for (int c = 0; c < NC; ++c) {
      const Vec vc = vload(v + c * kLanes);
      for (int g = 0; g < NG; ++g) acc[g][c] = vfma(pi[g], vc, acc[g][c]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out + g * E + c0 + c * kLanes, acc[g][c]);
}

// Query heads h0 .. h0 + NG - 1 (one kv head kh, so the same visible slots) of row (b, t).
template <int NG, typename W>
EESD_AVX2 void attend_heads(const Operands<W>& a, int64_t b, int64_t t, int64_t h0, Scratch<W>& sc) {
  const int64_t E = a.E, kh = h0 / (a.H / a.K), bt = b * a.T + t;
  // The visible keys/values, in order: the cache layer's slots, then the block's own.
  sc.keys.resize(a.S + a.Tn);
  sc.values.resize(a.S + a.Tn);
  const W** keys = sc.keys.data();
  const W** values = sc.values.data();
  const W *kc = a.k_cache + (b * a.K + kh) * a.S * E, *vc = a.v_cache + (b * a.K + kh) * a.S * E;
  const bool* vis = a.visible + bt * a.S;
  int64_t n = 0;
  for (int64_t s = 0; s < a.S; ++s) {
    keys[n] = kc + s * E, values[n] = vc + s * E;
    n += vis[s];
  }
  const bool* vis_new = a.visible_new + bt * a.Tn;
  for (int64_t u = 0; u < a.Tn; ++u) {
    const int64_t at = ((b * a.Tn + u) * a.K + kh) * E;
    keys[n] = a.k_new + at, values[n] = a.v_new + at;
    n += vis_new[u];
  }
  // Nothing visible: XLA's masked softmax is uniform over every slot (all scores the minimum).
  const bool none = n == 0;
  if (none) {
    for (int64_t s = 0; s < a.S; ++s) values[n++] = vc + s * E;
    for (int64_t u = 0; u < a.Tn; ++u) values[n++] = a.v_new + ((b * a.Tn + u) * a.K + kh) * E;
  }
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  sc.p.assign(NG * padded, 0.0f);
  float* p = sc.p.data();
  const float* q = a.q + (bt * a.H + h0) * E;
  if (!none) scores<NG>(q, keys, n, E, a.scale, p, padded);
  for (int g = 0; g < NG; ++g) softmax(p + g * padded, n, padded);
  // The weighted values, 32 columns at a time (NG * 4 accumulators and a value vector fit 16 registers).
  float* out = a.out + (bt * a.H + h0) * E;
  int64_t c0 = 0;
  for (; c0 + 4 * kLanes <= E; c0 += 4 * kLanes) weighted_values<NG, 4>(p, padded, values, n, c0, out, E);
  switch ((E - c0) / kLanes) {
    case 1: weighted_values<NG, 1>(p, padded, values, n, c0, out, E); break;
    case 2: weighted_values<NG, 2>(p, padded, values, n, c0, out, E); break;
    case 3: weighted_values<NG, 3>(p, padded, values, n, c0, out, E); break;
    default: break;
  }
}

// Visible (row, key) pairs below which a call runs on the calling thread alone: the pool's
// dispatch would cost more than the work (about a microsecond per 500 pairs of E = 64).
constexpr int64_t kInlinePairs = 2048;

template <typename W>
void attend(ffi::ThreadPool& pool, const Operands<W>& a) {
  int64_t pairs = 0;
  for (int64_t i = 0; i < a.B * a.T * a.S; ++i) pairs += a.visible[i];
  for (int64_t i = 0; i < a.B * a.T * a.Tn; ++i) pairs += a.visible_new[i];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = pairs * a.H < kInlinePairs ? 0 : threads - 1;
  // Units: up to 4 query heads of one kv head in one row (they share its slots, so each key and
  // value is loaded once for them), or single heads when that leaves too few units to balance
  // over the threads. A head's arithmetic is the same either way.
  const int64_t G = a.H / a.K, rows = a.B * a.T;
  const int64_t group = rows * a.K * ((G + 3) / 4) >= 2 * threads || helpers == 0 ? std::min<int64_t>(G, 4) : 1;
  const int64_t per_kv = (G + group - 1) / group, units = rows * a.K * per_kv;
  parallel_for(pool, units, std::min(helpers, units - 1), [&a, group, per_kv, G](int64_t u) {
    thread_local Scratch<W> sc;
    const int64_t bt = u / (a.K * per_kv), kh = (u / per_kv) % a.K, h0 = kh * G + (u % per_kv) * group;
    const int64_t b = bt / a.T, t = bt % a.T;
    switch (std::min(group, kh * G + G - h0)) {
      case 1: attend_heads<1>(a, b, t, h0, sc); break;
      case 2: attend_heads<2>(a, b, t, h0, sc); break;
      case 3: attend_heads<3>(a, b, t, h0, sc); break;
      default: attend_heads<4>(a, b, t, h0, sc); break;
    }
  });
}

template <typename W>
ffi::Error run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::AnyBuffer& k, ffi::AnyBuffer& v, int64_t layer,
               ffi::Buffer<ffi::PRED>& visible, ffi::AnyBuffer& k_new, ffi::AnyBuffer& v_new,
               ffi::Buffer<ffi::PRED>& visible_new, ffi::Result<ffi::Buffer<ffi::F32>>& out) {
  const auto qd = q.dimensions(), cd = k.dimensions(), nd = k_new.dimensions();
  Operands<W> a;
  a.B = qd[0], a.T = qd[1], a.H = qd[2], a.E = qd[3], a.K = cd[2], a.S = cd[3], a.Tn = nd[1];
  const int64_t layer_size = a.B * a.K * a.S * a.E;
  a.q = q.typed_data();
  a.k_cache = static_cast<const W*>(k.untyped_data()) + layer * layer_size;
  a.v_cache = static_cast<const W*>(v.untyped_data()) + layer * layer_size;
  a.visible = visible.typed_data();
  a.k_new = static_cast<const W*>(k_new.untyped_data());
  a.v_new = static_cast<const W*>(v_new.untyped_data());
  a.visible_new = visible_new.typed_data();
  a.out = out->typed_data();
  a.scale = static_cast<float>(std::pow(static_cast<double>(a.E), -0.5));  // As Python's E**-0.5.
  attend(pool, a);
  return ffi::Error::Success();
}

template <typename Dims>
bool same(const Dims& a, std::initializer_list<int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// out[B, T, H, E] = softmax over the visible slots of layer `layer` of k/v [L, B, K, S, E]
// (visible [B, T, S]) and of k_new/v_new [B, Tn, K, E] (visible_new [B, T, Tn]; Tn may be 0).
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::PRED> visible, ffi::AnyBuffer k_new,
                     ffi::AnyBuffer v_new, ffi::Buffer<ffi::PRED> visible_new,
                     ffi::Result<ffi::Buffer<ffi::F32>> out) {
  if (!cpu_supported()) return ffi::Error(ffi::ErrorCode::kUnimplemented, "eesd attention: CPU lacks AVX2/FMA");
  const auto qd = q.dimensions(), cd = k.dimensions(), nd = k_new.dimensions();
  if (qd.size() != 4 || cd.size() != 5 || nd.size() != 4)
    return ffi::Error::InvalidArgument("eesd attention: want q[B, T, H, E], k/v[L, B, K, S, E], k/v_new[B, Tn, K, E]");
  const int64_t B = qd[0], T = qd[1], H = qd[2], E = qd[3], L = cd[0], K = cd[2], S = cd[3], Tn = nd[1];
  if (cd[1] != B || cd[4] != E || K < 1 || H % K || E % kLanes || !same(v.dimensions(), {L, B, K, S, E}) ||
      !same(nd, {B, Tn, K, E}) || !same(v_new.dimensions(), {B, Tn, K, E}) || !same(visible.dimensions(), {B, T, S}) ||
      !same(visible_new.dimensions(), {B, T, Tn}) || !same(out->dimensions(), {B, T, H, E}) ||
      layer.element_count() != 1)
    return ffi::Error::InvalidArgument("eesd attention: operand shapes disagree (H a multiple of K, E of 8)");
  const auto dtype = k.element_type();
  if (v.element_type() != dtype || k_new.element_type() != dtype || v_new.element_type() != dtype)
    return ffi::Error::InvalidArgument("eesd attention: keys and values share one dtype");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("eesd attention: layer index outside the cache");
  if (dtype == ffi::DataType::F32) return run<float>(pool, q, k, v, l, visible, k_new, v_new, visible_new, out);
  if (dtype == ffi::DataType::BF16) return run<uint16_t>(pool, q, k, v, l, visible, k_new, v_new, visible_new, out);
  return ffi::Error::InvalidArgument("eesd attention: keys/values must be float32 or bfloat16");
}

}  // namespace
}  // namespace eesd

XLA_FFI_DEFINE_HANDLER_SYMBOL(EesdAttention, eesd::Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::AnyBuffer>()          // k cache
                                  .Arg<ffi::AnyBuffer>()          // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // visible
                                  .Arg<ffi::AnyBuffer>()          // k new
                                  .Arg<ffi::AnyBuffer>()          // v new
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // visible new
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The KV-cache write for a bfloat16 cache: XLA:CPU scatters bfloat16 through float32, converting
// the whole cache there and back on every write; here only the written slots are touched.
namespace eesd {
namespace {

// The index in [0, n) that jnp's scatter (mode="drop") writes, or -1 when it drops it.
int64_t in_range(int64_t i, int64_t n) {
  if (i < 0) i += n;
  return i >= 0 && i < n ? i : -1;
}

// out = cache with out[layer[i], row[i], :, slot[i]] = update[i] for each i (update [N, K, E]); out
// aliases the cache (written in place), indices outside the cache are dropped.
ffi::Error WriteSlots(ffi::AnyBuffer cache, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> row,
                      ffi::Buffer<ffi::S32> slot, ffi::AnyBuffer update, ffi::Result<ffi::AnyBuffer> out) {
  const auto cd = cache.dimensions(), ud = update.dimensions();
  const int64_t N = layer.element_count();
  if (cd.size() != 5 || ud.size() != 3 || row.element_count() != N || slot.element_count() != N || ud[0] != N ||
      ud[1] != cd[2] || ud[2] != cd[4] || update.element_type() != cache.element_type() ||
      out->element_type() != cache.element_type() || out->size_bytes() != cache.size_bytes())
    return ffi::Error::InvalidArgument("eesd write_slots: want cache[L, B, K, S, E], N indices and update[N, K, E]");
  const int64_t L = cd[0], B = cd[1], K = cd[2], S = cd[3], E = cd[4];
  const int64_t row_bytes = E * (update.size_bytes() / std::max<int64_t>(update.element_count(), 1));
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != cache.untyped_data()) std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const char* src = static_cast<const char*>(update.untyped_data());
  for (int64_t i = 0; i < N; ++i) {
    const int64_t l = in_range(layer.typed_data()[i], L), b = in_range(row.typed_data()[i], B);
    const int64_t s = in_range(slot.typed_data()[i], S);
    if (l < 0 || b < 0 || s < 0) continue;
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(dst + (((l * B + b) * K + k) * S + s) * row_bytes, src + (i * K + k) * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace eesd

XLA_FFI_DEFINE_HANDLER_SYMBOL(EesdWriteSlots, eesd::WriteSlots,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot
                                  .Arg<ffi::AnyBuffer>()         // update
                                  .Ret<ffi::AnyBuffer>());
