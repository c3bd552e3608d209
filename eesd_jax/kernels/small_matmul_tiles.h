// The kernel's body for one instruction set, included once per ISA by small_matmul.cc inside a
// namespace that defines EESD_TARGET, Vec (kLanes float32 lanes), kRegs (vector registers) and
// vzero / vload (float32 or bfloat16) / vfma / vhsum. No include guard: included twice.

// R input rows x C weight rows over the whole of D: R * C accumulators, C weight vectors in
// registers, x read as a memory operand. `tail_x` holds each row's last D % kLanes values
// zero-padded to kLanes and `tail_w` the C weight rows' (as float32).
template <int R, int C, typename W>
EESD_TARGET void tile(const float* x, const float* tail_x, const W* w, const float* tail_w, float* y,
                      int64_t D, int64_t O) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vzero();
  const int64_t body = D - D % kLanes;
  for (int64_t d = 0; d < body; d += kLanes) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (C + c) * D + d), _MM_HINT_T0);
      wv[c] = vload(w + c * D + d);
    }
    for (int r = 0; r < R; ++r) {
      Vec xv = vload(x + r * D + d);
      asm("" : "+v"(xv));  // In a register: folded into each FMA, x was loaded C times.
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(xv, wv[c], acc[r][c]);
    }
  }
  if (body < D) {
    for (int r = 0; r < R; ++r) {
      const Vec xv = vload(tail_x + r * kLanes);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(xv, vload(tail_w + c * kLanes), acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * O + c] = vhsum(acc[r][c]);
}

// Weight rows a tile of R input rows takes at a time: the R * C accumulators, C weight vectors
// and an x vector fit the registers (at most 4 weight rows on 16 registers, 8 on 32).
constexpr int cols_for(int R) {
  const int fit = (kRegs - 1) / (R + 1);
  return fit < 1 ? 1 : (fit > kRegs / 4 ? kRegs / 4 : fit);
}

// Output columns [o0, o1) for R (<= 8) input rows: C weight rows at a time (one at the chunk's
// end), each streamed from memory once for all R rows, which are read from L1. Every weight
// byte is loaded in one pass, so the stream from memory overlaps the FMAs of all rows.
template <int R, typename W>
EESD_TARGET void row_group(const float* x, const float* tail_x, const W* w, float* y, int64_t D, int64_t O,
                           int64_t o0, int64_t o1) {
  constexpr int C = cols_for(R);
  const int64_t body = D - D % kLanes;
  float tail_w[C * kLanes];
  std::memset(tail_w, 0, sizeof(tail_w));
  auto fill_tail = [&](int64_t o, int rows) {
    for (int c = 0; c < rows; ++c)
      for (int64_t d = body; d < D; ++d) tail_w[c * kLanes + (d - body)] = to_float(w[(o + c) * D + d]);
  };
  int64_t o = o0;
  for (; o + C <= o1; o += C) {
    fill_tail(o, C);
    tile<R, C>(x, tail_x, w + o * D, tail_w, y + o, D, O);
  }
  for (; o < o1; ++o) {
    fill_tail(o, 1);
    tile<R, 1>(x, tail_x, w + o * D, tail_w, y + o, D, O);
  }
}

// Weight rows whose every group of 8 input rows runs before the next such block: more than 8 rows
// then read the block from memory once and again from L2 (a multiple of most tiles' C).
constexpr int64_t kBlockRows = 48;

// Output columns [o0, o1) for all N rows, in groups of up to 8 rows. A dot's own arithmetic is
// the same in every tile shape.
template <typename W>
EESD_TARGET void columns(const float* x, const float* tail_x, const W* w, float* y, int64_t N, int64_t D,
                         int64_t O, int64_t o0, int64_t o1) {
  const int64_t block = N > 8 ? kBlockRows : o1 - o0;
  for (int64_t b0 = o0; b0 < o1; b0 += block) {
    const int64_t b1 = std::min(o1, b0 + block);
    for (int64_t n = 0; n < N; n += 8) {
      const float* xn = x + n * D;
      const float* tn = tail_x + n * kLanes;
      float* yn = y + n * O;
      switch (std::min<int64_t>(8, N - n)) {
        case 1: row_group<1>(xn, tn, w, yn, D, O, b0, b1); break;
        case 2: row_group<2>(xn, tn, w, yn, D, O, b0, b1); break;
        case 3: row_group<3>(xn, tn, w, yn, D, O, b0, b1); break;
        case 4: row_group<4>(xn, tn, w, yn, D, O, b0, b1); break;
        case 5: row_group<5>(xn, tn, w, yn, D, O, b0, b1); break;
        case 6: row_group<6>(xn, tn, w, yn, D, O, b0, b1); break;
        case 7: row_group<7>(xn, tn, w, yn, D, O, b0, b1); break;
        default: row_group<8>(xn, tn, w, yn, D, O, b0, b1); break;
      }
    }
  }
}

template <typename W>
void matmul(ffi::ThreadPool& pool, const float* x, const std::vector<Segment>& segs, int64_t N, int64_t D) {
  // Each row's zero-padded last chunk, shared by every column.
  const int64_t body = D - D % kLanes;
  std::unique_ptr<float[]> tail_x(new float[N * kLanes]());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = body; d < D; ++d) tail_x[n * kLanes + (d - body)] = x[n * D + d];
  // The weights' rows one after another: chunks of them (a multiple of 8) small enough to
  // balance, large enough to stream, each running over the weights it overlaps.
  int64_t total = 0;
  for (const Segment& s : segs) total += s.O;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = std::max<int64_t>(64, (total / (4 * threads) + 7) / 8 * 8);
  const int64_t chunks = (total + per - 1) / per;
  const float* tx = tail_x.get();
  const Segment* sp = segs.data();
  const size_t n_segs = segs.size();
  parallel_for(pool, chunks, std::min(threads, chunks) - 1, [=](int64_t i) {
    int64_t start = 0;  // The first row of segment k among all weights' rows.
    for (size_t k = 0; k < n_segs; start += sp[k].O, ++k) {
      const int64_t o0 = std::max<int64_t>(i * per - start, 0), o1 = std::min((i + 1) * per - start, sp[k].O);
      if (o0 < o1) columns(x, tx, static_cast<const W*>(sp[k].w), sp[k].y, N, D, sp[k].O, o0, o1);
    }
  });
}
