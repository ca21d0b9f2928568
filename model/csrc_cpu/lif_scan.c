#include <math.h>
#include <stdint.h>

/* The LIF scan (model/lif.py) with Spike-KDA's modulation folded in
 * (model/kernels/reference.py, lif_modulate_reference), forward and backward, for rows of
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
 */
#define LIF_MODULATE(SUFFIX, REAL, EXP)                                                             \
    void lif_modulate_forward_##SUFFIX(const REAL *drive, const REAL *a, const REAL *beta_logit,   \
                                       const REAL *keep, REAL *v_all, REAL *spikes,                \
                                       REAL *log_alpha, REAL *beta, REAL *m, int64_t B, int64_t T, \
                                       int64_t H, int64_t D, double decay_d, double threshold_d) { \
        const REAL decay = (REAL)decay_d, threshold = (REAL)threshold_d;                           \
        const int64_t N = H * D;                                                                    \
        for (int64_t b = 0; b < B; ++b) {                                                          \
            REAL *mb = m + b * N;                                                                  \
            for (int64_t t = 0; t < T; ++t) {                                                      \
                const int64_t row = (b * T + t) * N;                                               \
                if (keep) {                                                                        \
                    const REAL k = keep[b * T + t];                                                \
                    for (int64_t n = 0; n < N; ++n) mb[n] = mb[n] * k;                             \
                }                                                                                  \
                for (int64_t n = 0; n < N; ++n) {                                                  \
                    const REAL vn = drive[row + n] + decay * mb[n];                                \
                    const REAL sn = vn >= threshold ? (REAL)1 : (REAL)0;                           \
                    v_all[row + n] = vn;                                                           \
                    spikes[row + n] = sn;                                                          \
                    if (a) log_alpha[row + n] = -a[row + n] * sn;                                  \
                    mb[n] = vn >= threshold ? vn - threshold : vn;                                 \
                }                                                                                  \
                for (int64_t h = 0; h < H; ++h) {                                                  \
                    REAL count = 0;                                                                \
                    for (int64_t d = 0; d < D; ++d) count += spikes[row + h * D + d];              \
                    const REAL sig = (REAL)1 / ((REAL)1 + EXP(-beta_logit[(b * T + t) * H + h]));  \
                    beta[(b * T + t) * H + h] = sig * (count / (REAL)D);                           \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    void lif_modulate_backward_##SUFFIX(                                                           \
        const REAL *v_all, const REAL *a, const REAL *beta_logit, const REAL *keep,                \
        const REAL *grad_spikes, const REAL *grad_m_end, const REAL *grad_log_alpha,               \
        const REAL *grad_beta, REAL *grad_drive, REAL *grad_a, REAL *grad_beta_logit,              \
        REAL *grad_m0, int64_t B, int64_t T, int64_t H, int64_t D, double decay_d,                 \
        double threshold_d, double slope_d) {                                                      \
        const REAL decay = (REAL)decay_d, threshold = (REAL)threshold_d, slope = (REAL)slope_d;    \
        const int64_t N = H * D;                                                                    \
        for (int64_t b = 0; b < B; ++b) {                                                          \
            REAL *g = grad_m0 + b * N;                                                             \
            for (int64_t n = 0; n < N; ++n) g[n] = grad_m_end ? grad_m_end[b * N + n] : (REAL)0;   \
            for (int64_t t = T - 1; t >= 0; --t) {                                                 \
                const int64_t row = (b * T + t) * N;                                               \
                const REAL carry = keep ? decay * keep[b * T + t] : decay;                         \
                for (int64_t h = 0; h < H; ++h) {                                                  \
                    const int64_t hr = (b * T + t) * H + h;                                        \
                    const REAL sig = (REAL)1 / ((REAL)1 + EXP(-beta_logit[hr]));                   \
                    const REAL gb = grad_beta ? grad_beta[hr] : (REAL)0;                           \
                    const REAL per_spike = gb * sig / (REAL)D;                                     \
                    REAL count = 0;                                                                \
                    for (int64_t d = 0; d < D; ++d) {                                              \
                        const int64_t i = row + h * D + d;                                         \
                        const REAL v = v_all[i];                                                   \
                        const REAL s = v >= threshold ? (REAL)1 : (REAL)0;                         \
                        const REAL gla = grad_log_alpha ? grad_log_alpha[i] : (REAL)0;             \
                        count += s;                                                                \
                        if (grad_a) grad_a[i] = -s * gla;                                          \
                        const REAL gs = (grad_spikes ? grad_spikes[i] : (REAL)0) - (a ? a[i] * gla : (REAL)0) + per_spike; \
                        const REAL x = v - threshold;                                              \
                        const REAL den = (REAL)1 + slope * (x < 0 ? -x : x);                       \
                        const REAL gv = gs / (den * den) + g[h * D + d];                           \
                        grad_drive[i] = gv;                                                        \
                        g[h * D + d] = gv * carry;                                                 \
                    }                                                                              \
                    grad_beta_logit[hr] = gb * (count / (REAL)D) * sig * ((REAL)1 - sig);          \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

LIF_MODULATE(f32, float, expf)
LIF_MODULATE(f64, double, exp)
