/* The chunked KDA (model/ops/reference/kda.py's _KDAChunkFn) for CPU tensors, forward and backward, one
 * stream-head (batch row, head) at a time: its state and a whole chunk stay in cache, and
 * the only thing kept for the backward is the state each chunk started from (the
 * backward recomputes the rest per chunk). The algebra and the per-head loops are in
 * kda_chunk_body.h, compiled here once per variant: float and double, and on x86-64 a
 * float variant for AVX2 + FMA chosen at run time.
 *
 * Layouts (all contiguous, BH = batch x heads, T = N C, the caller pads T): q, k, g, dq,
 * dk, dg [BH, T, DK]; v, O, dO, dv [BH, T, DV]; beta, dbeta [BH, T]; seg [BH, T] int64
 * segment ids within each chunk (resets so far in the chunk) or NULL; S0, S_end, dS_end,
 * dS0 [BH, DK, DV] (S0, dS_end may be NULL: zeros); starts [BH, N, DK, DV]. q comes
 * already scaled. The caller guarantees no chunk decays by more than e^-80 in any channel
 * (so e^-G stays in float range). Stream-heads are shared among `threads` threads; work
 * is the caller's scratch, kda_chunk_work_size() elements per thread.
 */
#include <math.h>
#include <string.h>

#include "parallel.h"
#include "vec_math.h"

#define MAXD 256 /* the largest dk, dv the variants for any size take */

#define REAL float
#define EXP exp_f32
#define ATTR
#define FIXED 0
#define NAME(x) x##_f32
#include "kda_chunk_body.h"
#undef NAME
#undef FIXED
#define FIXED 64
#define NAME(x) x##_f32_64
#include "kda_chunk_body.h"
#undef NAME
#undef FIXED
#undef ATTR

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KDA_HAVE_AVX2 1
#define ATTR __attribute__((target("avx2,fma")))
#define FIXED 0
#define NAME(x) x##_f32_avx2
#include "kda_chunk_body.h"
#undef NAME
#undef FIXED
#define FIXED 64
#define NAME(x) x##_f32_64_avx2
#include "kda_chunk_body.h"
#undef NAME
#undef FIXED
#undef ATTR
#endif
#undef REAL
#undef EXP

#define REAL double
#define EXP exp
#define ATTR
#define FIXED 0
#define NAME(x) x##_f64
#include "kda_chunk_body.h"
#undef NAME
#undef FIXED
#undef ATTR
#undef REAL
#undef EXP

static int64_t kda_allow_avx2 = 1;

static int64_t kda_use_avx2(void) {
#ifdef KDA_HAVE_AVX2
    return kda_allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Tests run the portable float variant on an AVX2 machine by passing 0 (1: the default). */
void kda_chunk_allow_avx2(int64_t allow) { kda_allow_avx2 = allow; }

/* Elements of scratch one thread needs (the backward's is the larger). */
int64_t kda_chunk_work_size(int64_t C, int64_t DK, int64_t DV) {
    const int64_t RW = DV + DK;
    return 11 * C * DK + 4 * C * C + 4 * C * RW + 2 * C * DV + 4 * DK + 2 * C + 5 * DK * DV;
}

/* The largest dk and dv the loops take. */
int64_t kda_chunk_max_dim(void) { return MAXD; }

#define KDA_ENTRY(SUFFIX, REAL, FAST)                                                             \
    void kda_chunk_forward_##SUFFIX(const REAL *q, const REAL *k, const REAL *v, const REAL *g,  \
                                    const REAL *beta, const int64_t *seg, const REAL *S0, REAL *O, \
                                    REAL *S_end, REAL *starts, REAL *work, int64_t BH, int64_t N, \
                                    int64_t C, int64_t DK, int64_t DV, int64_t threads) {         \
        const int64_t T = N * C, fast = FAST, size = kda_chunk_work_size(C, DK, DV);              \
        (void)fast;                                                                               \
        PARALLEL_FOR(threads)                                                                     \
        for (int64_t bh = 0; bh < BH; ++bh) {                                                     \
            REAL *scratch = work + THREAD_ID() * size;                                            \
            const int64_t *sg = seg ? seg + bh * T : NULL;                                        \
            const REAL *s0 = S0 ? S0 + bh * DK * DV : NULL;                                       \
            KDA_DISPATCH(SUFFIX, fast, head_forward, q + bh * T * DK, k + bh * T * DK,            \
                         v + bh * T * DV, g + bh * T * DK, beta + bh * T, sg, s0, O + bh * T * DV, \
                         S_end + bh * DK * DV, starts + bh * N * DK * DV, N, C, DK, DV, scratch); \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    void kda_chunk_backward_##SUFFIX(const REAL *q, const REAL *k, const REAL *v, const REAL *g, \
                                     const REAL *beta, const int64_t *seg, const REAL *starts,    \
                                     const REAL *dO, const REAL *dS_end, REAL *dq, REAL *dk,      \
                                     REAL *dv, REAL *dg, REAL *dbeta, REAL *dS0, REAL *work,      \
                                     int64_t BH, int64_t N, int64_t C, int64_t DK, int64_t DV,    \
                                     int64_t threads) {                                           \
        const int64_t T = N * C, fast = FAST, size = kda_chunk_work_size(C, DK, DV);              \
        (void)fast;                                                                               \
        PARALLEL_FOR(threads)                                                                     \
        for (int64_t bh = 0; bh < BH; ++bh) {                                                     \
            REAL *scratch = work + THREAD_ID() * size;                                            \
            const int64_t *sg = seg ? seg + bh * T : NULL;                                        \
            const REAL *dse = dS_end ? dS_end + bh * DK * DV : NULL;                              \
            KDA_DISPATCH(SUFFIX, fast, head_backward, q + bh * T * DK, k + bh * T * DK,           \
                         v + bh * T * DV, g + bh * T * DK, beta + bh * T, sg,                     \
                         starts + bh * N * DK * DV, dO + bh * T * DV, dse, dq + bh * T * DK,      \
                         dk + bh * T * DK, dv + bh * T * DV, dg + bh * T * DK, dbeta + bh * T,    \
                         dS0 + bh * DK * DV, N, C, DK, DV, scratch);                              \
        }                                                                                         \
    }

/* the float variant for this machine (AVX2 + FMA or not) and head size (64 or any) */
#ifdef KDA_HAVE_AVX2
#define KDA_DISPATCH_f32(fast, fn, ...)                                        \
    do {                                                                       \
        if (DK == 64 && DV == 64)                                              \
            (fast ? fn##_f32_64_avx2 : fn##_f32_64)(__VA_ARGS__);              \
        else                                                                   \
            (fast ? fn##_f32_avx2 : fn##_f32)(__VA_ARGS__);                    \
    } while (0)
#else
#define KDA_DISPATCH_f32(fast, fn, ...) \
    do { if (DK == 64 && DV == 64) fn##_f32_64(__VA_ARGS__); else fn##_f32(__VA_ARGS__); } while (0)
#endif
#define KDA_DISPATCH_f64(fast, fn, ...) fn##_f64(__VA_ARGS__)
#define KDA_DISPATCH(SUFFIX, fast, fn, ...) KDA_DISPATCH_##SUFFIX(fast, fn, __VA_ARGS__)

KDA_ENTRY(f32, float, kda_use_avx2())
KDA_ENTRY(f64, double, 0)
