/* The LIF membrane loop of model/lif.py (`_lif_forward_loop`) for CPU tensors: the same
 * arithmetic in the same order, one pass over time per stream, vectorised over neurons.
 *
 *   m <- m * keep_t                     (keep_t = 0 where a document starts, else 1)
 *   v_t = drive_t + decay * m           (written to v_all: the backward needs it)
 *   m <- v_t >= threshold ? v_t - threshold : v_t
 *
 * drive, v_all: [B, T, N] contiguous; keep: [B, T] or NULL; m: [B, N], the initial
 * membrane in, the final one out. Built with -ffp-contract=off, so `decay * m` is rounded
 * before the add, exactly as torch computes it.
 */
#include <math.h>
#include <stdint.h>

#define LIF_FORWARD(NAME, REAL)                                                              \
    void NAME(const REAL *drive, const REAL *keep, REAL *v_all, REAL *m, int64_t B,          \
              int64_t T, int64_t N, double decay_d, double threshold_d) {                    \
        const REAL decay = (REAL)decay_d, threshold = (REAL)threshold_d;                     \
        for (int64_t b = 0; b < B; ++b) {                                                    \
            REAL *mb = m + b * N;                                                            \
            for (int64_t t = 0; t < T; ++t) {                                                \
                const REAL *x = drive + (b * T + t) * N;                                     \
                REAL *v = v_all + (b * T + t) * N;                                           \
                if (keep) {                                                                  \
                    const REAL k = keep[b * T + t];                                          \
                    for (int64_t n = 0; n < N; ++n) mb[n] = mb[n] * k;                       \
                }                                                                            \
                for (int64_t n = 0; n < N; ++n) {                                            \
                    REAL vn = x[n] + decay * mb[n];                                          \
                    v[n] = vn;                                                               \
                    mb[n] = vn >= threshold ? vn - threshold : vn;                           \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }

/* Its backward (model/lif.py `_LIFScanSequential.backward`), a reverse pass over time:
 *
 *   dL/dv_t     = surrogate(v_t - threshold) * dL/ds_t + g,  surrogate(x) = 1 / (1 + slope |x|)^2
 *   g <- decay * keep_t * dL/dv_t                            (g starts as dL/dm_end)
 *
 * v_all, grad_spikes (or NULL: zero), grad_drive: [B, T, N]; grad_m_end (or NULL) and
 * grad_m0 (out): [B, N]; keep: [B, T] or NULL.
 */
#define LIF_BACKWARD(NAME, REAL)                                                             \
    void NAME(const REAL *v_all, const REAL *grad_spikes, const REAL *grad_m_end,            \
              const REAL *keep, REAL *grad_drive, REAL *grad_m0, int64_t B, int64_t T,       \
              int64_t N, double decay_d, double threshold_d, double slope_d) {               \
        const REAL decay = (REAL)decay_d, threshold = (REAL)threshold_d, slope = (REAL)slope_d; \
        for (int64_t b = 0; b < B; ++b) {                                                    \
            REAL *g = grad_m0 + b * N;                                                       \
            for (int64_t n = 0; n < N; ++n) g[n] = grad_m_end ? grad_m_end[b * N + n] : (REAL)0; \
            for (int64_t t = T - 1; t >= 0; --t) {                                           \
                const REAL *v = v_all + (b * T + t) * N;                                     \
                const REAL *gs = grad_spikes ? grad_spikes + (b * T + t) * N : 0;            \
                REAL *gv = grad_drive + (b * T + t) * N;                                     \
                const REAL carry = keep ? decay * keep[b * T + t] : decay;                   \
                for (int64_t n = 0; n < N; ++n) {                                            \
                    REAL direct = (REAL)0;                                                   \
                    if (gs) {                                                                \
                        const REAL x = v[n] - threshold;                                     \
                        const REAL den = (REAL)1 + slope * (x < 0 ? -x : x);                 \
                        direct = gs[n] / (den * den);                                        \
                    }                                                                        \
                    gv[n] = direct + g[n];                                                   \
                    g[n] = gv[n] * carry;                                                    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }

LIF_FORWARD(lif_forward_f32, float)
LIF_FORWARD(lif_forward_f64, double)
LIF_BACKWARD(lif_backward_f32, float)
LIF_BACKWARD(lif_backward_f64, double)

/* The LIF scan with Spike-KDA's modulation folded in (model/kernels/reference.py,
 * lif_modulate_reference), forward and backward, for rows of N = H * D neurons:
 *   log_alpha = -a * s        beta[h] = sigmoid(beta_logit[h]) * mean over the head's D of s
 * drive, a, v_all, spikes, log_alpha: [B, T, H*D]; beta_logit, beta: [B, T, H]; keep, m as
 * above. The backward takes any of grad_spikes, grad_m_end, grad_log_alpha, grad_beta as
 * NULL (zero) and writes grad_drive, grad_a [B, T, H*D], grad_beta_logit [B, T, H] and
 * grad_m0 [B, H*D].
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
                    log_alpha[row + n] = -a[row + n] * sn;                                         \
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
                        grad_a[i] = -s * gla;                                                      \
                        const REAL gs = (grad_spikes ? grad_spikes[i] : (REAL)0) - a[i] * gla + per_spike; \
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
