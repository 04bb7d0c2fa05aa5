// Fused CPU preprocessing: uint8 RGB [H, W, 3] -> normalized [3, crop, crop] float32/float16/bfloat16.
//
// What it fuses: torchvision's eval transform (Resize(resize) bilinear antialiased, CenterCrop(crop),
// ToTensor, Normalize) plus the HWC -> CHW layout change and the output dtype, in one pass over the
// output rows. Only the output pixels inside the center crop are computed, and only the source rows and
// columns they touch are read. There is no full-size float intermediate: for each group of 8 output
// rows, a vertical pass blends the few source rows each needs into a float row (the crop's columns
// only), the 8 rows are transposed so that a horizontal pass can run 8 rows per SIMD instruction, and
// the results are normalized, converted and stored straight into each channel plane.
//
// What it is based on: the coefficients are exactly PIL's ImagingResample (Resample.c,
// precompute_coeffs: triangle filter, support widened by the scale when downscaling, pixel-center
// rounding of the bounds), computed in double and applied without PIL's intermediate uint8 rounding
// (vertical pass in 16-bit fixed point with 2^-14 .. 2^-22 units under AVX2, float32 otherwise;
// horizontal pass in float32), so the result is within one uint8 level of PIL's. Computing only the
// crop box comes from Pillow-SIMD. Unlike PIL (horizontal first) it runs the vertical pass first,
// because that pass is the expensive one (~2 * scale taps over ~crop * scale columns) and vertically it
// is a plain multiply-add over contiguous bytes.
// A source that is not a whole number of pixels (a JPEG decoded at DCT scale 1/s stands for the
// extent orig / s, not ceil(orig / s)) is handled by mapping output pixels onto that fractional extent.
//
// Where it stops being fast: the first pass costs ~6 * scale^2 * crop^2 multiply-adds and reads a
// ~crop * scale square of the source about twice, so a large downscale (10 MP and up) is bound by
// memory, and by cache contention on a shared machine; below ~0.3 MP fixed costs (transposes, the
// Python wrapper's ~15 us) weigh. An image that arrives cold (evicted from the caches, as in a server
// or a round-robin benchmark) costs up to ~2x its warm time at 0.3-2.5 MP: DRAM misses on short rows. Without AVX2/FMA (AURORA_PORTABLE=1, non-x86) a simpler row-at-a-time
// path relies on the compiler's auto-vectorization.

#include "preprocess.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define AURORA_AVX2 1
#endif

namespace aurora {

namespace {

// Round-half-to-even of d / 2, as Python's round() does in torchvision's CenterCrop.
int64_t half_round_even(int64_t d) {
  int64_t h = d / 2;
  if (d % 2 != 0 && h % 2 != 0) h += 1;
  return h;
}

// 1-D resampling weights for `count` consecutive outputs starting at `offset`, out of `out_size`
// outputs covering the source extent [0, extent) of an axis with `in_size` pixels.
struct Coeffs {
  int64_t taps = 0;            // weights per output (uniform; padded with zeros)
  std::vector<int64_t> start;  // first source pixel per output; start + taps <= in_size
  std::vector<float> w;        // count * taps
  int64_t lo = 0, hi = 0;      // source pixels [lo, hi) used by any output
#ifdef AURORA_AVX2  // the layouts below feed only the AVX2 passes; the portable path reads w
  // The same weights blocked by 8 outputs: wblk[(b * taps + k) * 8 + i] = w[(8 b + i) * taps + k], the
  // last output repeated to fill the final block (the horizontal pass computes 8 outputs at a time).
  std::vector<float> wblk;
  // The same weights in fixed point for the AVX2 vertical pass: per output, (taps + 1) / 2 int32 words
  // each holding two int16 weights (taps 2j and 2j + 1, the odd tail padded with 0), in units of
  // 2^-ishift, rounded so that each output's weights sum to exactly 2^ishift.
  std::vector<int32_t> wpair;
  int ishift = 14;
#endif
};

double triangle(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

std::shared_ptr<const Coeffs> build_coeffs(int64_t in_size, double extent, int64_t out_size,
                                           int64_t offset, int64_t count) {
  // PIL's precompute_coeffs with box (0, extent) and the bilinear filter (support 1).
  const double scale = extent / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  const double ss = 1.0 / filterscale;
  std::vector<int64_t> first(count), n(count);
  std::vector<std::vector<double>> ws(count);
  int64_t taps = 1;
  for (int64_t i = 0; i < count; ++i) {
    const double center = (static_cast<double>(offset + i) + 0.5) * scale;
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);  // C truncation, as PIL
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    std::vector<double> k(static_cast<size_t>(std::max<int64_t>(xmax - xmin, 0)));
    double ww = 0.0;
    for (size_t x = 0; x < k.size(); ++x) {
      k[x] = triangle((static_cast<double>(x) + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    if (ww != 0.0)
      for (double& v : k) v /= ww;
    // Zero weights at the ends (e.g. the [1, 0] of an identity axis) cost a full pass of work.
    size_t b = 0, e = k.size();
    while (b < e && k[b] == 0.0) ++b;
    while (e > b && k[e - 1] == 0.0) --e;
    if (b == e) {  // all-zero (cannot happen for a triangle with support >= 1; keep one tap)
      b = 0;
      e = k.empty() ? 0 : 1;
    }
    first[i] = xmin + static_cast<int64_t>(b);
    ws[i].assign(k.begin() + b, k.begin() + e);
    n[i] = static_cast<int64_t>(ws[i].size());
    taps = std::max(taps, n[i]);
  }
  auto c = std::make_shared<Coeffs>();
  c->taps = taps;
  c->start.resize(count);
  c->w.assign(static_cast<size_t>(count * taps), 0.0f);
  c->lo = in_size;
  c->hi = 0;
  for (int64_t i = 0; i < count; ++i) {
    // Uniform tap count; shift the window left where it would run past the edge, zero-padding.
    const int64_t s = std::max<int64_t>(0, std::min(first[i], in_size - taps));
    const int64_t pad = first[i] - s;
    for (int64_t k = 0; k < n[i]; ++k) c->w[i * taps + pad + k] = static_cast<float>(ws[i][k]);
    c->start[i] = s;
    c->lo = std::min(c->lo, s);
    c->hi = std::max(c->hi, s + taps);
  }
#ifdef AURORA_AVX2
  const int64_t blocks = (count + 7) / 8;
  c->wblk.resize(static_cast<size_t>(blocks * taps * 8));
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t k = 0; k < taps; ++k)
      for (int64_t i = 0; i < 8; ++i)
        c->wblk[(b * taps + k) * 8 + i] = c->w[std::min(8 * b + i, count - 1) * taps + k];
  // Largest shift keeping every weight (plus the rounding fix-up) in int16 and sums of 255 * 2^ishift in
  // int32: 2^-18 .. 2^-20 units on a large downscale, far below float's error after ~20 taps.
  float wmax = 0.0f;
  for (float v : c->w) wmax = std::max(wmax, v);
  while (c->ishift < 22 && std::ldexp(static_cast<double>(wmax), c->ishift + 1) < 32000.0) ++c->ishift;
  const int64_t pairs = (taps + 1) / 2;
  c->wpair.assign(static_cast<size_t>(count * pairs), 0);
  std::vector<int32_t> q(static_cast<size_t>(2 * pairs));
  for (int64_t i = 0; i < count; ++i) {
    int64_t sum = 0, big = 0;
    std::fill(q.begin(), q.end(), 0);
    for (int64_t k = 0; k < taps; ++k) {
      q[k] = static_cast<int32_t>(std::lround(std::ldexp(static_cast<double>(c->w[i * taps + k]), c->ishift)));
      sum += q[k];
      if (q[k] > q[big]) big = k;
    }
    q[big] += static_cast<int32_t>((int64_t(1) << c->ishift) - sum);
    for (int64_t j = 0; j < pairs; ++j)
      c->wpair[i * pairs + j] =
          static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(q[2 * j])) |
                               (static_cast<uint32_t>(static_cast<uint16_t>(q[2 * j + 1])) << 16));
  }
#endif
  return c;
}

// Weights depend only on the axis geometry, which repeats across requests of the same camera.
class CoeffCache {
 public:
  std::shared_ptr<const Coeffs> get(int64_t in_size, double extent, int64_t out_size, int64_t offset,
                                    int64_t count) {
    uint64_t ebits;
    std::memcpy(&ebits, &extent, sizeof ebits);
    const Key key{in_size, ebits, out_size, offset, count};
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) return it->second;
    }
    auto c = build_coeffs(in_size, extent, out_size, offset, count);  // built outside the lock
    std::lock_guard<std::mutex> lock(mu_);
    if (map_.size() >= kMaxEntries) map_.clear();  // bounded; a full reset is rare and cheap
    map_.emplace(key, c);
    return c;
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return map_.size();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    map_.clear();
  }

 private:
  using Key = std::tuple<int64_t, uint64_t, int64_t, int64_t, int64_t>;
  static constexpr size_t kMaxEntries = 1024;
  std::mutex mu_;
  std::map<Key, std::shared_ptr<const Coeffs>> map_;
};

CoeffCache& cache() {
  static CoeffCache* c = new CoeffCache();  // leaked on purpose: no destruction-order issues at exit
  return *c;
}

#ifndef AURORA_AVX2
// Vertical pass: dst[e] = sum_k w[k] * src[k * stride + e] for e < n (taps consecutive source rows).
void vertical_pass(float* dst, const uint8_t* src, int64_t stride, const float* w, int64_t taps, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = 0.0f;
  for (int64_t k = 0; k < taps; ++k) {
    const uint8_t* p = src + k * stride;
    const float wk = w[k];
    for (int64_t i = 0; i < n; ++i) dst[i] += wk * static_cast<float>(p[i]);
  }
}
#else
// Vertical pass: dst[e] = sum_k w[k] * src[k * stride + e] for e < n (taps consecutive source rows), in
// fixed point: two source rows interleaved into 16-bit pairs feed one vpmaddwd (16 multiply-adds per
// uop, against 8 per FMA plus a conversion uop in float): 6-11% off the whole call at 0.3-10 MP here,
// and within 255 * 2^-15 ~ 0.008 levels of the float pass (max 0.0077 over 1500 random small images):
// weights are in units of 2^-14 on identity and upscaling axes, where a weight near 1 must fit int16,
// down to 2^-22 on large downscales. wp: (taps + 1) / 2 weight pairs (Coeffs::wpair).
// pf, pf_rows: source rows the next output row adds (same columns), prefetched into L2 as this row goes.
void vertical_pass_i16(float* dst, const uint8_t* src, int64_t stride, const int32_t* wp, int64_t taps,
                       int ishift, int64_t n, const uint8_t* pf, int64_t pf_rows) {
  const float unit = std::ldexp(1.0f, -ishift);
  const __m256 vunit = _mm256_set1_ps(unit);
  const __m256i zero = _mm256_setzero_si256();
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    __m256i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    // In a serving process the image arrives cold (decoded, then evicted by other work within ~10 ms
    // on this shared host: a call after 10 ms of anything else took ~2x as long at 0.3-2.5 MP). The
    // rows of the next output row, fetched one output row ahead, took 5-12% off such cold calls.
    if ((e & 63) == 0)
      for (int64_t i = 0; i < pf_rows; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(pf + i * stride + e), _MM_HINT_T1);
    const uint8_t* p = src + e;
    for (int64_t k = 0; k < taps; k += 2, p += 2 * stride) {
      const __m256i w = _mm256_set1_epi32(wp[k / 2]);
      // The hardware prefetcher loses track of ~2 * scale concurrent row streams; prefetching 256 bytes
      // ahead on each cut the 10 MP median from 7.9-12.6 ms to 4.7-4.9 ms CPU time here (128: 5.4,
      // 1024: 6.5).
      _mm_prefetch(reinterpret_cast<const char*>(p + 256), _MM_HINT_T0);
      const __m256i ra = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      __m256i rb = ra;  // odd tail: the pair's second weight is 0; reread the row rather than run past
      if (k + 1 < taps) {
        _mm_prefetch(reinterpret_cast<const char*>(p + stride + 256), _MM_HINT_T0);
        rb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + stride));
      }
      const __m256i lo = _mm256_unpacklo_epi8(ra, rb), hi = _mm256_unpackhi_epi8(ra, rb);
      // Lanes hold elements [0..3 | 16..19], [4..7 | 20..23], [8..11 | 24..27], [12..15 | 28..31].
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), w));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), w));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), w));
      a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), w));
    }
    auto put = [&](float* d, __m256i v) { _mm256_storeu_ps(d, _mm256_mul_ps(_mm256_cvtepi32_ps(v), vunit)); };
    put(dst + e, _mm256_permute2x128_si256(a0, a1, 0x20));
    put(dst + e + 8, _mm256_permute2x128_si256(a2, a3, 0x20));
    put(dst + e + 16, _mm256_permute2x128_si256(a0, a1, 0x31));
    put(dst + e + 24, _mm256_permute2x128_si256(a2, a3, 0x31));
  }
  for (; e < n; ++e) {
    int32_t acc = 0;
    for (int64_t k = 0; k < taps; ++k) {
      const int32_t wk = static_cast<int16_t>(static_cast<uint32_t>(wp[k / 2]) >> (16 * (k & 1)));
      acc += wk * src[k * stride + e];
    }
    dst[e] = static_cast<float>(acc) * unit;
  }
}
#endif

#ifndef AURORA_AVX2
// Horizontal pass + normalization: t[4 x + c] = a[c] * sum_k w[x][k] * row[3 (start[x] + k) + c] + b[c].
void horizontal_pass(float* t, const float* row, const Coeffs& ch, int64_t count, const float* a,
                     const float* b) {
  const int64_t taps = ch.taps;
  for (int64_t x = 0; x < count; ++x) {
    const float* w = ch.w.data() + x * taps;
    const float* p = row + 3 * (ch.start[x] - ch.lo);
    float s[3] = {0.0f, 0.0f, 0.0f};
    for (int64_t k = 0; k < taps; ++k)
      for (int c = 0; c < 3; ++c) s[c] += w[k] * p[3 * k + c];
    for (int c = 0; c < 3; ++c) t[4 * x + c] = s[c] * a[c] + b[c];
    t[4 * x + 3] = 0.0f;
  }
}
#endif

uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (as torch does)
  return static_cast<uint16_t>(u >> 16);
}

uint16_t float_to_f16(float f) {
#if defined(__FLT16_MAX__)
  _Float16 h = static_cast<_Float16>(f);  // round to nearest even; F16C instruction with -march=native
  uint16_t u;
  std::memcpy(&u, &h, sizeof u);
  return u;
#else
  // Portable round-to-nearest-even conversion for compilers without _Float16.
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (x < 0x38800000u) {                                                 // subnormal half or zero
    if (x < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = ((x >> 13) - (112u << 10));
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
#endif
}

#ifndef AURORA_AVX2
// Store one output row of each plane from the interleaved t[4 x + c].
void store_row(void* out, OutType type, int64_t crop, int64_t y, const float* t) {
  const int64_t plane = crop * crop;
  for (int c = 0; c < 3; ++c) {
    const int64_t base = c * plane + y * crop;
    if (type == OutType::F32) {
      float* o = static_cast<float*>(out) + base;
      for (int64_t x = 0; x < crop; ++x) o[x] = t[4 * x + c];
    } else if (type == OutType::F16) {
      uint16_t* o = static_cast<uint16_t*>(out) + base;
      for (int64_t x = 0; x < crop; ++x) o[x] = float_to_f16(t[4 * x + c]);
    } else {
      uint16_t* o = static_cast<uint16_t*>(out) + base;
      for (int64_t x = 0; x < crop; ++x) o[x] = float_to_bf16(t[4 * x + c]);
    }
  }
}
#endif

#ifdef AURORA_AVX2
// In-register transpose of an 8x8 float block: r[i][j] -> r[j][i].
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Store the first `count` (<= 8) lanes of v at element `idx` of out, converted to `type`.
inline void store8(void* out, int64_t idx, OutType type, __m256 v, int64_t count) {
  if (count == 8 && type == OutType::F32) {
    _mm256_storeu_ps(static_cast<float*>(out) + idx, v);
    return;
  }
  uint16_t* o16 = static_cast<uint16_t*>(out) + idx;
  if (count == 8 && type == OutType::BF16) {
    // Round to nearest even on the bit pattern, as torch does; values are finite by construction.
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o16), _mm256_castsi256_si128(packed));
    return;
  }
#ifdef __F16C__
  if (count == 8 && type == OutType::F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o16), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return;
  }
#endif
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int64_t i = 0; i < count; ++i) {
    if (type == OutType::F32) static_cast<float*>(out)[idx + i] = tmp[i];
    else o16[i] = type == OutType::F16 ? float_to_f16(tmp[i]) : float_to_bf16(tmp[i]);
  }
}
#endif

}  // namespace

Geometry compute_geometry(int64_t orig_h, int64_t orig_w, int64_t scale, int64_t resize, int64_t crop) {
  if (orig_h <= 0 || orig_w <= 0 || scale <= 0 || resize <= 0 || crop <= 0 || crop > resize)
    throw std::invalid_argument("preprocess: invalid geometry (sizes must be positive, crop <= resize)");
  Geometry g{};
  // torchvision _compute_resized_output_size: int(size * long / short), a double division.
  const bool w_short = orig_w <= orig_h;
  const int64_t s = w_short ? orig_w : orig_h, l = w_short ? orig_h : orig_w;
  const int64_t new_long = static_cast<int64_t>(static_cast<double>(resize * l) / static_cast<double>(s));
  g.new_w = w_short ? resize : new_long;
  g.new_h = w_short ? new_long : resize;
  g.top = half_round_even(g.new_h - crop);
  g.left = half_round_even(g.new_w - crop);
  g.ext_h = static_cast<double>(orig_h) / static_cast<double>(scale);
  g.ext_w = static_cast<double>(orig_w) / static_cast<double>(scale);
  return g;
}

void preprocess_image(const ImageView& im, const Spec& spec, void* out) {
  const Geometry g = compute_geometry(im.orig_h, im.orig_w, im.scale, spec.resize, spec.crop);
  const int64_t crop = spec.crop;
  const auto cv = cache().get(im.h, g.ext_h, g.new_h, g.top, crop);
  const auto ch = cache().get(im.w, g.ext_w, g.new_w, g.left, crop);
  const int64_t n = 3 * (ch->hi - ch->lo);  // floats of one vertically blended row (crop columns only)
  const int64_t stride = im.row_stride;
  const uint8_t* col0 = im.data + 3 * ch->lo;

  // (x / 255 - mean) / std folded into one multiply-add.
  float a[4], b[4];
  for (int c = 0; c < 3; ++c) {
    a[c] = static_cast<float>(1.0 / (255.0 * spec.std[c]));
    b[c] = static_cast<float>(-static_cast<double>(spec.mean[c]) / spec.std[c]);
  }
  a[3] = b[3] = 0.0f;

#ifdef AURORA_AVX2
  // Eight output rows at a time. The vertical pass (vertical_pass_i16, 16-bit fixed point) blends their
  // source rows over the whole blended row and transposes it into vt[e][r] (element-major, 8 rows
  // per vector), so the horizontal pass is also a broadcast-weight FMA on whole vectors: 8 rows x 1
  // channel per instruction, no gathers and no horizontal sums. A final 8x8 transpose turns 8 columns
  // of 8 rows back into row-major stores. Per-row passes with a 4-lane RGB horizontal were ~1.8x
  // slower on 2.5 MP here.
  // Whole blended rows, not L1-sized strips: 256-element strips make the prefetcher juggle ~100 short
  // row streams per group and were 1.3-3x slower on 10 MP here; 2048-element strips were no faster.
  const int64_t n8 = (n + 7) & ~int64_t(7), kStrip = n8;
  thread_local std::vector<float> vt, strip;
  vt.resize(static_cast<size_t>(n8 * 8));
  strip.resize(static_cast<size_t>(8 * kStrip));
  const int64_t plane = crop * crop, vtaps = cv->taps, htaps = ch->taps, vpairs = (vtaps + 1) / 2;
  const int64_t item = spec.type == OutType::F32 ? 4 : 2;
  // The output lines of the next group of rows, fetched for writing while this group's vertical pass
  // runs: a cold 0.3 MP call (out evicted, as in a round-robin run) went from 564-614 to 438-447 us
  // (A/B, 25-40 calls each), warm unchanged. 2.5 MP cold was unchanged (bound by its source reads).
  auto prefetch_out_row = [&](int64_t y) {
    if (y >= crop) return;
    for (int c = 0; c < 3; ++c) {
      const char* o = static_cast<const char*>(out) + (c * plane + y * crop) * item;
      for (int64_t q = 0; q < crop * item; q += 64) __builtin_prefetch(o + q, 1, 3);
    }
  };
  for (int64_t r = 0; r < 8; ++r) prefetch_out_row(r);
  for (int64_t y0 = 0; y0 < crop; y0 += 8) {
    const int64_t ny = std::min<int64_t>(8, crop - y0);
    for (int64_t e0 = 0; e0 < n; e0 += kStrip) {
      const int64_t len = std::min(kStrip, n - e0), len8 = (len + 7) & ~int64_t(7);
      for (int64_t r = 0; r < 8; ++r) {
        const int64_t y = y0 + std::min(r, ny - 1);  // rows past the crop repeat the last (not stored)
        float* dst = strip.data() + r * kStrip;
        if (e0 == 0) prefetch_out_row(y0 + 8 + r);
        int64_t pf_rows = 0;
        const uint8_t* pf = nullptr;
        if (r < ny && y + 1 < crop) {
          const int64_t a0 = std::max(cv->start[y] + vtaps, cv->start[y + 1]), a1 = cv->start[y + 1] + vtaps;
          pf_rows = std::max<int64_t>(0, a1 - a0);
          pf = col0 + a0 * stride + e0;
        }
        vertical_pass_i16(dst, col0 + cv->start[y] * stride + e0, stride, cv->wpair.data() + y * vpairs, vtaps,
                          cv->ishift, len, pf, pf_rows);
        for (int64_t i = len; i < len8; ++i) dst[i] = 0.0f;
      }
      for (int64_t j = 0; j < len8; j += 8) {
        __m256 blk[8];
        for (int r = 0; r < 8; ++r) blk[r] = _mm256_loadu_ps(strip.data() + r * kStrip + j);
        transpose8(blk);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(vt.data() + (e0 + j + i) * 8, blk[i]);
      }
    }
    // Channels innermost: the three channel passes of an 8-column block read the same vt lines (8 columns
    // x taps x 96 bytes, in L1); channel-outermost reread all of vt from L2 three times per group.
    for (int64_t x0 = 0; x0 < crop; x0 += 8) {
      const int64_t nx = std::min<int64_t>(8, crop - x0);
      const float* p[8];
      for (int64_t i = 0; i < 8; ++i) {
        const int64_t x = x0 + std::min(i, nx - 1);
        p[i] = vt.data() + (ch->start[x] - ch->lo) * 24;
      }
      const float* wb = ch->wblk.data() + (x0 / 8) * htaps * 8;
      for (int c = 0; c < 3; ++c) {
        const float* w = wb;
        __m256 acc[8];
        for (auto& v : acc) v = _mm256_setzero_ps();
        for (int64_t k = 0; k < htaps; ++k, w += 8) {
          const int64_t off = k * 24 + c * 8;  // source pixel k of the window, channel c
          for (int i = 0; i < 8; ++i)
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i), _mm256_loadu_ps(p[i] + off), acc[i]);
        }
        transpose8(acc);  // acc[r] = output row y0 + r, columns x0 .. x0 + 7
        const __m256 va = _mm256_set1_ps(a[c]), vb = _mm256_set1_ps(b[c]);
        for (int64_t r = 0; r < ny; ++r)
          store8(out, c * plane + (y0 + r) * crop + x0, spec.type, _mm256_fmadd_ps(acc[r], va, vb), nx);
      }
    }
  }
#else
  // Portable path: one output row at a time, blended row then a 3-channel horizontal pass.
  thread_local std::vector<float> row, t;
  row.resize(static_cast<size_t>(n + 4));
  t.resize(static_cast<size_t>(4 * crop + 4));
  for (int64_t y = 0; y < crop; ++y) {
    vertical_pass(row.data(), col0 + cv->start[y] * stride, stride, cv->w.data() + y * cv->taps, cv->taps, n);
    horizontal_pass(t.data(), row.data(), *ch, crop, a, b);
    store_row(out, spec.type, crop, y, t.data());
  }
#endif
}

void preprocess_batch(const std::vector<ImageView>& ims, const Spec& spec, void* out,
                      int64_t out_stride_bytes, int num_threads) {
  const size_t count = ims.size();
  // Largest source first, so that the last image a thread takes is a small one and the threads finish
  // together (a 2.5 MP image taken last by one thread left the other idle for ~1 ms).
  std::vector<size_t> order(count);
  for (size_t i = 0; i < count; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return ims[a].h * ims[a].w > ims[b].h * ims[b].w; });
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto work = [&]() {
    for (size_t j = next.fetch_add(1); j < count; j = next.fetch_add(1)) {
      const size_t i = order[j];
      try {
        preprocess_image(ims[i], spec, static_cast<uint8_t*>(out) + static_cast<int64_t>(i) * out_stride_bytes);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
    }
  };
  // Workers are started per call (tens of microseconds, against milliseconds per image) rather than
  // kept in a persistent pool: nothing to shut down at exit and nothing to break across fork().
  // A worker is started only for 2^17 source plus output pixels or more (a 0.3 MP photo alone is more):
  // on a busy machine a new thread may not run at once, and the join waits for it. Six 8x8 images (8x8
  // crops, bench_batcher's) took 161 us (median; p99 1.1 ms) with a second thread, 73 us (p99 175 us)
  // without, on the 2-core dev box; batches of real photos at a 224 crop are above the bound and
  // threaded as before.
  constexpr int64_t kWorkPerThread = int64_t{1} << 17;
  int64_t pixels = 0;
  for (const auto& im : ims) pixels += im.h * im.w + spec.crop * spec.crop;
  const size_t by_work = static_cast<size_t>(std::max<int64_t>(1, pixels / kWorkPerThread));
  const size_t nt = std::max<size_t>(
      1, std::min({static_cast<size_t>(std::max(num_threads, 1)), count, by_work}));
  std::vector<std::thread> workers;
  workers.reserve(nt - 1);
  for (size_t i = 1; i < nt; ++i) workers.emplace_back(work);
  work();
  for (auto& th : workers) th.join();
  if (error) std::rethrow_exception(error);
}

size_t coeff_cache_size() { return cache().size(); }
void clear_coeff_cache() { cache().clear(); }

}  // namespace aurora
