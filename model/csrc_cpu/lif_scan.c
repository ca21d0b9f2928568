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

LIF_FORWARD(lif_forward_f32, float)
LIF_FORWARD(lif_forward_f64, double)
