/* Spike-KDA's gated RMSNorm (model/ops/reference/layer.py, gated_rmsnorm_reference) for CPU
 * tensors, forward and backward, one pass each over rows of D channels:
 *
 *   r = 1 / sqrt(mean(o^2) + eps),   n = o r,   y = n * weight * silu(gate)
 *
 * o: element (b, t, h, d) at o[b sb + t st + h sh + d] (the KDA's [B, H, T, D] output
 * read as [B, T, H, D] without a copy); gate, y, gy, ggate: [B, T, H, D] contiguous;
 * go: o's layout; rstd: [B, T, H] (r, kept for the backward); weight: [D]; gw: [B T, D],
 * each (b, t)'s share of the weight's gradient (the caller sums them in a fixed order).
 * Built with OpenMP, the (b, t) rows are shared among `threads` threads. Sums over D use
 * eight partial sums, so they vectorise and their order never changes.
 */
#include <math.h>

#include "parallel.h"
#include "vec_math.h"

#define DOT8(REAL, a, b, n, out)                                                      \
    do {                                                                              \
        REAL p_[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                        \
        const int64_t n8_ = (n) - (n) % 8;                                            \
        for (int64_t j_ = 0; j_ < n8_; j_ += 8)                                       \
            for (int l_ = 0; l_ < 8; ++l_) p_[l_] += (a)[j_ + l_] * (b)[j_ + l_];     \
        for (int64_t j_ = n8_; j_ < (n); ++j_) p_[0] += (a)[j_] * (b)[j_];            \
        out = ((p_[0] + p_[4]) + (p_[2] + p_[6])) + ((p_[1] + p_[5]) + (p_[3] + p_[7])); \
    } while (0)

#define GATED_NORM(SUFFIX, REAL, EXP, SQRT)                                                          \
    void gated_norm_forward_##SUFFIX(const REAL *o, int64_t sb, int64_t st, int64_t sh,             \
                                     const REAL *gate, const REAL *weight, REAL *y, REAL *rstd,     \
                                     int64_t B, int64_t T, int64_t H, int64_t D, double eps,        \
                                     int64_t threads) {                                              \
        PARALLEL_FOR(threads)                                                                        \
        for (int64_t bt = 0; bt < B * T; ++bt) {                                                     \
            const int64_t b = bt / T, t = bt % T;                                                    \
            for (int64_t h = 0; h < H; ++h) {                                                        \
                const REAL *x = o + b * sb + t * st + h * sh;                                        \
                const REAL *g = gate + (bt * H + h) * D;                                             \
                REAL *out = y + (bt * H + h) * D;                                                    \
                REAL ss;                                                                             \
                DOT8(REAL, x, x, D, ss);                                                             \
                const REAL r = (REAL)1 / SQRT(ss / (REAL)D + (REAL)eps);                             \
                rstd[bt * H + h] = r;                                                                \
                for (int64_t d = 0; d < D; ++d)                                                      \
                    out[d] = x[d] * r * weight[d] * (g[d] / ((REAL)1 + EXP(-g[d])));                 \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void gated_norm_backward_##SUFFIX(const REAL *o, int64_t sb, int64_t st, int64_t sh,            \
                                      const REAL *gate, const REAL *weight, const REAL *rstd,       \
                                      const REAL *gy, REAL *go, REAL *ggate, REAL *gw, int64_t B,   \
                                      int64_t T, int64_t H, int64_t D, int64_t threads) {           \
        PARALLEL_FOR(threads)                                                                        \
        for (int64_t bt = 0; bt < B * T; ++bt) {                                                     \
            const int64_t b = bt / T, t = bt % T;                                                    \
            REAL *gwr = gw + bt * D;                                                                 \
            for (int64_t d = 0; d < D; ++d) gwr[d] = 0;                                              \
            for (int64_t h = 0; h < H; ++h) {                                                        \
                const int64_t off = b * sb + t * st + h * sh, row = (bt * H + h) * D;               \
                const REAL *x = o + off, *g = gate + row, *dy = gy + row;                            \
                const REAL r = rstd[bt * H + h];                                                     \
                REAL gn[MAXD_NORM], n[MAXD_NORM];                                                    \
                for (int64_t d = 0; d < D; ++d) {                                                    \
                    const REAL s = (REAL)1 / ((REAL)1 + EXP(-g[d]));                                 \
                    const REAL silu = g[d] * s;                                                      \
                    n[d] = x[d] * r;                                                                 \
                    gn[d] = dy[d] * weight[d] * silu;                                                \
                    ggate[row + d] = dy[d] * n[d] * weight[d] * s * ((REAL)1 + g[d] * ((REAL)1 - s)); \
                    gwr[d] += dy[d] * n[d] * silu;                                                   \
                }                                                                                    \
                REAL dot;                                                                            \
                DOT8(REAL, gn, n, D, dot);                                                           \
                const REAL mean = dot / (REAL)D;                                                     \
                for (int64_t d = 0; d < D; ++d) go[off + d] = r * (gn[d] - n[d] * mean);             \
            }                                                                                        \
        }                                                                                            \
    }

/* the largest D the backward's row buffers hold (the caller checks) */
#define MAXD_NORM 1024
int64_t gated_norm_max_dim(void) { return MAXD_NORM; }

static inline double exp_f64(double x) { return exp(x); }

GATED_NORM(f32, float, exp_f32, sqrtf)
GATED_NORM(f64, double, exp_f64, sqrt)
