"""Kimi Delta Attention (KDA): the gated delta rule with a per-channel decay.

For every head, with a fast-weight state S of shape [dk, dv]:

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

alpha_t in (0, 1]^dk is a per-key-channel decay (passed in log space, `log_alpha <= 0`),
beta_t in [0, 1] a per-head write strength. Read the update as: decay the memory, ask it
what it currently stores under k_t, and move that answer a fraction beta_t of the way
towards v_t (an error-correcting write).

Three forms of the same function, all computing in float32:

- `kda_recurrent`: the specification, one token at a time (a loop over `kda_step`).
- `kda_chunk`: the chunked parallel form used for training; exact, not an approximation.
  Its usual case (no chunk decaying by more than e^-80) is one autograd Function with a
  hand-written backward (`_KDAChunkFn`); the rest goes through autograd. `prepare_inputs`
  and `chunk_inputs` are its preparation (float32, scale; chunk choice, padding, segments),
  shared with the fast forms (model/ops/library.py), which this module never imports.
- `kda_step`: one token, for generation.

Shapes (batch first, heads second): q, k [B, H, T, dk]; v [B, H, T, dv];
log_alpha [B, H, T, dk]; beta [B, H, T]; state [B, H, dk, dv].

Document resets: `reset` ([B, T] or [B, H, T] bool, True at the first token of a new
document) zeroes a stream's state *before* that token is written, so the token and
everything after it never see the previous document. All three forms implement it
exactly (a mask, not a huge negative decay), so gradients stay finite.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from ..boundary import outside_compile

# ------------------------------------------------------------------------------------
# One step and the sequential reference
# ------------------------------------------------------------------------------------


def _float32(fn):
    """Run fn with autocast off: under bf16 autocast the matmuls of the state recurrence
    would otherwise drop to bf16 and the state would drift over long sequences."""

    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        with torch.autocast(device_type=q.device.type, enabled=False):
            return fn(q, *args, **kwargs)

    return wrapper


@_float32
def kda_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    reset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of KDA.

    q, k: [B, H, dk]; v: [B, H, dv]; log_alpha: [B, H, dk]; beta: [B, H];
    state: [B, H, dk, dv] or None (zeros); reset: [B] or [B, H] bool or None.
    Returns (o [B, H, dv] in v's dtype, new state [B, H, dk, dv] float32).
    """
    dtype = v.dtype
    q, k, v, log_alpha, beta = (x.float() for x in (q, k, v, log_alpha, beta))
    B, H, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    if state is None:
        state = q.new_zeros(B, H, dk, v.shape[-1])
    state = state.float()
    if reset is not None:  # a new document starts here: forget everything before it
        keep = ~reset.reshape(B, -1)  # [B, 1] or [B, H]
        state = state * keep[..., None, None]
    S = state * log_alpha.exp()[..., None]  # Diag(alpha) S
    recalled = torch.einsum("bhk,bhkv->bhv", k, S)  # what the memory returns for k
    S = S + (beta[..., None] * k)[..., :, None] * (v - recalled)[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q * scale, S)
    return o.to(dtype), S


@_float32
def kda_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    reset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: KDA over a sequence, one token at a time.

    q, k [B, H, T, dk]; v [B, H, T, dv]; log_alpha [B, H, T, dk]; beta [B, H, T];
    initial_state [B, H, dk, dv] or None; reset [B, T] / [B, H, T] bool or None.
    Returns (o [B, H, T, dv], final state [B, H, dk, dv] float32).
    """
    B, H, T, _ = q.shape
    reset = _reset_bht(reset, B, H, T)
    S = initial_state
    outs = []
    # unbind (not x[:, :, t]) so the backward stacks gradients once instead of T times
    steps = zip(*(x.unbind(2) for x in (q, k, v, log_alpha, beta)))
    resets = reset.unbind(2) if reset is not None else [None] * T
    for (q_t, k_t, v_t, la_t, b_t), r_t in zip(steps, resets):
        o, S = kda_step(q_t, k_t, v_t, la_t, b_t, S, scale, r_t)
        outs.append(o)
    return torch.stack(outs, dim=2), S


# ------------------------------------------------------------------------------------
# The chunked parallel form
# ------------------------------------------------------------------------------------
#
# Within a chunk of C tokens that starts from state S0, write G_t = sum_{s<=t} log alpha_s
# (a cumulative log-decay per key channel, so G only decreases) and unroll the recurrence
# (a WY/UT-style representation of the product of Householder-like factors):
#
#     S_t = Diag(e^{G_t}) S0 + sum_{i<=t} Diag(e^{G_t - G_i}) k_i u_i^T
#
# where the "pseudo-values" u_i are what token i actually writes. Substituting into the
# delta rule gives a unit lower-triangular system for all u of the chunk at once:
#
#     u_t + beta_t sum_{i<t} A_ti u_i = beta_t (v_t - (e^{G_t} * k_t)^T S0),
#     A_ti = sum_d k_t[d] k_i[d] e^{G_t[d] - G_i[d]}
#
# i.e. U = T (V - (e^G * K) S0) with T = (I + diag(beta) strict_tril(A))^{-1} diag(beta).
# So U = U~ - W S0 with U~ = T V and W = T (e^G * K), both independent of S0 and computed
# for every chunk in parallel. Only the small recurrence over chunk states is sequential:
#
#     O     = (e^G * Q) S0 + tril(Aqk) U,        Aqk_ti = sum_d q_t[d] k_i[d] e^{G_t[d]-G_i[d]}
#     S_end = Diag(e^{G_C}) S0 + (e^{G_C - G} * K)^T U
#
# Numerical care: e^{G_t - G_i} (t >= i) is <= 1, but splitting it as e^{G_t} e^{-G_i} to
# use a matmul overflows once a chunk decays by more than ~e^-88. So when no chunk of the
# call decays by more than e^-80 in any channel (the usual case), the score matrices are
# two matmuls per chunk, (e^G * Q) (e^-G * K)^T and (e^G * K) (e^-G * K)^T, with factors
# e^{G_t} <= 1 and e^{-G_i} <= e^80 (e^G * Q and e^G * K are needed for S0 anyway).
# Otherwise they are built from sub-chunks of `sub` tokens: pairs in different sub-chunks are
# factored through the last token r of the key's sub-chunk, e^{G_t - G_r} e^{G_r - G_i},
# both factors <= 1; pairs in the same sub-chunk are factored through its first token f,
# e^{G_t - G_f} e^{G_f - G_i} (one small matmul), as long as no sub-chunk in the call
# decays by more than e^-80 (so no factor, nor a masked product above the diagonal,
# leaves float32's range); otherwise they use the explicit pairwise exponent
# ([.., s, s, dk], several times slower). The choice is per call, so a strongly decaying
# call only costs time, never exactness.
#
# Resets: a token at or after a reset may only combine with tokens of its own segment
# (segment = number of resets so far in the chunk), and only segment 0 sees S0.


def _reset_bht(reset: Optional[torch.Tensor], B: int, H: int, T: int) -> Optional[torch.Tensor]:
    """reset [B, T] or [B, H, T] (or None) -> [B, H, T] bool (or None)."""
    if reset is None:
        return None
    reset = reset.bool()
    if reset.dim() == 2:
        reset = reset[:, None, :]
    return reset.expand(B, H, T)


_CPU_GROUP_ELEMENTS = 1 << 17  # elements of q per group of streams that kda_chunk runs at once on CPU
_FACTOR_MAX = 80.0  # largest log-decay across one sub-chunk that its factored form takes


@outside_compile
def _span_at_most(span: torch.Tensor, limit: float) -> bool:
    """Whether every log-decay in `span` (>= 0) is at most `limit` (True when empty). A
    data-dependent choice: under torch.compile, a graph break here rather than a traced .item()."""
    return bool(span.amax() <= limit) if span.numel() else True


@outside_compile
def _factorable_chunk(g: torch.Tensor, chunk_size: int, limit: float) -> Optional[int]:
    """The longest of chunk_size, chunk_size / 2, ... (halving while even and >= 16) whose
    chunks, aligned at t = 0, each decay by at most `limit` nats in every channel, or None.
    g [B, H, T, dk] the log-decays (<= 0). A channel that forgets more than 80 nats in a
    64-token chunk (more than 1.25 a token, common at initialisation) would otherwise send
    the whole call to the sub-chunk scores; halving the chunk keeps it on the fast path.
    A data-dependent choice: kept out of torch.compile's graphs, like _span_at_most."""
    sizes = chunk_sizes(chunk_size)
    grain, T = sizes[-1], g.shape[2]
    pad = (-T) % chunk_size
    sums = torch.nn.functional.pad(g, (0, 0, 0, pad)).unflatten(2, (-1, grain)).sum(-2)  # [B, H, T' / grain, dk]
    worst = []
    for _ in sizes[::-1]:  # grain, 2 grain, ..., chunk_size
        worst.append(-sums.amin() if sums.numel() else sums.new_zeros(()))
        if sums.shape[2] % 2 == 0:
            sums = sums.unflatten(2, (-1, 2)).sum(-2)
    fits = (torch.stack(worst) <= limit).tolist()[::-1]  # in the order of sizes
    return next((c for c, ok in zip(sizes, fits) if ok), None)


def _decayed_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay-weighted dot products inside each chunk.

    q, k, G: [..., C, dk] (G the within-chunk cumulative log-decay). Returns
    (Aqk, Akk), each [..., C, C], with X[t, i] = sum_d x_t[d] k_i[d] exp(G_t[d] - G_i[d])
    for t >= i; above the diagonal, entries are finite but arbitrary (the caller masks them).
    """
    C = q.shape[-2]
    n = C // sub
    lead = q.shape[:-2]
    # (1) pairs inside one sub-chunk, [..., n, s, s]
    Gs = G.unflatten(-2, (n, sub))
    ks = k.unflatten(-2, (n, sub))
    qs = q.unflatten(-2, (n, sub))
    # The reference points of the factorisations below are detached: e^{G_t - G_f} e^{G_f - G_i}
    # does not depend on G_f, so its gradient through G_f is exactly zero (and summing the two
    # cancelling halves of it would only add rounding).
    first = Gs[..., :1, :].detach()  # [..., n, 1, dk]: G at the sub-chunk's first token f
    if _span_at_most(first - Gs[..., -1:, :], _FACTOR_MAX):
        # factored through f (f <= i <= t, so causal): e^{G_t - G_i} = e^{G_t - G_f} e^{G_f - G_i},
        # factors in [e^-80, e^80] (and the products above the diagonal, masked by the caller,
        # <= e^80): one matmul per sub-chunk instead of an [s, s, dk] tensor of pairwise exponents
        k_in = ks * (first - Gs).exp()  # [..., n, s, dk]
        down = (Gs - first).exp()
        diag_qk = (qs * down) @ k_in.transpose(-1, -2)  # [..., n, s(t), s(i)]
        diag_kk = (ks * down) @ k_in.transpose(-1, -2)
    else:  # some sub-chunk decays by more than e^-80: the explicit pairwise exponent
        diff = Gs[..., :, None, :] - Gs[..., None, :, :]
        tri = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
        decay = torch.where(tri[..., None], diff, float("-inf")).exp()  # 0 above the diagonal
        k_pairs = decay * ks[..., None, :, :]  # [..., n, s(t), s(i), dk]: k_i decayed to time t
        rows = torch.stack([qs, ks], dim=-1)  # [..., n, s(t), dk, 2]
        diag_qk, diag_kk = (k_pairs @ rows).unbind(-1)  # [..., n, s(t), s(i)] each
    # (2) pairs in different sub-chunks, factored through r = last token of the key's
    # sub-chunk b: keys scaled by e^{G_r - G_i} <= 1, rows by e^{G_t - G_r} (<= 1 where used;
    # clamped elsewhere, those entries are masked out below).
    Gr = Gs[..., -1, :].detach()  # [..., n, dk]
    k_dec = ks * (Gr[..., :, None, :] - Gs).exp()  # [..., n(b), s, dk]
    row_dec = (G[..., None, :, :] - Gr[..., :, None, :]).clamp(max=0).exp()  # [..., n(b), C, dk]
    blk = torch.arange(C, device=q.device) // sub
    later_block = blk[:, None] > blk[None, :]  # [C, C]: query's sub-chunk after key's
    eye_n = torch.eye(n, dtype=q.dtype, device=q.device)

    def assemble(rows: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        off = (rows[..., None, :, :] * row_dec) @ k_dec.transpose(-1, -2)  # [..., n(b), C, s]
        off = off.movedim(-3, -2).reshape(*lead, C, C)  # column index = b * s + j
        off = off.masked_fill(~later_block, 0.0)
        # place the [n, s, s] diagonal blocks on the block diagonal of a [C, C] matrix
        on = torch.einsum("...ati,ab->...atbi", diag, eye_n).reshape(*lead, C, C)
        return off + on

    return assemble(q, diag_qk), assemble(k, diag_kk)


def _sub_chunk(chunk_size: int) -> int:
    """Largest divisor of chunk_size that is at most 16 (the explicit pairwise block)."""
    for s in range(min(16, chunk_size), 0, -1):
        if chunk_size % s == 0:
            return s
    return 1


def _diagonal_block_inverses(L: torch.Tensor, blk: int) -> torch.Tensor:
    """(I + L_ii)^{-1} for the C / blk diagonal blocks of strictly lower-triangular L
    [..., C, C]: [..., C / blk, blk, blk], by the finite Neumann product
    (I + P)^{-1} = (I - P)(I + P^2)(I + P^4)... (P nilpotent, exact once 2^m >= blk)."""
    nb = L.shape[-1] // blk
    P = -torch.stack([L[..., i * blk:(i + 1) * blk, i * blk:(i + 1) * blk] for i in range(nb)], -3)
    X = torch.eye(blk, dtype=L.dtype, device=L.device) + P
    for _ in range(max(0, (blk - 1).bit_length() - 1)):
        P = P @ P
        X = X + X @ P
    return X


def _blocked_solve(L: torch.Tensor, X: torch.Tensor, rhs: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(I + L)^{-1} rhs (forward substitution over blocks), or (I + L)^{-T} rhs when
    `transposed` (back substitution, the diagonal inverses transposed), without autograd.
    L [..., C, C] strictly lower; X its diagonal block inverses; rhs [..., C, r]."""
    nb, blk = X.shape[-3], X.shape[-1]
    out = torch.empty_like(rhs)
    for i in (reversed(range(nb)) if transposed else range(nb)):
        rows = slice(i * blk, (i + 1) * blk)
        r = rhs[..., rows, :]
        if transposed and i < nb - 1:
            r = r - L[..., (i + 1) * blk:, rows].transpose(-1, -2) @ out[..., (i + 1) * blk:, :]
        elif not transposed and i:
            r = r - L[..., rows, :i * blk] @ out[..., :i * blk, :]
        out[..., rows, :] = (X[..., i, :, :].transpose(-1, -2) if transposed else X[..., i, :, :]) @ r
    return out


class _UnitLowerSolve(torch.autograd.Function):
    """x = (I + L)^{-1} rhs by blocks: the diagonal blocks inverted (matmuls only; batched
    `linalg.solve_triangular` runs at well under 1 GFLOP/s on CPU), then substitution over
    blocks. Its own backward: g_rhs = (I + L)^{-T} g_x (back substitution with the same
    block inverses) and g_L = -strict_tril(g_rhs x^T), half the work of differentiating
    through the forward's matmuls."""

    @staticmethod
    def forward(ctx, L, rhs, blk):
        X = _diagonal_block_inverses(L, blk)
        x = _blocked_solve(L, X, rhs, transposed=False)
        ctx.save_for_backward(L, X, x)
        return x

    @staticmethod
    def backward(ctx, g_x):
        L, X, x = ctx.saved_tensors
        g_rhs = _blocked_solve(L, X, g_x.contiguous(), transposed=True)
        g_L = -(g_rhs @ x.transpose(-1, -2)).tril(-1)
        return g_L, g_rhs, None


def _unit_lower_solve(L: torch.Tensor, rhs: torch.Tensor, blk: int) -> torch.Tensor:
    """(I + L)^{-1} rhs for strictly lower-triangular L [..., C, C] (only its strictly lower
    part is read), rhs [..., C, r]; differentiable in both. `blk` must divide C."""
    return _UnitLowerSolve.apply(L, rhs, blk)


def _unit_lower_inverse(L: torch.Tensor, blk: int) -> torch.Tensor:
    """(I + L)^{-1} for strictly lower-triangular L [..., C, C] (C = blk * 2^m), without
    autograd: the diagonal blocks of `blk` inverted (`_diagonal_block_inverses`), then
    pairs of neighbouring blocks merged until one is left, by
    [[A, 0], [X, D]]^{-1} = [[A^-1, 0], [-D^-1 X A^-1, D^-1]] (two matmuls per level)."""
    C = L.shape[-1]
    nb = C // blk
    if nb & (nb - 1):  # not a power of two: extend by identity rows (inverted as themselves)
        extra = blk * (1 << nb.bit_length()) - C
        return _unit_lower_inverse(torch.nn.functional.pad(L, (0, extra, 0, extra)), blk)[..., :C, :C]
    inv = _diagonal_block_inverses(L, blk)  # [..., C / s, s, s]
    s = blk
    lead = L.shape[:-2]
    while s < C:
        m = C // (2 * s)
        top, bottom = inv[..., 0::2, :, :], inv[..., 1::2, :, :]  # [..., m, s, s]
        # the lower-left s x s block of each 2s x 2s diagonal block of L
        rows = L.unflatten(-2, (m, 2, s))[..., 1, :, :]  # [..., m, s, C]: lower halves' rows
        X = torch.diagonal(rows.unflatten(-1, (m, 2, s))[..., 0, :], dim1=-4, dim2=-2)  # [..., s, s, m]
        X = X.movedim(-1, -3)  # [..., m, s, s]
        merged = inv.new_zeros(*lead, m, 2 * s, 2 * s)
        merged[..., :s, :s] = top
        merged[..., s:, s:] = bottom
        merged[..., s:, :s] = -(bottom @ (X @ top))
        inv, s = merged, 2 * s
    return inv[..., 0, :, :]


class _KDAChunkFn(torch.autograd.Function):
    """The chunked form with its own backward, for calls whose chunks each decay by at most
    e^-80 in every channel (scores as two matmuls; see the notes above).

    q (already scaled), k [B, H, N, C, dk]; v [B, H, N, C, dv]; g [B, H, N, C, dk] the
    log-decays; beta [B, H, N, C]; S0 [B, H, dk, dv]; seg [B, H, N, C] int64 segment ids
    (resets so far in the chunk) or None. Returns (O [B, H, N, C, dv], S_N).

    Forward, per chunk (E = e^G, G = cumsum g; Qg = q E, Kg = k E, Ki = k / E):

        Aqk = tril(Qg Ki^T),  Akk = strict_tril(Kg Ki^T)         (x same segment)
        Tm  = (I + diag(beta) Akk)^{-1}
        U~  = Tm diag(beta) V,   W = Tm diag(beta) Kg             (Kg: tokens seeing S0)
        U_n = U~_n - W_n S_n,    S_{n+1} = Diag(E_C) S_n + (Ki E_C)^T U_n
        O_n = Qg_n S_n + Aqk_n U_n

    The backward runs the same chain in reverse by hand: the state recurrence (two
    matmuls per chunk), then all chunks at once through the solve
    (dR = Tm^T dX, dL = -strict_tril(dR X^T)), the scores and the decays, and
    dg = the reverse cumulative sum of dG. Autograd's version of the same graph keeps
    about twice as many intermediates and passes over them."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, S0, seg, blk):
        C = q.shape[-2]
        G = g.cumsum(-2)
        E = G.exp()  # e^{G_t} <= 1
        Ei = E.reciprocal()  # e^{-G_i} <= e^80
        Qg, Kg, Ki = q * E, k * E, k * Ei
        EC = E[..., -1:, :]  # [B, H, N, 1, dk]: decay over the whole chunk
        tri = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        incl, strict = tri.to(q.dtype), tri.tril(-1).to(q.dtype)
        if seg is not None:
            same = (seg[..., :, None] == seg[..., None, :]).to(q.dtype)  # [B, H, N, C, C]
            incl, strict = incl * same, strict * same
            sees = (seg == 0).to(q.dtype)[..., None]  # [B, H, N, C, 1]: tokens before the first reset
            last = (seg == seg[..., -1:]).to(q.dtype)[..., None]  # tokens of the chunk's last segment
        Ki_t = Ki.transpose(-1, -2)
        Aqk = (Qg @ Ki_t).mul_(incl)
        Akk = (Kg @ Ki_t).mul_(strict)
        Ke = Ki * EC  # e^{G_C - G_i} k_i
        dec = EC[..., 0, :]  # [B, H, N, dk]
        Qs, Ks = Qg, Kg
        if seg is not None:
            Qs, Ks, Ke = Qg * sees, Kg * sees, Ke * last
            dec = dec * sees[..., -1, :]
        Tm = _unit_lower_inverse(Akk * beta[..., None], blk)
        Tb = Tm * beta[..., None, :]  # Tm diag(beta)
        U_free, W = Tb @ v, Tb @ Ks
        O, S, starts, U = _state_passing(U_free, W, Qs, Aqk, Ke, dec, S0)
        ctx.save_for_backward(v, beta, E, Ei, Qs, Ks, Qg, Kg, Ki, Ke, EC, dec, Aqk, Akk, Tm, U_free, W,
                              starts, U, S, incl, strict, *(() if seg is None else (sees, last)))
        ctx.has_seg = seg is not None
        return O, S

    @staticmethod
    def backward(ctx, dO, dS_end):
        (v, beta, E, Ei, Qs, Ks, Qg, Kg, Ki, Ke, EC, dec, Aqk, Akk, Tm, U_free, W, starts, U, S_end,
         incl, strict, *masks) = ctx.saved_tensors
        dO = dO.contiguous()
        dS_end = torch.zeros_like(S_end) if dS_end is None else dS_end.contiguous()
        dU, dW, dQs, dAqk, dKe, ddec, dS0 = _state_passing_backward(dO, dS_end, W, Qs, Aqk, Ke, dec, starts, U)
        dW = -dW
        dAqk = dAqk.mul_(incl)
        # the solve: X = [U~ | W] = Tm R with R = diag(beta) [V | Ks], Tm = (I + L)^{-1}, L = diag(beta) Akk
        Tm_t = Tm.transpose(-1, -2)
        dRv, dRk = Tm_t @ dU, Tm_t @ dW
        dL = torch.baddbmm(dRv.flatten(0, -3) @ U_free.flatten(0, -3).transpose(-1, -2),
                           dRk.flatten(0, -3), W.flatten(0, -3).transpose(-1, -2)).view_as(Tm)
        dL = dL.mul_(strict).neg_()  # strictly lower (and same segment): what L has
        dbeta = (dRv * v).sum(-1) + (dRk * Ks).sum(-1) + (dL * Akk).sum(-1)
        dv = dRv * beta[..., None]
        dKs = dRk * beta[..., None]
        dAkk = dL * beta[..., None]
        # the scores and the chunk-end terms
        dQg = dAqk @ Ki
        dKg = dAkk @ Ki
        dKi = dAqk.transpose(-1, -2) @ Qg
        dKi = dKi.add_(dAkk.transpose(-1, -2) @ Kg)
        if ctx.has_seg:
            sees, last = masks
            dQg, dKg = dQg.addcmul_(dQs, sees), dKg.addcmul_(dKs, sees)
            dKe = dKe * last
            ddec = ddec * sees[..., -1, :]
        else:
            dQg, dKg = dQg.add_(dQs), dKg.add_(dKs)
        dKi = dKi.addcmul_(dKe, EC)
        dEC = (dKe * Ki).sum(-2) + ddec  # [B, H, N, dk]
        dq = dQg * E
        dk = (dKg * E).addcmul_(dKi, Ei)
        dG = (dQg * Qg).addcmul_(dKg, Kg).addcmul_(dKi, Ki, value=-1.0)
        dG[..., -1, :] += dEC * EC[..., 0, :]
        dg = dG.sum(-2, keepdim=True) - dG.cumsum(-2) + dG  # reverse cumulative sum over the chunk
        return dq, dk, dv, dg, dbeta, dS0, None, None


def _state_passing(U_free, W, Qs, Aqk, Ke, dec, S0):
    """The sequential part: U_n = U~_n - W_n S_n, S_{n+1} = Diag(dec_n) S_n + Ke_n^T U_n, and
    the outputs O_n = Qs_n S_n + Aqk_n U_n (shapes as in _ChunkStates). Returns (O, S_N,
    starts [B, H, N, dk, dv] the state each chunk starts from, U [B, H, N, C, dv])."""
    N = U_free.shape[2]
    states, us = [S0], []
    S = S0
    for u_c, w_c, kT_c, dec_c in zip(U_free.unbind(2), W.unbind(2), Ke.transpose(-1, -2).unbind(2),
                                     dec[..., None].unbind(2)):
        u = u_c - w_c @ S
        us.append(u)
        S = dec_c * S + kT_c @ u
        states.append(S)
    starts = torch.stack(states[:N], 2)
    U = torch.stack(us, 2)
    O = Qs @ starts + Aqk @ U
    return O, S, starts, U


def _state_passing_backward(dO, dS, W, Qs, Aqk, Ke, dec, starts, U):
    """Gradients of `_state_passing` given dO and dS_N: (dU~, dU @ starts^T (= -dW), dQs,
    dAqk, dKe, ddec, dS0); the state recurrence runs backward one chunk at a time (two
    matmuls each), everything else is batched over the chunks."""
    N = U.shape[2]
    dU_out = Aqk.transpose(-1, -2) @ dO  # through O_n = ... + Aqk_n U_n
    dS_out = Qs.transpose(-1, -2) @ dO  # through O_n = Qs_n S_n + ...
    dUs, dS_next = [None] * N, [None] * N
    for n in reversed(range(N)):
        dS_next[n] = dS  # the gradient of S_{n+1}
        dU = dU_out[:, :, n] + Ke[:, :, n] @ dS
        dUs[n] = dU
        dS = dec[:, :, n, :, None] * dS + dS_out[:, :, n] - W[:, :, n].transpose(-1, -2) @ dU
    dU = torch.stack(dUs, 2)
    dS_next = torch.stack(dS_next, 2)
    starts_t = starts.transpose(-1, -2)
    return (dU, dU @ starts_t, dO @ starts_t, dO @ U.transpose(-1, -2), U @ dS_next.transpose(-1, -2),
            (dS_next * starts).sum(-1), dS)


class _ChunkStates(torch.autograd.Function):
    """The sequential part of the chunked form, and the outputs it feeds.

    u_free, w [B, H, N, C, dv|dk]; q_s0, k_end [B, H, N, C, dk]; Aqk [B, H, N, C, C];
    decay_end [B, H, N, dk]; S0 [B, H, dk, dv]. With S_0 = S0, for each chunk n:

        U_n = u_free_n - w_n S_n,    S_{n+1} = Diag(decay_end_n) S_n + k_end_n^T U_n
        O_n = q_s0_n S_n + Aqk_n U_n

    Returns (O [B, H, N, C, dv], S_N). Only the two state matmuls per chunk run one chunk
    at a time, forward and backward (the backward's two are k_end_n dS_{n+1} and
    w_n^T dU_n); the outputs and every other gradient are one batched matmul over all
    chunks, rather than autograd's eight small ones per chunk."""

    @staticmethod
    def forward(ctx, u_free, w, q_s0, Aqk, k_end, decay_end, S0):
        O, S, starts, U = _state_passing(u_free, w, q_s0, Aqk, k_end, decay_end, S0)
        ctx.save_for_backward(w, q_s0, Aqk, k_end, decay_end, starts, U)
        return O, S

    @staticmethod
    def backward(ctx, dO, dS_end):
        w, q_s0, Aqk, k_end, decay_end, starts, U = ctx.saved_tensors
        dS_end = torch.zeros_like(starts[:, :, 0]) if dS_end is None else dS_end.contiguous()
        dU, dU_starts, dq, dA, dk, ddec, dS0 = _state_passing_backward(dO.contiguous(), dS_end, w, q_s0, Aqk, k_end,
                                                                       decay_end, starts, U)
        return dU, -dU_starts, dq, dA, dk, ddec, dS0


class Chunks(NamedTuple):
    """kda_chunk's inputs prepared for a chunked form: q (scaled), k, v, g [B, H, T', d] float32
    contiguous, T' = T padded to a multiple of `chunk`; beta [B, H, T']; S0 [B, H, dk, dv];
    seg [B, H, N, chunk] int64 (resets so far within each chunk) or None; `fast` when no
    chunk decays by more than e^-80 in any channel (the two-matmul scores apply)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    S0: torch.Tensor
    seg: Optional[torch.Tensor]
    chunk: int
    fast: bool
    T: int


def prepare_inputs(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None):
    """The data-independent half of the preparation (arguments as kda_recurrent's): (q scaled,
    k, v, g, beta float32 contiguous [B, H, T, d] / [B, H, T]; S0 float32 [B, H, dk, dv];
    reset [B, H, T] bool contiguous or None)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    # contiguous [B, H, T, d] once (callers pass [B, T, H, d] transposed): the elementwise work
    # below runs several times faster on contiguous memory
    q, k, v, g, beta = (x.float().contiguous() for x in (q, k, v, log_alpha, beta))
    q = q * scale
    reset = _reset_bht(reset, B, H, T)
    S0 = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.float().contiguous()
    return q, k, v, g, beta, S0, None if reset is None else reset.contiguous()


def chunk_sizes(chunk_size: int) -> list[int]:
    """chunk_size, chunk_size / 2, ... (halving while even and >= 16): the chunks a call may take."""
    sizes = [chunk_size]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= 16:
        sizes.append(sizes[-1] // 2)
    return sizes


def chunk_inputs(q, k, v, g, beta, S0, reset, chunk_size: int, chunk: Optional[int] = None) -> Chunks:
    """The data-dependent half (prepare_inputs' results in): the chunk (`chunk` if given, else
    the longest of chunk_sizes(chunk_size) whose chunks decay by at most e^-80), padding to
    a multiple of it, and the segment ids of the resets."""
    B, H, T, _ = q.shape
    C = chunk if chunk is not None else _factorable_chunk(g, chunk_size, _FACTOR_MAX)
    fast = C is not None
    C = C or chunk_size
    pad = (-T) % C
    if pad:  # padded tokens: no decay (g = 0) and no write (beta = 0) leave the state as is
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        beta = torch.nn.functional.pad(beta, (0, pad))
        if reset is not None:
            reset = torch.nn.functional.pad(reset, (0, pad))
    N = (T + pad) // C
    seg = None if reset is None else reset.unflatten(2, (N, C)).long().cumsum(-1)  # [B, H, N, C]
    return Chunks(q, k, v, g, beta, S0, seg, C, fast, T)


def prepare_chunks(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None,
                   chunk_size: int = 64) -> Chunks:
    """The preparation of kda_chunk (arguments as kda_recurrent's): prepare_inputs, then
    chunk_inputs."""
    return chunk_inputs(*prepare_inputs(q, k, v, log_alpha, beta, initial_state, scale, reset), chunk_size)


@_float32
def kda_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    reset: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KDA over a sequence in chunks of `chunk_size` (any T; the tail chunk is padded).

    Same arguments and results as `kda_recurrent`; differentiable in every input.
    """
    B, H, T, dk = q.shape
    if q.device.type == "cpu" and B > 1 and B * H * T * dk > _CPU_GROUP_ELEMENTS:
        # on CPU, a few streams at a time: each group's tensors stay in cache between the many
        # passes over them (a training step at the bench shape 10-15% faster than with the whole batch at once)
        per = max(1, _CPU_GROUP_ELEMENTS // (H * T * dk))
        parts = [x.split(per) if x is not None else [None] * -(-B // per)
                 for x in (q, k, v, log_alpha, beta, initial_state, None if reset is None else reset.bool())]
        outs = [kda_chunk(*args[:6], scale, args[6], chunk_size) for args in zip(*parts)]
        return torch.cat([o for o, _ in outs]), torch.cat([s for _, s in outs])
    dtype = v.dtype
    return chunk_form(prepare_chunks(q, k, v, log_alpha, beta, initial_state, scale, reset, chunk_size), dtype)


def chunk_form(c: Chunks, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch chunked form over prepared chunks: (o [B, H, T, dv] in dtype, S_end)."""
    dk, dv, C, N, T = c.q.shape[-1], c.v.shape[-1], c.chunk, c.q.shape[2] // c.chunk, c.T
    q, k, v, g = (x.unflatten(2, (N, C)) for x in (c.q, c.k, c.v, c.g))  # [B, H, N, C, d]
    beta, seg, S0 = c.beta.unflatten(2, (N, C)), c.seg, c.S0  # [B, H, N, C]
    if c.fast:  # the usual case: scores as two matmuls per chunk
        o, S = _KDAChunkFn.apply(q, k, v, g, beta, S0, seg, _sub_chunk(C))
        return o.flatten(2, 3)[:, :, :T].to(dtype), S
    # some chunk decays by more than e^-80 in some channel: sub-chunk scores, by autograd
    G = g.cumsum(-2)
    eG = G.exp()  # e^{G_t}: the decay from the chunk's start to token t
    q_s0, k_s0 = q * eG, k * eG  # how each query (key) reads the chunk's initial state
    Aqk, Akk = _decayed_scores(q, k, G, _sub_chunk(C))
    k_end = k * (G[..., -1:, :] - G).exp()  # e^{G_C - G_i} k_i: how each write looks at chunk end
    Aqk = Aqk.tril()
    Akk = Akk.tril(-1)  # strictly lower: u_t depends on earlier u_i
    decay_end = eG[..., -1, :]  # [B, H, N, dk]
    if seg is not None:
        same = seg[..., :, None] == seg[..., None, :]
        Aqk, Akk = Aqk * same, Akk * same
        sees_s0 = (seg == 0)[..., None].float()  # tokens before the chunk's first reset
        q_s0, k_s0 = q_s0 * sees_s0, k_s0 * sees_s0
        k_end = k_end * (seg == seg[..., -1:])[..., None]  # only the last segment survives
        decay_end = decay_end * sees_s0[..., -1, :]

    # U = U~ - W S0, with [U~ | W] = (I + diag(beta) Akk)^{-1} diag(beta) [V | e^G K]
    rhs = beta[..., None] * torch.cat([v, k_s0], dim=-1)
    sol = _unit_lower_solve(beta[..., None] * Akk, rhs, _sub_chunk(C))
    u_free, w = sol.split([dv, dk], dim=-1)

    o, S = _ChunkStates.apply(u_free, w, q_s0, Aqk, k_end, decay_end, S0)
    return o.flatten(2, 3)[:, :, :T].to(dtype), S
