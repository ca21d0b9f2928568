// Spike-KDA recurrence (model/kda.py is the specification), per head with state S [dk, dv]:
//
//   S' = Diag(alpha_t) S        (S zeroed first where a document starts), alpha = exp(log_alpha)
//   r  = S'^T k_t;   u = v_t - r
//   S  = S' + beta_t k_t u^T;   o_t = S^T (scale q_t)
//
// Parallel over batch, heads and tiles of value columns (the columns of S evolve
// independently given k, alpha, beta), sequential over time, state in registers, float32
// throughout. Thread layout in a block of kThreads: each value column is owned by KS lanes
// of one warp, each lane holding kRows rows of that column:
//
//   lane = ks * CW + cw       ks in [0, KS): row group, rows ks*kRows .. ks*kRows+kRows-1
//                             cw in [0, CW): column within the warp (CW = 32 / KS)
//   column = tile * BV + warp * CW + cw      (BV = CW * warps: columns per block)
//
// Sums over rows (r, o, and e in the backward) are shuffles over the ks bits; sums over
// columns (dq, dk, dlog_alpha, dbeta in the backward) are a reduce-scatter over the cw bits,
// then across warps through shared memory, then across column tiles by the caller
// (each tile writes its own slice of a [n_tiles, ...] partial buffer, summed in torch):
// deterministic, no atomics.
//
// dk is padded to DKP in {32, 64, 128, 256} (zero q/k, alpha = 1 on the padding: padded
// rows stay zero). Inputs are staged per chunk of kChunk tokens in shared memory.
//
// Training: the forward stores the state at the start of every chunk (ckpt, float32
// [B, H, n_chunks, dk, dv]); the backward walks the chunks in reverse, recomputes the
// chunk's per-token states from its checkpoint into shared memory, then runs the reverse
// recurrence for dS (the gradient of the state) token by token.
#pragma once

#include "common.cuh"

namespace sk {

struct KdaParams {
  const void* q;         // [B, H, T, dk]  dtype ti, strides q_s
  const void* k;         // [B, H, T, dk]  dtype ti, strides k_s
  const void* v;         // [B, H, T, dv]  dtype tv, strides v_s
  const void* g;         // [B, H, T, dk]  log alpha, dtype ti, strides g_s
  const void* beta;      // [B, H, T]      dtype ti, strides beta_s
  const uint8_t* reset;  // [B, H, T] via strides reset_s (h stride 0 for [B, T]) or null
  const float* s0;       // [B, H, dk, dv] contiguous or null (zeros)
  void* o;               // [B, H, T, dv]  dtype tv, strides o_s
  float* s_final;        // [B, H, dk, dv] contiguous
  float* ckpt;           // [B, H, nc, dk, dv] contiguous or null
  // backward
  const void* d_o;         // [B, H, T, dv] dtype tv, strides do_s, or null (zeros)
  const float* d_sfinal;   // [B, H, dk, dv] contiguous or null
  float* dq;               // [nv, B, H, T, dk] contiguous partial sums over column tiles
  float* dk;               // [nv, B, H, T, dk]
  float* dg;               // [nv, B, H, T, dk]
  float* dbeta;            // [nv, B, H, T]
  float* dv;               // [B, H, T, dv] contiguous
  float* ds0;              // [B, H, dk, dv] contiguous or null
  int64_t q_s[3], k_s[3], v_s[3], g_s[3], beta_s[3], reset_s[3], o_s[3], do_s[3];  // b, h, t strides
  int64_t B, H, T, DK, DV;
  int64_t nv, nc;  // column tiles and chunks, as the caller sized its buffers
  int64_t ti, tv;  // dtype codes of (q, k, g, beta) and of (v, o, d_o)
  double scale;
};

constexpr int kRows = 8;       // state rows per thread
constexpr int kThreads = 128;  // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 16;  // tokens per chunk (checkpoint interval)

template <int DKP>
struct KdaCfg {
  static constexpr int KS = DKP / kRows;  // lanes per column
  static constexpr int CW = 32 / KS;      // columns per warp
  static constexpr int BV = CW * kWarps;  // columns per block
  static_assert(KS >= 1 && KS <= 32 && CW * KS == 32, "unsupported DKP");
  // forward shared memory (floats): k, q, alpha [kChunk][DKP]; v, o [kChunk][BV]; beta, keep [kChunk]
  static constexpr int kFwdSmem = 3 * kChunk * DKP + 2 * kChunk * BV + 2 * kChunk;
  // backward: + d_o, u [kChunk][BV]; states [kChunk][kRows][kThreads]; reductions [2][kWarps][3][DKP] + [2][kWarps]
  static constexpr int kBwdSmem = 3 * kChunk * DKP + 3 * kChunk * BV + 2 * kChunk + kChunk * kRows * kThreads +
                                  2 * kWarps * 3 * DKP + 2 * kWarps;
};

#if SK_HOST
inline int64_t kda_dkp(int64_t dk) {
  return dk <= 32 ? 32 : dk <= 64 ? 64 : dk <= 128 ? 128 : dk <= 256 ? 256 : -1;
}
inline int64_t kda_bv(int64_t dk) { return kda_dkp(dk) < 0 ? -1 : 32 / (kda_dkp(dk) / kRows) * kWarps; }
#endif  // SK_HOST

// Stage the chunk's inputs [t0, t0 + n) into shared memory (q pre-scaled, alpha = exp(g)).
template <int DKP, class TI, class TV>
__device__ __forceinline__ void kda_stage(const KdaParams& p, int64_t b, int64_t h, int64_t tile, int64_t t0, int n,
                                          float* s_k, float* s_q, float* s_a, float* s_v, float* s_beta,
                                          float* s_keep, float* s_do) {
  using C = KdaCfg<DKP>;
  const TI* Q = static_cast<const TI*>(p.q);
  const TI* K = static_cast<const TI*>(p.k);
  const TI* G = static_cast<const TI*>(p.g);
  const TI* Bt = static_cast<const TI*>(p.beta);
  const TV* V = static_cast<const TV*>(p.v);
  const TV* DO = static_cast<const TV*>(p.d_o);
  const float scale = float(p.scale);
  const int tid = threadIdx.x;
  for (int e = tid; e < kChunk * DKP; e += kThreads) {
    const int j = e / DKP, d = e % DKP;
    const int64_t t = t0 + j;
    const bool ok = j < n && d < p.DK;
    s_k[e] = ok ? to_f(K[b * p.k_s[0] + h * p.k_s[1] + t * p.k_s[2] + d]) : 0.0f;
    s_q[e] = ok ? to_f(Q[b * p.q_s[0] + h * p.q_s[1] + t * p.q_s[2] + d]) * scale : 0.0f;
    s_a[e] = ok ? expf(to_f(G[b * p.g_s[0] + h * p.g_s[1] + t * p.g_s[2] + d])) : 1.0f;
  }
  for (int e = tid; e < kChunk * C::BV; e += kThreads) {
    const int j = e / C::BV;
    const int64_t col = tile * C::BV + e % C::BV, t = t0 + j;
    const bool ok = j < n && col < p.DV;
    s_v[e] = ok ? to_f(V[b * p.v_s[0] + h * p.v_s[1] + t * p.v_s[2] + col]) : 0.0f;
    if (s_do) s_do[e] = (ok && DO) ? to_f(DO[b * p.do_s[0] + h * p.do_s[1] + t * p.do_s[2] + col]) : 0.0f;
  }
  for (int j = tid; j < kChunk; j += kThreads) {
    const int64_t t = t0 + j;
    const bool ok = j < n;
    s_beta[j] = ok ? to_f(Bt[b * p.beta_s[0] + h * p.beta_s[1] + t * p.beta_s[2]]) : 0.0f;
    const bool rs = ok && p.reset && p.reset[b * p.reset_s[0] + h * p.reset_s[1] + t * p.reset_s[2]] != 0;
    s_keep[j] = rs ? 0.0f : 1.0f;
  }
}

template <int DKP, class TI, class TV>
__global__ void __launch_bounds__(kThreads) kda_fwd_kernel(const KdaParams p) {
  using C = KdaCfg<DKP>;
  SK_DYNAMIC_SMEM(sm);
  float* s_k = sm;
  float* s_q = s_k + kChunk * DKP;
  float* s_a = s_q + kChunk * DKP;
  float* s_v = s_a + kChunk * DKP;
  float* s_o = s_v + kChunk * C::BV;
  float* s_beta = s_o + kChunk * C::BV;
  float* s_keep = s_beta + kChunk;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ks = lane / C::CW, cw = lane % C::CW;
  const int cl = warp * C::CW + cw;  // column within the block's tile
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H, tile = blockIdx.y;
  const int64_t col = tile * C::BV + cl;
  const bool col_ok = col < p.DV;
  const int d0 = ks * kRows;
  const int64_t state_base = bh * p.DK * p.DV;  // element (b, h, 0, 0) of [B, H, dk, dv]

  float S[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int d = d0 + i;
    S[i] = (p.s0 && col_ok && d < p.DK) ? p.s0[state_base + d * p.DV + col] : 0.0f;
  }
  TV* O = static_cast<TV*>(p.o);

  for (int64_t t0 = 0; t0 < p.T; t0 += kChunk) {
    const int n = int(imin(kChunk, p.T - t0));
    if (p.ckpt && col_ok) {  // the state this chunk starts from (before its first reset)
      float* ck = p.ckpt + ((bh * p.nc + t0 / kChunk) * p.DK) * p.DV;
#pragma unroll
      for (int i = 0; i < kRows; ++i)
        if (d0 + i < p.DK) ck[(d0 + i) * p.DV + col] = S[i];
    }
    __syncthreads();  // the previous chunk's shared memory is no longer read
    kda_stage<DKP, TI, TV>(p, b, h, tile, t0, n, s_k, s_q, s_a, s_v, s_beta, s_keep, nullptr);
    __syncthreads();
    for (int j = 0; j < n; ++j) {
      float kr[kRows], qr[kRows], ar[kRows];
      load8(s_k + j * DKP + d0, kr);
      load8(s_q + j * DKP + d0, qr);
      load8(s_a + j * DKP + d0, ar);
      if (s_keep[j] == 0.0f) {
#pragma unroll
        for (int i = 0; i < kRows; ++i) S[i] = 0.0f;
      }
      float pr = 0.0f;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        S[i] *= ar[i];
        pr = __fmaf_rn(kr[i], S[i], pr);
      }
      const float r = lane_sum_high<C::CW>(pr);
      const float bu = s_beta[j] * (s_v[j * C::BV + cl] - r);
      float po = 0.0f;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        S[i] = __fmaf_rn(kr[i], bu, S[i]);
        po = __fmaf_rn(qr[i], S[i], po);
      }
      const float o = lane_sum_high<C::CW>(po);
      if (ks == 0) s_o[j * C::BV + cl] = o;
    }
    __syncthreads();
    for (int e = tid; e < n * C::BV; e += kThreads) {
      const int j = e / C::BV;
      const int64_t c = tile * C::BV + e % C::BV;
      if (c < p.DV) O[b * p.o_s[0] + h * p.o_s[1] + (t0 + j) * p.o_s[2] + c] = from_f<TV>(s_o[e]);
    }
  }
  if (col_ok) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (d0 + i < p.DK) p.s_final[state_base + (d0 + i) * p.DV + col] = S[i];
  }
}

template <int DKP, class TI, class TV>
__global__ void __launch_bounds__(kThreads) kda_bwd_kernel(const KdaParams p) {
  using C = KdaCfg<DKP>;
  constexpr int RS = kRows / C::CW;  // reduced rows per lane after the column reduce-scatter
  SK_DYNAMIC_SMEM(sm);
  float* s_k = sm;
  float* s_q = s_k + kChunk * DKP;
  float* s_a = s_q + kChunk * DKP;
  float* s_v = s_a + kChunk * DKP;
  float* s_do = s_v + kChunk * C::BV;
  float* s_u = s_do + kChunk * C::BV;
  float* s_beta = s_u + kChunk * C::BV;
  float* s_keep = s_beta + kChunk;
  float* s_st = s_keep + kChunk;                        // [kChunk][kRows][kThreads]
  float* s_red = s_st + kChunk * kRows * kThreads;      // [2][kWarps][3][DKP]
  float* s_redb = s_red + 2 * kWarps * 3 * DKP;         // [2][kWarps]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ks = lane / C::CW, cw = lane % C::CW;
  const int cl = warp * C::CW + cw;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H, tile = blockIdx.y;
  const int64_t col = tile * C::BV + cl;
  const bool col_ok = col < p.DV;
  const int d0 = ks * kRows;
  const int64_t state_base = bh * p.DK * p.DV;
  const int64_t part_base = (tile * p.B * p.H + bh) * p.T;  // row (tile, b, h, t=0) of the partials
  const float scale = float(p.scale);

  float dS[kRows];  // dL/dS_t, the state after token t
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int d = d0 + i;
    dS[i] = (p.d_sfinal && col_ok && d < p.DK) ? p.d_sfinal[state_base + d * p.DV + col] : 0.0f;
  }

  for (int64_t c = p.nc - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk;
    const int n = int(imin(kChunk, p.T - t0));
    __syncthreads();  // the previous chunk's shared memory is no longer read
    kda_stage<DKP, TI, TV>(p, b, h, tile, t0, n, s_k, s_q, s_a, s_v, s_beta, s_keep, s_do);
    float S[kRows];
    {
      const float* ck = p.ckpt + ((bh * p.nc + c) * p.DK) * p.DV;
#pragma unroll
      for (int i = 0; i < kRows; ++i) S[i] = (col_ok && d0 + i < p.DK) ? ck[(d0 + i) * p.DV + col] : 0.0f;
    }
    __syncthreads();
    // (1) recompute the chunk forward: the state each token starts from (after its reset)
    // goes to shared memory, and u = v - r to s_u.
    for (int j = 0; j < n; ++j) {
      float kr[kRows], ar[kRows];
      load8(s_k + j * DKP + d0, kr);
      load8(s_a + j * DKP + d0, ar);
      if (s_keep[j] == 0.0f) {
#pragma unroll
        for (int i = 0; i < kRows; ++i) S[i] = 0.0f;
      }
      float pr = 0.0f;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        s_st[(j * kRows + i) * kThreads + tid] = S[i];
        S[i] *= ar[i];
        pr = __fmaf_rn(kr[i], S[i], pr);
      }
      const float u = s_v[j * C::BV + cl] - lane_sum_high<C::CW>(pr);
      if (ks == 0) s_u[j * C::BV + cl] = u;
      const float bu = s_beta[j] * u;
#pragma unroll
      for (int i = 0; i < kRows; ++i) S[i] = __fmaf_rn(kr[i], bu, S[i]);
    }
    __syncthreads();
    // (2) reverse through the chunk
    for (int j = n - 1; j >= 0; --j) {
      const int64_t t = t0 + j;
      float kr[kRows], qr[kRows], ar[kRows];
      load8(s_k + j * DKP + d0, kr);
      load8(s_q + j * DKP + d0, qr);
      load8(s_a + j * DKP + d0, ar);
      const float u = s_u[j * C::BV + cl], beta = s_beta[j], dout = s_do[j * C::BV + cl];
      const float bu = beta * u;
      float Sp[kRows], St[kRows];
      float pe = 0.0f;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        Sp[i] = s_st[(j * kRows + i) * kThreads + tid] * ar[i];  // Diag(alpha) S_{t-1}
        St[i] = __fmaf_rn(kr[i], bu, Sp[i]);                     // S_t
        dS[i] = __fmaf_rn(qr[i], dout, dS[i]);                   // + the read o_t = S_t^T q
        pe = __fmaf_rn(kr[i], dS[i], pe);
      }
      const float e = lane_sum_high<C::CW>(pe);  // e = dS_t^T k
      const float be = beta * e;
      if (ks == 0 && col_ok) p.dv[(bh * p.T + t) * p.DV + col] = be;
      float xq[kRows], xk[kRows], xg[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        xq[i] = St[i] * dout;                              // dq (times scale, below)
        xk[i] = __fmaf_rn(bu, dS[i], -be * Sp[i]);         // dk: write k u^T, and the recall r = S'^T k
        const float dSp = __fmaf_rn(-be, kr[i], dS[i]);    // dL/dS'
        xg[i] = dSp * Sp[i];                               // d log_alpha
        dS[i] = s_keep[j] == 0.0f ? 0.0f : dSp * ar[i];    // dL/dS_{t-1}
      }
      const float db = lane_sum_low<C::CW>(e * u);  // d beta, summed over this warp's columns
      int off = 0, off2 = 0, off3 = 0;
      lane_reduce_scatter<C::CW / 2, kRows>(xq, lane, off);
      lane_reduce_scatter<C::CW / 2, kRows>(xk, lane, off2);
      lane_reduce_scatter<C::CW / 2, kRows>(xg, lane, off3);
      const int buf = j & 1;  // double buffer: one barrier per token
      float* red = s_red + (buf * kWarps + warp) * 3 * DKP + d0 + off;
#pragma unroll
      for (int i = 0; i < RS; ++i) {
        red[i] = xq[i];
        red[DKP + i] = xk[i];
        red[2 * DKP + i] = xg[i];
      }
      if (lane == 0) s_redb[buf * kWarps + warp] = db;
      __syncthreads();
      for (int e2 = tid; e2 < 3 * DKP; e2 += kThreads) {
        const int qty = e2 / DKP, d = e2 % DKP;
        if (d < p.DK) {
          float sum = 0.0f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) sum += s_red[(buf * kWarps + w) * 3 * DKP + e2];
          float* out = qty == 0 ? p.dq : qty == 1 ? p.dk : p.dg;
          out[(part_base + t) * p.DK + d] = qty == 0 ? sum * scale : sum;
        }
      }
      if (tid == 0) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += s_redb[buf * kWarps + w];
        p.dbeta[part_base + t] = sum;
      }
    }
  }
  if (p.ds0 && col_ok) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (d0 + i < p.DK) p.ds0[state_base + (d0 + i) * p.DV + col] = dS[i];
  }
}

#if SK_HOST  // host launchers (not compiled by NVRTC: nvrtc.py launches the kernels itself)
template <int DKP, bool BACKWARD>
inline const char* kda_launch(const KdaParams& p, cudaStream_t stream) {
  using C = KdaCfg<DKP>;
  const dim3 grid(unsigned(p.B * p.H), unsigned(p.nv));
  const size_t smem = sizeof(float) * size_t(BACKWARD ? C::kBwdSmem : C::kFwdSmem);
  const int64_t combo = p.ti * 2 + p.tv;
#define SK_KDA_CASE(CODE, TI, TV)                                                                    \
  case CODE:                                                                                         \
    if constexpr (BACKWARD) return launch(kda_bwd_kernel<DKP, TI, TV>, grid, dim3(kThreads), smem, stream, p); \
    else return launch(kda_fwd_kernel<DKP, TI, TV>, grid, dim3(kThreads), smem, stream, p);
  switch (combo) {
    SK_KDA_CASE(kFloat32 * 2 + kFloat32, float, float)
    SK_KDA_CASE(kFloat32 * 2 + kBFloat16, float, bf16)
    SK_KDA_CASE(kBFloat16 * 2 + kBFloat16, bf16, bf16)
    default:
      return "kda: unsupported dtype combination (q/k/log_alpha/beta bf16 with float32 v)";
  }
#undef SK_KDA_CASE
}

// The forward (BACKWARD = false; also the one-token step) or the backward. Templated so
// that the extension compiles the two in separate translation units (kda_fwd.cu, kda_bwd.cu).
template <bool BACKWARD>
inline const char* kda_run(const KdaParams& p, cudaStream_t stream) {
  const int64_t dkp = kda_dkp(p.DK);
  if (dkp < 0) return "kda: head dim (dk) above 256 is not supported by the fused kernel";
  if (p.nv != (p.DV + kda_bv(p.DK) - 1) / kda_bv(p.DK)) return "kda: nv does not match the column tiling";
  if (p.nc != (p.T + kChunk - 1) / kChunk) return "kda: nc does not match the chunking";
  if (BACKWARD && !p.ckpt) return "kda: the backward needs the forward's checkpoints";
  if (p.B * p.H == 0 || p.DV == 0) return nullptr;
  if (p.T == 0 && BACKWARD) return nullptr;
  switch (dkp) {
    case 32: return kda_launch<32, BACKWARD>(p, stream);
    case 64: return kda_launch<64, BACKWARD>(p, stream);
    case 128: return kda_launch<128, BACKWARD>(p, stream);
    default: return kda_launch<256, BACKWARD>(p, stream);
  }
}

#endif  // SK_HOST

}  // namespace sk
