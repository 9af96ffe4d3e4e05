// CPU kernels for quantized matrix products, called through XLA's FFI.
//
// Both read a Dense kernel's codes in jaxquant's stored layout, [K, N] contraction-major
// (4-bit codes two per byte along N: column 2i in the low nibble of byte i), once, and widen
// them in registers; neither writes a widened copy of the weights.
//
//   jaxquant_wq_matmul     y[m, n] = Σ_g s[g, n] · (Σ_{k∈g} x[m, k] · q[k, n] − z[g, n] · Σ_{k∈g} x[m, k])
//                          float32 activations × int8 or 4-bit codes (group or channel scales
//                          along K, optional zero points): weight-only (W8A16 / W4A16).
//   jaxquant_int8_matmul   y[m, n] = (Σ_k a[m, k] · q[k, n]) · sa[m] · sw[n]
//                          int8 × int8 products summed exactly in int32 (W8A8).
//
// Work is split over column tiles of 16 on XLA's intra-op thread pool. The code path is chosen
// at run time: AVX-512 (F, BW, VNNI: 16-lane widening for up to 4 rows, vpdpbusd for W8A8),
// else AVX2 + FMA; a portable scalar loop computes the same sums elsewhere (and the column
// tail). `jaxquant_kernels_set_isa` caps the path, so one machine can test each.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JQ_X86 1
#else
#define JQ_X86 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;      // output columns per register tile
constexpr int64_t kVnniWide = 64;  // columns per VNNI tile (one zmm of bytes per row of K)

// --------------------------------------------------------------------------- threading
// Chunks are claimed from a shared counter by the caller and by pool tasks alike, so the
// caller never waits for a task that has not started (no deadlock when every pool thread is
// itself inside a kernel).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, const F& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  if (chunks <= 1) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  auto state = std::make_shared<State>();
  const int64_t total = chunks;
  auto work = [state, total, &body]() {
    int64_t finished = 0;
    for (int64_t c; (c = state->next.fetch_add(1)) < total;) {
      body(c);
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += finished;
      if (state->done == total) state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  // Tasks that start after every chunk is claimed return at once; `body` is only called for
  // claimed chunks, all of which finish before this function returns.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, total, work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == total; });
}

// --------------------------------------------------------------------------- instruction sets
// The widest code path this CPU runs, lowered by `jaxquant_kernels_set_isa` (tests and
// benchmarks compare the paths on one machine): 0 scalar, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VNNI).
std::atomic<int> isa_cap{2};

int DetectIsa() {
#if JQ_X86
  static const int detected = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni")) {
      return 2;
    }
    return 1;
  }();
  return detected;
#else
  return 0;
#endif
}

int Isa() { return std::min(DetectIsa(), isa_cap.load(std::memory_order_relaxed)); }

int64_t ChunksFor(int64_t tiles, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(tiles, 4 * std::max<int64_t>(threads, 1)));
}

// --------------------------------------------------------------------------- weight-only
// K is walked in blocks of a few rows (never across a scale group when folding), so every
// pass over the codes streams a few rows at once: whole-K passes per column tile would touch
// one page per row and thrash the TLB.
constexpr int64_t kPanelBlock = 128;  // rows per dequantized panel for many rows
constexpr int64_t kPanelTiles = 16;   // tiles per panel: 128 x 256 floats, 128 KiB
constexpr int64_t kRowBlock = 96;     // activation rows per pass over a panel (outputs in L2)
constexpr int64_t kFewRows = 4;
// up to this many rows: fold path; more: panel path

struct WqProblem {
  const float* x;      // [M, K]
  const uint8_t* w;    // int8 [K, N] or packed [K, ceil(N / 2)]
  const float* scale;  // [G, N]
  const float* zero;   // [G, N] or nullptr
  float* y;            // [M, N]
  int64_t m, k, n, groups, group, row_bytes;
  int bits;
  bool is_signed;
  std::vector<float> xsum;  // fold path: [M, G], Σ_{k∈g} x[m, k]
};

void SumGroups(WqProblem& p) {
  p.xsum.assign(p.m * p.groups, 0.f);
  for (int64_t r = 0; r < p.m; ++r) {
    for (int64_t g = 0; g < p.groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) s += p.x[r * p.k + k];
      p.xsum[r * p.groups + g] = s;
    }
  }
}

inline int32_t Code(const WqProblem& p, int64_t k, int64_t n) {
  const uint8_t* row = p.w + k * p.row_bytes;
  if (p.bits == 8) return p.is_signed ? static_cast<int8_t>(row[n]) : row[n];
  const int32_t nib = (n & 1) ? (row[n >> 1] >> 4) : (row[n >> 1] & 0xF);
  return p.is_signed ? (nib ^ 8) - 8 : nib;
}

inline float Dequantized(const WqProblem& p, int64_t k, int64_t n) {
  const int64_t g = k / p.group;
  const float z = p.zero ? p.zero[g * p.n + n] : 0.f;
  return (static_cast<float>(Code(p, k, n)) - z) * p.scale[g * p.n + n];
}

// Columns [n0, n1) of every row, scalar: y = x · dequantize(w).
void WqColumnsScalar(const WqProblem& p, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < p.m; ++r) {
    const float* x = p.x + r * p.k;
    for (int64_t n = n0; n < n1; ++n) {
      float total = 0.f;
      for (int64_t k = 0; k < p.k; ++k) total += x[k] * Dequantized(p, k, n);
      p.y[r * p.n + n] = total;
    }
  }
}

#if JQ_X86
// 16 codes of row k from column n0 as two float vectors (columns n0..n0+7, n0+8..n0+15);
// signed 4-bit codes come back offset by +8 (callers subtract 8 with the zero point).
template <int BITS, bool SIGNED>
__attribute__((target("avx2,fma"))) inline void Widen(const uint8_t* row, int64_t n0, __m256& lo,
                                                      __m256& hi) {
  if constexpr (BITS == 8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + n0));
    const __m128i v_hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + n0 + 8));
    if constexpr (SIGNED) {
      lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
      hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v_hi));
    } else {
      lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
      hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v_hi));
    }
  } else {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + n0 / 2));
    if constexpr (SIGNED) b = _mm_xor_si128(b, _mm_set1_epi8(static_cast<char>(0x88)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(b, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    const __m128i cols = _mm_unpacklo_epi8(low, high);  // columns n0..n0+15, in order
    lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(cols));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(cols, 8)));
  }
}

// The zero point z' the widened codes are offset by, for group g at columns n0..n0+15.
template <int BITS, bool SIGNED>
__attribute__((target("avx2,fma"))) inline void Zero(const WqProblem& p, int64_t g, int64_t n0,
                                                    __m256& z0, __m256& z1) {
  z0 = z1 = _mm256_set1_ps((BITS == 4 && SIGNED) ? 8.f : 0.f);
  if (p.zero) {
    z0 = _mm256_add_ps(z0, _mm256_loadu_ps(p.zero + g * p.n + n0));
    z1 = _mm256_add_ps(z1, _mm256_loadu_ps(p.zero + g * p.n + n0 + 8));
  }
}

// Fold path: rows of the codes streamed in order, a few at a time, across a chunk of
// columns; sums for the current group in `buf` (cache-resident), folded into y at the
// group's end: y += s · (Σ_{k∈g} x · code − z' · Σ_{k∈g} x). 4-bit codes are summed in
// (even columns, odd columns) order per tile of 16, so nibbles need no interleave.
template <int BITS, bool SIGNED>
__attribute__((target("avx2,fma"))) inline void WidenSplit(const uint8_t* row, int64_t n0,
                                                           __m256& a, __m256& b) {
  if constexpr (BITS == 8) {
    Widen<8, SIGNED>(row, n0, a, b);
  } else {
    const __m256i v =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + n0 / 2)));
    __m256i even = _mm256_and_si256(v, _mm256_set1_epi32(0xF));
    __m256i odd = _mm256_srli_epi32(v, 4);
    if constexpr (SIGNED) {  // two's complement nibble c: c ^ 8 = q + 8
      even = _mm256_xor_si256(even, _mm256_set1_epi32(8));
      odd = _mm256_xor_si256(odd, _mm256_set1_epi32(8));
    }
    a = _mm256_cvtepi32_ps(even);
    b = _mm256_cvtepi32_ps(odd);
  }
}

// buf[r][tile] += Σ_{u<U} x[r, k + u] · codes[k + u, tile] for every tile of [t0, t1)
template <int MR, int U, int BITS, bool SIGNED>
__attribute__((target("avx2,fma"))) void StreamRows(const WqProblem& p, int64_t k, int64_t t0,
                                                    int64_t t1, float* buf, int64_t width) {
  __m256 xv[U][MR];
  #pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) xv[u][r] = _mm256_broadcast_ss(p.x + r * p.k + k + u);
  }
  const int64_t tile_bytes = BITS == 8 ? kTile : kTile / 2;
  const int64_t every = 64 / tile_bytes;  // tiles per cache line
  const bool ahead = k + 2 * U <= p.k;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kTile, off = (t - t0) * kTile;
    if (ahead && (t - t0) % every == 0) {  // the next rows' line at this column, one call ahead
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(p.w + (k + U + u) * p.row_bytes +
                                                   t * tile_bytes),
                     _MM_HINT_T0);
      }
    }
    __m256 acc[MR][2];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm256_loadu_ps(buf + r * width + off);
      acc[r][1] = _mm256_loadu_ps(buf + r * width + off + 8);
    }
    #pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      __m256 w0, w1;
      WidenSplit<BITS, SIGNED>(p.w + (k + u) * p.row_bytes, n0, w0, w1);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        acc[r][0] = _mm256_fmadd_ps(xv[u][r], w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv[u][r], w1, acc[r][1]);
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(buf + r * width + off, acc[r][0]);
      _mm256_storeu_ps(buf + r * width + off + 8, acc[r][1]);
    }
  }
}

// y[r, tile] += s · (buf − z' · Σx) for group g; buf back to zero
template <int MR, int BITS, bool SIGNED>
__attribute__((target("avx2,fma"))) void FoldGroup(const WqProblem& p, int64_t g, int64_t t0,
                                                   int64_t t1, float* buf, int64_t width) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kTile, off = (t - t0) * kTile;
    __m256 z0, z1;
    Zero<BITS, SIGNED>(p, g, n0, z0, z1);
    const __m256 s0 = _mm256_loadu_ps(p.scale + g * p.n + n0);
    const __m256 s1 = _mm256_loadu_ps(p.scale + g * p.n + n0 + 8);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* sums = buf + r * width + off;
      __m256 a0 = _mm256_loadu_ps(sums), a1 = _mm256_loadu_ps(sums + 8);
      if constexpr (BITS == 4) {  // (even, odd) back to column order
        const __m256 lo = _mm256_unpacklo_ps(a0, a1), hi = _mm256_unpackhi_ps(a0, a1);
        a0 = _mm256_permute2f128_ps(lo, hi, 0x20);
        a1 = _mm256_permute2f128_ps(lo, hi, 0x31);
      }
      const __m256 xs = _mm256_set1_ps(p.xsum[r * p.groups + g]);
      float* y = p.y + r * p.n + n0;
      const __m256 d0 = _mm256_fnmadd_ps(z0, xs, a0), d1 = _mm256_fnmadd_ps(z1, xs, a1);
      _mm256_storeu_ps(y, _mm256_fmadd_ps(s0, d0, _mm256_loadu_ps(y)));
      _mm256_storeu_ps(y + 8, _mm256_fmadd_ps(s1, d1, _mm256_loadu_ps(y + 8)));
      _mm256_storeu_ps(sums, _mm256_setzero_ps());
      _mm256_storeu_ps(sums + 8, _mm256_setzero_ps());
    }
  }
}

// ---- AVX-512 fold path: super tiles of 32 columns (two tiles), one zmm per 16 sums.
#define JQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))
constexpr int64_t kWide = 32;  // columns per AVX-512 fold tile

// 32 codes of row k from column n0: int8 as (n0..n0+15, n0+16..n0+31); 4-bit as (even
// columns, odd columns) of n0..n0+31, signed ones offset by +8 as in `Widen`.
template <int BITS, bool SIGNED>
JQ_AVX512 inline void WidenSplit512(const uint8_t* row, int64_t n0, __m512& a, __m512& b) {
  if constexpr (BITS == 8) {
    const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + n0));
    const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + n0 + 16));
    if constexpr (SIGNED) {
      a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v0));
      b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v1));
    } else {
      a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v0));
      b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v1));
    }
  } else {
    const __m512i v =
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + n0 / 2)));
    __m512i even = _mm512_and_si512(v, _mm512_set1_epi32(0xF));
    __m512i odd = _mm512_srli_epi32(v, 4);
    if constexpr (SIGNED) {
      even = _mm512_xor_si512(even, _mm512_set1_epi32(8));
      odd = _mm512_xor_si512(odd, _mm512_set1_epi32(8));
    }
    a = _mm512_cvtepi32_ps(even);
    b = _mm512_cvtepi32_ps(odd);
  }
}

// `StreamRows` over super tiles of 32 columns: tiles [t0, t1), an even count of them
template <int MR, int U, int BITS, bool SIGNED>
JQ_AVX512 void StreamRows512(const WqProblem& p, int64_t k, int64_t t0, int64_t t1, float* buf,
                             int64_t width) {
  const int64_t nb = t0 * kTile, count = (t1 - t0) / 2;
  __m512 xv[U][MR];
  #pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) xv[u][r] = _mm512_set1_ps(p.x[r * p.k + k + u]);
  }
  const int64_t tile_bytes = BITS == 8 ? kWide : kWide / 2;
  const int64_t every = 64 / tile_bytes;  // super tiles per cache line
  const bool ahead = k + 2 * U <= p.k;
  for (int64_t s = 0; s < count; ++s) {
    const int64_t n0 = nb + s * kWide, off = s * kWide;
    if (ahead && s % every == 0) {
      #pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(p.w + (k + U + u) * p.row_bytes +
                                                   n0 * BITS / 8),
                     _MM_HINT_T0);
      }
    }
    __m512 acc[MR][2];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm512_loadu_ps(buf + r * width + off);
      acc[r][1] = _mm512_loadu_ps(buf + r * width + off + 16);
    }
    #pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      __m512 w0, w1;
      WidenSplit512<BITS, SIGNED>(p.w + (k + u) * p.row_bytes, n0, w0, w1);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        acc[r][0] = _mm512_fmadd_ps(xv[u][r], w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(xv[u][r], w1, acc[r][1]);
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(buf + r * width + off, acc[r][0]);
      _mm512_storeu_ps(buf + r * width + off + 16, acc[r][1]);
    }
  }
}

// `FoldGroup` over super tiles of 32 columns: tiles [t0, t1), an even count of them
template <int MR, int BITS, bool SIGNED>
JQ_AVX512 void FoldGroup512(const WqProblem& p, int64_t g, int64_t t0, int64_t t1, float* buf,
                            int64_t width) {
  const int64_t nb = t0 * kTile, count = (t1 - t0) / 2;
  // (even, odd) sums back to column order: lanes 0..15 and 16..31 of the interleave
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx =
    _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 offset = _mm512_set1_ps((BITS == 4 && SIGNED) ? 8.f : 0.f);
  for (int64_t s = 0; s < count; ++s) {
    const int64_t n0 = nb + s * kWide, off = s * kWide;
    __m512 z0 = offset, z1 = offset;
    if (p.zero) {
      z0 = _mm512_add_ps(z0, _mm512_loadu_ps(p.zero + g * p.n + n0));
      z1 = _mm512_add_ps(z1, _mm512_loadu_ps(p.zero + g * p.n + n0 + 16));
    }
    const __m512 s0 = _mm512_loadu_ps(p.scale + g * p.n + n0);
    const __m512 s1 = _mm512_loadu_ps(p.scale + g * p.n + n0 + 16);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* sums = buf + r * width + off;
      __m512 a0 = _mm512_loadu_ps(sums), a1 = _mm512_loadu_ps(sums + 16);
      if constexpr (BITS == 4) {
        const __m512 even = a0, odd = a1;
        a0 = _mm512_permutex2var_ps(even, lo_idx, odd);
        a1 = _mm512_permutex2var_ps(even, hi_idx, odd);
      }
      const __m512 xs = _mm512_set1_ps(p.xsum[r * p.groups + g]);
      float* y = p.y + r * p.n + n0;
      const __m512 d0 = _mm512_fnmadd_ps(z0, xs, a0), d1 = _mm512_fnmadd_ps(z1, xs, a1);
      _mm512_storeu_ps(y, _mm512_fmadd_ps(s0, d0, _mm512_loadu_ps(y)));
      _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(s1, d1, _mm512_loadu_ps(y + 16)));
      _mm512_storeu_ps(sums, _mm512_setzero_ps());
      _mm512_storeu_ps(sums + 16, _mm512_setzero_ps());
    }
  }
}

// Tiles [t0, t1) of MR rows, group by group; WIDE: in zmm (AVX-512, an even count of tiles)
template <int MR, int BITS, bool SIGNED, bool WIDE>
void FoldPath(const WqProblem& p, int64_t t0, int64_t t1) {
  const int64_t width = (t1 - t0) * kTile;
  std::vector<float> buf(MR * width, 0.f);
  constexpr int U = 4;
  auto stream = [&](auto rows, int64_t k) {
    constexpr int R = decltype(rows)::value;
    if constexpr (WIDE) {
      StreamRows512<MR, R, BITS, SIGNED>(p, k, t0, t1, buf.data(), width);
    } else {
      StreamRows<MR, R, BITS, SIGNED>(p, k, t0, t1, buf.data(), width);
    }
  };
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k1 = (g + 1) * p.group;
    int64_t k = g * p.group;
    for (; k + U <= k1; k += U) stream(std::integral_constant<int, U>{}, k);
    for (; k < k1; ++k) stream(std::integral_constant<int, 1>{}, k);
    if constexpr (WIDE) {
      FoldGroup512<MR, BITS, SIGNED>(p, g, t0, t1, buf.data(), width);
    } else {
      FoldGroup<MR, BITS, SIGNED>(p, g, t0, t1, buf.data(), width);
    }
  }
}

template <int BITS, bool SIGNED, bool WIDE>
void FewRows(const WqProblem& p, int64_t t0, int64_t t1) {
  switch (p.m) {
    case 4: FoldPath<4, BITS, SIGNED, WIDE>(p, t0, t1); break;
    case 3: FoldPath<3, BITS, SIGNED, WIDE>(p, t0, t1); break;
    case 2: FoldPath<2, BITS, SIGNED, WIDE>(p, t0, t1); break;
    default: FoldPath<1, BITS, SIGNED, WIDE>(p, t0, t1); break;
  }
}

// Panel path: rows [k0, k1) × 16 columns dequantized once, ((code − z') · s), into `panel`.
template <int BITS, bool SIGNED>
__attribute__((target("avx2,fma"))) void Dequantize(const WqProblem& p, int64_t k0, int64_t k1,
                                                    int64_t n0, float* panel) {
  int64_t g = -1;
  __m256 z0, z1, s0, s1;
  for (int64_t k = k0; k < k1; ++k) {
    if (k / p.group != g) {
      g = k / p.group;
      Zero<BITS, SIGNED>(p, g, n0, z0, z1);
      s0 = _mm256_loadu_ps(p.scale + g * p.n + n0);
      s1 = _mm256_loadu_ps(p.scale + g * p.n + n0 + 8);
    }
    __m256 w0, w1;
    Widen<BITS, SIGNED>(p.w + k * p.row_bytes, n0, w0, w1);
    _mm256_storeu_ps(panel + (k - k0) * kTile, _mm256_mul_ps(_mm256_sub_ps(w0, z0), s0));
    _mm256_storeu_ps(panel + (k - k0) * kTile + 8, _mm256_mul_ps(_mm256_sub_ps(w1, z1), s1));
  }
}

// y[r0 : r0 + MR, n0 : n0 + 16] += x[r0 : r0 + MR, k0 : k1] · panel
template <int MR>
__attribute__((target("avx2,fma"))) void PanelTile(const WqProblem& p, int64_t r0, int64_t n0,
                                                   int64_t k0, int64_t k1, const float* panel) {
  __m256 acc[MR][2];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* x = p.x + r0 * p.k;
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + (k - k0) * kTile);
    const __m256 w1 = _mm256_loadu_ps(panel + (k - k0) * kTile + 8);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * p.k + k);
      acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* y = p.y + (r0 + r) * p.n + n0;
    _mm256_storeu_ps(y, _mm256_add_ps(acc[r][0], _mm256_loadu_ps(y)));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(acc[r][1], _mm256_loadu_ps(y + 8)));
  }
}

template <int BITS, bool SIGNED>
void WqTilesAvx2(const WqProblem& p, int64_t t0, int64_t t1) {
  if (p.m <= kFewRows) {
    FewRows<BITS, SIGNED, false>(p, t0, t1);
    return;
  }
  // GEMM blocking, per block of kPanelTiles tiles and kRowBlock activation rows (whose outputs
  // stay in L2): each panel of kPanelBlock rows of the codes is dequantized once, then every
  // 6 activation rows run over it tile by tile (L1)
  std::vector<float> panel(kPanelBlock * kTile * kPanelTiles);
  for (int64_t g0 = t0; g0 < t1; g0 += kPanelTiles) {
    const int64_t g1 = std::min(t1, g0 + kPanelTiles);
    auto at = [&](int64_t t) { return panel.data() + (t - g0) * kPanelBlock * kTile; };
    for (int64_t m0 = 0; m0 < p.m; m0 += kRowBlock) {
      const int64_t m1 = std::min(p.m, m0 + kRowBlock);
      for (int64_t k0 = 0; k0 < p.k; k0 += kPanelBlock) {
        const int64_t k1 = std::min(p.k, k0 + kPanelBlock);
        for (int64_t t = g0; t < g1; ++t) Dequantize<BITS, SIGNED>(p, k0, k1, t * kTile, at(t));
        int64_t r = m0;
        for (; r + 6 <= m1; r += 6) {
          for (int64_t t = g0; t < g1; ++t) PanelTile<6>(p, r, t * kTile, k0, k1, at(t));
        }
        for (int64_t t = g0; t < g1; ++t) {
          const int64_t n0 = t * kTile;
          switch (m1 - r) {
            case 5: PanelTile<5>(p, r, n0, k0, k1, at(t)); break;
            case 4: PanelTile<4>(p, r, n0, k0, k1, at(t)); break;
            case 3: PanelTile<3>(p, r, n0, k0, k1, at(t)); break;
            case 2: PanelTile<2>(p, r, n0, k0, k1, at(t)); break;
            case 1: PanelTile<1>(p, r, n0, k0, k1, at(t)); break;
            default: break;
          }
        }
      }
    }
  }
}

#endif

bool HasAvx2() { return Isa() >= 1; }
bool HasAvx512() { return Isa() >= 2; }

void WqTiles(const WqProblem& p, int64_t t0, int64_t t1) {
#if JQ_X86
  if (HasAvx2()) {
    for (int64_t r = 0; r < p.m; ++r) {
      std::fill(p.y + r * p.n + t0 * kTile, p.y + r * p.n + t1 * kTile, 0.f);
    }
    if (p.m <= kFewRows && HasAvx512()) {  // pairs of tiles in zmm, an odd last one in ymm
      const int64_t even = t0 + (t1 - t0) / 2 * 2;
      if (p.bits == 8) {
        p.is_signed ? FewRows<8, true, true>(p, t0, even) : FewRows<8, false, true>(p, t0, even);
      } else {
        p.is_signed ? FewRows<4, true, true>(p, t0, even) : FewRows<4, false, true>(p, t0, even);
      }
      t0 = even;
      if (t0 == t1) return;
    }
    if (p.bits == 8) {
      p.is_signed ? WqTilesAvx2<8, true>(p, t0, t1) : WqTilesAvx2<8, false>(p, t0, t1);
    } else {
      p.is_signed ? WqTilesAvx2<4, true>(p, t0, t1) : WqTilesAvx2<4, false>(p, t0, t1);
    }
    return;
  }
#endif
  WqColumnsScalar(p, t0 * kTile, t1 * kTile);
}

ffi::Error WqMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> zero,
                    ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t is_signed,
                    int64_t has_zero) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("jaxquant_wq_matmul: x, w and scale must be 2-D");
  }
  WqProblem p;
  p.m = xd[0];
  p.k = xd[1];
  p.n = sd[1];
  p.groups = sd[0];
  p.bits = static_cast<int>(bits);
  p.is_signed = is_signed != 0;
  p.row_bytes = wd[1];
  const int64_t want_bytes = bits == 8 ? p.n : (p.n + 1) / 2;
  if (wd[0] != p.k || p.row_bytes != want_bytes || p.groups < 1 || p.k % p.groups ||
      (bits != 4 && bits != 8)) {
    return ffi::Error::InvalidArgument("jaxquant_wq_matmul: inconsistent shapes");
  }
  p.group = p.k / p.groups;
  p.x = x.typed_data();
  p.w = static_cast<const uint8_t*>(w.untyped_data());
  p.scale = scale.typed_data();
  p.zero = has_zero ? zero.typed_data() : nullptr;
  p.y = y->typed_data();
  if (p.m <= kFewRows) SumGroups(p);
  const int64_t tiles = p.n / kTile;
  // few rows: one thread streams the codes (measured: splitting the columns over XLA's pool
  // was slower on 2 cores, the stream is memory-bound); many rows: every thread of the pool
  const int64_t chunks = p.m <= kFewRows ? 1 : ChunksFor(tiles, pool.num_threads() + 1);
  ParallelFor(pool, chunks, [&](int64_t c) {
    WqTiles(p, tiles * c / chunks, tiles * (c + 1) / chunks);
  });
  if (tiles * kTile < p.n) WqColumnsScalar(p, tiles * kTile, p.n);
  return ffi::Error::Success();
}

// --------------------------------------------------------------------------- int8 x int8
constexpr int64_t kPairBlock = 4;  // pairs of rows of w streamed per pass (8 rows of K)

struct I8Problem {
  const int32_t* pairs;  // [M, ceil(K / 2)]: (a[m, 2j] as u16) | (a[m, 2j + 1] << 16)
  const int8_t* a;       // [M, K]
  const int8_t* w;       // [K, N]
  const float* sa;       // [M]
  const float* sw;       // [N]
  const int32_t* quads;  // [M, ceil(K / 4)]: a[m, 4j..4j+3] as the bytes of one int32 (VNNI)
  const int32_t* asum;   // [M]: Σ_k a[m, k] (VNNI)
  int32_t* acc;          // [M, N] exact partial sums
  float* y;              // [M, N]
  int64_t m, k, n, half, quarter;
};

void I8ColumnsScalar(const I8Problem& p, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < p.m; ++r) {
    for (int64_t n = n0; n < n1; ++n) {
      int32_t acc = 0;
      for (int64_t k = 0; k < p.k; ++k) acc += int32_t(p.a[r * p.k + k]) * p.w[k * p.n + n];
      p.y[r * p.n + n] = static_cast<float>(acc) * p.sa[r] * p.sw[n];
    }
  }
}

#if JQ_X86
// Rows [r0, r0 + MR), columns [n0, n0 + 16), pairs [j0, j1): rows 2j, 2j+1 of w interleaved
// as int16 and multiplied with (a[2j], a[2j+1]) by vpmaddwd, added to the int32 sums.
template <int MR>
__attribute__((target("avx2,fma"))) void I8Tile(const I8Problem& p, int64_t r0, int64_t n0,
                                                int64_t j0, int64_t j1) {
  __m256i acc[MR][2];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m128i zero = _mm_setzero_si128();
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t k = 2 * j;
    const __m128i r_even = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w + k * p.n + n0));
    const __m128i r_odd =
      k + 1 < p.k ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w + (k + 1) * p.n + n0))
                  : zero;
    const __m256i e = _mm256_cvtepi8_epi16(r_even), o = _mm256_cvtepi8_epi16(r_odd);
    // lanes: lo = columns [0..3 | 8..11], hi = [4..7 | 12..15], each (even, odd) pairs
    const __m256i lo = _mm256_unpacklo_epi16(e, o), hi = _mm256_unpackhi_epi16(e, o);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256i pr = _mm256_set1_epi32(p.pairs[(r0 + r) * p.half + j]);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(lo, pr));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(hi, pr));
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    int32_t* out = p.acc + (r0 + r) * p.n + n0;
    const __m256i c0 = _mm256_permute2x128_si256(acc[r][0], acc[r][1], 0x20);  // columns 0..7
    const __m256i c1 = _mm256_permute2x128_si256(acc[r][0], acc[r][1], 0x31);  // 8..15
    __m256i* o0 = reinterpret_cast<__m256i*>(out);
    __m256i* o1 = reinterpret_cast<__m256i*>(out + 8);
    _mm256_storeu_si256(o0, _mm256_add_epi32(c0, _mm256_loadu_si256(o0)));
    _mm256_storeu_si256(o1, _mm256_add_epi32(c1, _mm256_loadu_si256(o1)));
  }
}

void I8TilesAvx2(const I8Problem& p, int64_t t0, int64_t t1) {
  for (int64_t j0 = 0; j0 < p.half; j0 += kPairBlock) {
    const int64_t j1 = std::min(p.half, j0 + kPairBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile;
      int64_t r = 0;
      for (; r + 4 <= p.m; r += 4) I8Tile<4>(p, r, n0, j0, j1);
      switch (p.m - r) {
        case 3: I8Tile<3>(p, r, n0, j0, j1); break;
        case 2: I8Tile<2>(p, r, n0, j0, j1); break;
        case 1: I8Tile<1>(p, r, n0, j0, j1); break;
        default: break;
      }
    }
  }
  for (int64_t r = 0; r < p.m; ++r) {
    for (int64_t n = t0 * kTile; n < t1 * kTile; ++n) {
      p.y[r * p.n + n] = static_cast<float>(p.acc[r * p.n + n]) * p.sa[r] * p.sw[n];
    }
  }
}

// ---- AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, four products per int32
// lane. The weights are the unsigned side, offset by +128 (w ^ 0x80), so
// Σ_k (w + 128) · a = Σ_k w · a + 128 · Σ_k a, and 128 · Σ_k a[m, k] is taken off at the end
// (exact: |Σ| < 255 · 128 · K fits int32 for K < 65,000).

// Quads [j0, j0 + QB) of K (rows 4j..4j+3 of w) × VNNI tiles [s0, s1): four rows of bytes
// interleaved into 4 zmm, zmm c holding columns 16ℓ + 4c + i at lane 4ℓ + i (ℓ = 128-bit lane);
// the int32 sums are kept in that order in `acc` (`VnniFinish` puts them back).
template <int QB>
JQ_AVX512 void VnniBlock(const I8Problem& p, int64_t j0, int64_t s0, int64_t s1) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const bool ahead = 4 * (j0 + 2 * QB) <= p.k;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t n0 = s * kVnniWide;
    __m512i w[QB][4];
    #pragma GCC unroll 4
    for (int q = 0; q < QB; ++q) {
      const int64_t k = 4 * (j0 + q);
      __m512i r[4];
      #pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        r[i] = k + i < p.k ? _mm512_xor_si512(_mm512_loadu_si512(p.w + (k + i) * p.n + n0), flip)
                           : _mm512_setzero_si512();  // past K: zero, times a zero activation
        if (ahead) {
          _mm_prefetch(reinterpret_cast<const char*>(p.w + (k + 4 * QB + i) * p.n + n0),
                       _MM_HINT_T0);
        }
      }
      const __m512i lo01 = _mm512_unpacklo_epi8(r[0], r[1]), hi01 = _mm512_unpackhi_epi8(r[0], r[1]);
      const __m512i lo23 = _mm512_unpacklo_epi8(r[2], r[3]), hi23 = _mm512_unpackhi_epi8(r[2], r[3]);
      w[q][0] = _mm512_unpacklo_epi16(lo01, lo23);
      w[q][1] = _mm512_unpackhi_epi16(lo01, lo23);
      w[q][2] = _mm512_unpacklo_epi16(hi01, hi23);
      w[q][3] = _mm512_unpackhi_epi16(hi01, hi23);
    }
    for (int64_t m = 0; m < p.m; ++m) {
      int32_t* out = p.acc + m * p.n + n0;
      __m512i a[4];
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) a[c] = _mm512_loadu_si512(out + 16 * c);
      #pragma GCC unroll 4
      for (int q = 0; q < QB; ++q) {
        const __m512i av = _mm512_set1_epi32(p.quads[m * p.quarter + j0 + q]);
        #pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) a[c] = _mm512_dpbusd_epi32(a[c], w[q][c], av);
      }
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) _mm512_storeu_si512(out + 16 * c, a[c]);
    }
  }
}

// y for VNNI tiles [s0, s1): sums back to column order, offset removed, rescaled
void VnniFinish(const I8Problem& p, int64_t s0, int64_t s1) {
  for (int64_t m = 0; m < p.m; ++m) {
    const int32_t offset = 128 * p.asum[m];
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = s * kVnniWide;
      const int32_t* sums = p.acc + m * p.n + n0;
      for (int c = 0; c < 4; ++c) {
        for (int l = 0; l < 4; ++l) {
          for (int i = 0; i < 4; ++i) {
            const int64_t n = n0 + 16 * l + 4 * c + i;
            p.y[m * p.n + n] =
              static_cast<float>(sums[16 * c + 4 * l + i] - offset) * p.sa[m] * p.sw[n];
          }
        }
      }
    }
  }
}

void VnniTiles(const I8Problem& p, int64_t s0, int64_t s1) {
  const int64_t quads = p.quarter;
  int64_t j = 0;
  if (p.m > 4) {  // more rows: more of K per pass, fewer passes over the sums
    for (; j + 4 <= quads; j += 4) VnniBlock<4>(p, j, s0, s1);
  }
  for (; j < quads; ++j) VnniBlock<1>(p, j, s0, s1);
  VnniFinish(p, s0, s1);
}
#endif

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::F32> sa,
                      ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> sw,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto ad = a.dimensions(), wd = w.dimensions();
  if (ad.size() != 2 || wd.size() != 2 || ad[1] != wd[0] ||
      static_cast<int64_t>(sa.element_count()) != ad[0] ||
      static_cast<int64_t>(sw.element_count()) != wd[1]) {
    return ffi::Error::InvalidArgument("jaxquant_int8_matmul: inconsistent shapes");
  }
  I8Problem p;
  p.m = ad[0];
  p.k = ad[1];
  p.n = wd[1];
  p.half = (p.k + 1) / 2;
  p.a = a.typed_data();
  p.w = w.typed_data();
  p.sa = sa.typed_data();
  p.sw = sw.typed_data();
  p.y = y->typed_data();
  const bool vnni = HasAvx512();
  // VNNI tiles of 64 columns first, then tiles of 16 (AVX2), then single columns
  const int64_t wide = vnni ? p.n / kVnniWide : 0;
  const int64_t tiles = p.n / kTile, first_tile = wide * kVnniWide / kTile;
  // int16 pairs of activations: only for AVX2 tiles, i.e. the columns VNNI tiles leave
  std::vector<int32_t> pairs(HasAvx2() && first_tile < tiles ? p.m * p.half : 0);
  for (int64_t r = 0; r < p.m && !pairs.empty(); ++r) {
    for (int64_t j = 0; j < p.half; ++j) {
      const int64_t k = 2 * j;
      const uint16_t even = static_cast<uint16_t>(static_cast<int16_t>(p.a[r * p.k + k]));
      const uint16_t odd =
        k + 1 < p.k ? static_cast<uint16_t>(static_cast<int16_t>(p.a[r * p.k + k + 1])) : 0;
      pairs[r * p.half + j] = static_cast<int32_t>(uint32_t(even) | (uint32_t(odd) << 16));
    }
  }
  p.pairs = pairs.data();
  p.quarter = (p.k + 3) / 4;
  std::vector<int32_t> quads(vnni ? p.m * p.quarter : 0, 0), asum(vnni ? p.m : 0, 0);
  if (vnni) {
    for (int64_t r = 0; r < p.m; ++r) {
      int8_t* bytes = reinterpret_cast<int8_t*>(quads.data() + r * p.quarter);
      std::memcpy(bytes, p.a + r * p.k, p.k);
      for (int64_t k = 0; k < p.k; ++k) asum[r] += p.a[r * p.k + k];
    }
  }
  p.quads = quads.data();
  p.asum = asum.data();
  std::vector<int32_t> acc(HasAvx2() ? p.m * p.n : 0, 0);
  p.acc = acc.data();
  const int64_t units = wide + (tiles - first_tile);
  const int64_t chunks = p.m <= 4 ? 1 : ChunksFor(units, pool.num_threads() + 1);  // as above
  ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t u0 = units * c / chunks, u1 = units * (c + 1) / chunks;
#if JQ_X86
    if (vnni && u0 < wide) VnniTiles(p, u0, std::min(u1, wide));
    const int64_t t0 = std::max(u0, wide) - wide + first_tile;
    const int64_t t1 = std::max(u1, wide) - wide + first_tile;
    if (HasAvx2()) {
      if (t0 < t1) I8TilesAvx2(p, t0, t1);
      return;
    }
    I8ColumnsScalar(p, t0 * kTile, t1 * kTile);
#else
    I8ColumnsScalar(p, u0 * kTile, u1 * kTile);
#endif
  });
  if (tiles * kTile < p.n) I8ColumnsScalar(p, tiles * kTile, p.n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantWqMatmul, WqMatmul,
                              ffi::Ffi::Bind()
                                .Ctx<ffi::ThreadPool>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Arg<ffi::AnyBuffer>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Ret<ffi::Buffer<ffi::F32>>()
                                .Attr<int64_t>("bits")
                                .Attr<int64_t>("signed")
                                .Attr<int64_t>("has_zero"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                .Ctx<ffi::ThreadPool>()
                                .Arg<ffi::Buffer<ffi::S8>>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Arg<ffi::Buffer<ffi::S8>>()
                                .Arg<ffi::Buffer<ffi::F32>>()
                                .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int jaxquant_kernels_have_avx2() { return HasAvx2() ? 1 : 0; }

// The code path in use: 0 scalar, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VNNI).
extern "C" int jaxquant_kernels_isa() { return Isa(); }

// Caps the code path at `level` (as `jaxquant_kernels_isa` numbers them; 2 lifts the cap);
// returns the path now in use.
extern "C" int jaxquant_kernels_set_isa(int level) {
  isa_cap.store(std::max(0, std::min(level, 2)));
  return Isa();
}
