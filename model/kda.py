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
from typing import Optional

import torch

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


_FACTOR_MAX = 80.0  # largest log-decay across one sub-chunk that its factored form takes


@torch.compiler.disable
def _span_at_most(span: torch.Tensor, limit: float) -> bool:
    """Whether every log-decay in `span` (>= 0) is at most `limit` (True when empty). A
    data-dependent choice: under torch.compile, a graph break here rather than a traced .item()."""
    return bool(span.amax() <= limit) if span.numel() else True


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

    Same arguments and results as `kda_recurrent`; differentiable by autograd.
    """
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    dtype = v.dtype
    scale = dk ** -0.5 if scale is None else scale
    C = chunk_size
    # contiguous [B, H, T, d] once (callers pass [B, T, H, d] transposed): the elementwise work
    # below runs several times faster on contiguous memory
    q, k, v, g, beta = (x.float().contiguous() for x in (q, k, v, log_alpha, beta))
    q = q * scale
    reset = _reset_bht(reset, B, H, T)
    pad = (-T) % C
    if pad:  # padded tokens: no decay (g = 0) and no write (beta = 0) leave the state as is
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        beta = torch.nn.functional.pad(beta, (0, pad))
        if reset is not None:
            reset = torch.nn.functional.pad(reset, (0, pad))
    N = (T + pad) // C
    q, k, v, g = (x.unflatten(2, (N, C)) for x in (q, k, v, g))  # [B, H, N, C, d]
    beta = beta.unflatten(2, (N, C))  # [B, H, N, C]
    G = g.cumsum(-2)
    eG = G.exp()  # e^{G_t}: the decay from the chunk's start to token t
    q_s0, k_s0 = q * eG, k * eG  # how each query (key) reads the chunk's initial state
    if _span_at_most(-G[..., -1:, :], _FACTOR_MAX):  # the usual case: two matmuls per chunk
        k_inv = k * (-G).exp()  # e^{-G_i} k_i, in [1, e^80] times k_i
        k_inv_t = k_inv.transpose(-1, -2)
        Aqk, Akk = q_s0 @ k_inv_t, k_s0 @ k_inv_t
        k_end = k_inv * eG[..., -1:, :]
    else:
        Aqk, Akk = _decayed_scores(q, k, G, _sub_chunk(C))
        k_end = k * (G[..., -1:, :] - G).exp()  # e^{G_C - G_i} k_i: how each write looks at chunk end
    Aqk = Aqk.tril()
    Akk = Akk.tril(-1)  # strictly lower: u_t depends on earlier u_i
    decay_end = eG[..., -1, :]  # [B, H, N, dk]
    if reset is not None:
        seg = reset.unflatten(2, (N, C)).long().cumsum(-1)  # [B, H, N, C]
        same = seg[..., :, None] == seg[..., None, :]
        Aqk, Akk = Aqk * same, Akk * same
        sees_s0 = (seg == 0)[..., None].float()  # tokens before the chunk's first reset
        q_s0, k_s0 = q_s0 * sees_s0, k_s0 * sees_s0
        k_end = k_end * (seg == seg[..., -1:])[..., None]  # only the last segment survives
        decay_end = decay_end * sees_s0[..., -1, :]

    # U = U~ - W S0, with [U~ | W] = (I + diag(beta) Akk)^{-1} diag(beta) [V | e^G K]
    rhs = beta[..., None] * torch.cat([v, k_s0], dim=-1)
    sol = _unit_lower_solve(beta[..., None] * Akk, rhs, _sub_chunk(C))
    u_free, w = sol[..., :dv], sol[..., dv:]

    S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.float()
    outs = []
    # unbind once: indexing chunk n inside the loop would make autograd scatter each
    # slice's gradient into a full-size zero tensor, O(N) times (quadratic in T)
    per_chunk = zip(*(x.unbind(2) for x in (u_free, w, q_s0, Aqk, k_end.transpose(-1, -2), decay_end[..., None])))
    for u_c, w_c, q_c, A_c, kT_c, dec_c in per_chunk:  # the only sequential part, one step per chunk
        u = u_c - w_c @ S
        outs.append(q_c @ S + A_c @ u)
        S = dec_c * S + kT_c @ u
    o = torch.stack(outs, dim=2).flatten(2, 3)[:, :, :T]
    return o.to(dtype), S
