/* One stream-head of the chunked KDA, forward and backward: included by kda_chunk.c once
 * per variant, with REAL (float or double), EXP (a vectorisable e^x), ATTR (a target
 * attribute or nothing), NAME(x) (x pasted with the variant's suffix) and FIXED (the head
 * size dk = dv the variant is built for, or 0 for any size up to MAXD) defined.
 *
 * The algebra is model/ops/reference/kda.py's _KDAChunkFn (read its docstring and the notes above it),
 * per chunk of C tokens starting from state S [DK, DV]:
 *
 *   G = cumsum g, E = e^G, Qg = q E, Kg = k E, Ki = k / E            [C, DK]
 *   Aqk = tril(Qg Ki^T) (same segment), Akk = strict_tril(Kg Ki^T) (same segment)
 *   X = [U~ | W] solves (I + diag(beta) Akk) X = diag(beta) [V | Ks]   (forward substitution)
 *   U = U~ - W S,   O = Qs S + Aqk U,   S' = Diag(dec) S + Ke^T U
 *
 * with Qs, Ks = Qg, Kg of the tokens before the chunk's first reset (they see S),
 * Ke = Ki E_C of the tokens of its last segment and dec = E_C (0 after a reset). Every
 * matrix product is either a row accumulated in a local array over the reduction (with
 * the row length a constant, the array lives in vector registers) or a dot product of
 * two rows with eight partial sums; both vectorise with a fixed order of summation. One
 * stream-head's state and a whole chunk stay in cache. The backward keeps no
 * intermediates but the state each chunk started from: it recomputes the chunk's
 * forward, then runs the chain in reverse.
 */

#if FIXED
#define ROW FIXED
#else
#define ROW MAXD
#endif

/* Per-chunk quantities shared by the forward and the backward. */
typedef struct {
    REAL *E, *Ei, *Qg, *Kg, *Ki, *Aqk, *Akk, *X, *U, *EC, *dec;
    REAL *sees, *last; /* [C] 0/1 */
} NAME(Chunk);

/* a . b over n, eight partial sums (then summed pairwise): vectorises, same order always. */
static inline ATTR REAL NAME(dot)(const REAL *restrict a, const REAL *restrict b, int64_t n) {
    REAL p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t n8 = n - n % 8;
    for (int64_t j = 0; j < n8; j += 8)
        for (int l = 0; l < 8; ++l) p[l] += a[j + l] * b[j + l];
    for (int64_t j = n8; j < n; ++j) p[0] += a[j] * b[j];
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

/* out[:n] = (init ? init[:n] * scale : 0) + sum_{r < m} coef[r * cstride] B[r * ldb : +n]:
 * one output row accumulated over m input rows (n <= ROW; a constant n stays in registers).
 * init may be out itself (it is read whole before out is written). */
static inline ATTR void NAME(row_mix)(REAL *out, const REAL *init, REAL scale,
                                      const REAL *restrict coef, int64_t cstride, const REAL *restrict B,
                                      int64_t ldb, int64_t m, int64_t n) {
    REAL acc[ROW];
    for (int64_t j = 0; j < n; ++j) acc[j] = init ? init[j] * scale : (REAL)0;
    for (int64_t r = 0; r < m; ++r) {
        const REAL a = coef[r * cstride];
        const REAL *restrict b = B + r * ldb;
        for (int64_t j = 0; j < n; ++j) acc[j] += a * b[j];
    }
    for (int64_t j = 0; j < n; ++j) out[j] = acc[j];
}

/* The chunk's forward up to U (everything but the outputs): q, k [C, DK], v [C, DV], g
 * [C, DK], beta [C], seg [C] (or NULL: one segment), S [DK, DV]; KsT: DK elements of scratch. */
static ATTR void NAME(chunk_forward)(NAME(Chunk) *c, const REAL *q, const REAL *k, const REAL *v, const REAL *g,
                                     const REAL *beta, const int64_t *seg, const REAL *S, int64_t C, int64_t dk_,
                                     int64_t dv_, REAL *KsT) {
    const int64_t DK = FIXED ? FIXED : dk_, DV = FIXED ? FIXED : dv_, RW = DV + DK;
    for (int64_t t = 0; t < C; ++t) {
        c->sees[t] = (!seg || seg[t] == 0) ? (REAL)1 : (REAL)0;
        c->last[t] = (!seg || seg[t] == seg[C - 1]) ? (REAL)1 : (REAL)0;
    }
    /* G (in E), then E, Ei and the scaled rows */
    for (int64_t d = 0; d < DK; ++d) c->E[d] = g[d];
    for (int64_t t = 1; t < C; ++t)
        for (int64_t d = 0; d < DK; ++d) c->E[t * DK + d] = c->E[(t - 1) * DK + d] + g[t * DK + d];
    for (int64_t i = 0; i < C * DK; ++i) {
        const REAL e = EXP(c->E[i]);
        c->E[i] = e;
        c->Ei[i] = (REAL)1 / e;
        c->Qg[i] = q[i] * e;
        c->Kg[i] = k[i] * e;
        c->Ki[i] = k[i] * c->Ei[i];
    }
    for (int64_t d = 0; d < DK; ++d) {
        c->EC[d] = c->E[(C - 1) * DK + d];
        c->dec[d] = c->EC[d] * c->sees[C - 1];
    }
    /* scores: Aqk[t, i <= t] = Qg[t] . Ki[i], Akk[t, i < t] = Kg[t] . Ki[i], same segment */
    for (int64_t t = 0; t < C; ++t) {
        REAL *aq = c->Aqk + t * C, *ak = c->Akk + t * C;
        for (int64_t i = 0; i < C; ++i) {
            const int same = i <= t && (!seg || seg[i] == seg[t]);
            aq[i] = same ? NAME(dot)(c->Qg + t * DK, c->Ki + i * DK, DK) : (REAL)0;
            ak[i] = same && i < t ? NAME(dot)(c->Kg + t * DK, c->Ki + i * DK, DK) : (REAL)0;
        }
    }
    /* forward substitution: X[t] = beta_t ([v_t | Ks_t] - sum_{i<t} Akk[t, i] X[i]), by halves */
    for (int64_t t = 0; t < C; ++t) {
        REAL *x = c->X + t * RW;
        for (int64_t d = 0; d < DK; ++d) KsT[d] = c->Kg[t * DK + d] * c->sees[t];
        for (int64_t i = 0; i < t; ++i) c->Ei[C * DK + i] = -c->Akk[t * C + i]; /* negated row, in spare room */
        NAME(row_mix)(x, v + t * DV, (REAL)1, c->Ei + C * DK, 1, c->X, RW, t, DV);
        NAME(row_mix)(x + DV, KsT, (REAL)1, c->Ei + C * DK, 1, c->X + DV, RW, t, DK);
        for (int64_t j = 0; j < RW; ++j) x[j] *= beta[t];
    }
    /* U = U~ - W S: row t mixes S's rows by -W[t] */
    for (int64_t t = 0; t < C; ++t) {
        const REAL *x = c->X + t * RW;
        for (int64_t d = 0; d < DK; ++d) KsT[d] = -x[DV + d];
        NAME(row_mix)(c->U + t * DV, x, (REAL)1, KsT, 1, S, DV, DK, DV);
    }
}

#define CHUNK_VIEWS(c, w)                                                                         \
    (c).E = w; w += C * DK; (c).Ei = w; w += C * DK + C; (c).Qg = w; w += C * DK;                 \
    (c).Kg = w; w += C * DK; (c).Ki = w; w += C * DK; (c).Aqk = w; w += C * C;                    \
    (c).Akk = w; w += C * C; (c).X = w; w += C * RW; (c).U = w; w += C * DV; (c).EC = w;          \
    w += DK; (c).dec = w; w += DK; (c).sees = w; w += C; (c).last = w; w += C

/* Forward over one stream-head's N chunks: q, k, g [N C, DK]; v, O [N C, DV]; beta [N C];
 * seg [N C] or NULL; S0 [DK, DV] or NULL (zeros); S_end [DK, DV]; starts [N, DK, DV]. */
static ATTR void NAME(head_forward)(const REAL *q, const REAL *k, const REAL *v, const REAL *g, const REAL *beta,
                                    const int64_t *seg, const REAL *S0, REAL *O, REAL *S_end, REAL *starts, int64_t N,
                                    int64_t C, int64_t dk_, int64_t dv_, REAL *work) {
    const int64_t DK = FIXED ? FIXED : dk_, DV = FIXED ? FIXED : dv_, RW = DV + DK;
    NAME(Chunk) c;
    REAL *w = work;
    CHUNK_VIEWS(c, w);
    REAL *S = w; w += DK * DV;
    REAL *tmp = w; w += (DK > C ? DK : C) + DK;
    for (int64_t i = 0; i < DK * DV; ++i) S[i] = S0 ? S0[i] : (REAL)0;
    for (int64_t n = 0; n < N; ++n) {
        const int64_t o = n * C;
        for (int64_t i = 0; i < DK * DV; ++i) starts[n * DK * DV + i] = S[i];
        NAME(chunk_forward)(&c, q + o * DK, k + o * DK, v + o * DV, g + o * DK, beta + o, seg ? seg + o : NULL, S,
                            C, DK, DV, tmp);
        /* O[t] = Qs[t] S + Aqk[t] U */
        for (int64_t t = 0; t < C; ++t) {
            REAL *out = O + (o + t) * DV;
            if (c.sees[t] != 0) {
                NAME(row_mix)(out, NULL, (REAL)0, c.Qg + t * DK, 1, S, DV, DK, DV);
                NAME(row_mix)(out, out, (REAL)1, c.Aqk + t * C, 1, c.U, DV, t + 1, DV);
            } else {
                NAME(row_mix)(out, NULL, (REAL)0, c.Aqk + t * C, 1, c.U, DV, t + 1, DV);
            }
        }
        /* S'[d] = dec_d S[d] + sum_t Ke[t, d] U[t], Ke[t] = Ki[t] E_C for the last segment's tokens */
        for (int64_t d = 0; d < DK; ++d) {
            for (int64_t t = 0; t < C; ++t) tmp[t] = c.Ki[t * DK + d] * c.EC[d] * c.last[t];
            NAME(row_mix)(S + d * DV, S + d * DV, c.dec[d], tmp, 1, c.U, DV, C, DV);
        }
    }
    for (int64_t i = 0; i < DK * DV; ++i) S_end[i] = S[i];
}

/* Backward over one stream-head: the forward's inputs, `starts`, dO [N C, DV] and dS_end
 * [DK, DV] (or NULL) in; dq, dk, dg [N C, DK], dv [N C, DV], dbeta [N C], dS0 [DK, DV] out. */
static ATTR void NAME(head_backward)(const REAL *q, const REAL *k, const REAL *v, const REAL *g, const REAL *beta,
                                     const int64_t *seg, const REAL *starts, const REAL *dO, const REAL *dS_end,
                                     REAL *dq, REAL *dk, REAL *dv, REAL *dg, REAL *dbeta, REAL *dS0, int64_t N,
                                     int64_t C, int64_t dk_, int64_t dv_, REAL *work) {
    const int64_t DK = FIXED ? FIXED : dk_, DV = FIXED ? FIXED : dv_, RW = DV + DK;
    NAME(Chunk) c;
    REAL *w = work;
    CHUNK_VIEWS(c, w);
    REAL *dS = w; w += DK * DV;      /* the gradient of the state after the chunk */
    REAL *dSp = w; w += DK * DV;     /* ... and before it */
    REAL *ST = w; w += DK * DV;      /* S^T, dS^T [DV, DK] */
    REAL *dST = w; w += DK * DV;
    REAL *dX = w; w += C * RW;       /* [dU | dW] */
    REAL *dR = w; w += C * RW;
    REAL *dQg = w; w += C * DK; REAL *dKg = w; w += C * DK; REAL *dKi = w; w += C * DK;
    REAL *dKe = w; w += C * DK; REAL *dG = w; w += C * DK;
    REAL *dAqk = w; w += C * C; REAL *dAkk = w; w += C * C;
    REAL *ddec = w; w += DK; REAL *dEC = w; w += DK;
    REAL *tmp = w; w += 2 * (RW > C ? RW : C);
    for (int64_t i = 0; i < DK * DV; ++i) dS[i] = dS_end ? dS_end[i] : (REAL)0;
    for (int64_t n = N - 1; n >= 0; --n) {
        const int64_t o = n * C;
        const REAL *S = starts + n * DK * DV;
        const REAL *vn = v + o * DV, *bn = beta + o, *dOn = dO + o * DV;
        const int64_t *sg = seg ? seg + o : NULL;
        NAME(chunk_forward)(&c, q + o * DK, k + o * DK, vn, g + o * DK, bn, sg, S, C, DK, DV, tmp);
        for (int64_t d = 0; d < DK; ++d) /* S^T and dS^T [DV, DK]: rows for the products with them */
            for (int64_t j = 0; j < DV; ++j) {
                ST[j * DK + d] = S[d * DV + j];
                dST[j * DK + d] = dS[d * DV + j];
            }
        for (int64_t t = 0; t < C; ++t) {
            REAL *du = dX + t * RW;
            /* dU[t] = sum_{s >= t} Aqk[s, t] dO[s] + sum_d Ke[t, d] dS[d] */
            NAME(row_mix)(du, NULL, (REAL)0, c.Aqk + t * C + t, C, dOn + t * DV, DV, C - t, DV);
            if (c.last[t] != 0) {
                for (int64_t d = 0; d < DK; ++d) tmp[d] = c.Ki[t * DK + d] * c.EC[d];
                NAME(row_mix)(du, du, (REAL)1, tmp, 1, dS, DV, DK, DV);
            }
            /* dQs[t] = dO[t] S^T (into dQg, masked by sees); dKe[t] = U[t] dS^T (last segment) */
            NAME(row_mix)(dQg + t * DK, NULL, (REAL)0, dOn + t * DV, 1, ST, DK, c.sees[t] != 0 ? DV : 0, DK);
            NAME(row_mix)(dKe + t * DK, NULL, (REAL)0, c.U + t * DV, 1, dST, DK, c.last[t] != 0 ? DV : 0, DK);
            /* dAqk[t, i <= t] = dO[t] . U[i] (same segment) */
            for (int64_t i = 0; i < C; ++i)
                dAqk[t * C + i] = i <= t && (!sg || sg[i] == sg[t]) ? NAME(dot)(dOn + t * DV, c.U + i * DV, DV) : (REAL)0;
        }
        /* dW[t] = -dU[t] S^T */
        for (int64_t t = 0; t < C; ++t) {
            for (int64_t j = 0; j < DV; ++j) tmp[j] = -dX[t * RW + j];
            NAME(row_mix)(dX + t * RW + DV, NULL, (REAL)0, tmp, 1, ST, DK, DV, DK);
        }
        /* ddec[d] = dS[d] . S[d]; dS_prev[d] = dec_d dS[d] + sum_t (Qs[t, d] dO[t] - W[t, d] dU[t]) */
        for (int64_t d = 0; d < DK; ++d) {
            ddec[d] = NAME(dot)(dS + d * DV, S + d * DV, DV);
            for (int64_t t = 0; t < C; ++t) {
                tmp[t] = c.Qg[t * DK + d] * c.sees[t];
                tmp[C + t] = -c.X[t * RW + DV + d];
            }
            NAME(row_mix)(dSp + d * DV, dS + d * DV, c.dec[d], tmp, 1, dOn, DV, C, DV);
            NAME(row_mix)(dSp + d * DV, dSp + d * DV, (REAL)1, tmp + C, 1, dX, RW, C, DV);
        }
        /* the solve backward: (I + L)^T dR = dX, L = diag(beta) Akk (back substitution, by halves) */
        for (int64_t i = C - 1; i >= 0; --i) {
            const int64_t m = C - 1 - i;
            for (int64_t t = 0; t < m; ++t) tmp[t] = -bn[i + 1 + t] * c.Akk[(i + 1 + t) * C + i];
            NAME(row_mix)(dR + i * RW, dX + i * RW, (REAL)1, tmp, 1, dR + (i + 1) * RW, RW, m, DV);
            NAME(row_mix)(dR + i * RW + DV, dX + i * RW + DV, (REAL)1, tmp, 1, dR + (i + 1) * RW + DV, RW, m, DK);
        }
        /* dL[t, i<t] = -dR[t] . X[i] (same segment); dbeta; dv; dAkk = dL beta_t; dKg[t] = dKs[t] sees_t */
        for (int64_t t = 0; t < C; ++t) {
            REAL *dak = dAkk + t * C;
            const REAL *r = dR + t * RW;
            REAL db = NAME(dot)(r, vn + t * DV, DV);
            for (int64_t d = 0; d < DK; ++d) tmp[d] = c.Kg[t * DK + d] * c.sees[t];
            db += NAME(dot)(r + DV, tmp, DK);
            for (int64_t i = 0; i < C; ++i) {
                const int same = i < t && (!sg || sg[i] == sg[t]);
                dak[i] = same ? -NAME(dot)(r, c.X + i * RW, RW) : (REAL)0;
            }
            db += NAME(dot)(dak, c.Akk + t * C, t);
            dbeta[o + t] = db;
            for (int64_t j = 0; j < DV; ++j) dv[(o + t) * DV + j] = r[j] * bn[t];
            for (int64_t i = 0; i < t; ++i) dak[i] *= bn[t];
        }
        /* the scores: dQg[t] += sum_i dAqk[t, i] Ki[i]; dKg[t] = dKs[t] sees_t + sum_i dAkk[t, i] Ki[i];
         * dKi[i] = dKe[i] E_C + sum_t dAqk[t, i] Qg[t] + sum_t dAkk[t, i] Kg[t] */
        for (int64_t t = 0; t < C; ++t) {
            NAME(row_mix)(dQg + t * DK, dQg + t * DK, (REAL)1, dAqk + t * C, 1, c.Ki, DK, t + 1, DK);
            for (int64_t d = 0; d < DK; ++d) tmp[d] = dR[t * RW + DV + d] * bn[t] * c.sees[t];
            NAME(row_mix)(dKg + t * DK, tmp, (REAL)1, dAkk + t * C, 1, c.Ki, DK, t, DK);
        }
        for (int64_t i = 0; i < C; ++i) {
            for (int64_t d = 0; d < DK; ++d) tmp[d] = dKe[i * DK + d] * c.EC[d];
            NAME(row_mix)(dKi + i * DK, tmp, (REAL)1, dAqk + i * C + i, C, c.Qg + i * DK, DK, C - i, DK);
            NAME(row_mix)(dKi + i * DK, dKi + i * DK, (REAL)1, dAkk + (i + 1) * C + i, C, c.Kg + (i + 1) * DK, DK,
                          C - 1 - i, DK);
        }
        /* dE_C = sum_i dKe[i] Ki[i] + ddec sees_{C-1}; dq, dk, dG, then dg = reverse cumsum of dG */
        for (int64_t d = 0; d < DK; ++d) dEC[d] = ddec[d] * c.sees[C - 1];
        for (int64_t i = 0; i < C; ++i)
            for (int64_t d = 0; d < DK; ++d) dEC[d] += dKe[i * DK + d] * c.Ki[i * DK + d];
        for (int64_t i = 0; i < C * DK; ++i) {
            dq[o * DK + i] = dQg[i] * c.E[i];
            dk[o * DK + i] = dKg[i] * c.E[i] + dKi[i] * c.Ei[i];
            dG[i] = dQg[i] * c.Qg[i] + dKg[i] * c.Kg[i] - dKi[i] * c.Ki[i];
        }
        for (int64_t d = 0; d < DK; ++d) dG[(C - 1) * DK + d] += dEC[d] * c.EC[d];
        for (int64_t d = 0; d < DK; ++d) dg[(o + C - 1) * DK + d] = dG[(C - 1) * DK + d];
        for (int64_t t = C - 2; t >= 0; --t)
            for (int64_t d = 0; d < DK; ++d) dg[(o + t) * DK + d] = dg[(o + t + 1) * DK + d] + dG[t * DK + d];
        REAL *swap = dS; dS = dSp; dSp = swap;
    }
    for (int64_t i = 0; i < DK * DV; ++i) dS0[i] = dS[i];
}

#undef ROW
