// LoRA dropout mask on CPU: the keep mask of llmkern/reference/lora.py, regenerated from a seed.
//
//   dropout_keep(x, seed, p) -> x * keep      (same dtype and shape; dropped elements are exactly 0)
//
// x: contiguous (M, K) float/double/Half/BFloat16. Element i of the flattened x (i = m * K + k) is
// kept when u(seed, i) >= float(p), where u is Triton's tl.rand: Philox 4x32-10 with counter
// (i_lo, i_hi, 0, 0) and key (seed_lo, seed_hi); the first output word, read as int32 s, maps to
// float(s < 0 ? ~s : s) * 4.6566127342e-10f. The same bits as the Triton kernels, so the forward and
// backward of every backend agree on the mask without storing it. The 1 / (1 - p) scale is applied
// by the caller in fp32 to the (M, r) product instead of to x, which keeps this copy exact.
// Elements run in parallel (at::parallel_for); the inner loop is branch-free for vectorisation.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>

namespace {

constexpr int64_t kGrain = 1 << 14;

inline float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t s = static_cast<int32_t>(c0);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * 4.6566127342e-10f;
}

template <typename T>
void keep_kernel(const T* x, T* out, int64_t n, uint64_t seed, float p) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      out[i] = philox_uniform(seed, static_cast<uint64_t>(i)) >= p ? x[i] : T(0);
    }
  });
}

torch::Tensor dropout_keep(const torch::Tensor& x, int64_t seed, double p) {
  TORCH_CHECK(x.device().is_cpu(), "llmkern.lora_linear (cpu): x must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "llmkern.lora_linear (cpu): dropout_keep takes a contiguous tensor");
  TORCH_CHECK(seed >= 0, "llmkern.lora_linear (cpu): seed must be non-negative, got ", seed);
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_keep", [&] {
    keep_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(),
                          static_cast<uint64_t>(seed), static_cast<float>(p));
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_keep", &dropout_keep, "x * keep for the LoRA dropout mask of (seed, p) (see csrc/lora.cpp)");
}
