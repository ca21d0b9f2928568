/* Spike-KDA's q/k/v split (model/spike_kda.py) for CPU tensors: the conv's output
 * [B, T, 3, H, D] becomes q, k, v, each [B, H, T, D] contiguous (the layout the chunked
 * KDA works in), with q and k L2-normalised per head as F.normalize does:
 * y = x / max(|x|, eps). Forward and backward, over batch rows [b0, b1) (pointers
 * pre-offset by the caller). The backward writes the whole gradient of qkv:
 *   dx = (dy - y (y . dy)) / |x|   where |x| > eps,   dy / eps   otherwise.
 * inv_norm [B, 2, H, T] keeps 1 / max(|x|, eps) of q and k for the backward (where it
 * equals 1 / eps, y = x / eps is linear in x and the projection term drops).
 * Built with OpenMP, the (batch row, token) pairs are shared among `threads` threads.
 */
#include <math.h>

#include "parallel.h"

#define SPLIT_HEADS(SUFFIX, REAL, SQRT)                                                           \
    void split_heads_forward_##SUFFIX(const REAL *qkv, REAL *q, REAL *k, REAL *v, REAL *inv_norm, \
                                      int64_t B, int64_t T, int64_t H, int64_t D, double eps_d,    \
                                      int64_t threads) {                                          \
        const REAL eps = (REAL)eps_d;                                                             \
        REAL *outs[3] = {q, k, v};                                                                \
        PARALLEL_FOR(threads)                                                                     \
        for (int64_t bt = 0; bt < B * T; ++bt)                                                    \
            for (int64_t j = 0; j < 3; ++j) {                                                     \
                const int64_t b = bt / T, t = bt % T;                                             \
                for (int64_t h = 0; h < H; ++h) {                                                 \
                    const REAL *x = qkv + (((b * T + t) * 3 + j) * H + h) * D;                    \
                    REAL *y = outs[j] + ((b * H + h) * T + t) * D;                                \
                    if (j == 2) {                                                                 \
                        for (int64_t d = 0; d < D; ++d) y[d] = x[d];                              \
                        continue;                                                                 \
                    }                                                                             \
                    REAL ss = 0;                                                                  \
                    for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];                            \
                    REAL n = SQRT(ss);                                                            \
                    REAL inv = (REAL)1 / (n > eps ? n : eps);                                     \
                    inv_norm[((b * 2 + j) * H + h) * T + t] = inv;                                \
                    for (int64_t d = 0; d < D; ++d) y[d] = x[d] * inv;                            \
                }                                                                                 \
            }                                                                                     \
    }                                                                                             \
                                                                                                  \
    void split_heads_backward_##SUFFIX(const REAL *q, const REAL *k, const REAL *inv_norm,       \
                                       const REAL *dq, const REAL *dk, const REAL *dv,            \
                                       REAL *dqkv, int64_t B, int64_t T, int64_t H, int64_t D,    \
                                       double eps_d, int64_t threads) {                           \
        const REAL big = (REAL)1 / (REAL)eps_d; /* inv == big: |x| <= eps, y = x / eps */        \
        const REAL *ys[2] = {q, k};                                                               \
        const REAL *dys[3] = {dq, dk, dv};                                                        \
        PARALLEL_FOR(threads)                                                                     \
        for (int64_t bt = 0; bt < B * T; ++bt)                                                    \
            for (int64_t j = 0; j < 3; ++j) {                                                     \
                const int64_t b = bt / T, t = bt % T;                                             \
                for (int64_t h = 0; h < H; ++h) {                                                 \
                    REAL *dx = dqkv + (((b * T + t) * 3 + j) * H + h) * D;                        \
                    const int64_t row = ((b * H + h) * T + t) * D;                                \
                    if (!dys[j]) {                                                                \
                        for (int64_t d = 0; d < D; ++d) dx[d] = 0;                                \
                        continue;                                                                 \
                    }                                                                             \
                    const REAL *dy = dys[j] + row;                                                \
                    if (j == 2) {                                                                 \
                        for (int64_t d = 0; d < D; ++d) dx[d] = dy[d];                            \
                        continue;                                                                 \
                    }                                                                             \
                    const REAL *y = ys[j] + row;                                                  \
                    const REAL inv = inv_norm[((b * 2 + j) * H + h) * T + t];                     \
                    REAL dot = 0;                                                                 \
                    for (int64_t d = 0; d < D; ++d) dot += y[d] * dy[d];                          \
                    const REAL proj = inv < big ? dot : (REAL)0; /* y = x / eps: linear */        \
                    for (int64_t d = 0; d < D; ++d) dx[d] = (dy[d] - y[d] * proj) * inv;          \
                }                                                                                 \
            }                                                                                     \
    }

SPLIT_HEADS(f32, float, sqrtf)
SPLIT_HEADS(f64, double, sqrt)
