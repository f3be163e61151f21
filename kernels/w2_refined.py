"""Triton: STOSA Wasserstein attention with AWRSR refinement, forward and backward (SPEC §3, §4).

Per (batch, head), with diagonal Gaussians (mu, sigma) for queries, keys and values:
    W2sq_ij = |muQ_i|^2 + |muK_j|^2 - 2 muQ_i.muK_j + sum sigQ_i + sum sigK_j - 2 sqrtQ_i.sqrtK_j
    (sqrt = sqrt(max(sigma, 1e-24)): two dot products plus norms, never a (n, n, d) tensor)
    A = masked softmax(-W2sq * scale); P = A or its refinement (none, simp, add, value: the shared core
    of _refine.py); P' = dropout(P); mu_out = P' muV, sig_out = (P' o P') sigV.

The fused path: one program per (batch, head) keeps the whole sequence on chip (n <= W2_FUSED_MAX_N),
on the smallest window of 16, 32 or N_PAD trailing positions that holds it, so the work follows the
real length. The forward is one launch that saves nothing but its inputs; the backward is one launch
that recomputes A, T, B and P and writes the gradients of all six inputs and per-program partial sums
of dM (and dW_RV), which one torch sum reduces.
    _w2_fused_fwd / _w2_fused_bwd    the two kernels; _w2_window_* do the work for one window size

The tiled path (longer n, and M_stoc at every n) writes A and the refined P to float32 scratch; every
loop starts at the sequence's first real position:
    _w2_probs_fwd / _w2_probs_bwd(_keys)   A = masked softmax(-W2sq * scale) and its backward
    _w2_out_fwd / _w2_out_bwd(_values)     P' muV, (P' o P') sigV and their backward
    simp/add/value refine A on the shared core (_refine.refine_probs_forward); M_stoc's row Gaussians
    G_mu = A W_mu, sigma = ELU(A W_sigma) + 1 are two GEMMs, and B = -c W2sq(G, G) is _w2_probs_fwd again
    with G as queries and keys (its backward the query side's gradient plus the key side's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from awr_fast.ops.w2_refined import SQRT_CLAMP, TRITON_MAX_N, default_scale

from ._common import (
    MAX_REGISTERS,
    _blocks,
    _cdiv,
    _dropout_keep,
    _first_real_position,
    _fused_meta,
    _head_stride,
    _Launch,
    _load_cols_slice,
    _load_rows,
    _load_rows_slice,
    _masked_softmax_rows,
    _pad,
    _program_sequence,
    _reduce_over_batch,
    _refine_coefficients,
    _sliced_dot,
    _slot_load,
    _slot_store,
    _staged_dot,
    _staged_k_slice,
    _stages_backward,
    _stages_forward,
    _store_rows,
    _store_rows_slice,
    _store_zero_rows,
    _target_arch,
    _visible,
    dropout_seed,
    fused_max_n_from_env,
    refinement_factor_grads,
    refinement_matrix,
)
from ._launch import launch
from ._op import TritonOp
from ._refine import (
    _refine_window,
    _refine_window_bwd,
    _staged_p_slot,
    _staged_refine_bwd,
    _staged_refine_fwd,
    _zero_outside,
    refine_probs_backward,
    refine_probs_forward,
    refinement_weight_grads,
    staged_slots,
)

W2_FUSED_MAX_N = fused_max_n_from_env()  # longer sequences (up to TRITON_MAX_N) take the tiled kernels
_CLAMP = tl.constexpr(SQRT_CLAMP)  # a jit function may read a module global only as a constexpr
# _w2_probs_fwd reads Gaussians wider than this in chunks of this many columns from memory per key block;
# 64 kept d_h = 64's query side in registers and spilled 56-72 B in fp32 (32: 56 B without a mask), 16
# spills nothing
W2_PROBS_D_BLOCK = 16


# ------------------------------------------------------------------------------------------- jit kernels


@triton.jit
def _sqrt_cov(sig, dmask):
    """sqrt(max(sigma, clamp)) on the real columns (dmask), 0 on the padded ones."""
    return tl.where(dmask, tl.sqrt(tl.maximum(sig, _CLAMP)), 0.0)


@triton.jit
def _w2_logits(
    MQ, SQ, MK, SK, base, idx, n, D, scale, PRECISION: tl.constexpr, D_PAD: tl.constexpr, D_SLICE: tl.constexpr
):
    """-W2sq(Q_i, K_j) * scale on one window (SPEC §4's fused form). D_SLICE > 0: summed over d in slices of
    that width, K's slices read transposed from memory (less live at once: sm_80 fp32 spilled 1-2.6 KB in
    the forward without)."""
    if D_SLICE > 0:
        w2 = tl.zeros((idx.shape[0], idx.shape[0]), tl.float32)
        for c in tl.static_range(0, D_PAD, D_SLICE):
            real_cols = (c + tl.arange(0, D_SLICE)) < D
            mq = _load_rows_slice(MQ, base, idx, n, D, c, D_SLICE)
            mk_t = _load_cols_slice(MK, base, idx, n, D, c, D_SLICE)
            w2 += tl.sum(mq * mq, 1)[:, None] + tl.sum(mk_t * mk_t, 0)[None, :]
            w2 -= 2.0 * tl.dot(mq, mk_t, input_precision=PRECISION)
            sq = _load_rows_slice(SQ, base, idx, n, D, c, D_SLICE)
            sk_t = _load_cols_slice(SK, base, idx, n, D, c, D_SLICE)
            w2 += tl.sum(sq, 1)[:, None] + tl.sum(sk_t, 0)[None, :]
            root_q = _sqrt_cov(sq, real_cols[None, :])
            w2 -= 2.0 * tl.dot(root_q, _sqrt_cov(sk_t, real_cols[:, None]), input_precision=PRECISION)
    else:
        dmask = (tl.arange(0, D_PAD) < D)[None, :]
        mq = _load_rows(MQ, base, idx, n, D, D_PAD)
        mk = _load_rows(MK, base, idx, n, D, D_PAD)
        w2 = tl.sum(mq * mq, 1)[:, None] + tl.sum(mk * mk, 1)[None, :]
        w2 -= 2.0 * tl.dot(mq, tl.trans(mk), input_precision=PRECISION)
        sq = _load_rows(SQ, base, idx, n, D, D_PAD)
        sk = _load_rows(SK, base, idx, n, D, D_PAD)
        w2 += tl.sum(sq, 1)[:, None] + tl.sum(sk, 1)[None, :]
        w2 -= 2.0 * tl.dot(_sqrt_cov(sq, dmask), tl.trans(_sqrt_cov(sk, dmask)), input_precision=PRECISION)
    return -w2 * scale


@triton.jit
def _w2_window_recompute(
    MQ,
    SQ,
    MK,
    SK,
    M1,
    WRV,
    KPM,
    bh,
    b,
    h,
    start,
    off,
    scale,
    alpha,
    beta,
    n,
    D,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
    D_SLICE: tl.constexpr,
):
    """(A, T, U, R, P, vis) of one window, as _window_recompute of the dot family."""
    idx = off + tl.arange(0, TILE)
    s = _w2_logits(MQ, SQ, MK, SK, bh * n * D, idx, n, D, scale, PRECISION, D_PAD, D_SLICE)
    vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
    a = _masked_softmax_rows(s, vis)
    if MECH > 0:
        if REFINE_SCORES:
            a = tl.where(vis, s, 0.0)
    t, u, r, p = _refine_window(
        a, vis, M1, WRV, h, idx, n, alpha, beta, m_head_stride, wrv_head_stride, MECH, PRECISION
    )
    return a, t, u, r, p, vis


@triton.jit
def _w2_window_fwd_registers(
    MQ,
    SQ,
    MK,
    SK,
    MV,
    SV,
    M1,
    WRV,
    KPM,
    SEED,
    OMU,
    OSIG,
    bh,
    b,
    h,
    start,
    scale,
    alpha,
    beta,
    dropout_p,
    n,
    D,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
    D_SLICE: tl.constexpr,
):
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    a, t, u, r, p, vis = _w2_window_recompute(
        MQ,
        SQ,
        MK,
        SK,
        M1,
        WRV,
        KPM,
        bh,
        b,
        h,
        start,
        off,
        scale,
        alpha,
        beta,
        n,
        D,
        m_head_stride,
        wrv_head_stride,
        MECH,
        HAS_MASK,
        REFINE_SCORES,
        PRECISION,
        TILE,
        D_PAD,
        D_SLICE,
    )
    if DROPOUT:  # STOSA drops P before both products: sig_out uses the dropped P squared
        p = tl.where(_dropout_keep(SEED, bh, idx, idx, n, dropout_p), p / (1.0 - dropout_p), 0.0)
    if D_SLICE > 0:  # in column slices of the values, as the logits
        for c in tl.static_range(0, D_PAD, D_SLICE):
            omu = tl.dot(p, _load_rows_slice(MV, base, idx, n, D, c, D_SLICE), input_precision=PRECISION)
            _store_rows_slice(OMU, base, omu, idx, n, D, c, D_SLICE)
        p_squared = p * p
        for c in tl.static_range(0, D_PAD, D_SLICE):
            osig = tl.dot(p_squared, _load_rows_slice(SV, base, idx, n, D, c, D_SLICE), input_precision=PRECISION)
            _store_rows_slice(OSIG, base, osig, idx, n, D, c, D_SLICE)
    else:
        omu = tl.dot(p, _load_rows(MV, base, idx, n, D, D_PAD), input_precision=PRECISION)
        _store_rows(OMU, base, omu, idx, n, D, D_PAD)
        osig = tl.dot(p * p, _load_rows(SV, base, idx, n, D, D_PAD), input_precision=PRECISION)
        _store_rows(OSIG, base, osig, idx, n, D, D_PAD)
    _store_zero_rows(OMU, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(OSIG, base, off, n, D, TILE, D_PAD)


@triton.jit
def _w2_window_fwd_staged(
    MQ,
    SQ,
    MK,
    SK,
    MV,
    SV,
    M1,
    WRV,
    KPM,
    SEED,
    OMU,
    OSIG,
    WS,
    bh,
    b,
    h,
    start,
    scale,
    alpha,
    beta,
    dropout_p,
    n,
    D,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
    D_SLICE: tl.constexpr,
    SLOTS: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """_w2_window_fwd_registers with its (TILE, TILE) tiles staged through scratch slots (as
    _w2_window_bwd_staged): P' in the refinement's P slot, P' o P' in the last."""
    TT: tl.constexpr = TILE * TILE
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    ws = bh * SLOTS * TT
    valid = n - off
    row_base = base + off * D
    s = _w2_logits(MQ, SQ, MK, SK, base, idx, n, D, scale, PRECISION, D_PAD, D_SLICE)
    vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
    if MECH > 0 and REFINE_SCORES:
        a = tl.where(vis, s, 0.0)
    else:
        a = _masked_softmax_rows(s, vis)
    p = _staged_refine_fwd(
        WS, ws, a, vis, M1, WRV, h, off, n, alpha, beta, m_head_stride, wrv_head_stride, MECH, PRECISION, TILE, K_SLICE
    )
    if DROPOUT:  # STOSA drops P before both products: sig_out uses the dropped P squared
        p = tl.where(_dropout_keep(SEED, bh, idx, idx, n, dropout_p), p / (1.0 - dropout_p), 0.0)
    p_slot = _staged_p_slot(ws, MECH, TILE)
    squared_slot = ws + (SLOTS - 1) * TT
    _slot_store(WS, p_slot, p, TILE)
    _slot_store(WS, squared_slot, p * p, TILE)
    tl.debug_barrier()
    omu = _staged_dot(
        WS,
        p_slot,
        TILE,
        1,
        TILE,
        TILE,
        MV,
        row_base,
        D,
        1,
        valid,
        D,
        TILE,
        D_PAD,
        TILE,
        K_SLICE,
        PRECISION,
    )
    _store_rows(OMU, base, omu, idx, n, D, D_PAD)
    osig = _staged_dot(
        WS,
        squared_slot,
        TILE,
        1,
        TILE,
        TILE,
        SV,
        row_base,
        D,
        1,
        valid,
        D,
        TILE,
        D_PAD,
        TILE,
        K_SLICE,
        PRECISION,
    )
    _store_rows(OSIG, base, osig, idx, n, D, D_PAD)
    _store_zero_rows(OMU, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(OSIG, base, off, n, D, TILE, D_PAD)


@triton.jit
def _w2_window_fwd(
    MQ,
    SQ,
    MK,
    SK,
    MV,
    SV,
    M1,
    WRV,
    KPM,
    SEED,
    OMU,
    OSIG,
    WS,
    bh,
    b,
    h,
    start,
    scale,
    alpha,
    beta,
    dropout_p,
    n,
    D,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
    D_SLICE: tl.constexpr,
    STAGED: tl.constexpr,
    SLOTS: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """The forward of one window: staged through scratch (see _stages_forward) or in registers."""
    if STAGED:
        _w2_window_fwd_staged(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            OMU,
            OSIG,
            WS,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            TILE,
            D_PAD,
            D_SLICE,
            SLOTS,
            K_SLICE,
        )
    else:
        _w2_window_fwd_registers(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            OMU,
            OSIG,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            TILE,
            D_PAD,
            D_SLICE,
        )


@triton.jit
def _w2_window_bwd_registers(
    MQ,
    SQ,
    MK,
    SK,
    MV,
    SV,
    M1,
    WRV,
    KPM,
    SEED,
    DOMU,
    DOSIG,
    DMQ,
    DSQ,
    DMK,
    DSK,
    DMV,
    DSV,
    DM1,
    DWRV,
    bh,
    b,
    h,
    start,
    scale,
    alpha,
    beta,
    dropout_p,
    n,
    D,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
    D_SLICE: tl.constexpr,
):
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    a, t, u, r, p, vis = _w2_window_recompute(
        MQ,
        SQ,
        MK,
        SK,
        M1,
        WRV,
        KPM,
        bh,
        b,
        h,
        start,
        off,
        scale,
        alpha,
        beta,
        n,
        D,
        m_head_stride,
        wrv_head_stride,
        MECH,
        HAS_MASK,
        REFINE_SCORES,
        PRECISION,
        TILE,
        D_PAD,
        D_SLICE,
    )
    # mu_out = P' muV, sig_out = (P' o P') sigV with P' = dropout(P): dL/dP' = dOmu muV^T + 2 P' o dOsig sigV^T
    p_dropped = p
    if DROPOUT:
        keep = _dropout_keep(SEED, bh, idx, idx, n, dropout_p)
        p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    domu = _load_rows(DOMU, base, idx, n, D, D_PAD)
    dp = tl.dot(domu, tl.trans(_load_rows(MV, base, idx, n, D, D_PAD)), input_precision=PRECISION)
    _store_rows(DMV, base, tl.dot(tl.trans(p_dropped), domu, input_precision=PRECISION), idx, n, D, D_PAD)
    dosig = _load_rows(DOSIG, base, idx, n, D, D_PAD)
    dsq_p = tl.dot(dosig, tl.trans(_load_rows(SV, base, idx, n, D, D_PAD)), input_precision=PRECISION)
    dp += 2.0 * p_dropped * dsq_p
    p_squared = p_dropped * p_dropped
    _store_rows(DSV, base, tl.dot(tl.trans(p_squared), dosig, input_precision=PRECISION), idx, n, D, D_PAD)
    if DROPOUT:
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    dlogits = p * (dp - tl.sum(p * dp, 1)[:, None])  # softmax backward; zero where P is masked
    if MECH > 0:
        da = _refine_window_bwd(
            dlogits,
            a,
            t,
            u,
            r,
            M1,
            WRV,
            DM1,
            DWRV,
            bh,
            h,
            idx,
            off,
            n,
            alpha,
            beta,
            m_head_stride,
            wrv_head_stride,
            MECH,
            PRECISION,
            TILE,
        )
        if REFINE_SCORES:
            ds = tl.where(vis, da, 0.0)
        else:
            ds = a * (da - tl.sum(a * da, 1)[:, None])
    else:
        ds = dlogits
    dw2 = -ds * scale  # dL/dW2sq
    rows = tl.sum(dw2, 1)
    cols = tl.sum(dw2, 0)
    dmask = (tl.arange(0, D_PAD) < D)[None, :]
    # means: d|mq_i - mk_j|^2 = 2 (mq_i - mk_j) on the query side, 2 (mk_j - mq_i) on the key side
    mq = _load_rows(MQ, base, idx, n, D, D_PAD)
    mk = _load_rows(MK, base, idx, n, D, D_PAD)
    dmq = 2.0 * (mq * rows[:, None] - tl.dot(dw2, mk, input_precision=PRECISION))
    _store_rows(DMQ, base, dmq, idx, n, D, D_PAD)
    dmk = 2.0 * (mk * cols[:, None] - tl.dot(tl.trans(dw2), mq, input_precision=PRECISION))
    _store_rows(DMK, base, dmk, idx, n, D, D_PAD)
    # covariances: the sums give dW2 itself; -2 sqrtQ.sqrtK goes through sqrt(max(sigma, clamp))
    sq = _load_rows(SQ, base, idx, n, D, D_PAD)
    sk = _load_rows(SK, base, idx, n, D, D_PAD)
    rq = _sqrt_cov(sq, dmask)
    rk = _sqrt_cov(sk, dmask)
    through_q = tl.where(dmask & (sq >= _CLAMP), 1.0 / tl.where(rq > 0, rq, 1.0), 0.0)
    through_k = tl.where(dmask & (sk >= _CLAMP), 1.0 / tl.where(rk > 0, rk, 1.0), 0.0)
    dsq = rows[:, None] - tl.dot(dw2, rk, input_precision=PRECISION) * through_q
    _store_rows(DSQ, base, dsq, idx, n, D, D_PAD)
    dsk = cols[:, None] - tl.dot(tl.trans(dw2), rq, input_precision=PRECISION) * through_k
    _store_rows(DSK, base, dsk, idx, n, D, D_PAD)
    _store_zero_rows(DMQ, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DSQ, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DMK, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DSK, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DMV, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DSV, base, off, n, D, TILE, D_PAD)


@triton.jit
def _staged_dot_sqrt(
    X,
    x_base,
    x_rs,
    x_cs,
    x_rows,
    x_cols,
    SIG,
    y_base,
    y_rows,
    D,
    M: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    K_SLICE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """_staged_dot with Y = sqrt(max(sigma, clamp)) of the (K, D) rows of SIG at y_base (0 outside them)."""
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    acc = tl.zeros([M, N], tl.float32)
    for k0 in range(0, K, K_SLICE):
        rk = k0 + tl.arange(0, K_SLICE)
        x_ok = (rm[:, None] < x_rows) & (rk[None, :] < x_cols)
        x = tl.load(X + x_base + rm[:, None] * x_rs + rk[None, :] * x_cs, mask=x_ok, other=0.0).to(tl.float32)
        y_ok = (rk[:, None] < y_rows) & (rn[None, :] < D)
        y = tl.load(SIG + y_base + rk[:, None] * D + rn[None, :], mask=y_ok, other=0.0).to(tl.float32)
        acc = tl.dot(x, _sqrt_cov(y, y_ok), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _w2_window_bwd_staged(
    MQ,
    SQ,
    MK,
    SK,
    MV,
    SV,
    M1,
    WRV,
    KPM,
    SEED,
    DOMU,
    DOSIG,
    DMQ,
    DSQ,
    DMK,
    DSK,
    DMV,
    DSV,
    DM1,
    DWRV,
    WS,
    bh,
    b,
    h,
    start,
    scale,
    alpha,
    beta,
    dropout_p,
    n,
    D,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
    D_SLICE: tl.constexpr,
    SLOTS: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """_w2_window_bwd_registers with its (TILE, TILE) operands staged through scratch slots, as the dot
    family's _window_bwd_staged (the fp32 path): the refinement's slots (_staged_refine_fwd / _bwd), the
    last slot for P' o P', and dW2 in slot 1 at the end."""
    TT: tl.constexpr = TILE * TILE
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    ws = bh * SLOTS * TT
    valid = n - off
    row_base = base + off * D
    s = _w2_logits(MQ, SQ, MK, SK, base, idx, n, D, scale, PRECISION, D_PAD, D_SLICE)
    vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
    if MECH > 0 and REFINE_SCORES:
        a = tl.where(vis, s, 0.0)
    else:
        a = _masked_softmax_rows(s, vis)
    p = _staged_refine_fwd(
        WS, ws, a, vis, M1, WRV, h, off, n, alpha, beta, m_head_stride, wrv_head_stride, MECH, PRECISION, TILE, K_SLICE
    )
    p_slot = _staged_p_slot(ws, MECH, TILE)
    squared_slot = ws + (SLOTS - 1) * TT
    # mu_out = P' muV, sig_out = (P' o P') sigV with P' = dropout(P): dL/dP' = dOmu muV^T + 2 P' o dOsig sigV^T
    p_dropped = p
    if DROPOUT:
        p_dropped = tl.where(_dropout_keep(SEED, bh, idx, idx, n, dropout_p), p / (1.0 - dropout_p), 0.0)
    _slot_store(WS, p_slot, p_dropped, TILE)
    _slot_store(WS, squared_slot, p_dropped * p_dropped, TILE)
    tl.debug_barrier()
    dmv = _staged_dot(
        WS, p_slot, 1, TILE, TILE, TILE, DOMU, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DMV, base, dmv, idx, n, D, D_PAD)
    dsv = _staged_dot(
        WS, squared_slot, 1, TILE, TILE, TILE, DOSIG, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DSV, base, dsv, idx, n, D, D_PAD)
    dp = _staged_dot(
        DOSIG, row_base, D, 1, valid, D, SV, row_base, 1, D, D, valid, TILE, TILE, D_PAD, D_SLICE, PRECISION
    )
    dp = 2.0 * p_dropped * dp
    dp += _staged_dot(
        DOMU, row_base, D, 1, valid, D, MV, row_base, 1, D, D, valid, TILE, TILE, D_PAD, D_SLICE, PRECISION
    )
    if DROPOUT:
        dp = tl.where(_dropout_keep(SEED, bh, idx, idx, n, dropout_p), dp / (1.0 - dropout_p), 0.0)
    dlogits = p * (dp - tl.sum(p * dp, 1)[:, None])
    da = _staged_refine_bwd(
        WS,
        ws,
        dlogits,
        M1,
        WRV,
        DM1,
        DWRV,
        bh,
        h,
        idx,
        off,
        n,
        alpha,
        beta,
        m_head_stride,
        wrv_head_stride,
        MECH,
        PRECISION,
        TILE,
        K_SLICE,
    )
    if MECH > 0:
        if REFINE_SCORES:
            ds = tl.where(_visible(idx, idx, n, start, b, KPM, HAS_MASK), da, 0.0)
        else:
            a = _slot_load(WS, ws, TILE)
            ds = a * (da - tl.sum(a * da, 1)[:, None])
    else:
        ds = da
    dw2 = -ds * scale  # dL/dW2sq
    rows = tl.sum(dw2, 1)
    cols = tl.sum(dw2, 0)
    dw2_slot = ws + TT
    _slot_store(WS, dw2_slot, dw2, TILE)
    tl.debug_barrier()
    # means: d|mq_i - mk_j|^2 = 2 (mq_i - mk_j) on the query side, 2 (mk_j - mq_i) on the key side
    mq = _load_rows(MQ, base, idx, n, D, D_PAD)
    dmq = _staged_dot(
        WS, dw2_slot, TILE, 1, TILE, TILE, MK, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DMQ, base, 2.0 * (mq * rows[:, None] - dmq), idx, n, D, D_PAD)
    mk = _load_rows(MK, base, idx, n, D, D_PAD)
    dmk = _staged_dot(
        WS, dw2_slot, 1, TILE, TILE, TILE, MQ, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DMK, base, 2.0 * (mk * cols[:, None] - dmk), idx, n, D, D_PAD)
    # covariances: the sums give dW2 itself; -2 sqrtQ.sqrtK goes through sqrt(max(sigma, clamp))
    dmask = (tl.arange(0, D_PAD) < D)[None, :]
    sq = _load_rows(SQ, base, idx, n, D, D_PAD)
    rq = _sqrt_cov(sq, dmask)
    through_q = tl.where(dmask & (sq >= _CLAMP), 1.0 / tl.where(rq > 0, rq, 1.0), 0.0)
    dsq = _staged_dot_sqrt(
        WS, dw2_slot, TILE, 1, TILE, TILE, SK, row_base, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DSQ, base, rows[:, None] - dsq * through_q, idx, n, D, D_PAD)
    sk = _load_rows(SK, base, idx, n, D, D_PAD)
    rk = _sqrt_cov(sk, dmask)
    through_k = tl.where(dmask & (sk >= _CLAMP), 1.0 / tl.where(rk > 0, rk, 1.0), 0.0)
    dsk = _staged_dot_sqrt(
        WS, dw2_slot, 1, TILE, TILE, TILE, SQ, row_base, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DSK, base, cols[:, None] - dsk * through_k, idx, n, D, D_PAD)
    _store_zero_rows(DMQ, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DSQ, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DMK, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DSK, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DMV, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DSV, base, off, n, D, TILE, D_PAD)


@triton.jit
def _w2_window_bwd(
    MQ,
    SQ,
    MK,
    SK,
    MV,
    SV,
    M1,
    WRV,
    KPM,
    SEED,
    DOMU,
    DOSIG,
    DMQ,
    DSQ,
    DMK,
    DSK,
    DMV,
    DSV,
    DM1,
    DWRV,
    WS,
    bh,
    b,
    h,
    start,
    scale,
    alpha,
    beta,
    dropout_p,
    n,
    D,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
    D_SLICE: tl.constexpr,
    STAGED: tl.constexpr,
    SLOTS: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """The backward of one window: staged through scratch (fp32, see _launch_fused_bwd) or in registers."""
    if STAGED:
        _w2_window_bwd_staged(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            DOMU,
            DOSIG,
            DMQ,
            DSQ,
            DMK,
            DSK,
            DMV,
            DSV,
            DM1,
            DWRV,
            WS,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            TILE,
            D_PAD,
            D_SLICE,
            SLOTS,
            K_SLICE,
        )
    else:
        _w2_window_bwd_registers(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            DOMU,
            DOSIG,
            DMQ,
            DSQ,
            DMK,
            DSK,
            DMV,
            DSV,
            DM1,
            DWRV,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            TILE,
            D_PAD,
            D_SLICE,
        )


@triton.jit
def _w2_fused_fwd(
    MQ,
    SQ,
    MK,
    SK,
    MV,
    SV,
    M1,
    WRV,
    KPM,
    SEED,
    OMU,
    OSIG,
    WS,
    scale,
    alpha,
    beta,
    dropout_p,
    n,
    D,
    H,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    TILE_S: tl.constexpr,
    TILE_M: tl.constexpr,
    D_SLICE: tl.constexpr,
    STAGED: tl.constexpr = False,
    SLOTS: tl.constexpr = 0,
    K_SLICE: tl.constexpr = 16,
):
    """One program per (batch, head): mu_out and sig_out on the smallest window that holds the sequence."""
    bh, b, h, start, length = _program_sequence(KPM, n, H, HAS_MASK, N_PAD)
    # TILE is a compile-time shape, so each window size is its own branch (TILE_S = 16, TILE_M = 32 or less)
    if length <= TILE_S:
        _w2_window_fwd(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            OMU,
            OSIG,
            WS,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            TILE_S,
            D_PAD,
            D_SLICE,
            STAGED,
            SLOTS,
            K_SLICE,
        )
    elif length <= TILE_M:
        _w2_window_fwd(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            OMU,
            OSIG,
            WS,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            TILE_M,
            D_PAD,
            D_SLICE,
            STAGED,
            SLOTS,
            K_SLICE,
        )
    else:
        _w2_window_fwd(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            OMU,
            OSIG,
            WS,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            N_PAD,
            D_PAD,
            D_SLICE,
            STAGED,
            SLOTS,
            K_SLICE,
        )


@triton.jit
def _w2_fused_bwd(
    MQ,
    SQ,
    MK,
    SK,
    MV,
    SV,
    M1,
    WRV,
    KPM,
    SEED,
    DOMU,
    DOSIG,
    DMQ,
    DSQ,
    DMK,
    DSK,
    DMV,
    DSV,
    DM1,
    DWRV,
    WS,
    scale,
    alpha,
    beta,
    dropout_p,
    n,
    D,
    H,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    TILE_S: tl.constexpr,
    TILE_M: tl.constexpr,
    D_SLICE: tl.constexpr,
    STAGED: tl.constexpr = False,
    SLOTS: tl.constexpr = 0,
    K_SLICE: tl.constexpr = 16,
):
    """The gradients of the six inputs and per-program partial sums of dM1 (and dW_RV), recomputed."""
    bh, b, h, start, length = _program_sequence(KPM, n, H, HAS_MASK, N_PAD)
    # TILE is a compile-time shape, so each window size is its own branch (TILE_S = 16, TILE_M = 32 or less)
    if length <= TILE_S:
        _w2_window_bwd(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            DOMU,
            DOSIG,
            DMQ,
            DSQ,
            DMK,
            DSK,
            DMV,
            DSV,
            DM1,
            DWRV,
            WS,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            TILE_S,
            D_PAD,
            D_SLICE,
            STAGED,
            SLOTS,
            K_SLICE,
        )
    elif length <= TILE_M:
        _w2_window_bwd(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            DOMU,
            DOSIG,
            DMQ,
            DSQ,
            DMK,
            DSK,
            DMV,
            DSV,
            DM1,
            DWRV,
            WS,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            TILE_M,
            D_PAD,
            D_SLICE,
            STAGED,
            SLOTS,
            K_SLICE,
        )
    else:
        _w2_window_bwd(
            MQ,
            SQ,
            MK,
            SK,
            MV,
            SV,
            M1,
            WRV,
            KPM,
            SEED,
            DOMU,
            DOSIG,
            DMQ,
            DSQ,
            DMK,
            DSK,
            DMV,
            DSV,
            DM1,
            DWRV,
            WS,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            dropout_p,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            MECH,
            HAS_MASK,
            REFINE_SCORES,
            DROPOUT,
            PRECISION,
            N_PAD,
            D_PAD,
            D_SLICE,
            STAGED,
            SLOTS,
            K_SLICE,
        )


# ---- tiled path (n > W2_FUSED_MAX_N): A, and the refined P, are written to float32 scratch; every loop
# starts at the sequence's first real position, so the work per head follows its real length.


@triton.jit
def _w2_gaussians(MU, SIG, base, idx, n, D, D_PAD: tl.constexpr):
    """(mu, sqrt(max(sigma, clamp)), |mu|^2 + sum sigma) of rows idx: one side of W2sq."""
    dmask = (tl.arange(0, D_PAD) < D)[None, :]
    mu = _load_rows(MU, base, idx, n, D, D_PAD)
    sig = _load_rows(SIG, base, idx, n, D, D_PAD)
    return mu, _sqrt_cov(sig, dmask), tl.sum(mu * mu, 1) + tl.sum(sig, 1)


@triton.jit
def _w2_tile_logits(mq, rq, nq, mk, rk, nk, scale, PRECISION: tl.constexpr):
    """-W2sq * scale between a block of query rows and a block of key rows."""
    cross = tl.dot(mq, tl.trans(mk), input_precision=PRECISION) + tl.dot(rq, tl.trans(rk), input_precision=PRECISION)
    return -(nq[:, None] + nk[None, :] - 2.0 * cross) * scale


@triton.jit
def _w2_chunked_logits(
    MQ,
    SQ,
    MK,
    SK,
    base,
    rows,
    cols,
    n,
    D,
    scale,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_BLOCK: tl.constexpr,
):
    """_w2_tile_logits for wide Gaussians (M_stoc's r up to 256), D_BLOCK columns at a time from memory: no
    (BLOCK, r) tile stays in registers (whole 256-wide tiles spilled 1 KB per thread on sm_90, 6.9 KB on sm_80)."""
    cross = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    nq = tl.zeros([BLOCK_M], tl.float32)
    nk = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, D, D_BLOCK):
        di = k0 + tl.arange(0, D_BLOCK)
        dmask = (di < D)[None, :]
        q_at = base + rows[:, None] * D + di[None, :]
        k_at = base + cols[:, None] * D + di[None, :]
        q_ok = (rows[:, None] < n) & dmask
        k_ok = (cols[:, None] < n) & dmask
        mq = tl.load(MQ + q_at, mask=q_ok, other=0.0).to(tl.float32)
        sq = tl.load(SQ + q_at, mask=q_ok, other=0.0).to(tl.float32)
        mk = tl.load(MK + k_at, mask=k_ok, other=0.0).to(tl.float32)
        sk = tl.load(SK + k_at, mask=k_ok, other=0.0).to(tl.float32)
        cross += tl.dot(mq, tl.trans(mk), input_precision=PRECISION)
        cross += tl.dot(_sqrt_cov(sq, dmask), tl.trans(_sqrt_cov(sk, dmask)), input_precision=PRECISION)
        nq += tl.sum(mq * mq, 1) + tl.sum(sq, 1)
        nk += tl.sum(mk * mk, 1) + tl.sum(sk, 1)
    return -(nq[:, None] + nk[None, :] - 2.0 * cross) * scale


@triton.jit
def _w2_probs_fwd(
    MQ,
    SQ,
    MK,
    SK,
    KPM,
    A,
    scale,
    n,
    D,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    D_BLOCK: tl.constexpr,
):
    """A = masked softmax(-W2sq * scale) (or the masked scores), two passes over the causal key blocks; the
    query rows' Gaussians stay in registers unless they are wider than D_BLOCK (then both sides are read in
    D_BLOCK-column chunks per key block)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = bh * n * D
    CHUNKED: tl.constexpr = D_BLOCK < D_PAD
    if not CHUNKED:
        mq, rq, nq = _w2_gaussians(MQ, SQ, base, rows, n, D, D_PAD)
    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if not REFINE_SCORES:
        for j0 in range(lo, hi, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            if CHUNKED:
                s = _w2_chunked_logits(
                    MQ, SQ, MK, SK, base, rows, cols, n, D, scale, PRECISION, BLOCK_M, BLOCK_N, D_BLOCK
                )
            else:
                mk, rk, nk = _w2_gaussians(MK, SK, base, cols, n, D, D_PAD)
                s = _w2_tile_logits(mq, rq, nq, mk, rk, nk, scale, PRECISION)
            s = tl.where(_visible(rows, cols, n, start, b, KPM, HAS_MASK), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        if CHUNKED:
            s = _w2_chunked_logits(MQ, SQ, MK, SK, base, rows, cols, n, D, scale, PRECISION, BLOCK_M, BLOCK_N, D_BLOCK)
        else:
            mk, rk, nk = _w2_gaussians(MK, SK, base, cols, n, D, D_PAD)
            s = _w2_tile_logits(mq, rq, nq, mk, rk, nk, scale, PRECISION)
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        if REFINE_SCORES:
            a = tl.where(vis, s, 0.0)
        else:
            a = tl.where(vis, tl.exp(tl.where(vis, s - m_i[:, None], 0.0)) * inv_l[:, None], 0.0)
        tl.store(A + bh * n * n + rows[:, None] * n + cols[None, :], a, mask=(rows[:, None] < n) & (cols[None, :] < n))


@triton.jit
def _w2_out_fwd(
    P,
    MV,
    SV,
    KPM,
    SEED,
    OMU,
    OSIG,
    dropout_p,
    n,
    D,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """mu_out = P' muV, sig_out = (P' o P') sigV with P' = dropout(P), P read from scratch."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = bh * n * D
    acc_mu = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc_sig = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for j0 in range((start // BLOCK_N) * BLOCK_N, tl.minimum(pid_m * BLOCK_M + BLOCK_M, n), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        p = tl.load(
            P + bh * n * n + rows[:, None] * n + cols[None, :],
            mask=(rows[:, None] < n) & (cols[None, :] < n),
            other=0.0,
        )
        if DROPOUT:
            p = tl.where(_dropout_keep(SEED, bh, rows, cols, n, dropout_p), p / (1.0 - dropout_p), 0.0)
        acc_mu += tl.dot(p, _load_rows(MV, base, cols, n, D, D_PAD), input_precision=PRECISION)
        acc_sig += tl.dot(p * p, _load_rows(SV, base, cols, n, D, D_PAD), input_precision=PRECISION)
    _store_rows(OMU, base, acc_mu, rows, n, D, D_PAD)
    _store_rows(OSIG, base, acc_sig, rows, n, D, D_PAD)


@triton.jit
def _w2_out_bwd(
    P,
    MV,
    SV,
    DOMU,
    DOSIG,
    KPM,
    SEED,
    DP,
    dropout_p,
    n,
    D,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    D_SLICE: tl.constexpr,
):
    """dL/dP = keep / (1 - p) o (dOmu muV^T + 2 P' o dOsig sigV^T) on the visible key blocks (scratch
    zero elsewhere; P is 0 on the invisible entries of those blocks, which the softmax backward uses).
    D_SLICE > 0: both products summed over D_SLICE-column slices read from memory, dOmu and dOsig never
    live whole (fp32 with dropout spilled 96-112 B per thread otherwise)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = bh * n * D
    if D_SLICE == 0:
        domu = _load_rows(DOMU, base, rows, n, D, D_PAD)
        dosig = _load_rows(DOSIG, base, rows, n, D, D_PAD)
    for j0 in range((start // BLOCK_N) * BLOCK_N, tl.minimum(pid_m * BLOCK_M + BLOCK_M, n), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < n) & (cols[None, :] < n)
        p = tl.load(P + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        if D_SLICE == 0:
            dp = tl.dot(domu, tl.trans(_load_rows(MV, base, cols, n, D, D_PAD)), input_precision=PRECISION)
            dsq = tl.dot(dosig, tl.trans(_load_rows(SV, base, cols, n, D, D_PAD)), input_precision=PRECISION)
        else:
            dp = _sliced_dot(DOMU, MV, base, rows, cols, n, D, D_PAD, D_SLICE, PRECISION)
            dsq = _sliced_dot(DOSIG, SV, base, rows, cols, n, D, D_PAD, D_SLICE, PRECISION)
        if DROPOUT:
            keep = _dropout_keep(SEED, bh, rows, cols, n, dropout_p)
            dp = tl.where(keep, (dp + 2.0 * p / (1.0 - dropout_p) * dsq) / (1.0 - dropout_p), 0.0)
        else:
            dp += 2.0 * p * dsq
        tl.store(DP + bh * n * n + rows[:, None] * n + cols[None, :], dp, mask=inside)


@triton.jit
def _w2_out_bwd_values(
    P,
    DOMU,
    DOSIG,
    KPM,
    SEED,
    DMV,
    DSV,
    dropout_p,
    n,
    D,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """dmuV = P'^T dOmu, dsigV = (P' o P')^T dOsig, one program per block of key rows (queries i >= j)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    base = bh * n * D
    acc_mu = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    acc_sig = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for i0 in range((tl.maximum(pid_n * BLOCK_N, start) // BLOCK_M) * BLOCK_M, n, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        p = tl.load(
            P + bh * n * n + rows[:, None] * n + cols[None, :],
            mask=(rows[:, None] < n) & (cols[None, :] < n),
            other=0.0,
        )
        if DROPOUT:
            p = tl.where(_dropout_keep(SEED, bh, rows, cols, n, dropout_p), p / (1.0 - dropout_p), 0.0)
        acc_mu += tl.dot(tl.trans(p), _load_rows(DOMU, base, rows, n, D, D_PAD), input_precision=PRECISION)
        acc_sig += tl.dot(tl.trans(p * p), _load_rows(DOSIG, base, rows, n, D, D_PAD), input_precision=PRECISION)
    _store_rows(DMV, base, acc_mu, cols, n, D, D_PAD)
    _store_rows(DSV, base, acc_sig, cols, n, D, D_PAD)


@triton.jit
def _w2_probs_bwd(
    A,
    DA,
    MQ,
    SQ,
    MK,
    SK,
    KPM,
    DMQ,
    DSQ,
    scale,
    n,
    D,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    REFINE_SCORES: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """dW2 = -scale dS (dS the softmax backward of A applied to dA) in place of dA, zero outside the
    visible blocks, and the query side's gradients: dmuQ = 2 (muQ rowsum(dW2) - dW2 muK),
    dsigQ = rowsum(dW2) - (dW2 sqrtK) / sqrtQ (no gradient through a clamped covariance)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    base = bh * n * D
    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n)
    row_dot = tl.zeros([BLOCK_M], tl.float32)
    if not REFINE_SCORES:
        for j0 in range(lo, hi, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            inside = row_ok[:, None] & (cols[None, :] < n)
            a = tl.load(A + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
            da = tl.load(DA + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
            row_dot += tl.sum(a * da, 1)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    dw2_mk = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    dw2_rk = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = row_ok[:, None] & (cols[None, :] < n)
        da = tl.load(DA + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        if REFINE_SCORES:
            ds = tl.where(vis, da, 0.0)
        else:
            a = tl.load(A + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
            ds = tl.where(vis, a * (da - row_dot[:, None]), 0.0)
        dw2 = -ds * scale
        tl.store(DA + bh * n * n + rows[:, None] * n + cols[None, :], dw2, mask=inside)
        mk, rk, _ = _w2_gaussians(MK, SK, base, cols, n, D, D_PAD)
        row_sum += tl.sum(dw2, 1)
        dw2_mk += tl.dot(dw2, mk, input_precision=PRECISION)
        dw2_rk += tl.dot(dw2, rk, input_precision=PRECISION)
    _zero_outside(DA, bh, rows, lo, hi, n, BLOCK_M, BLOCK_N)  # the key side reads whole columns
    dmask = (tl.arange(0, D_PAD) < D)[None, :]
    mq = _load_rows(MQ, base, rows, n, D, D_PAD)
    sq = _load_rows(SQ, base, rows, n, D, D_PAD)
    rq = _sqrt_cov(sq, dmask)
    through_q = tl.where(dmask & (sq >= _CLAMP), 1.0 / tl.where(rq > 0, rq, 1.0), 0.0)
    _store_rows(DMQ, base, 2.0 * (mq * row_sum[:, None] - dw2_mk), rows, n, D, D_PAD)
    _store_rows(DSQ, base, row_sum[:, None] - dw2_rk * through_q, rows, n, D, D_PAD)


@triton.jit
def _w2_probs_bwd_keys(
    DW2,
    MQ,
    SQ,
    MK,
    SK,
    KPM,
    DMK,
    DSK,
    n,
    D,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """The key side from _w2_probs_bwd's dW2: dmuK = 2 (muK colsum(dW2) - dW2^T muQ),
    dsigK = colsum(dW2) - (dW2^T sqrtQ) / sqrtK, one program per block of keys (queries i >= j)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    base = bh * n * D
    col_sum = tl.zeros([BLOCK_N], tl.float32)
    dw2_mq = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dw2_rq = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for i0 in range((tl.maximum(pid_n * BLOCK_N, start) // BLOCK_M) * BLOCK_M, n, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        dw2 = tl.load(
            DW2 + bh * n * n + rows[:, None] * n + cols[None, :],
            mask=(rows[:, None] < n) & (cols[None, :] < n),
            other=0.0,
        )
        mq, rq, _ = _w2_gaussians(MQ, SQ, base, rows, n, D, D_PAD)
        col_sum += tl.sum(dw2, 0)
        dw2_mq += tl.dot(tl.trans(dw2), mq, input_precision=PRECISION)
        dw2_rq += tl.dot(tl.trans(dw2), rq, input_precision=PRECISION)
    dmask = (tl.arange(0, D_PAD) < D)[None, :]
    mk = _load_rows(MK, base, cols, n, D, D_PAD)
    sk = _load_rows(SK, base, cols, n, D, D_PAD)
    rk = _sqrt_cov(sk, dmask)
    through_k = tl.where(dmask & (sk >= _CLAMP), 1.0 / tl.where(rk > 0, rk, 1.0), 0.0)
    _store_rows(DMK, base, 2.0 * (mk * col_sum[:, None] - dw2_mq), cols, n, D, D_PAD)
    _store_rows(DSK, base, col_sum[:, None] - dw2_rq * through_k, cols, n, D, D_PAD)


# ---------------------------------------------------------------------------------------------- launcher


def _backward_meta(L: _Launch, mechanism: str) -> dict:
    """Launch options of the fused backward that depend on the dtype and the target: staged through scratch
    where registers spill (_stages_backward with extra_live_tiles: the covariance path's second product
    makes this family's plain backward spill 64-160 B in registers in half precision on sm_80), with the
    logits and dP summed over 32-column slices of d (16 on pre-Hopper targets, where 32 spills 370-450 B)
    and the (n, n) products over _staged_k_slice. In registers, maxnreg bounds the kernel on pre-Hopper
    targets, where ptxas otherwise drops it to 32 registers and KBs of stack (on sm_90 the bound spills
    more than ptxas's own choice); bench/results/kernel_resources.md."""
    arch = _target_arch(L.device)
    pre_hopper = arch is not None and arch < 90
    if _stages_backward(L, mechanism, extra_live_tiles=True):
        return dict(STAGED=True, D_SLICE=min(16 if pre_hopper else 32, _pad(L.d)), K_SLICE=_staged_k_slice(L))
    return dict(STAGED=False, D_SLICE=0, **({"maxnreg": MAX_REGISTERS} if pre_hopper else {}))


def triton_reasons(inputs) -> list[str]:
    """What the triton row's table cannot say: M_stoc's row Gaussians have at most TRITON_MAX_N columns."""
    w = inputs.weights.get("w_mu")
    if w is not None and w.shape[-1] > TRITON_MAX_N:
        return [f"w_mu has {w.shape[-1]} columns; the Triton kernels take at most {TRITON_MAX_N}"]
    return []


def uses_fused_kernels(n: int) -> bool:
    """Whether a call of length n runs the fused single-program kernels (else the tiled ones)."""
    return n <= W2_FUSED_MAX_N


def _check_length(L: _Launch) -> None:
    if L.n > TRITON_MAX_N:  # the capability row keeps such calls away; this guards direct calls
        raise ValueError(f"n: the Triton W2 kernels take n <= {TRITON_MAX_N}, got {L.n}")


def _tiled_meta(L: _Launch, d: int) -> dict:
    """Meta-parameters of the tiled kernels for Gaussians of width d (d_h; r for M_stoc's row Gaussians):
    tiles of at most 32 rows even for short sequences (M_stoc runs tiled at every n), where whole 64-row
    tiles with their (64, d) Gaussians spilled up to 2.2 KB per thread in fp32."""
    bm, bn, _ = _blocks(max(L.n, 65), d)  # 32 x 32 (16 x 16 for d > 128)
    bm, bn = min(bm, L.n_pad), min(bn, L.n_pad)
    return dict(
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        PRECISION=L.precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        D_PAD=_pad(d),
        num_warps=8,  # 4 warps spilled 8-168 B per thread in fp32 (sm_80 and sm_90); 8 spill nothing
    )


def _launch_fused_fwd(L: _Launch, mq, sq, mk, sk, mv, sv, m1, w_rv, seed, options):
    mechanism, scale, refine_scale, refine_scores, dropout_p = options
    omu, osig = torch.empty_like(mq), torch.empty_like(mq)
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    staged = _stages_forward(L)
    slots = staged_slots(mechanism) + 1 if staged else 0  # the refinement's, and one for P' o P'
    ws = torch.empty(L.bh * slots * L.n_pad**2, dtype=torch.float32, device=L.device) if staged else omu
    launch(
        _w2_fused_fwd,
        (L.bh,),
        mq,
        sq,
        mk,
        sk,
        mv,
        sv,
        mq if m1 is None else m1,
        mq if w_rv is None else w_rv,
        L.kpm,
        seed,
        omu,
        osig,
        ws,
        scale,
        alpha,
        beta,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        _head_stride(m1),
        _head_stride(w_rv),
        D_SLICE=min(16, _pad(L.d)) if staged or mechanism != "value" else 0,  # "value" sliced spills 120 B on sm_90
        STAGED=staged,
        SLOTS=slots,
        **_fused_meta(L, mechanism, refine_scores),
    )
    return omu, osig


def _launch_fused_bwd(L: _Launch, grad_mu, grad_sig, inputs, m1, w_rv, seed, options):
    mechanism, scale, refine_scale, refine_scores, dropout_p = options
    grads = [torch.empty_like(x) for x in inputs]
    dm1_part = L.scratch_uninitialised() if m1 is not None else None
    dwrv_part = L.scratch_uninitialised() if w_rv is not None else None
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    meta = _backward_meta(L, mechanism)
    slots = staged_slots(mechanism) + 1 if meta["STAGED"] else 0  # the refinement's, and one for P' o P'
    ws = torch.empty(L.bh * slots * L.n_pad**2, dtype=torch.float32, device=L.device) if slots else grads[0]
    launch(
        _w2_fused_bwd,
        (L.bh,),
        *inputs,
        inputs[0] if m1 is None else m1,
        inputs[0] if w_rv is None else w_rv,
        L.kpm,
        seed,
        grad_mu,
        grad_sig,
        *grads,
        grads[0] if dm1_part is None else dm1_part,
        grads[0] if dwrv_part is None else dwrv_part,
        ws,
        scale,
        alpha,
        beta,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        _head_stride(m1),
        _head_stride(w_rv),
        SLOTS=slots,
        **meta,
        **_fused_meta(L, mechanism, refine_scores),
    )
    return grads, dm1_part, dwrv_part


def _launch_w2_probs(L: _Launch, mq, sq, mk, sk, scale, refine_scores):
    """masked softmax(-W2sq(q, k) * scale) (or the masked scores) as (B, H, n, n) float32."""
    a = L.scratch()
    d = mq.shape[-1]
    meta = _tiled_meta(L, d)
    launch(
        _w2_probs_fwd,
        L.grid_rows(meta["BLOCK_M"]),
        mq,
        sq,
        mk,
        sk,
        L.kpm,
        a,
        scale,
        L.n,
        d,
        L.heads,
        REFINE_SCORES=refine_scores,
        D_BLOCK=min(meta["D_PAD"], W2_PROBS_D_BLOCK),
        **meta,
    )
    return a


def _launch_w2_out(L: _Launch, p, mv, sv, seed, dropout_p):
    omu, osig = torch.empty_like(mv), torch.empty_like(mv)
    meta = _tiled_meta(L, L.d)
    launch(
        _w2_out_fwd,
        L.grid_rows(meta["BLOCK_M"]),
        p,
        mv,
        sv,
        L.kpm,
        seed,
        omu,
        osig,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        DROPOUT=dropout_p > 0,
        **meta,
    )
    return omu, osig


def _launch_w2_out_bwd(L: _Launch, grad_mu, grad_sig, p, mv, sv, seed, dropout_p):
    """(dL/dP float32 scratch, dmuV, dsigV)."""
    dp = L.scratch()
    dmv, dsv = torch.empty_like(mv), torch.empty_like(sv)
    meta = _tiled_meta(L, L.d)
    launch(
        _w2_out_bwd,
        L.grid_rows(meta["BLOCK_M"]),
        p,
        mv,
        sv,
        grad_mu,
        grad_sig,
        L.kpm,
        seed,
        dp,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        DROPOUT=dropout_p > 0,
        D_SLICE=32 if L.precision == "tf32x3" else 0,
        **meta,
    )
    launch(
        _w2_out_bwd_values,
        (_cdiv(L.n, meta["BLOCK_N"]), L.bh),
        p,
        grad_mu,
        grad_sig,
        L.kpm,
        seed,
        dmv,
        dsv,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        DROPOUT=dropout_p > 0,
        **meta,
    )
    return dp, dmv, dsv


def _launch_w2_probs_bwd(L: _Launch, a, da, mq, sq, mk, sk, scale, refine_scores):
    """(dmuQ, dsigQ, dmuK, dsigK) from dL/dA (float32, overwritten with dL/dW2sq)."""
    dmq, dsq, dmk, dsk = (torch.empty_like(x) for x in (mq, sq, mk, sk))
    d = mq.shape[-1]
    meta = _tiled_meta(L, d)
    launch(
        _w2_probs_bwd,
        L.grid_rows(meta["BLOCK_M"]),
        a,
        da,
        mq,
        sq,
        mk,
        sk,
        L.kpm,
        dmq,
        dsq,
        scale,
        L.n,
        d,
        L.heads,
        REFINE_SCORES=refine_scores,
        **meta,
    )
    launch(
        _w2_probs_bwd_keys,
        (_cdiv(L.n, meta["BLOCK_N"]), L.bh),
        da,
        mq,
        sq,
        mk,
        sk,
        L.kpm,
        dmk,
        dsk,
        L.n,
        d,
        L.heads,
        **meta,
    )
    return dmq, dsq, dmk, dsk


def _stoc_gaussians(a, w_mu, w_sigma):
    """M_stoc's row Gaussians (SPEC §3): G_mu = A W_mu and Z = A W_sigma (sigma = ELU(Z) + 1), float32
    (B, H, n, r); two GEMMs over the written-out A (its zero upper triangle and padding included)."""
    return torch.matmul(a, _as_head_weight(w_mu)), torch.matmul(a, _as_head_weight(w_sigma))


def _as_head_weight(w):
    """(n, r) shared or (H, n, r) per head, as a float32 operand that broadcasts against (B, H, n, n), its
    columns zero-padded to a multiple of 16: a padded column gives G_mu 0 and sigma = ELU(0) + 1 = 1 on
    both sides, so it adds exactly 0 to W2sq (0 + 1 + 1 - 2 sqrt(1) sqrt(1)) and gets no gradient, and the
    score kernels see a width divisible by 16 (aligned rows: 568 -> 64 B of spills at r = 50, sm_90)."""
    w = w.float()
    if w.shape[-1] % 16:
        w = F.pad(w, (0, 16 - w.shape[-1] % 16))
    return w if w.dim() == 2 else w[None]


def _stoc_probs_forward(L: _Launch, a, w_mu, w_sigma, refine_scale):
    """P = masked softmax(-c W2sq(row Gaussians of A)): the W2 score kernel with the row Gaussians as both
    queries and keys. (P, G_mu, Z)."""
    g_mu, z = _stoc_gaussians(a, w_mu, w_sigma)
    g_sig = F.elu(z) + 1.0
    return _launch_w2_probs(L, g_mu, g_sig, g_mu, g_sig, refine_scale, False), g_mu, z


def _stoc_probs_backward(L: _Launch, dp, a, p, g_mu, z, w_mu, w_sigma, refine_scale):
    """_stoc_probs_forward's backward from dL/dP (float32, overwritten): (dA, dW_mu, dW_sigma). The row
    Gaussians are both sides of the score, so their gradient is the query side's plus the key side's."""
    g_sig = F.elu(z) + 1.0
    dgq, dsq, dgk, dsk = _launch_w2_probs_bwd(L, p, dp, g_mu, g_sig, g_mu, g_sig, refine_scale, False)
    d_mu = dgq.add_(dgk)
    d_z = dsq.add_(dsk).mul_(torch.where(z > 0, 1.0, torch.exp(z)))  # ELU'(z) = exp(z) below 0
    da = torch.matmul(d_mu, _as_head_weight(w_mu).transpose(-1, -2))
    da.add_(torch.matmul(d_z, _as_head_weight(w_sigma).transpose(-1, -2)))
    r = w_mu.shape[-1]  # the padded columns' gradients are dropped
    dw_mu = _reduce_over_batch(a, d_mu[..., :r], w_mu.dim() == 3).to(w_mu.dtype)
    dw_sigma = _reduce_over_batch(a, d_z[..., :r], w_sigma.dim() == 3).to(w_sigma.dtype)
    return da, dw_mu, dw_sigma


# ------------------------------------------------------------------------------------------------- entry


def _forward(mq, sq, mk, sk, mv, sv, w_rq, w_rk, w_rv, w_mu, w_sigma, key_padding_mask, seed, *options):
    """(mu_out, sig_out, M, A, T, U, R, P): the fused path saves its inputs and M only (no second GEMM in
    the backward); the tiled one also the float32 weights its backward reads, None where unused. M_stoc
    (always tiled) keeps its row Gaussians' G_mu = A W_mu in T's place and Z = A W_sigma in U's."""
    mechanism, scale, refine_scale, refine_scores, dropout_p = options
    L = _Launch(mq, key_padding_mask, mechanism, dropout_p)
    _check_length(L)
    if mechanism == "stoc":
        a = _launch_w2_probs(L, mq, sq, mk, sk, scale, refine_scores)
        p, g_mu, z = _stoc_probs_forward(L, a, w_mu, w_sigma, refine_scale)
        omu, osig = _launch_w2_out(L, p, mv, sv, seed, dropout_p)
        return omu, osig, None, a, g_mu, z, None, p
    m1 = refinement_matrix(mechanism, w_rq, w_rk)
    if uses_fused_kernels(L.n):
        omu, osig = _launch_fused_fwd(L, mq, sq, mk, sk, mv, sv, m1, w_rv, seed, options)
        return omu, osig, m1, None, None, None, None, None
    a = _launch_w2_probs(L, mq, sq, mk, sk, scale, refine_scores)
    p, t, u, r = (a, None, None, None) if m1 is None else refine_probs_forward(L, a, m1, w_rv, mechanism, refine_scale)
    omu, osig = _launch_w2_out(L, p, mv, sv, seed, dropout_p)
    return omu, osig, m1, a, t, u, r, None if m1 is None else p


def _backward(
    grad_mu,
    grad_sig,
    mq,
    sq,
    mk,
    sk,
    mv,
    sv,
    w_rq,
    w_rk,
    w_rv,
    w_mu,
    w_sigma,
    key_padding_mask,
    seed,
    omu,
    osig,
    m1,
    a,
    t,
    u,
    r,
    p,
    mechanism,
    scale,
    refine_scale,
    refine_scores,
    dropout_p,
):
    """(dmu_q, dsig_q, dmu_k, dsig_k, dmu_v, dsig_v, dW_RQ, dW_RK, dW_RV, dW_mu, dW_sigma), the weights'
    None when unused."""
    options = (mechanism, scale, refine_scale, refine_scores, dropout_p)
    m1 = m1 if m1 is not None and m1.numel() else None  # the custom op saves None as an empty tensor
    L = _Launch(mq, key_padding_mask, mechanism, dropout_p)
    grad_mu, grad_sig = grad_mu.contiguous(), grad_sig.contiguous()
    inputs = (mq, sq, mk, sk, mv, sv)
    if mechanism == "stoc":
        dp, dmv, dsv = _launch_w2_out_bwd(L, grad_mu, grad_sig, p, mv, sv, seed, dropout_p)
        da, dw_mu, dw_sigma = _stoc_probs_backward(L, dp, a, p, t, u, w_mu, w_sigma, refine_scale)
        dmq, dsq, dmk, dsk = _launch_w2_probs_bwd(L, a, da, mq, sq, mk, sk, scale, refine_scores)
        return dmq, dsq, dmk, dsk, dmv, dsv, None, None, None, dw_mu, dw_sigma
    if uses_fused_kernels(L.n):
        grads, dm1_part, dwrv_part = _launch_fused_bwd(L, grad_mu, grad_sig, inputs, m1, w_rv, seed, options)
        if m1 is None:
            return (*grads, None, None, None, None, None)
        return (*grads, *refinement_weight_grads(L, mechanism, dm1_part, dwrv_part, w_rq, w_rk, w_rv), None, None)
    p = a if m1 is None else p
    dp, dmv, dsv = _launch_w2_out_bwd(L, grad_mu, grad_sig, p, mv, sv, seed, dropout_p)
    dm1 = dw_rv = None
    if m1 is None:
        da = dp
    else:
        w_rv = w_rv if w_rv is not None and w_rv.numel() else None
        da, dm1, dw_rv = refine_probs_backward(L, dp, a, t, u, r, p, m1, w_rv, mechanism, refine_scale)
    dmq, dsq, dmk, dsk = _launch_w2_probs_bwd(L, a, da, mq, sq, mk, sk, scale, refine_scores)
    return (dmq, dsq, dmk, dsk, dmv, dsv, *refinement_factor_grads(mechanism, dm1, w_rq, w_rk), dw_rv, None, None)


def _fake_forward(mq, sq, mk, sk, mv, sv, w_rq, w_rk, w_rv, w_mu, w_sigma, key_padding_mask, seed, mechanism, *options):
    """The shapes of _forward's results for torch.compile; empty where unused."""
    batch, heads, n, _ = mq.shape

    def empty():
        return mq.new_empty(0, dtype=torch.float32)

    def square():
        return mq.new_empty(batch, heads, n, n, dtype=torch.float32)

    if mechanism == "stoc":
        rows = mq.new_empty(batch, heads, n, -(-w_mu.shape[-1] // 16) * 16, dtype=torch.float32)  # padded
        return (
            torch.empty_like(mq),
            torch.empty_like(mq),
            empty(),
            square(),
            rows,
            torch.empty_like(rows),
            empty(),
            square(),
        )
    m1 = refinement_matrix(mechanism, w_rq, w_rk)  # fake tensors: only its shape and dtype are computed
    outs = (torch.empty_like(mq), torch.empty_like(mq), empty() if m1 is None else m1)
    if uses_fused_kernels(n):
        return (*outs, empty(), empty(), empty(), empty(), empty())
    if m1 is None:
        return (*outs, square(), empty(), empty(), empty(), empty())
    value = mechanism == "value"
    return (*outs, square(), square(), square() if value else empty(), square() if value else empty(), square())


# ------------------------------------------------------------------------ custom ops and autograd function

#: awr_fast::w2_refined_fwd / _bwd for torch.compile, an autograd.Function for eager calls (kernels/_op.py)
W2_REFINED = TritonOp(
    "w2_refined",
    tensors=(
        *("mu_q", "sig_q", "mu_k", "sig_k", "mu_v", "sig_v"),
        *("w_rq?", "w_rk?", "w_rv?", "w_mu?", "w_sigma?", "key_padding_mask?", "seed"),
    ),
    options=(
        ("mechanism", "str"),
        ("scale", "float"),
        ("refine_scale", "float"),
        ("refine_scores", "bool"),
        ("dropout_p", "float"),
    ),
    differentiable=("mu_q", "sig_q", "mu_k", "sig_k", "mu_v", "sig_v", "w_rq", "w_rk", "w_rv", "w_mu", "w_sigma"),
    forward=_forward,
    backward=_backward,
    fake_forward=_fake_forward,
    outputs=2,
)


# ----------------------------------------------------------------------------------------- public entry


def w2_refined(
    mu_q,
    sig_q,
    mu_k,
    sig_k,
    mu_v,
    sig_v,
    *,
    mechanism="none",
    w_rq=None,
    w_rk=None,
    w_rv=None,
    w_mu=None,
    w_sigma=None,
    key_padding_mask=None,
    scale=None,
    refine_scale=None,
    refine_input="probs",
    dropout_p=0.0,
):
    """Same contract as awr_fast.reference.w2_refined.w2_refined (inputs validated by the API; what runs here
    is the triton row of awr_fast.ops.w2_refined.CAPABILITIES: n <= TRITON_MAX_N, stoc's r <= TRITON_MAX_N)."""
    d_h = mu_q.shape[-1]
    scale = default_scale(d_h) if scale is None else float(scale)
    refine_scale = default_scale(d_h) if refine_scale is None else float(refine_scale)
    tensors = [x.contiguous() for x in (mu_q, sig_q, mu_k, sig_k, mu_v, sig_v)]
    w_rv = None if w_rv is None else w_rv.contiguous()
    seed = dropout_seed(dropout_p, mu_q)
    options = (mechanism, scale, refine_scale, refine_input == "scores", float(dropout_p))
    return W2_REFINED(*tensors, w_rq, w_rk, w_rv, w_mu, w_sigma, key_padding_mask, seed, *options)
