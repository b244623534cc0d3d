// NF4 4-bit block quantization (QLoRA) on CPU: the contract of llmkern/reference/nf4.py, byte for byte.
//
//   quantize(x (n,) float/Half/BFloat16, blocksize) -> [packed ((n+1)/2,) uint8, absmax (nblocks,) fp32]
//   dynamic_quantize(a (n,) fp32, lut (65536,) uint8, blocksize) -> [codes (n,) uint8, absmax fp32]
//   dequantize(packed, absmax, nested_absmax?, nested_code?, offset, blocksize, nested_blocksize, out)
//   linear(x (M,K), packed, absmax, nested..., N, K, blocksize, nested_blocksize) -> y (M,N) in x's dtype
//   linear_grad_input(dy (M,N), packed, absmax, nested..., N, K, ...) -> dx (M,K) in dy's dtype
//
// Blocks run in parallel (at::parallel_for); each block is read straight from the input (two
// passes: absmax, then codes), so quantize needs no buffer beyond its outputs. With AVX-512 the
// block loops are vectorised by hand (16 values per step; NF4 codes by a 4-step binary search over
// the 15 midpoints held in one register, nibbles decoded with one permute); other CPUs run the
// scalar loops, which define the same bytes.
//
// linear never holds the dense weight. fp32 path: each task decodes kTileN (4) weight rows x kTileK
// (1024) columns into a 16 KiB buffer and multiplies it with the fp32 input rows in 4 x 4 register
// blocks (dot products along K). bf16 path (AVX512-BF16 and VBMI, K a multiple of the blocksize):
// each task owns 16 output features; it regroups their packed codes, still 4 bits each, so that one
// dword holds 8 columns of one feature and a vector 16 features (a 16 x 16 transpose, K / 2 bytes
// per feature), then for up to 16 rows of x at a time decodes every vector in registers into bf16
// code values (a shift and a vpermw per 32 weights), multiplies them with broadcast pairs of x by
// vdpbf16ps and scales each block's fp32 partial sums by the 16 block absmax values (bitsandbytes'
// CPU scheme, on its storage layout). y(M, N) accumulates in fp32 in a fixed order
// (deterministic). linear_grad_input decodes kTileK-column strips of 4 weight rows at a time (fp32)
// and accumulates dx strips the same way.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LLMKERN_NF4_AVX512 1
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define LLMKERN_NF4_BF16 1
#endif
#endif

namespace {

constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
constexpr float kAbsmaxFloor = 1e-38f;
constexpr uint8_t kZeroCode = 7;
constexpr int64_t kTileN = 4;     // weight rows decoded per linear tile
constexpr int64_t kTileK = 1024;  // weight columns decoded per linear tile
constexpr int64_t kMinTaskElements = 1 << 16;

struct Bounds {
  float v[16];  // the 15 midpoints (c[i] + c[i+1]) / 2 in fp32, then +inf (never compared)
  Bounds() {
    for (int i = 0; i < 15; ++i) v[i] = (kNF4[i] + kNF4[i + 1]) / 2.0f;
    v[15] = INFINITY;
  }
};
const Bounds kBounds;

// Number of midpoints strictly below s: the nearest NF4 code, ties to the lower one.
inline uint8_t nf4_code(float s) {
  int idx = 0;
  for (int step = 8; step > 0; step >>= 1) {
    if (kBounds.v[idx + step - 1] < s) idx += step;
  }
  return static_cast<uint8_t>(idx);
}

inline float to_float(float v) { return v; }
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Calls f(T{}) with T the C++ type of a float32 / float16 / bfloat16 tensor.
template <typename F>
void dispatch_float(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, "llmkern.", op, " (cpu): expected float32, float16 or bfloat16, got ", type);
  }
}

inline int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, kMinTaskElements / blocksize); }

// float32(code2[q] * absmax2) + offset with two roundings: `volatile` keeps the compiler from
// contracting the two into a fused multiply-add (GCC contracts across statements by default).
inline float nested_scale(float code_value, float absmax2, float offset) {
  volatile float product = code_value * absmax2;
  return product + offset;
}

#if LLMKERN_NF4_AVX512
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even, NaN -> 0x7FC0: c10::BFloat16's rounding, vectorised.
inline __m256i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store16(at::BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v)); }

// 16 NF4 codes of s (one per lane), by binary search over the midpoints.
inline __m512i nf4_code16(__m512 s, __m512 bounds) {
  __m512i idx = _mm512_setzero_si512();
  for (int step = 8; step > 0; step >>= 1) {
    const __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
    const __mmask16 below = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(probe, bounds), s, _CMP_LT_OQ);
    idx = _mm512_mask_add_epi32(idx, below, idx, _mm512_set1_epi32(step));
  }
  return idx;
}

// Pack 16 codes (epi32 lanes, element 2j in lane 2j) into 8 bytes: (c[2j] << 4) | c[2j+1].
inline void pack16(__m512i codes, uint8_t* out) {
  const __m512i lo = _mm512_and_si512(codes, _mm512_set1_epi64(0xFFFFFFFF));
  const __m512i bytes = _mm512_or_si512(_mm512_slli_epi64(lo, 4), _mm512_srli_epi64(codes, 32));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm512_cvtepi64_epi8(bytes));
}

// 16 floats decoded from 8 packed bytes: NF4[nibble] * scale.
inline __m512 decode16(const uint8_t* in, __m512 table, __m512 scale) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
  const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
  return _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), scale);
}
#endif

// ---- quantize ---------------------------------------------------------------------------------------

template <typename T>
void quantize_block(const T* x, int64_t len, bool last_partial, uint8_t* out, float* absmax_out) {
  float amax = 0.0f;
  int64_t i = 0;
#if LLMKERN_NF4_AVX512
  __m512 vmax = _mm512_setzero_ps();
  for (; i < len; i += 16) {
    const __mmask16 m = len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(x + i, m)));
  }
  amax = _mm512_reduce_max_ps(vmax);
#else
#pragma omp simd reduction(max : amax)
  for (i = 0; i < len; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
#endif
  // Full blocks multiply by the reciprocal of max(absmax, 1e-38); the partial last block stores the
  // floored absmax and divides by it (bitsandbytes' two code paths).
  if (last_partial) amax = std::max(amax, kAbsmaxFloor);
  *absmax_out = amax;
  const float recip = 1.0f / std::max(amax, kAbsmaxFloor);
  i = 0;
#if LLMKERN_NF4_AVX512
  const __m512 bounds = _mm512_loadu_ps(kBounds.v);
  const __m512 vrecip = _mm512_set1_ps(recip), vamax = _mm512_set1_ps(amax);
  for (; i + 16 <= len; i += 16) {
    const __m512 v = load16(x + i, 0xFFFF);
    const __m512 s = last_partial ? _mm512_div_ps(v, vamax) : _mm512_mul_ps(v, vrecip);
    pack16(nf4_code16(s, bounds), out + i / 2);
  }
#endif
  for (; i < len; i += 2) {
    const float v0 = to_float(x[i]);
    const uint8_t c0 = nf4_code(last_partial ? v0 / amax : v0 * recip);
    uint8_t c1 = kZeroCode;
    if (i + 1 < len) {
      const float v1 = to_float(x[i + 1]);
      c1 = nf4_code(last_partial ? v1 / amax : v1 * recip);
    }
    out[i / 2] = static_cast<uint8_t>((c0 << 4) | c1);
  }
}

std::vector<torch::Tensor> quantize(const torch::Tensor& x, int64_t blocksize) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 1,
              "llmkern.nf4_quantize (cpu): x must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(blocksize >= 32 && blocksize % 32 == 0, "llmkern.nf4_quantize (cpu): bad blocksize ", blocksize);
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  auto packed = torch::empty({(n + 1) / 2}, x.options().dtype(torch::kUInt8));
  auto absmax = torch::empty({nblocks}, x.options().dtype(torch::kFloat32));
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* a = absmax.data_ptr<float>();
  const bool partial = n % blocksize != 0;
  dispatch_float(x.scalar_type(), "nf4_quantize", [&](auto tag) {
    using T = decltype(tag);
    const T* src = x.data_ptr<T>();
    at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        quantize_block(src + start, len, partial && b == nblocks - 1, p + start / 2, a + b);
      }
    });
  });
  return {packed, absmax};
}

std::vector<torch::Tensor> dynamic_quantize(const torch::Tensor& a, const torch::Tensor& lut, int64_t blocksize) {
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && a.scalar_type() == torch::kFloat32,
              "llmkern.nf4 double quant (cpu): a must be a contiguous float32 CPU tensor");
  TORCH_CHECK(lut.numel() == 65536 && lut.scalar_type() == torch::kUInt8 && lut.is_contiguous(),
              "llmkern.nf4 double quant (cpu): lut must be 65536 contiguous uint8");
  const int64_t n = a.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  auto codes = torch::empty({n}, a.options().dtype(torch::kUInt8));
  auto absmax = torch::empty({nblocks}, a.options());
  const float* src = a.data_ptr<float>();
  const uint8_t* table = lut.data_ptr<uint8_t>();
  uint8_t* q = codes.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(start + blocksize, n);
      float amax = 0.0f;
      for (int64_t i = start; i < end; ++i) amax = std::max(amax, std::fabs(src[i]));
      am[b] = amax;
      if (amax == 0.0f) {
        std::memset(q + start, 0, end - start);
        continue;
      }
      const float inv = 1.0f / amax;
      for (int64_t i = start; i < end; ++i) {
        const float v = std::min(1.0f, std::max(-1.0f, src[i] * inv));
        q[i] = table[static_cast<int64_t>((v + 1.0f) * 0.5f * 65535.0f + 0.5f)];
      }
    }
  });
  return {codes, absmax};
}

// ---- dequantize -------------------------------------------------------------------------------------

struct Scales {
  const float* absmax = nullptr;     // not nested: fp32 per block
  const uint8_t* codes = nullptr;    // nested: uint8 per block
  const float* absmax2 = nullptr;    // nested: fp32 per nested block
  const float* code2 = nullptr;      // nested: 256-entry map
  float offset = 0.0f;
  int nested_shift = 8;  // log2(nested blocksize)

  float operator()(int64_t b) const {
    if (codes == nullptr) return absmax[b];
    return nested_scale(code2[codes[b]], absmax2[b >> nested_shift], offset);
  }
};

Scales make_scales(const torch::Tensor& absmax, const c10::optional<torch::Tensor>& nested_absmax,
                   const c10::optional<torch::Tensor>& nested_code, double offset, int64_t nested_blocksize) {
  Scales s;
  if (nested_absmax.has_value()) {
    TORCH_CHECK(absmax.scalar_type() == torch::kUInt8 && nested_code.has_value(),
                "llmkern.nf4 (cpu): a nested state needs uint8 absmax codes and a nested code");
    TORCH_CHECK(nested_absmax->scalar_type() == torch::kFloat32 && nested_code->scalar_type() == torch::kFloat32 &&
                    nested_code->numel() == 256 && nested_absmax->is_contiguous() && nested_code->is_contiguous(),
                "llmkern.nf4 (cpu): nested absmax / code must be contiguous float32 (code: 256 entries)");
    s.codes = absmax.data_ptr<uint8_t>();
    s.absmax2 = nested_absmax->data_ptr<float>();
    s.code2 = nested_code->data_ptr<float>();
    s.offset = static_cast<float>(offset);
    TORCH_CHECK(nested_blocksize > 0 && (nested_blocksize & (nested_blocksize - 1)) == 0,
                "llmkern.nf4 (cpu): the nested blocksize must be a power of two, got ", nested_blocksize);
    s.nested_shift = __builtin_ctzll(static_cast<unsigned long long>(nested_blocksize));
  } else {
    TORCH_CHECK(absmax.scalar_type() == torch::kFloat32, "llmkern.nf4 (cpu): absmax must be float32");
    s.absmax = absmax.data_ptr<float>();
  }
  return s;
}

inline int block_shift(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0,
              "llmkern.nf4 (cpu): blocksize must be a power of two >= 32, got ", blocksize);
  return __builtin_ctzll(static_cast<unsigned long long>(blocksize));
}

// Decode elements [i0, i1) of the flattened NF4 tensor into dst[0 : i1 - i0] (any alignment).
template <typename T>
void decode_range(const uint8_t* packed, const Scales& scales, int shift, int64_t i0, int64_t i1, T* dst) {
  int64_t i = i0;
  while (i < i1) {
    const int64_t b = i >> shift;
    const int64_t seg_end = std::min(i1, (b + 1) << shift);
    const float scale = scales(b);
    if (i & 1) {  // odd start: the low nibble of a byte
      dst[i - i0] = static_cast<T>(kNF4[packed[i / 2] & 0xF] * scale);
      ++i;
    }
#if LLMKERN_NF4_AVX512
    const __m512 table = _mm512_loadu_ps(kNF4), vscale = _mm512_set1_ps(scale);
    for (; i + 16 <= seg_end; i += 16) store16(dst + (i - i0), decode16(packed + i / 2, table, vscale));
#endif
    for (; i < seg_end; ++i) {
      const uint8_t byte = packed[i / 2];
      dst[i - i0] = static_cast<T>(kNF4[(i & 1) ? (byte & 0xF) : (byte >> 4)] * scale);
    }
  }
}

// Ask Linux for transparent huge pages on the 2 MiB-aligned part of a fresh output buffer, before
// its first write: a fresh multi-MiB tensor is mapped on first touch, and faulting it in 4 KiB pages
// costs more than decoding into it (16 ms vs 1.6 ms for 32 MiB on one core); with 2 MiB pages it
// is 512 times fewer faults. Advisory: without THP ("never") nothing changes. Only whole pages
// inside the buffer are advised.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

void dequantize(const torch::Tensor& packed, const torch::Tensor& absmax, const c10::optional<torch::Tensor>& nested_absmax,
                const c10::optional<torch::Tensor>& nested_code, double offset, int64_t blocksize,
                int64_t nested_blocksize, torch::Tensor& out) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && out.is_contiguous() &&
                  absmax.is_contiguous() && packed.numel() == (out.numel() + 1) / 2,
              "llmkern.nf4_dequantize (cpu): packed must hold (n + 1) / 2 contiguous bytes for a contiguous out");
  const Scales scales = make_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  const int shift = block_shift(blocksize);
  const int64_t n = out.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, "llmkern.nf4_dequantize (cpu): absmax must have ", nblocks, " entries");
  const uint8_t* p = packed.data_ptr<uint8_t>();
  advise_huge_pages(out.data_ptr(), out.nbytes());
  dispatch_float(out.scalar_type(), "nf4_dequantize", [&](auto tag) {
    using T = decltype(tag);
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      const int64_t i0 = b0 * blocksize, i1 = std::min(b1 * blocksize, n);
      decode_range(p, scales, shift, i0, i1, dst + i0);
    });
  });
}

// ---- linear -----------------------------------------------------------------------------------------

// y[m, n] (+)= sum_k x[m, k] * w[n, k] for MR rows of x and 4 rows of w, k in [0, kc).
template <int MR>
void dot_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y, int64_t ldy, int nr,
              bool accumulate) {
  float sums[MR][4];
#if LLMKERN_NF4_AVX512
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; k += 16) {
    const __mmask16 m = kc - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (kc - k)) - 1);
    __m512 wv[4];
    for (int c = 0; c < 4; ++c) wv[c] = _mm512_maskz_loadu_ps(m, w + c * ldw + k);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * ldx + k);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) sums[r][c] = _mm512_reduce_add_ps(acc[r][c]);
#else
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) {
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < kc; ++k) s += x[r * ldx + k] * w[c * ldw + k];
      sums[r][c] = s;
    }
#endif
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < nr; ++c) y[r * ldy + c] = accumulate ? y[r * ldy + c] + sums[r][c] : sums[r][c];
}

void dot_rows(int mr, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y, int64_t ldy,
              int nr, bool accumulate) {
  switch (mr) {
    case 4: return dot_tile<4>(x, ldx, w, ldw, kc, y, ldy, nr, accumulate);
    case 3: return dot_tile<3>(x, ldx, w, ldw, kc, y, ldy, nr, accumulate);
    case 2: return dot_tile<2>(x, ldx, w, ldw, kc, y, ldy, nr, accumulate);
    default: return dot_tile<1>(x, ldx, w, ldw, kc, y, ldy, nr, accumulate);
  }
}

struct Weight {
  const uint8_t* packed;
  Scales scales;
  int64_t n_out, k_in;
  int shift;  // log2(blocksize)
};

Weight make_weight(const torch::Tensor& packed, const torch::Tensor& absmax, const c10::optional<torch::Tensor>& nested_absmax,
                   const c10::optional<torch::Tensor>& nested_code, double offset, int64_t n_out, int64_t k_in,
                   int64_t blocksize, int64_t nested_blocksize) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.numel() == (n_out * k_in + 1) / 2,
              "llmkern.nf4_linear (cpu): packed must hold (N * K + 1) / 2 contiguous bytes");
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() == (n_out * k_in + blocksize - 1) / blocksize,
              "llmkern.nf4_linear (cpu): absmax has the wrong length");
  return {packed.data_ptr<uint8_t>(), make_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize), n_out,
          k_in, block_shift(blocksize)};
}

#if LLMKERN_NF4_BF16
// 16 x 16 transpose of dwords: on return r[c] holds column c (lane i = former row i).
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// Decoding (quad_dot) reads each dword of NF4 codes, 4 bytes = 8 columns c .. c + 7 of one weight
// row, four times, shifted right by 0, 4, 8 and 12 bits: vpermw looks up the low 5 bits of both
// words (its 32-entry table holds the 16 codes twice, so the bit above the nibble is harmless), which
// gives the bf16 values of columns (c + 1, c + 5), (c, c + 4), (c + 3, c + 7) and (c + 2, c + 6).
// Those are the k-pairs that vdpbf16ps sums, so x is regrouped to match: kPairOrder lists, for each
// of the four pairs, the two columns' bytes within 8 bf16 values (16 bytes).
constexpr int8_t kPairOrder[16] = {2, 3, 10, 11, 0, 1, 8, 9, 6, 7, 14, 15, 4, 5, 12, 13};

// bf16 x (M, K) regrouped per 16 rows: xt[(g * K / 2 + p) * 16 + r] = the two bf16 of row 16 g + r
// (zero past row M) that k-pair p = 4 * (c / 8) + i multiplies, i-th pair of columns c .. c + 7 in
// the order above: the 16 broadcasts of one k-pair are one cache line, at fixed offsets from one
// pointer. K is a multiple of 32.
std::vector<uint32_t> pair_major(const uint16_t* x, int64_t m_rows, int64_t k_in) {
  const int64_t groups = (m_rows + 15) / 16, npairs = k_in / 2;
  std::vector<uint32_t> xt(groups * npairs * 16);
  const __m512i order = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kPairOrder)));
  // 16 x 16 dwords per step; up to 256 steps (256 KiB of x) on one thread: cheaper than a parallel region.
  at::parallel_for(0, groups * (npairs / 16), 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / (npairs / 16), p0 = b % (npairs / 16) * 16;
      __m512i rows[16];
      for (int r = 0; r < 16; ++r) {
        const int64_t m = g * 16 + r;
        rows[r] = m < m_rows ? _mm512_shuffle_epi8(_mm512_loadu_si512(x + m * k_in + 2 * p0), order)
                             : _mm512_setzero_si512();
      }
      transpose16(rows);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(xt.data() + (g * npairs + p0 + c) * 16, rows[c]);
    }
  });
  return xt;
}

// The packed codes of weight rows [n0, n0 + nt) (nt <= 16; rows past nt read as zero bytes, their
// lanes are masked off later), K columns (a multiple of 32), regrouped as quads[q * 16 + r] = the 4
// bytes of row n0 + r that hold columns 8q .. 8q + 7: 16 output features per vector, still 4 bits
// per weight. 64 bytes of each row at a time, by a 16 x 16 dword transpose; quads has room for K
// rounded up to 128 columns.
void gather_quads(const uint8_t* packed, int64_t k_in, int64_t n0, int nt, uint32_t* quads) {
  for (int64_t j = 0; j < k_in; j += 128) {
    const int dwords = static_cast<int>(std::min<int64_t>(128, k_in - j) / 8);
    const __mmask16 m = static_cast<__mmask16>((1u << dwords) - 1);
    __m512i rows[16];
    for (int r = 0; r < 16; ++r) {
      if (r >= nt) {
        rows[r] = _mm512_setzero_si512();
        continue;
      }
      const uint8_t* src = packed + ((n0 + r) * k_in + j) / 2;
      rows[r] = _mm512_maskz_loadu_epi32(m, src);
      // The same bytes of the next tile (16 rows on) into L2: 16 short row streams per tile are too
      // many for the hardware prefetchers to catch in time (a hint: never faults, even past the end).
      _mm_prefetch(reinterpret_cast<const char*>(src + 8 * k_in), _MM_HINT_T1);
    }
    transpose16(rows);
    for (int c = 0; c < 16; ++c) _mm512_storeu_si512(quads + (j / 8 + c) * 16, rows[c]);
  }
}

// The 256-entry nested code (fp32) split into its 4 bytes: planes[p][i] = byte p of code2[i], for
// vpermi2b look-ups of 64 absmax codes at a time (two per 128 entries and byte).
struct CodePlanes {
  alignas(64) uint8_t planes[4][256];
  explicit CodePlanes(const float* code2) {
    for (int i = 0; i < 256; ++i) {
      uint8_t bytes[4];
      std::memcpy(bytes, code2 + i, 4);
      for (int p = 0; p < 4; ++p) planes[p][i] = bytes[p];
    }
  }
};

// The block scales of weight rows [n0, n0 + nt) as scales[j * 16 + r] = Scales(block j of row n0 + r)
// for j < row_blocks (rows past nt: those of the last row), 16 rows x 64 blocks at a time; scales
// has room for row_blocks rounded up to 64. Plain absmax: a 16 x 16 transpose per 16 blocks. Nested
// absmax: the codes are transposed like the weights (a dword holds 4 blocks of one row) and ordered
// block-major within each 128-bit lane, so that after the bytewise look-up (vpermi2b: 64 codes per
// instruction and byte) two rounds of unpacking give, for each of the 4 blocks, the fp32 code
// values of the 16 rows in row order. The nested absmax of a row changes at most once within 64
// blocks (nested blocksize >= 64): a blend of two per-row values.
void tile_scales(const Scales& s, const CodePlanes* code, int64_t row_blocks, int64_t n0, int nt, float* scales) {
  int64_t rows_at[16];  // first block of each row
  for (int r = 0; r < 16; ++r) rows_at[r] = (n0 + std::min(r, nt - 1)) * row_blocks;
  if (s.codes == nullptr) {
    for (int64_t j0 = 0; j0 < row_blocks; j0 += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, row_blocks - j0)) - 1);
      __m512i rows[16];
      for (int r = 0; r < 16; ++r)
        rows[r] = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, s.absmax + rows_at[r] + j0));
      transpose16(rows);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(scales + (j0 + c) * 16, rows[c]);
    }
    return;
  }
  const __m512i block_major =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  const __m512 offset = _mm512_set1_ps(s.offset);
  for (int64_t j0 = 0; j0 < row_blocks; j0 += 64) {
    const int64_t count = std::min<int64_t>(64, row_blocks - j0);
    // Per row: the nested absmax of the group's first and last block, and where the second starts.
    alignas(64) float first[16], last[16];
    alignas(64) int32_t switch_at[16];
    __m512i rows[16];
    for (int r = 0; r < 16; ++r) {
      const int64_t b = rows_at[r] + j0, nested = b >> s.nested_shift;
      first[r] = s.absmax2[nested];
      last[r] = s.absmax2[(b + count - 1) >> s.nested_shift];
      switch_at[r] = static_cast<int32_t>(((nested + 1) << s.nested_shift) - b);
      rows[r] = _mm512_maskz_loadu_epi8(count == 64 ? ~0ull : (1ull << count) - 1, s.codes + b);
    }
    const __m512 lo = _mm512_load_ps(first), hi = _mm512_load_ps(last);
    const __m512i switch_v = _mm512_load_si512(switch_at);
    transpose16(rows);
    for (int c = 0; c < 16; ++c) {
      const __m512i idx = _mm512_shuffle_epi8(rows[c], block_major);
      const __mmask64 upper = _mm512_movepi8_mask(idx);  // entries 128 .. 255
      __m512i byte[4];
      for (int p = 0; p < 4; ++p) {
        const __m512i* plane = reinterpret_cast<const __m512i*>(code->planes[p]);
        byte[p] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(plane[0], idx, plane[1]),
                                         _mm512_permutex2var_epi8(plane[2], idx, plane[3]));
      }
      const __m512i b01[2] = {_mm512_unpacklo_epi8(byte[0], byte[1]), _mm512_unpackhi_epi8(byte[0], byte[1])};
      const __m512i b23[2] = {_mm512_unpacklo_epi8(byte[2], byte[3]), _mm512_unpackhi_epi8(byte[2], byte[3])};
      for (int q = 0; q < 4; ++q) {
        const __m512i bits = q % 2 == 0 ? _mm512_unpacklo_epi16(b01[q / 2], b23[q / 2])
                                        : _mm512_unpackhi_epi16(b01[q / 2], b23[q / 2]);
        const int32_t j = static_cast<int32_t>(4 * c + q);
        const __mmask16 second = _mm512_cmpge_epi32_mask(_mm512_set1_epi32(j), switch_v);
        const __m512 absmax2 = _mm512_mask_blend_ps(second, lo, hi);
        const __m512 product = _mm512_mul_round_ps(_mm512_castsi512_ps(bits), absmax2,
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_storeu_ps(scales + (j0 + j) * 16,
                         _mm512_add_round_ps(product, offset, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
    }
  }
}

// y[m, n0 : n0 + 16] = bf16(sum over segments s of scales[s] * (sum_{p in s} xt[p, m] . w[p])) for MR
// rows of x (xt: their regrouped k-pairs) against nquads quads, w[p] being the bf16 NF4 code values
// of k-pair p for the 16 features, decoded in registers. Each segment (seg_quads quads, within one
// block of every weight row) sums in fp32 registers, with S independent vdpbf16ps chains per row so
// that small MR still fills the pipeline, and is then scaled by its 16 block scales into the
// accumulators (bitsandbytes' CPU scheme). Those of the first 8 rows stay in registers, the others
// in L1 (16 partial sums + 16 accumulators would not fit in the 32 registers).
template <int MR>
void quad_dot(const uint32_t* xt, const uint32_t* quads, int64_t nquads, int64_t seg_quads, const float* scales,
              at::BFloat16* y, int64_t ldy, __mmask16 nmask) {
  constexpr int S = MR <= 4 ? 4 : MR <= 8 ? 2 : 1;
  constexpr int R = MR < 8 ? MR : 8;  // rows accumulated in registers
  const __m512i table = _mm512_broadcast_i64x4((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(kNF4)));
  __m512 acc[R];
  alignas(64) float spill[MR - R + 1][16];  // rows R .. MR - 1 (one spare: no zero-length array)
  for (int r = 0; r < MR; ++r) {
    if (r < R) acc[r] = _mm512_setzero_ps();
    else _mm512_store_ps(spill[r - R], _mm512_setzero_ps());
  }
  for (int64_t q0 = 0; q0 < nquads; q0 += seg_quads, scales += 16) {
    __m512 part[S][MR];
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < MR; ++r) part[s][r] = _mm512_setzero_ps();
    for (int64_t q = q0; q < q0 + seg_quads; ++q) {
      const __m512i codes = _mm512_loadu_si512(quads + q * 16);
      for (int j = 0; j < 4; ++j) {
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi32(codes, 4 * j), table);
        const uint32_t* xp = xt + (4 * q + j) * 16;
        for (int r = 0; r < MR; ++r)
          part[j % S][r] = _mm512_dpbf16_ps(part[j % S][r], w, (__m512bh)_mm512_set1_epi32(xp[r]));
      }
    }
    const __m512 scale = _mm512_loadu_ps(scales);
    for (int r = 0; r < MR; ++r) {
      __m512 sum = part[0][r];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, part[s][r]);
      if (r < R) acc[r] = _mm512_fmadd_ps(sum, scale, acc[r]);
      else _mm512_store_ps(spill[r - R], _mm512_fmadd_ps(sum, scale, _mm512_load_ps(spill[r - R])));
    }
  }
  for (int r = 0; r < MR; ++r)
    _mm256_mask_storeu_epi16(y + r * ldy, nmask, bf16_bits(r < R ? acc[r] : _mm512_load_ps(spill[r - R])));
}

// quad_dot<mr> for 1 <= mr <= 16.
template <int... MRs>
void quad_dot_rows(int mr, std::integer_sequence<int, MRs...>, const uint32_t* xt, const uint32_t* quads,
                   int64_t nquads, int64_t seg_quads, const float* scales, at::BFloat16* y, int64_t ldy,
                   __mmask16 nmask) {
  ((mr == MRs + 1 ? quad_dot<MRs + 1>(xt, quads, nquads, seg_quads, scales, y, ldy, nmask) : void()), ...);
}

// y (M, N) bf16 = x @ W.T (fp32 sums) for bf16 x, K a multiple of the blocksize (so every weight row
// starts a block), a nested blocksize of at least 64: x is regrouped once (pair_major); tiles of 16
// output features run in parallel, each gets its block scales (tile_scales) and regroups its codes
// (gather_quads: K / 2 bytes per feature, 32 KiB for K = 4096), then computes 16 rows of y at a
// time (quad_dot).
void pair_linear(const uint16_t* xp, int64_t m_rows, const Weight& w, at::BFloat16* yp) {
  const int64_t n_out = w.n_out, k_in = w.k_in, blocksize = int64_t(1) << w.shift;
  const int64_t tiles = (n_out + 15) / 16, row_blocks = k_in / blocksize;
  const std::vector<uint32_t> xt = pair_major(xp, m_rows, k_in);
  const std::unique_ptr<CodePlanes> code(w.scales.codes ? new CodePlanes(w.scales.code2) : nullptr);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> quads((k_in + 127) / 128 * 256);
    std::vector<float> scales((row_blocks + 63) / 64 * 64 * 16);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * 16;
      const int nt = static_cast<int>(std::min<int64_t>(16, n_out - n0));
      const __mmask16 nmask = static_cast<__mmask16>((1u << nt) - 1);
      tile_scales(w.scales, code.get(), row_blocks, n0, nt, scales.data());
      gather_quads(w.packed, k_in, n0, nt, quads.data());
      for (int64_t m0 = 0; m0 < m_rows; m0 += 16) {
        const int mr = static_cast<int>(std::min<int64_t>(16, m_rows - m0));
        quad_dot_rows(mr, std::make_integer_sequence<int, 16>{}, xt.data() + m0 * k_in / 2, quads.data(), k_in / 8,
                      blocksize / 8, scales.data(), yp + m0 * n_out + n0, n_out, nmask);
      }
    }
  });
}
#endif

// y (M, N) fp32 = x @ W.T for fp32 x: tiles of kTileN weight rows run in parallel; each decodes
// kTileK columns of its rows at a time into `buf` and multiplies them with 4 x 4 register blocks.
void tiled_linear(const float* xp, int64_t m_rows, const Weight& w, float* yp) {
  const int64_t n_out = w.n_out, k_in = w.k_in;
  const int64_t tiles = (n_out + kTileN - 1) / kTileN;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(kTileN * kTileK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileN, nt = std::min(kTileN, n_out - n0);
      for (int64_t k0 = 0; k0 < k_in; k0 += kTileK) {
        const int64_t kc = std::min(kTileK, k_in - k0);
        for (int64_t r = 0; r < kTileN; ++r) {
          float* row = buf.data() + r * kTileK;
          if (r < nt) {
            const int64_t base = (n0 + r) * k_in + k0;
            decode_range(w.packed, w.scales, w.shift, base, base + kc, row);
          } else {
            std::fill(row, row + kc, 0.0f);
          }
        }
        for (int64_t c0 = 0; c0 < nt; c0 += 4) {
          const int nr = static_cast<int>(std::min<int64_t>(4, nt - c0));
          for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
            const int mr = static_cast<int>(std::min<int64_t>(4, m_rows - m0));
            dot_rows(mr, xp + m0 * k_in + k0, k_in, buf.data() + c0 * kTileK, kTileK, kc, yp + m0 * n_out + n0 + c0,
                     n_out, nr, k0 > 0);
          }
        }
      }
    }
  });
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& absmax,
                     const c10::optional<torch::Tensor>& nested_absmax, const c10::optional<torch::Tensor>& nested_code,
                     double offset, int64_t n_out, int64_t k_in, int64_t blocksize, int64_t nested_blocksize) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k_in, "llmkern.nf4_linear (cpu): x must be (M, K)");
  const Weight w = make_weight(packed, absmax, nested_absmax, nested_code, offset, n_out, k_in, blocksize, nested_blocksize);
  const int64_t m_rows = x.size(0);
#if LLMKERN_NF4_BF16
  if (x.scalar_type() == torch::kBFloat16 && k_in % (int64_t(1) << w.shift) == 0 &&
      (w.scales.codes == nullptr || w.scales.nested_shift >= 6)) {
    const torch::Tensor xc = x.contiguous();
    auto y = torch::empty({m_rows, n_out}, x.options());
    pair_linear(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), m_rows, w, y.data_ptr<at::BFloat16>());
    return y;
  }
#endif
  auto y = torch::empty({m_rows, n_out}, x.options().dtype(torch::kFloat32));
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  tiled_linear(xf.data_ptr<float>(), m_rows, w, y.data_ptr<float>());
  return y.to(x.scalar_type());
}

torch::Tensor linear_grad_input(const torch::Tensor& dy, const torch::Tensor& packed, const torch::Tensor& absmax,
                                const c10::optional<torch::Tensor>& nested_absmax,
                                const c10::optional<torch::Tensor>& nested_code, double offset, int64_t n_out,
                                int64_t k_in, int64_t blocksize, int64_t nested_blocksize) {
  TORCH_CHECK(dy.dim() == 2 && dy.size(1) == n_out, "llmkern.nf4_linear backward (cpu): dy must be (M, N)");
  const Weight w = make_weight(packed, absmax, nested_absmax, nested_code, offset, n_out, k_in, blocksize, nested_blocksize);
  const torch::Tensor g = dy.to(torch::kFloat32).contiguous();
  const int64_t m_rows = g.size(0);
  auto dx = torch::empty({m_rows, k_in}, g.options());
  const float* gp = g.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  constexpr int64_t kRowsM = 16;  // dx rows accumulated per strip
  const int64_t strips = (k_in + kTileK - 1) / kTileK;
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> wbuf(4 * kTileK), acc(kRowsM * kTileK);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t k0 = s * kTileK, kc = std::min(kTileK, k_in - k0);
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRowsM) {
        const int64_t mc = std::min(kRowsM, m_rows - m0);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t n0 = 0; n0 < n_out; n0 += 4) {
          const int64_t nr = std::min<int64_t>(4, n_out - n0);
          for (int64_t r = 0; r < 4; ++r) {
            float* row = wbuf.data() + r * kTileK;
            if (r < nr) {
              const int64_t base = (n0 + r) * k_in + k0;
              decode_range(w.packed, w.scales, w.shift, base, base + kc, row);
            } else {
              std::fill(row, row + kc, 0.0f);
            }
          }
          const float* w0 = wbuf.data();
          const float* w1 = w0 + kTileK;
          const float* w2 = w1 + kTileK;
          const float* w3 = w2 + kTileK;
          for (int64_t m = 0; m < mc; ++m) {
            const float* gr = gp + (m0 + m) * n_out + n0;
            const float g0 = gr[0], g1 = nr > 1 ? gr[1] : 0.0f, g2 = nr > 2 ? gr[2] : 0.0f, g3 = nr > 3 ? gr[3] : 0.0f;
            float* a = acc.data() + m * kTileK;
#pragma omp simd
            for (int64_t k = 0; k < kc; ++k) a[k] += g0 * w0[k] + g1 * w1[k] + g2 * w2[k] + g3 * w3[k];
          }
        }
        for (int64_t m = 0; m < mc; ++m)
          std::memcpy(dxp + (m0 + m) * k_in + k0, acc.data() + m * kTileK, kc * sizeof(float));
      }
    }
  });
  return dx.to(dy.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize", &quantize, "NF4 blockwise quantize (bitsandbytes bytes)");
  m.def("dynamic_quantize", &dynamic_quantize, "8-bit dynamic-map blockwise quantize (double quant)");
  m.def("dequantize", &dequantize, "NF4 dequantize into out (nested absmax decoded in the same pass)");
  m.def("linear", &linear, "x @ W.T with W decoded tile by tile");
  m.def("linear_grad_input", &linear_grad_input, "dy @ W with W decoded tile by tile");
}
