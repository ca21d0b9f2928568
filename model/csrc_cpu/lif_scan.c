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
