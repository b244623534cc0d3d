// LayerNorm / RMSNorm forward and backward on CPU, with the optional fused residual add.
//
// The contract is llmkern/reference/norm.py's norm_fwd / norm_bwd on 2-D rows (M, N):
//   norm_fwd(x, residual?, weight?, bias?, eps, rms) -> [out, residual_out, mean, rstd]
//   norm_bwd(dy, dresidual_out?, h, weight?, mean, rstd, rms, want_dbias)
//       -> [dh (promote_types(dy, h)), dweight (fp32, empty without weight), dbias (fp32, empty unless wanted)]
// x / residual / dy / h / dresidual_out are float, Half or BFloat16 with any row stride (a last dim
// with stride != 1 is copied); weight and bias are float32 (the Python wrapper converts them).
//
// Rows run in parallel with OpenMP, handed out dynamically so that a descheduled thread on a shared
// machine does not hold the others up. Each row is converted to fp32 into a per-thread buffer (fp32
// rows are used in place); every pass is then a plain loop over float arrays that the compiler
// vectorises (`omp simd`). Row sums are fp32 SIMD partials over blocks of kSumBlock values added in
// double, so accuracy does not degrade with N. LayerNorm uses two passes (mean, then the mean
// squared deviation). Backward dweight/dbias: rows are cut into chunks whose number depends only on
// (M, N), never on the thread count; each chunk sums into its own fp32 partial row and the partial
// rows are added in chunk order, so results are bit-identical run to run and across thread counts.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kSumBlock = 256;                  // values per fp32 SIMD partial sum
constexpr int64_t kParallelMinElements = 1 << 15;  // below this, one thread (OpenMP start-up dominates)
constexpr int64_t kTaskElements = 1 << 14;         // forward rows are handed out in tasks of this size
constexpr int64_t kMaxChunks = 64;                  // backward partial rows for dweight/dbias ...
constexpr int64_t kMinChunkElements = 1 << 14;     // ... each covering at least this many values

// ---- conversions between a row of T and a row of float -------------------------------------------

inline void load_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void load_row(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(s[j]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[j] = f;
  }
}

inline void load_row(const at::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
#endif
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

inline void store_row(const float* src, float* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(float));
}

// Round to nearest even, NaN kept quiet: what c10::BFloat16(float) does, written to vectorise.
inline void store_row(const float* src, at::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, src + j, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    d[j] = static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

inline void store_row(const float* src, at::Half* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; j < n; ++j) dst[j] = static_cast<at::Half>(src[j]);
}

// dst[j] += float(src[j])
template <typename T>
inline void add_row(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
  } else {
    float tmp[kSumBlock];
    for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
      const int64_t len = std::min(kSumBlock, n - j0);
      load_row(src + j0, tmp, len);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) dst[j0 + j] += tmp[j];
    }
  }
}

// The row as float: the row itself when T is float, else converted into `buf`.
template <typename T>
inline const float* as_float(const T* row, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    load_row(row, buf, n);
    return buf;
  }
}

// ---- row reductions ------------------------------------------------------------------------------

// sum_j (h[j] - shift)^p for p = 1 or 2.
template <int P>
inline double row_moment(const float* h, float shift, int64_t n) {
  double total = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t end = std::min(j0 + kSumBlock, n);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = j0; j < end; ++j) {
      const float d = h[j] - shift;
      s += P == 1 ? d : d * d;
    }
    total += s;
  }
  return total;
}

// y[j] = (h[j] - mean) * rstd * w[j] + b[j]; y may alias h.
inline void normalize_row(const float* h, float mean, float rstd, const float* w, const float* b, float* y, int64_t n) {
  if (w && b) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = (h[j] - mean) * rstd * w[j] + b[j];
  } else if (w) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = (h[j] - mean) * rstd * w[j];
  } else if (b) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = (h[j] - mean) * rstd + b[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = (h[j] - mean) * rstd;
  }
}

// ---- forward -------------------------------------------------------------------------------------

template <typename T, typename TR>
void forward_rows(const T* x, int64_t sx, const TR* res, int64_t sres, const float* w, const float* b, T* out,
                  TR* res_out, float* mean_out, float* rstd_out, int64_t m, int64_t n, float eps, bool rms) {
  const int64_t rows_per_task = std::max<int64_t>(1, kTaskElements / n);
#pragma omp parallel if (m > 1 && m * n >= kParallelMinElements)
  {
    std::vector<float> buf(n);
    float* s = buf.data();
#pragma omp for schedule(dynamic, rows_per_task)
    for (int64_t i = 0; i < m; ++i) {
      const float* h;
      if (res) {
        // h = x + residual, rounded to residual_out's dtype so that out is the norm of what is stored.
        load_row(x + i * sx, s, n);
        add_row(res + i * sres, s, n);
        store_row(s, res_out + i * n, n);
        if constexpr (!std::is_same_v<TR, float>) load_row(res_out + i * n, s, n);
        h = s;
      } else {
        h = as_float(x + i * sx, s, n);
      }
      const float mean = rms ? 0.f : static_cast<float>(row_moment<1>(h, 0.f, n) / n);
      const float rstd = 1.f / std::sqrt(static_cast<float>(row_moment<2>(h, mean, n) / n) + eps);
      if (!rms) mean_out[i] = mean;
      rstd_out[i] = rstd;
      if constexpr (std::is_same_v<T, float>) {
        normalize_row(h, mean, rstd, w, b, out + i * n, n);
      } else {
        normalize_row(h, mean, rstd, w, b, s, n);
        store_row(s, out + i * n, n);
      }
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------

// One row: dh = rstd * (g - c1 - xhat * c2) with g = dy * w, xhat = (h - mean) * rstd, c1 = mean(g)
// (0 for RMSNorm, where mean = 0 too), c2 = mean(g * xhat); with a weight dw += dy * xhat, with a bias
// db += dy. g is stored in `gbuf` and read back, so the g that c1 sums is the g that dh subtracts it
// from (a contracted dy * w - c1 would leave a rounding residue times rstd where the answer is 0).
template <bool HAS_W, bool HAS_B>
void backward_row(const float* h, const float* dy, const float* w, float mean, float rstd, bool rms, float* dh,
                  float* dw, float* db, float* gbuf, int64_t n) {
  const float* g = HAS_W ? gbuf : dy;
  double c1 = 0.0, c2 = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t end = std::min(j0 + kSumBlock, n);
    float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = j0; j < end; ++j) {
      const float xhat = (h[j] - mean) * rstd;
      float gj = dy[j];
      if constexpr (HAS_W) {
        gj *= w[j];
        gbuf[j] = gj;
        dw[j] += dy[j] * xhat;
      }
      if constexpr (HAS_B) db[j] += dy[j];
      s1 += gj;
      s2 += gj * xhat;
    }
    c1 += s1;
    c2 += s2;
  }
  const float c1n = rms ? 0.f : static_cast<float>(c1 / n);
  const float c2n = static_cast<float>(c2 / n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float xhat = (h[j] - mean) * rstd;
    dh[j] = (g[j] - c1n - xhat * c2n) * rstd;
  }
}

// dh has dy's dtype when dy and h share one, else float (torch.promote_types of two of our dtypes).
template <typename TD, typename TH>
using GradType = std::conditional_t<std::is_same_v<TD, TH>, TD, float>;

template <typename TD, typename TH, bool HAS_W, bool HAS_B>
void backward_rows(const TD* dy, int64_t sdy, const TH* dres, int64_t sdres, const TH* h, int64_t sh, const float* w,
                   const float* mean, const float* rstd, GradType<TD, TH>* dh, float* dw_partial, float* db_partial,
                   int64_t m, int64_t n, bool rms, int64_t rows_per_chunk, int64_t chunks) {
  using TG = GradType<TD, TH>;
#pragma omp parallel if (chunks > 1 && m * n >= kParallelMinElements)
  {
    std::vector<float> hbuf(n), dybuf(n), gbuf(n), dhbuf(std::is_same_v<TG, float> ? 0 : n);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      float* dw = HAS_W ? dw_partial + c * n : nullptr;
      float* db = HAS_B ? db_partial + c * n : nullptr;
      if (HAS_W) std::fill(dw, dw + n, 0.f);
      if (HAS_B) std::fill(db, db + n, 0.f);
      const int64_t end = std::min(m, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < end; ++i) {
        const float* hf = as_float(h + i * sh, hbuf.data(), n);
        const float* dyf = as_float(dy + i * sdy, dybuf.data(), n);
        float* dhr;
        if constexpr (std::is_same_v<TG, float>) {
          dhr = dh + i * n;
        } else {
          dhr = dhbuf.data();
        }
        backward_row<HAS_W, HAS_B>(hf, dyf, w, rms ? 0.f : mean[i], rstd[i], rms, dhr, dw, db, gbuf.data(), n);
        if (dres) add_row(dres + i * sdres, dhr, n);
        if constexpr (!std::is_same_v<TG, float>) store_row(dhr, dh + i * n, n);
      }
    }
  }
}

// Sum each (chunks, n) partial buffer in chunk order into an (n,) total; one parallel region over
// column blocks for all buffers, so the order of additions never depends on the thread count.
std::vector<at::Tensor> sum_partials(const std::vector<at::Tensor>& partials) {
  std::vector<at::Tensor> totals;
  std::vector<const float*> srcs;
  std::vector<float*> dsts;
  for (const auto& p : partials) {
    totals.push_back(at::zeros({p.size(1)}, p.options()));
    srcs.push_back(p.data_ptr<float>());
    dsts.push_back(totals.back().data_ptr<float>());
  }
  if (partials.empty()) return totals;
  const int64_t chunks = partials[0].size(0), n = partials[0].size(1);
  constexpr int64_t kCols = 1024;
  const int64_t blocks = (n + kCols - 1) / kCols;
  const int64_t count = static_cast<int64_t>(partials.size());
#pragma omp parallel for schedule(dynamic, 1) if (count * chunks * n >= kParallelMinElements)
  for (int64_t task = 0; task < count * blocks; ++task) {
    const float* p = srcs[task / blocks];
    float* t = dsts[task / blocks];
    const int64_t j0 = (task % blocks) * kCols, j1 = std::min(n, j0 + kCols);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* row = p + c * n;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) t[j] += row[j];
    }
  }
  return totals;
}

// ---- dtype dispatch ------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void visit_float_type(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<at::Half>{}); break;
    case at::kBFloat16: f(Tag<at::BFloat16>{}); break;
    default: TORCH_CHECK(false, "llmkern norm (cpu): ", what, " must be float32, float16 or bfloat16, got ", st);
  }
}

at::Tensor rows_of(const at::Tensor& t, const char* what, int64_t m, int64_t n) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == m && t.size(1) == n, "llmkern norm (cpu): ", what, " must have shape (",
              m, ", ", n, "), got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "llmkern norm (cpu): ", what, " must be a CPU tensor");
  return t.stride(1) == 1 ? t : t.contiguous();
}

const float* param_ptr(const std::optional<at::Tensor>& p, const char* what, int64_t n) {
  if (!p.has_value()) return nullptr;
  TORCH_CHECK(p->scalar_type() == at::kFloat && p->is_contiguous() && p->numel() == n, "llmkern norm (cpu): ", what,
              " must be a contiguous float32 tensor of ", n, " values");
  return p->data_ptr<float>();
}

std::vector<at::Tensor> norm_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 double eps, bool rms) {
  TORCH_CHECK(x_in.dim() == 2, "llmkern norm (cpu): x must be 2-D, got ", x_in.sizes());
  const int64_t m = x_in.size(0), n = x_in.size(1);
  const at::Tensor x = rows_of(x_in, "x", m, n);
  const bool has_res = residual_in.has_value();
  const at::Tensor residual = has_res ? rows_of(*residual_in, "residual", m, n) : x;
  const float* w = param_ptr(weight, "weight", n);
  const float* b = param_ptr(bias, "bias", n);

  at::Tensor out = at::empty({m, n}, x.options());
  at::Tensor residual_out = has_res ? at::empty({m, n}, residual.options()) : at::empty({0}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({rms ? 0 : m}, f32);
  at::Tensor rstd = at::empty({m}, f32);

  visit_float_type(x.scalar_type(), "x", [&](auto xt) {
    using T = typename decltype(xt)::type;
    visit_float_type(residual.scalar_type(), "residual", [&](auto rt) {
      using TR = typename decltype(rt)::type;
      forward_rows<T, TR>(x.data_ptr<T>(), x.stride(0), has_res ? residual.data_ptr<TR>() : nullptr,
                          residual.stride(0), w, b, out.data_ptr<T>(), has_res ? residual_out.data_ptr<TR>() : nullptr,
                          rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), m, n,
                          static_cast<float>(eps), rms);
    });
  });
  return {out, residual_out, mean, rstd};
}

std::vector<at::Tensor> norm_bwd(const at::Tensor& dy_in, const std::optional<at::Tensor>& dres_in,
                                 const at::Tensor& h_in, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& mean, const at::Tensor& rstd, bool rms, bool want_dbias) {
  TORCH_CHECK(h_in.dim() == 2, "llmkern norm (cpu): h must be 2-D, got ", h_in.sizes());
  const int64_t m = h_in.size(0), n = h_in.size(1);
  const at::Tensor h = rows_of(h_in, "h", m, n);
  const at::Tensor dy = rows_of(dy_in, "dy", m, n);
  const bool has_dres = dres_in.has_value();
  // dresidual_out is the gradient of residual_out = h, so it normally has h's dtype.
  const at::Tensor dres = has_dres ? rows_of(*dres_in, "dresidual_out", m, n).to(h.scalar_type()) : h;
  const float* w = param_ptr(weight, "weight", n);
  const bool want_dweight = w != nullptr;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == m,
              "llmkern norm (cpu): rstd must be contiguous float32 of ", m, " values");
  TORCH_CHECK(rms || (mean.scalar_type() == at::kFloat && mean.is_contiguous() && mean.numel() == m),
              "llmkern norm (cpu): mean must be contiguous float32 of ", m, " values");

  const int64_t rows_per_chunk =
      std::max((m + kMaxChunks - 1) / kMaxChunks, (kMinChunkElements + n - 1) / n);
  const int64_t chunks = std::max<int64_t>(1, (m + rows_per_chunk - 1) / rows_per_chunk);
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor dh = at::empty({m, n}, h.options().dtype(at::promote_types(dy.scalar_type(), h.scalar_type())));
  at::Tensor dw_partial = want_dweight ? at::empty({chunks, n}, f32) : at::empty({0}, f32);
  at::Tensor db_partial = want_dbias ? at::empty({chunks, n}, f32) : at::empty({0}, f32);

  visit_float_type(dy.scalar_type(), "dy", [&](auto dt) {
    using TD = typename decltype(dt)::type;
    visit_float_type(h.scalar_type(), "h", [&](auto ht) {
      using TH = typename decltype(ht)::type;
      auto run = [&](auto has_w, auto has_b) {
        backward_rows<TD, TH, decltype(has_w)::value, decltype(has_b)::value>(
            dy.data_ptr<TD>(), dy.stride(0), has_dres ? dres.data_ptr<TH>() : nullptr, dres.stride(0),
            h.data_ptr<TH>(), h.stride(0), w, rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
            dh.data_ptr<GradType<TD, TH>>(), want_dweight ? dw_partial.data_ptr<float>() : nullptr,
            want_dbias ? db_partial.data_ptr<float>() : nullptr, m, n, rms, rows_per_chunk, chunks);
      };
      if (w && want_dbias) {
        run(std::true_type{}, std::true_type{});
      } else if (w) {
        run(std::true_type{}, std::false_type{});
      } else if (want_dbias) {
        run(std::false_type{}, std::true_type{});
      } else {
        run(std::false_type{}, std::false_type{});
      }
    });
  });
  std::vector<at::Tensor> partials;
  if (want_dweight) partials.push_back(dw_partial);
  if (want_dbias) partials.push_back(db_partial);
  const std::vector<at::Tensor> totals = sum_partials(partials);
  at::Tensor dweight = want_dweight ? totals.front() : at::empty({0}, f32);
  at::Tensor dbias = want_dbias ? totals.back() : at::empty({0}, f32);
  return {dh, dweight, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_fwd", &norm_fwd, "LayerNorm/RMSNorm forward with optional residual add (see csrc/norm.cpp)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"),
        py::call_guard<py::gil_scoped_release>());
  m.def("norm_bwd", &norm_bwd, "LayerNorm/RMSNorm backward: dh, and dweight / dbias sums in fp32", py::arg("dy"),
        py::arg("dresidual_out"), py::arg("h"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("rms"),
        py::arg("want_dbias"), py::call_guard<py::gil_scoped_release>());
}
