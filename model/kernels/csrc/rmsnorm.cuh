// Gated RMSNorm over the last dim (model/kernels/reference.py, gated_rmsnorm_reference):
//
//   y = o * rsqrt(mean(o^2) + eps) * w * silu(gate)        float32 out
//
// One warp per row, rows spread over a grid of warps; the weight gradient is summed per
// block into a [n_blocks, d] partial buffer (summed in torch: deterministic, no atomics).
// o, gate: [rows, d] contiguous, dtype codes to / tg; weight float32 [d].
#pragma once

#include "common.cuh"

namespace sk {

struct RmsParams {
  const void* o;
  const void* gate;
  const float* weight;
  float* y;  // [rows, d]
  // backward
  const float* dy;  // [rows, d] contiguous
  float* d_o;       // [rows, d] float32
  float* d_gate;    // [rows, d] float32
  float* d_weight;  // [n_blocks, d] partial sums
  int64_t rows, d, n_blocks;
  int64_t to, tg;
  double eps;
};

constexpr int kRmsWarps = 8;

template <class TO, class TG>
__global__ void __launch_bounds__(kRmsWarps * 32) rms_fwd_kernel(const RmsParams p) {
  const TO* O = static_cast<const TO*>(p.o);
  const TG* Gt = static_cast<const TG*>(p.gate);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float eps = float(p.eps);
  for (int64_t row = int64_t(blockIdx.x) * kRmsWarps + warp; row < p.rows; row += int64_t(gridDim.x) * kRmsWarps) {
    const int64_t base = row * p.d;
    float ss = 0.0f;
    for (int64_t e = lane; e < p.d; e += 32) {
      const float x = to_f(O[base + e]);
      ss = __fmaf_rn(x, x, ss);
    }
    ss = lane_sum_low<32>(ss);
    const float rstd = rsqrtf(ss / float(p.d) + eps);
    for (int64_t e = lane; e < p.d; e += 32) {
      const float g = to_f(Gt[base + e]);
      p.y[base + e] = to_f(O[base + e]) * rstd * p.weight[e] * (g * sigmoidf(g));
    }
  }
}

template <class TO, class TG>
__global__ void __launch_bounds__(kRmsWarps * 32) rms_bwd_kernel(const RmsParams p) {
  SK_DYNAMIC_SMEM(s_dw);  // [kRmsWarps][d]
  const TO* O = static_cast<const TO*>(p.o);
  const TG* Gt = static_cast<const TG*>(p.gate);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float eps = float(p.eps);
  float* my_dw = s_dw + warp * p.d;
  for (int64_t e = lane; e < p.d; e += 32) my_dw[e] = 0.0f;
  for (int64_t row = int64_t(blockIdx.x) * kRmsWarps + warp; row < p.rows; row += int64_t(gridDim.x) * kRmsWarps) {
    const int64_t base = row * p.d;
    float ss = 0.0f;
    for (int64_t e = lane; e < p.d; e += 32) {
      const float x = to_f(O[base + e]);
      ss = __fmaf_rn(x, x, ss);
    }
    ss = lane_sum_low<32>(ss);
    const float rstd = rsqrtf(ss / float(p.d) + eps);
    // dn = dy * w * silu(g) with n = o * rstd; do = rstd * (dn - n * mean(dn * n))
    float dot = 0.0f;
    for (int64_t e = lane; e < p.d; e += 32) {
      const float g = to_f(Gt[base + e]), sg = sigmoidf(g), n = to_f(O[base + e]) * rstd;
      const float dy = p.dy[base + e];
      const float dn = dy * p.weight[e] * (g * sg);
      dot = __fmaf_rn(dn, n, dot);
      my_dw[e] += dy * n * (g * sg);
      p.d_gate[base + e] = dy * n * p.weight[e] * (sg * (1.0f + g * (1.0f - sg)));
    }
    dot = lane_sum_low<32>(dot) / float(p.d);
    for (int64_t e = lane; e < p.d; e += 32) {
      const float g = to_f(Gt[base + e]), sg = sigmoidf(g), n = to_f(O[base + e]) * rstd;
      const float dn = p.dy[base + e] * p.weight[e] * (g * sg);
      p.d_o[base + e] = rstd * (dn - n * dot);
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < p.d; e += kRmsWarps * 32) {
    float sum = 0.0f;
    for (int w = 0; w < kRmsWarps; ++w) sum += s_dw[w * p.d + e];
    p.d_weight[int64_t(blockIdx.x) * p.d + e] = sum;
  }
}

#if SK_HOST  // host launchers (not compiled by NVRTC: nvrtc.py launches the kernels itself)
inline const char* rms_run(const RmsParams& p, bool backward, cudaStream_t stream) {
  if (p.d < 1) return "gated_rmsnorm: empty last dim";
  if (p.n_blocks < 1) return "gated_rmsnorm: n_blocks must be at least 1";
  if (backward && size_t(p.d) * kRmsWarps * sizeof(float) > 200 * 1024) return "gated_rmsnorm: last dim too large";
  const dim3 grid(unsigned(p.n_blocks)), block(kRmsWarps * 32);
  const size_t smem = backward ? size_t(p.d) * kRmsWarps * sizeof(float) : 0;
  const int64_t combo = p.to * 2 + p.tg;
#define SK_RMS_CASE(CODE, TO, TG)                                                     \
  case CODE:                                                                          \
    return backward ? launch(rms_bwd_kernel<TO, TG>, grid, block, smem, stream, p) \
                    : launch(rms_fwd_kernel<TO, TG>, grid, block, smem, stream, p);
  switch (combo) {
    SK_RMS_CASE(kFloat32 * 2 + kFloat32, float, float)
    SK_RMS_CASE(kFloat32 * 2 + kBFloat16, float, bf16)
    SK_RMS_CASE(kBFloat16 * 2 + kFloat32, bf16, float)
    SK_RMS_CASE(kBFloat16 * 2 + kBFloat16, bf16, bf16)
    default:
      return "gated_rmsnorm: unsupported dtype";
  }
#undef SK_RMS_CASE
}

#endif  // SK_HOST

}  // namespace sk
