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
of dM (and dW_RV), which one torch sum reduces. Longer sequences and M_stoc run on the eager backend
(awr_fast.ops.w2_refined.CAPABILITIES says so).
    _w2_fused_fwd / _w2_fused_bwd    the two kernels; _w2_window_* do the work for one window size
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from awr_fast.ops.w2_refined import SQRT_CLAMP, TRITON_MAX_N, default_scale

from ._common import (
    MAX_REGISTERS,
    _dropout_keep,
    _fused_meta,
    _head_stride,
    _Launch,
    _load_rows,
    _masked_softmax_rows,
    _program_sequence,
    _refine_coefficients,
    _store_rows,
    _store_zero_rows,
    _sum_partials,
    _visible,
    dropout_seed,
    refinement_factor_grads,
    refinement_matrix,
)
from ._launch import launch
from ._op import TritonOp
from ._refine import _refine_window, _refine_window_bwd

W2_FUSED_MAX_N = TRITON_MAX_N  # every length the Triton W2 family takes runs fused
_CLAMP = tl.constexpr(SQRT_CLAMP)  # a jit function may read a module global only as a constexpr


# ------------------------------------------------------------------------------------------- jit kernels


@triton.jit
def _sqrt_cov(sig, dmask):
    """sqrt(max(sigma, clamp)) on the real columns (dmask), 0 on the padded ones."""
    return tl.where(dmask, tl.sqrt(tl.maximum(sig, _CLAMP)), 0.0)


@triton.jit
def _w2_logits(MQ, SQ, MK, SK, base, idx, n, D, scale, PRECISION: tl.constexpr, D_PAD: tl.constexpr):
    """-W2sq(Q_i, K_j) * scale on one window (SPEC §4's fused form)."""
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
):
    """(A, T, U, R, P, vis) of one window, as _window_recompute of the dot family."""
    idx = off + tl.arange(0, TILE)
    s = _w2_logits(MQ, SQ, MK, SK, bh * n * D, idx, n, D, scale, PRECISION, D_PAD)
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
    )
    if DROPOUT:  # STOSA drops P before both products: sig_out uses the dropped P squared
        p = tl.where(_dropout_keep(SEED, bh, idx, idx, n, dropout_p), p / (1.0 - dropout_p), 0.0)
    omu = tl.dot(p, _load_rows(MV, base, idx, n, D, D_PAD), input_precision=PRECISION)
    _store_rows(OMU, base, omu, idx, n, D, D_PAD)
    osig = tl.dot(p * p, _load_rows(SV, base, idx, n, D, D_PAD), input_precision=PRECISION)
    _store_rows(OSIG, base, osig, idx, n, D, D_PAD)
    _store_zero_rows(OMU, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(OSIG, base, off, n, D, TILE, D_PAD)


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
        )


# ---------------------------------------------------------------------------------------------- launcher


_REGISTER_BOUND: dict = {}  # device -> launch options of the backward (host cost: one lookup a call)


def _register_bound(device: torch.device) -> dict:
    """maxnreg for the fused backward on pre-Hopper targets, where ptxas otherwise drops the fp32 refined
    backward to 32 registers and 12-17 KB of stack per thread (the bound leaves 4.5-5.2 KB); on sm_90 the
    bound spills more than ptxas's own choice, so it is left out there (bench/results/kernel_resources.md).
    The target is Triton's active one (the GPU, or bench/kernel_resources.py's stand-in)."""
    key = (device.type, device.index)
    if key not in _REGISTER_BOUND:
        try:
            arch = triton.runtime.driver.active.get_current_target().arch
        except Exception:  # the interpreter, or no driver: nothing to bound
            arch = None
        _REGISTER_BOUND[key] = {"maxnreg": MAX_REGISTERS} if isinstance(arch, int) and arch < 90 else {}
    return _REGISTER_BOUND[key]


def _check_length(L: _Launch) -> None:
    if L.n > W2_FUSED_MAX_N:  # the capability row keeps such calls away; this guards direct calls
        raise ValueError(f"n: the Triton W2 kernels take n <= {W2_FUSED_MAX_N}, got {L.n}")


def _forward(mq, sq, mk, sk, mv, sv, w_rq, w_rk, w_rv, key_padding_mask, seed, *options):
    """(mu_out, sig_out, M): the fused forward saves its inputs and M (no second GEMM in the backward)."""
    mechanism, scale, refine_scale, refine_scores, dropout_p = options
    L = _Launch(mq, key_padding_mask, mechanism, dropout_p)
    m1 = refinement_matrix(mechanism, w_rq, w_rk)
    _check_length(L)
    omu, osig = torch.empty_like(mq), torch.empty_like(mq)
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
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
        scale,
        alpha,
        beta,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        _head_stride(m1),
        _head_stride(w_rv),
        **_fused_meta(L, mechanism, refine_scores),
    )
    return omu, osig, m1


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
    key_padding_mask,
    seed,
    omu,
    osig,
    m1,
    mechanism,
    scale,
    refine_scale,
    refine_scores,
    dropout_p,
):
    """(dmu_q, dsig_q, dmu_k, dsig_k, dmu_v, dsig_v, dW_RQ, dW_RK, dW_RV), the weights' None when unused."""
    m1 = m1 if m1 is not None and m1.numel() else None  # the custom op saves None as an empty tensor
    L = _Launch(mq, key_padding_mask, mechanism, dropout_p)
    grads = [torch.empty_like(x) for x in (mq, sq, mk, sk, mv, sv)]
    dm1_part = L.scratch_uninitialised() if m1 is not None else None
    dwrv_part = L.scratch_uninitialised() if w_rv is not None else None
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    launch(
        _w2_fused_bwd,
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
        grad_mu.contiguous(),
        grad_sig.contiguous(),
        *grads,
        grads[0] if dm1_part is None else dm1_part,
        grads[0] if dwrv_part is None else dwrv_part,
        scale,
        alpha,
        beta,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        _head_stride(m1),
        _head_stride(w_rv),
        **_fused_meta(L, mechanism, refine_scores),
        **_register_bound(L.device),
    )
    dm1 = None if m1 is None else _sum_partials(dm1_part, m1.dim() == 3, m1.dtype)
    dw_rv = None if w_rv is None else _sum_partials(dwrv_part, w_rv.dim() == 3, w_rv.dtype)
    return (*grads, *refinement_factor_grads(mechanism, dm1, w_rq, w_rk), dw_rv)


def _fake_forward(mq, sq, mk, sk, mv, sv, w_rq, w_rk, w_rv, key_padding_mask, seed, mechanism, *options):
    m1 = refinement_matrix(mechanism, w_rq, w_rk)  # fake tensors: only its shape and dtype are computed
    return torch.empty_like(mq), torch.empty_like(mq), mq.new_empty(0, dtype=torch.float32) if m1 is None else m1


# ------------------------------------------------------------------------ custom ops and autograd function

#: awr_fast::w2_refined_fwd / _bwd for torch.compile, an autograd.Function for eager calls (kernels/_op.py)
W2_REFINED = TritonOp(
    "w2_refined",
    tensors=("mu_q", "sig_q", "mu_k", "sig_k", "mu_v", "sig_v", "w_rq?", "w_rk?", "w_rv?", "key_padding_mask?", "seed"),
    options=(
        ("mechanism", "str"),
        ("scale", "float"),
        ("refine_scale", "float"),
        ("refine_scores", "bool"),
        ("dropout_p", "float"),
    ),
    differentiable=("mu_q", "sig_q", "mu_k", "sig_k", "mu_v", "sig_v", "w_rq", "w_rk", "w_rv"),
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
    is the triton row of awr_fast.ops.w2_refined.CAPABILITIES: no stoc, n <= W2_FUSED_MAX_N)."""
    if mechanism == "stoc" or w_mu is not None or w_sigma is not None:
        raise ValueError("mechanism: the Triton W2 kernels take none, simp, add or value, got 'stoc'")
    d_h = mu_q.shape[-1]
    scale = default_scale(d_h) if scale is None else float(scale)
    refine_scale = default_scale(d_h) if refine_scale is None else float(refine_scale)
    tensors = [x.contiguous() for x in (mu_q, sig_q, mu_k, sig_k, mu_v, sig_v)]
    w_rv = None if w_rv is None else w_rv.contiguous()
    seed = dropout_seed(dropout_p, mu_q)
    options = (mechanism, scale, refine_scale, refine_input == "scores", float(dropout_p))
    return W2_REFINED(*tensors, w_rq, w_rk, w_rv, key_padding_mask, seed, *options)
