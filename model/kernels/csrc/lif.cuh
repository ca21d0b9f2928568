// LIF spike scan fused with the Spike-KDA modulation (model/kernels/reference.py,
// lif_modulate_reference, is the specification):
//
//   v_t = decay * m_{t-1} + drive_t      (m zeroed first where a document starts)
//   s_t = [v_t >= threshold];  m_t = v_t - threshold * s_t
//   log_alpha_t = -a_t * s_t;  beta_t = sigmoid(beta_logit_t) * mean_channels(s_t)
//
// backward: fast-sigmoid surrogate ds/dv = 1 / (1 + slope |v - threshold|)^2, reset path
// treated as constant, so dL/dm_{t-1} = decay * keep_t * dL/dv_t (a reverse linear scan).
//
// One block per (batch, head), one thread per channel (blockDim = N rounded up to 32),
// a sequential loop over time; the per-head spike count comes from __syncthreads_count.
// Inputs are float32 and contiguous: drive, a [B, T, H, N]; beta_logit [B, T, H];
// membrane [B, H, N]; reset [B, T] (uint8). Every pointer marked "or null" may be null.
#pragma once

#include "common.cuh"

namespace sk {

struct LifParams {
  const float* drive;       // [B, T, H, N]
  const float* a;           // [B, T, H, N] decay magnitude
  const float* beta_logit;  // [B, T, H]
  const float* membrane;    // [B, H, N] or null (zeros)
  const uint8_t* reset;     // [B, T] or null
  float* spikes;            // [B, T, H, N]
  float* log_alpha;         // [B, T, H, N]
  float* beta;              // [B, T, H]
  float* v_save;            // [B, T, H, N] or null: the membrane before the spike decision
  float* membrane_out;      // [B, H, N]
  // backward
  const float* v;            // [B, T, H, N] v_save of the forward
  const float* g_spikes;     // or null
  const float* g_log_alpha;  // or null
  const float* g_beta;       // or null
  const float* g_membrane;   // or null
  float* d_drive;            // [B, T, H, N]
  float* d_a;                // [B, T, H, N]
  float* d_beta_logit;       // [B, T, H]
  float* d_membrane;         // [B, H, N] or null
  int64_t B, T, H, N;
  double decay, threshold, slope;
};

constexpr int kLifTile = 8;  // time steps loaded ahead of the dependent chain

__global__ void lif_fwd_kernel(const LifParams p) {
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int c = threadIdx.x;
  const bool active = c < p.N;
  const float decay = float(p.decay), thr = float(p.threshold), inv_n = 1.0f / float(p.N);
  const int64_t row = p.H * p.N;                    // stride of t in [B, T, H, N]
  const int64_t base = (b * p.T * p.H + h) * p.N + c;  // element (b, 0, h, c)
  float m = (active && p.membrane) ? p.membrane[bh * p.N + c] : 0.0f;
  for (int64_t t0 = 0; t0 < p.T; t0 += kLifTile) {
    float x[kLifTile], av[kLifTile], bl[kLifTile];
    bool rs[kLifTile];
#pragma unroll
    for (int j = 0; j < kLifTile; ++j) {  // independent loads first
      const int64_t t = t0 + j;
      const bool ok = t < p.T;
      x[j] = (ok && active) ? p.drive[base + t * row] : 0.0f;
      av[j] = (ok && active) ? p.a[base + t * row] : 0.0f;
      bl[j] = (ok && c == 0) ? p.beta_logit[(b * p.T + t) * p.H + h] : 0.0f;
      rs[j] = (ok && p.reset) ? p.reset[b * p.T + t] != 0 : false;
    }
#pragma unroll
    for (int j = 0; j < kLifTile; ++j) {
      const int64_t t = t0 + j;
      if (t < p.T) {  // uniform over the block
        if (rs[j]) m = 0.0f;
        const float v = __fmaf_rn(decay, m, x[j]);  // torch.add(drive, m, alpha=decay): one rounding
        const bool s = v >= thr;
        m = s ? v - thr : v;
        const float sf = s ? 1.0f : 0.0f;
        const int count = __syncthreads_count(active && s);
        if (active) {
          const int64_t i = base + t * row;
          p.spikes[i] = sf;
          p.log_alpha[i] = -av[j] * sf;
          if (p.v_save) p.v_save[i] = v;
        }
        if (c == 0) p.beta[(b * p.T + t) * p.H + h] = sigmoidf(bl[j]) * (float(count) * inv_n);
      }
    }
  }
  if (active) p.membrane_out[bh * p.N + c] = m;
}

__global__ void lif_bwd_kernel(const LifParams p) {
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int c = threadIdx.x;
  const bool active = c < p.N;
  const float decay = float(p.decay), thr = float(p.threshold), slope = float(p.slope);
  const float inv_n = 1.0f / float(p.N);
  const int64_t row = p.H * p.N;
  const int64_t base = (b * p.T * p.H + h) * p.N + c;
  float gm = (active && p.g_membrane) ? p.g_membrane[bh * p.N + c] : 0.0f;  // dL/dm_t
  for (int64_t t1 = p.T - 1; t1 >= 0; t1 -= kLifTile) {  // steps t1, t1-1, ..., t1-kLifTile+1
    float v[kLifTile], av[kLifTile], gs[kLifTile], gla[kLifTile], gb[kLifTile], bl[kLifTile];
    bool rs[kLifTile];
#pragma unroll
    for (int j = 0; j < kLifTile; ++j) {
      const int64_t t = t1 - j;
      const bool ok = t >= 0, on = ok && active;
      const int64_t i = base + t * row, ih = (b * p.T + t) * p.H + h;
      v[j] = on ? p.v[i] : 0.0f;
      av[j] = on ? p.a[i] : 0.0f;
      gs[j] = (on && p.g_spikes) ? p.g_spikes[i] : 0.0f;
      gla[j] = (on && p.g_log_alpha) ? p.g_log_alpha[i] : 0.0f;
      gb[j] = (ok && p.g_beta) ? p.g_beta[ih] : 0.0f;
      bl[j] = ok ? p.beta_logit[ih] : 0.0f;
      rs[j] = (ok && p.reset) ? p.reset[b * p.T + t] != 0 : false;
    }
#pragma unroll
    for (int j = 0; j < kLifTile; ++j) {
      const int64_t t = t1 - j;
      if (t >= 0) {  // uniform over the block
        const bool s = v[j] >= thr;
        const float sf = s ? 1.0f : 0.0f;
        const float sig = sigmoidf(bl[j]);
        // dL/ds from the three uses of s: the spikes output, log_alpha = -a s, beta = sig * mean(s)
        const float g_s = gs[j] + gla[j] * -av[j] + gb[j] * sig * inv_n;
        const float du = 1.0f + slope * fabsf(v[j] - thr);
        const float gv = g_s * (1.0f / (du * du)) + gm;  // dL/dv_t = dL/d drive_t
        gm = rs[j] ? 0.0f : gv * decay;
        if (active) {
          const int64_t i = base + t * row;
          p.d_drive[i] = gv;
          p.d_a[i] = -(gla[j] * sf);
        }
        if (p.g_beta) {  // uniform: the count is only needed for d beta_logit
          const int count = __syncthreads_count(active && s);
          if (c == 0) p.d_beta_logit[(b * p.T + t) * p.H + h] = gb[j] * (float(count) * inv_n) * (1.0f - sig) * sig;
        } else if (c == 0) {
          p.d_beta_logit[(b * p.T + t) * p.H + h] = 0.0f;
        }
      }
    }
  }
  if (active && p.d_membrane) p.d_membrane[bh * p.N + c] = gm;
}

#if SK_HOST  // host launchers (not compiled by NVRTC: nvrtc.py launches the kernels itself)
inline int lif_threads(int64_t N) { return int((N + 31) / 32 * 32); }

inline const char* lif_fwd(const LifParams& p, cudaStream_t stream) {
  if (p.N < 1 || p.N > 1024) return "lif: channels per head must be in [1, 1024]";
  if (p.B * p.H == 0 || p.T == 0) return nullptr;
  return launch(lif_fwd_kernel, dim3(unsigned(p.B * p.H)), dim3(lif_threads(p.N)), 0, stream, p);
}

inline const char* lif_bwd(const LifParams& p, cudaStream_t stream) {
  if (p.N < 1 || p.N > 1024) return "lif: channels per head must be in [1, 1024]";
  if (p.B * p.H == 0) return nullptr;
  return launch(lif_bwd_kernel, dim3(unsigned(p.B * p.H)), dim3(lif_threads(p.N)), 0, stream, p);
}

#endif  // SK_HOST

}  // namespace sk
