/* ShortConv's causal depthwise convolution (model/spike_kda.py) for CPU tensors, forward
 * and backward, over batch rows [b0, b1) so that callers can split a batch across threads.
 *
 *   y[b, t, :] = sum_j w[j, :] * xx[b, t + j, :]          j = 0 .. K-1
 *
 * xx: [B, T+K-1, D] (the carried tail, then the call's inputs); w: [K, D] (the module's
 * [D, K] weight transposed); y, gy: [B, T, D]; gxx: [B, T+K-1, D], written whole;
 * gw: [B, K, D], each batch row's share, written whole (the caller sums them, so the sum's
 * order does not depend on how rows were shared among threads). All contiguous; the inner
 * loops run along D, so they vectorise. Built with OpenMP, the rows (forward: (batch row, token) pairs;
 * backward: batch rows) are shared among `threads` threads.
 */
#include <string.h>

#include "parallel.h"

#define SHORT_CONV(SUFFIX, REAL)                                                                  \
    void short_conv_forward_##SUFFIX(const REAL *xx, const REAL *w, REAL *y, int64_t b0,         \
                                     int64_t b1, int64_t T, int64_t D, int64_t K,                 \
                                     int64_t threads) {                                           \
        PARALLEL_FOR(threads)                                                                     \
        for (int64_t bt = b0 * T; bt < b1 * T; ++bt) {                                            \
            const int64_t b = bt / T, t = bt % T;                                                 \
            REAL *out = y + (b * T + t) * D;                                                      \
            const REAL *in = xx + (b * (T + K - 1) + t) * D;                                      \
            for (int64_t d = 0; d < D; ++d) out[d] = w[(K - 1) * D + d] * in[(K - 1) * D + d];    \
            for (int64_t j = K - 2; j >= 0; --j)                                                  \
                for (int64_t d = 0; d < D; ++d) out[d] += w[j * D + d] * in[j * D + d];           \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    void short_conv_backward_##SUFFIX(const REAL *xx, const REAL *w, const REAL *gy, REAL *gxx,  \
                                      REAL *gw_all, int64_t b0, int64_t b1, int64_t T, int64_t D, \
                                      int64_t K, int64_t threads) {                               \
        PARALLEL_FOR(threads)                                                                     \
        for (int64_t b = b0; b < b1; ++b) {                                                       \
            REAL *gw = gw_all + b * K * D;                                                        \
            REAL *gin_b = gxx + b * (T + K - 1) * D;                                              \
            memset(gw, 0, sizeof(REAL) * K * D);                                                  \
            memset(gin_b, 0, sizeof(REAL) * (T + K - 1) * D);                                     \
            for (int64_t t = 0; t < T; ++t) {                                                     \
                const REAL *g = gy + (b * T + t) * D;                                             \
                const REAL *in = xx + (b * (T + K - 1) + t) * D;                                  \
                REAL *gin = gin_b + t * D;                                                        \
                for (int64_t j = 0; j < K; ++j)                                                   \
                    for (int64_t d = 0; d < D; ++d) {                                             \
                        gin[j * D + d] += w[j * D + d] * g[d];                                    \
                        gw[j * D + d] += g[d] * in[j * D + d];                                    \
                    }                                                                             \
            }                                                                                     \
        }                                                                                         \
    }

SHORT_CONV(f32, float)
SHORT_CONV(f64, double)
