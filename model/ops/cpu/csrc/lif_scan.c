#include <math.h>
#include <stdint.h>

/* The LIF scan (model/ops/reference/lif.py) with Spike-KDA's modulation folded in
 * (model/ops/reference/layer.py, lif_modulate_reference), forward and backward, for rows of
 * N = H * D neurons, over the batch rows the caller's pointers start at:
 *   v_t = drive_t + decay * m      m <- m * keep_t before it (keep_t = 0 at a document start)
 *   s_t = v_t >= threshold         m <- s_t ? v_t - threshold : v_t
 * with the same arithmetic in the same order as the reference (built with
 * -ffp-contract=off, so decay * m is rounded before the add), so spikes are identical, and
 *   log_alpha = -a * s        beta[h] = sigmoid(beta_logit[h]) * mean over the head's D of s
 * drive, a, v_all, spikes, log_alpha: [B, T, H*D]; beta_logit, beta: [B, T, H]; keep:
 * [B, T] or NULL; m: [B, H*D], the initial membrane in, the final one out. The backward
 * uses the fast-sigmoid surrogate ds/dv = 1 / (1 + slope |v - threshold|)^2. The backward takes any of grad_spikes, grad_m_end, grad_log_alpha, grad_beta as
 * NULL (zero) and writes grad_drive, grad_a [B, T, H*D], grad_beta_logit [B, T, H] and
 * grad_m0 [B, H*D]. a = NULL: no alpha modulation (log_alpha and grad_a are not written;
 * pass them NULL too).
 *
 * Every (batch row, head) pair is independent: built with OpenMP, the pairs are shared
 * among `threads` threads (the caller passes torch's intra-op thread count; see
 * parallel.h); a head's spike count is an integer, so it is exact in any order.
 */
#include "parallel.h"

#define LIF_MODULATE(SUFFIX, REAL, EXP)                                                             \
    void lif_modulate_forward_##SUFFIX(const REAL *drive, const REAL *a, const REAL *beta_logit,   \
                                       const REAL *keep, REAL *v_all, REAL *spikes,                \
                                       REAL *log_alpha, REAL *beta, REAL *m, int64_t B, int64_t T, \
                                       int64_t H, int64_t D, double decay_d, double threshold_d,   \
                                       int64_t threads) {                                          \
        const REAL decay = (REAL)decay_d, threshold = (REAL)threshold_d;                           \
        const int64_t N = H * D;                                                                    \
        PARALLEL_FOR(threads)                                                                      \
        for (int64_t bh = 0; bh < B * H; ++bh) {                                                   \
            const int64_t b = bh / H, h = bh % H;                                                  \
            REAL *mb = m + b * N + h * D;                                                          \
            for (int64_t t = 0; t < T; ++t) {                                                      \
                const int64_t row = (b * T + t) * N + h * D;                                       \
                if (keep) {                                                                        \
                    const REAL k = keep[b * T + t];                                                \
                    for (int64_t d = 0; d < D; ++d) mb[d] = mb[d] * k;                             \
                }                                                                                  \
                int32_t count = 0;                                                                 \
                for (int64_t d = 0; d < D; ++d) {                                                  \
                    const REAL vn = drive[row + d] + decay * mb[d];                                \
                    const int32_t fired = vn >= threshold;                                         \
                    const REAL sn = fired ? (REAL)1 : (REAL)0;                                     \
                    v_all[row + d] = vn;                                                           \
                    spikes[row + d] = sn;                                                          \
                    if (a) log_alpha[row + d] = -a[row + d] * sn;                                  \
                    mb[d] = fired ? vn - threshold : vn;                                           \
                    count += fired;                                                                \
                }                                                                                  \
                const int64_t hr = (b * T + t) * H + h;                                            \
                const REAL sig = (REAL)1 / ((REAL)1 + EXP(-beta_logit[hr]));                       \
                beta[hr] = sig * ((REAL)count / (REAL)D);                                          \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    void lif_modulate_backward_##SUFFIX(                                                           \
        const REAL *v_all, const REAL *a, const REAL *beta_logit, const REAL *keep,                \
        const REAL *grad_spikes, const REAL *grad_m_end, const REAL *grad_log_alpha,               \
        const REAL *grad_beta, REAL *grad_drive, REAL *grad_a, REAL *grad_beta_logit,              \
        REAL *grad_m0, int64_t B, int64_t T, int64_t H, int64_t D, double decay_d,                 \
        double threshold_d, double slope_d, int64_t threads) {                                     \
        const REAL decay = (REAL)decay_d, threshold = (REAL)threshold_d, slope = (REAL)slope_d;    \
        const int64_t N = H * D;                                                                    \
        PARALLEL_FOR(threads)                                                                      \
        for (int64_t bh = 0; bh < B * H; ++bh) {                                                   \
            const int64_t b = bh / H, h = bh % H;                                                  \
            REAL *g = grad_m0 + b * N + h * D;                                                     \
            for (int64_t d = 0; d < D; ++d) g[d] = grad_m_end ? grad_m_end[b * N + h * D + d] : (REAL)0; \
            for (int64_t t = T - 1; t >= 0; --t) {                                                 \
                const int64_t row = (b * T + t) * N + h * D;                                       \
                const REAL carry = keep ? decay * keep[b * T + t] : decay;                         \
                const int64_t hr = (b * T + t) * H + h;                                            \
                const REAL sig = (REAL)1 / ((REAL)1 + EXP(-beta_logit[hr]));                       \
                const REAL gb = grad_beta ? grad_beta[hr] : (REAL)0;                               \
                const REAL per_spike = gb * sig / (REAL)D;                                         \
                int32_t count = 0;                                                                 \
                for (int64_t d = 0; d < D; ++d) {                                                  \
                    const int64_t i = row + d;                                                     \
                    const REAL v = v_all[i];                                                       \
                    const int32_t fired = v >= threshold;                                          \
                    const REAL s = fired ? (REAL)1 : (REAL)0;                                      \
                    const REAL gla = grad_log_alpha ? grad_log_alpha[i] : (REAL)0;                 \
                    count += fired;                                                                \
                    if (grad_a) grad_a[i] = -s * gla;                                              \
                    const REAL gs = (grad_spikes ? grad_spikes[i] : (REAL)0) - (a ? a[i] * gla : (REAL)0) + per_spike; \
                    const REAL x = v - threshold;                                                  \
                    const REAL den = (REAL)1 + slope * (x < 0 ? -x : x);                           \
                    const REAL gv = gs / (den * den) + g[d];                                       \
                    grad_drive[i] = gv;                                                            \
                    g[d] = gv * carry;                                                             \
                }                                                                                  \
                grad_beta_logit[hr] = gb * ((REAL)count / (REAL)D) * sig * ((REAL)1 - sig);        \
            }                                                                                      \
        }                                                                                          \
    }

LIF_MODULATE(f32, float, expf)
LIF_MODULATE(f64, double, exp)
