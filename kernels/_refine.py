"""The refinement passes on a family's first-order weights A (SPEC §3b), shared by every Triton family.

Per (batch, head), with M = W_RQ W_RK^T (M^T for "add"):
    simp   B = c A M A^T
    add    B = (c A M^T A^T + A) / 2
    value  R = softmax(c A M A^T),   B = R (A W_RV)
    out = dropout(softmax(mask(B))) V
With T = A M as "queries" and the rows of A as "keys", B_ij = c T_i . A_j (+ beta A_ij), so the second
softmax and P V (or R U for "value") run as a flash-style online-softmax pass that never materialises B.

Fused windows (n <= the fused limit): _refine_window / _refine_window_bwd, inlined into a family's
single-program kernels after its own A. Tiled (longer n; float32 scratch; loops start at the sequence's
first real position):
    _tril_matmul        C (+)= X W for X lower triangular from `start` (T = A M1, U = A W_RV, dA += dT M1^T)
    _flash_fwd          online softmax of alpha Xq Xk^T + beta*bias over causal key blocks, times Y
    _value_out_fwd      out = softmax(mask(Bv)) V for "value", two passes
    _value_out_bwd      dBv and the dropped P3 for "value"
    _flash_bwd_dkdv     dXk, dY of the flash pass (grid over key blocks)
    _flash_bwd_dq       dXq (and beta*dB into dA) of the flash pass (grid over query blocks)
refine_forward / refine_backward run them from A to the output and from the output's gradient to dA.
A family whose output is not one P V (W2's (P o P) V_sigma) takes P itself, written out:
    _softmax_probs_fwd  P = masked softmax(alpha Xq Xk^T + beta bias), two passes over key blocks
    _softmax_probs_bwd  P o (dP - rowsum(P o dP)) in place
refine_probs_forward / refine_probs_backward run them from A to P and from dP to dA.
After a fused backward: _weight_grads turns its per-program partials into dW_RQ, dW_RK, dW_RV (one launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    MAX_REGISTERS,
    _blocks,
    _cdiv,
    _dropout_keep,
    _dropped_pair,
    _first_real_position,
    _head_stride,
    _Launch,
    _load_rows,
    _load_square,
    _masked_softmax_rows,
    _pad,
    _probs_from_lse,
    _reduce_over_batch,
    _refine_coefficients,
    _sliced_dot,
    _slot_load,
    _slot_store,
    _staged_dot,
    _store_square_partial,
    _visible,
)
from ._launch import launch

# ------------------------------------------------------------------------------------------- jit kernels


@triton.jit
def _tril_matmul(
    X,
    W,
    C,
    KPM,
    n,
    H,
    w_head_stride,
    w_stride_r,
    w_stride_c,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    TRIANGULAR: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[i, c] (+)= sum_k X[i, k] W[k, c] for X zero before `start` (rows and cols) and, if TRIANGULAR,
    above the diagonal: the inner loop then stops at the row block's last row."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    m0 = pid_m * BLOCK_M
    # rows and columns before `start` are never read downstream (they meet zeros of A): skip them,
    # so the work per head is ~L^3 for a sequence of length L.
    if (m0 + BLOCK_M > start) & (pid_n * BLOCK_N + BLOCK_N > start):
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        k_end = n
        if TRIANGULAR:
            k_end = tl.minimum(m0 + BLOCK_M, n)
        for k0 in range((start // BLOCK_K) * BLOCK_K, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                X + bh * n * n + rows[:, None] * n + ks[None, :],
                mask=(rows[:, None] < n) & (ks[None, :] < n),
                other=0.0,
            )
            w = tl.load(
                W + h * w_head_stride + ks[:, None] * w_stride_r + cols[None, :] * w_stride_c,
                mask=(ks[:, None] < n) & (cols[None, :] < n),
                other=0.0,
            ).to(tl.float32)
            acc += tl.dot(x, w, input_precision=PRECISION)
        ptrs = C + bh * n * n + rows[:, None] * n + cols[None, :]
        inside = (rows[:, None] < n) & (cols[None, :] < n)
        if ACCUMULATE:
            acc += tl.load(ptrs, mask=inside, other=0.0)
        tl.store(ptrs, acc, mask=inside)


@triton.jit
def _flash_fwd(
    XQ,
    XK,
    Y,
    BIAS,
    KPM,
    SEED,
    O,
    LSE,
    alpha,
    beta,
    dropout_p,
    n,
    DI,
    DV,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DI_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    di = tl.arange(0, DI_PAD)
    dv = tl.arange(0, DV_PAD)
    xq = tl.load(
        XQ + bh * n * DI + rows[:, None] * DI + di[None, :], mask=(rows[:, None] < n) & (di[None, :] < DI), other=0.0
    ).to(tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for j0 in range((start // BLOCK_N) * BLOCK_N, tl.minimum(pid_m * BLOCK_M + BLOCK_M, n), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        xk = tl.load(
            XK + bh * n * DI + cols[:, None] * DI + di[None, :],
            mask=(cols[:, None] < n) & (di[None, :] < DI),
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(xq, tl.trans(xk), input_precision=PRECISION) * alpha
        if HAS_BIAS:
            s += beta * tl.load(
                BIAS + bh * n * n + rows[:, None] * n + cols[None, :],
                mask=(rows[:, None] < n) & (cols[None, :] < n),
                other=0.0,
            )
        s = tl.where(_visible(rows, cols, n, start, b, KPM, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        correction = tl.exp(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(SEED, bh, rows, cols, n, dropout_p), p / (1.0 - dropout_p), 0.0)
        y = tl.load(
            Y + bh * n * DV + cols[:, None] * DV + dv[None, :], mask=(cols[:, None] < n) & (dv[None, :] < DV), other=0.0
        ).to(tl.float32)
        acc = acc * correction[:, None] + tl.dot(p, y, input_precision=PRECISION)
        m_i = m_new
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(
        O + bh * n * DV + rows[:, None] * DV + dv[None, :],
        out.to(O.dtype.element_ty),
        mask=(rows[:, None] < n) & (dv[None, :] < DV),
    )
    tl.store(LSE + bh * n + rows, tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), 0.0), mask=rows < n)


@triton.jit
def _value_out_fwd(
    BV,
    V,
    KPM,
    SEED,
    O,
    LSE,
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
    """out = dropout(softmax(mask(Bv))) V; Bv is the (float32) result of the inner flash pass."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, D_PAD)
    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = tl.load(
            BV + bh * n * n + rows[:, None] * n + cols[None, :],
            mask=(rows[:, None] < n) & (cols[None, :] < n),
            other=0.0,
        )
        s = tl.where(_visible(rows, cols, n, start, b, KPM, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    has_key = l_i > 0
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = tl.load(
            BV + bh * n * n + rows[:, None] * n + cols[None, :],
            mask=(rows[:, None] < n) & (cols[None, :] < n),
            other=0.0,
        )
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        p = tl.where(vis, tl.exp(tl.where(vis, s - m_i[:, None], 0.0)) * inv_l[:, None], 0.0)
        if DROPOUT:
            p = tl.where(_dropout_keep(SEED, bh, rows, cols, n, dropout_p), p / (1.0 - dropout_p), 0.0)
        v = tl.load(
            V + bh * n * D + cols[:, None] * D + dcols[None, :],
            mask=(cols[:, None] < n) & (dcols[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(p, v, input_precision=PRECISION)
    tl.store(
        O + bh * n * D + rows[:, None] * D + dcols[None, :],
        acc.to(O.dtype.element_ty),
        mask=(rows[:, None] < n) & (dcols[None, :] < D),
    )
    tl.store(LSE + bh * n + rows, tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), 0.0), mask=rows < n)


@triton.jit
def _value_out_bwd(
    BV,
    V,
    DO,
    LSE,
    OUT,
    KPM,
    SEED,
    DBV,
    P3,
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
    """dBv = P3 o (dP3 - rowsum(dO o out)); also writes the dropped P3 for dV = P3^T dO."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, D_PAD)
    row_ok = rows < n
    do = tl.load(
        DO + bh * n * D + rows[:, None] * D + dcols[None, :], mask=row_ok[:, None] & (dcols[None, :] < D), other=0.0
    ).to(tl.float32)
    lse = tl.load(LSE + bh * n + rows, mask=row_ok, other=0.0)
    out = tl.load(
        OUT + bh * n * D + rows[:, None] * D + dcols[None, :], mask=row_ok[:, None] & (dcols[None, :] < D), other=0.0
    ).to(tl.float32)
    delta = tl.sum(do * out, 1)  # = rowsum(dP3 o P3), as in flash attention's backward
    for j0 in range((start // BLOCK_N) * BLOCK_N, tl.minimum(pid_m * BLOCK_M + BLOCK_M, n), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = row_ok[:, None] & (cols[None, :] < n)
        s = tl.load(BV + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        p = _probs_from_lse(s, lse, _visible(rows, cols, n, start, b, KPM, HAS_MASK))
        v = tl.load(
            V + bh * n * D + cols[:, None] * D + dcols[None, :],
            mask=(cols[:, None] < n) & (dcols[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        p_dropped, dp = _dropped_pair(p, dp, SEED, bh, rows, cols, n, dropout_p, DROPOUT)
        tl.store(DBV + bh * n * n + rows[:, None] * n + cols[None, :], p * (dp - delta[:, None]), mask=inside)
        tl.store(P3 + bh * n * n + rows[:, None] * n + cols[None, :], p_dropped, mask=inside)


@triton.jit
def _flash_bwd_dkdv(
    XQ,
    XK,
    Y,
    BIAS,
    KPM,
    SEED,
    DO,
    LSE,
    OUT,
    DXK,
    DY,
    alpha,
    beta,
    dropout_p,
    n,
    DI,
    DV,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DI_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    DI_SLICE: tl.constexpr,
    DV_SLICE: tl.constexpr,
):
    """DI_SLICE > 0: S = Xq Xk^T summed over slices of DI_SLICE columns read from memory, so the key block
    Xk is never live whole (the refined pass's DI is the padded length: a (BLOCK_N, 256) fp32 tile);
    DV_SLICE > 0: dP = dO Y^T the same way, Y never live whole."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    di = tl.arange(0, DI_PAD)
    dv = tl.arange(0, DV_PAD)
    col_ok = cols < n
    if DI_SLICE == 0:
        xk = _load_rows(XK, bh * n * DI, cols, n, DI, DI_PAD)
    if DV_SLICE == 0:
        y = _load_rows(Y, bh * n * DV, cols, n, DV, DV_PAD)
    dxk = tl.zeros([BLOCK_N, DI_PAD], tl.float32)
    dy = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    for i0 in range((tl.maximum(n0, start) // BLOCK_M) * BLOCK_M, n, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        xq = tl.load(
            XQ + bh * n * DI + rows[:, None] * DI + di[None, :], mask=row_ok[:, None] & (di[None, :] < DI), other=0.0
        ).to(tl.float32)
        do = tl.load(
            DO + bh * n * DV + rows[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0
        ).to(tl.float32)
        lse = tl.load(LSE + bh * n + rows, mask=row_ok, other=0.0)
        out = tl.load(
            OUT + bh * n * DV + rows[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0
        ).to(tl.float32)
        delta = tl.sum(do * out, 1)  # rowsum(dO o O), recomputed here instead of a separate pass
        if DI_SLICE == 0:
            s = tl.dot(xq, tl.trans(xk), input_precision=PRECISION) * alpha
        else:
            s = _sliced_dot(XQ, XK, bh * n * DI, rows, cols, n, DI, DI_PAD, DI_SLICE, PRECISION) * alpha
        if HAS_BIAS:
            s += beta * tl.load(
                BIAS + bh * n * n + rows[:, None] * n + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
            )
        p = _probs_from_lse(s, lse, _visible(rows, cols, n, start, b, KPM, HAS_MASK))
        if DV_SLICE == 0:
            dp = tl.dot(do, tl.trans(y), input_precision=PRECISION)
        else:
            dp = _sliced_dot(DO, Y, bh * n * DV, rows, cols, n, DV, DV_PAD, DV_SLICE, PRECISION)
        p_dropped, dp = _dropped_pair(p, dp, SEED, bh, rows, cols, n, dropout_p, DROPOUT)
        dy += tl.dot(tl.trans(p_dropped), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dxk += tl.dot(tl.trans(ds), xq, input_precision=PRECISION)
    tl.store(
        DXK + bh * n * DI + cols[:, None] * DI + di[None, :],
        (dxk * alpha).to(DXK.dtype.element_ty),
        mask=col_ok[:, None] & (di[None, :] < DI),
    )
    tl.store(
        DY + bh * n * DV + cols[:, None] * DV + dv[None, :],
        dy.to(DY.dtype.element_ty),
        mask=col_ok[:, None] & (dv[None, :] < DV),
    )


@triton.jit
def _flash_bwd_dq(
    XQ,
    XK,
    Y,
    BIAS,
    KPM,
    SEED,
    DO,
    LSE,
    OUT,
    DXQ,
    DBIAS,
    alpha,
    beta,
    dropout_p,
    n,
    DI,
    DV,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DI_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    DI_SLICE: tl.constexpr,
    DV_SLICE: tl.constexpr,
):
    """DI_SLICE, DV_SLICE > 0: S and dP summed over column slices read from memory, as in _flash_bwd_dkdv, so
    neither Xq nor dO is live whole across the loop."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    di = tl.arange(0, DI_PAD)
    dv = tl.arange(0, DV_PAD)
    row_ok = rows < n
    xq = tl.load(
        XQ + bh * n * DI + rows[:, None] * DI + di[None, :], mask=row_ok[:, None] & (di[None, :] < DI), other=0.0
    ).to(tl.float32)
    do = tl.load(
        DO + bh * n * DV + rows[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0
    ).to(tl.float32)
    lse = tl.load(LSE + bh * n + rows, mask=row_ok, other=0.0)
    out = tl.load(
        OUT + bh * n * DV + rows[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0
    ).to(tl.float32)
    delta = tl.sum(do * out, 1)
    dxq = tl.zeros([BLOCK_M, DI_PAD], tl.float32)
    for j0 in range((start // BLOCK_N) * BLOCK_N, tl.minimum(pid_m * BLOCK_M + BLOCK_M, n), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = row_ok[:, None] & (cols[None, :] < n)
        xk = _load_rows(XK, bh * n * DI, cols, n, DI, DI_PAD)
        if DV_SLICE == 0:
            y = _load_rows(Y, bh * n * DV, cols, n, DV, DV_PAD)
        if DI_SLICE == 0:
            s = tl.dot(xq, tl.trans(xk), input_precision=PRECISION) * alpha
        else:
            s = _sliced_dot(XQ, XK, bh * n * DI, rows, cols, n, DI, DI_PAD, DI_SLICE, PRECISION) * alpha
        if HAS_BIAS:
            s += beta * tl.load(BIAS + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        p = _probs_from_lse(s, lse, _visible(rows, cols, n, start, b, KPM, HAS_MASK))
        if DV_SLICE == 0:
            dp = tl.dot(do, tl.trans(y), input_precision=PRECISION)
        else:
            dp = _sliced_dot(DO, Y, bh * n * DV, rows, cols, n, DV, DV_PAD, DV_SLICE, PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(SEED, bh, rows, cols, n, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dxq += tl.dot(ds, xk, input_precision=PRECISION)
        if HAS_BIAS:
            tl.store(DBIAS + bh * n * n + rows[:, None] * n + cols[None, :], beta * ds, mask=inside)
    tl.store(
        DXQ + bh * n * DI + rows[:, None] * DI + di[None, :],
        (dxq * alpha).to(DXQ.dtype.element_ty),
        mask=row_ok[:, None] & (di[None, :] < DI),
    )


@triton.jit
def _probs_logits(
    XQ,
    XK,
    BIAS,
    bh,
    rows,
    cols,
    alpha,
    beta,
    n,
    DI,
    HAS_QK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DI_BLOCK: tl.constexpr,
):
    """alpha XQ[rows] XK[cols]^T + beta BIAS[rows, cols] (either term optional) of _softmax_probs_fwd; the
    inner dimension (n for T A^T) in chunks of DI_BLOCK, so no (BLOCK, n) tile is held in registers."""
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if HAS_QK:
        for k0 in range(0, DI, DI_BLOCK):
            di = k0 + tl.arange(0, DI_BLOCK)
            xq = tl.load(
                XQ + bh * n * DI + rows[:, None] * DI + di[None, :],
                mask=(rows[:, None] < n) & (di[None, :] < DI),
                other=0.0,
            ).to(tl.float32)
            xk = tl.load(
                XK + bh * n * DI + cols[:, None] * DI + di[None, :],
                mask=(cols[:, None] < n) & (di[None, :] < DI),
                other=0.0,
            ).to(tl.float32)
            s += tl.dot(xq, tl.trans(xk), input_precision=PRECISION)
        s = s * alpha
    if HAS_BIAS:
        s += beta * tl.load(BIAS + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
    return s


@triton.jit
def _softmax_probs_fwd(
    XQ,
    XK,
    BIAS,
    KPM,
    P,
    alpha,
    beta,
    n,
    DI,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_QK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DI_BLOCK: tl.constexpr,
):
    """P = masked softmax(alpha XQ XK^T + beta BIAS) written out (float32, zero where masked): the
    materialised form of _flash_fwd's weights, for a family whose output is not one P Y. Two passes
    over the causal key blocks (row max and sum, then the weights)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = _probs_logits(
            XQ, XK, BIAS, bh, rows, cols, alpha, beta, n, DI, HAS_QK, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, DI_BLOCK
        )
        s = tl.where(_visible(rows, cols, n, start, b, KPM, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = _probs_logits(
            XQ, XK, BIAS, bh, rows, cols, alpha, beta, n, DI, HAS_QK, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, DI_BLOCK
        )
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        p = tl.where(vis, tl.exp(tl.where(vis, s - m_i[:, None], 0.0)) * inv_l[:, None], 0.0)
        tl.store(P + bh * n * n + rows[:, None] * n + cols[None, :], p, mask=(rows[:, None] < n) & (cols[None, :] < n))


@triton.jit
def _softmax_probs_bwd(
    P,
    DP,
    KPM,
    n,
    H,
    HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dX = P o (dP - rowsum(P o dP)), the softmax backward of _softmax_probs_fwd, in place of dP; every
    entry outside the visible blocks is set to 0 (dP may be dense there, e.g. dR = dBv U^T)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n)
    row_dot = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = row_ok[:, None] & (cols[None, :] < n)
        p = tl.load(P + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        dp = tl.load(DP + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        row_dot += tl.sum(p * dp, 1)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = row_ok[:, None] & (cols[None, :] < n)
        p = tl.load(P + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        dp = tl.load(DP + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        tl.store(DP + bh * n * n + rows[:, None] * n + cols[None, :], p * (dp - row_dot[:, None]), mask=inside)
    _zero_outside(DP, bh, rows, lo, hi, n, BLOCK_M, BLOCK_N)


@triton.jit
def _zero_outside(X, bh, rows, lo, hi, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zero the columns of rows `rows` of an (n, n) block outside the key blocks [lo, hi) a row loop
    covered, so that later whole-row GEMMs read only what the loop wrote."""
    zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    row_ok = rows < n
    for j0 in range(0, lo, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        tl.store(X + bh * n * n + rows[:, None] * n + cols[None, :], zeros, mask=row_ok[:, None] & (cols[None, :] < n))
    for j0 in range(lo + tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N) * BLOCK_N, n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        tl.store(X + bh * n * n + rows[:, None] * n + cols[None, :], zeros, mask=row_ok[:, None] & (cols[None, :] < n))


@triton.jit
def _refine_window(
    a, vis, M1, WRV, h, idx, n, alpha, beta, m_head_stride, wrv_head_stride, MECH: tl.constexpr, PRECISION: tl.constexpr
):
    """The refinement of one fused window's first-order weights A: (T, U, R, P) with P the final
    (pre-dropout) weights; entries a mechanism does not use are A. MECH 0 none (P = A), 1 simp
    (B = alpha T A^T), 2 add (+ beta A), 3 value (R = softmax(alpha T A^T), P = softmax(R U), U = A W_RV)."""
    t = a
    u = a
    r = a
    p = a
    if MECH > 0:
        t = tl.dot(a, _load_square(M1, h * m_head_stride, idx, n), input_precision=PRECISION)
        scores2 = tl.dot(t, tl.trans(a), input_precision=PRECISION) * alpha
        if MECH == 2:  # add
            scores2 += beta * a
        p = _masked_softmax_rows(scores2, vis)
        if MECH == 3:  # value
            r = p
            u = tl.dot(a, _load_square(WRV, h * wrv_head_stride, idx, n), input_precision=PRECISION)
            p = _masked_softmax_rows(tl.dot(r, u, input_precision=PRECISION), vis)
    return t, u, r, p


@triton.jit
def _refine_window_bwd(
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
    MECH: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
):
    """dL/dA of a refined window (MECH > 0) from dL/d(logits of P); stores this program's (n, n) partial
    sums of dM1 (and dW_RV). M1 and W_RV are loaded again here rather than kept live from the forward."""
    dscores2 = dlogits
    if MECH == 3:  # value: P = softmax(R U): dR, dU, then the inner softmax R = softmax(c T A^T)
        dr = tl.dot(dlogits, tl.trans(u), input_precision=PRECISION)
        du = tl.dot(tl.trans(r), dlogits, input_precision=PRECISION)
        dscores2 = r * (dr - tl.sum(r * dr, 1)[:, None])
        _store_square_partial(DWRV, bh * n * n, tl.dot(tl.trans(a), du, input_precision=PRECISION), idx, off, n, TILE)
        da = tl.dot(du, tl.trans(_load_square(WRV, h * wrv_head_stride, idx, n)), input_precision=PRECISION)
        da += tl.dot(tl.trans(dscores2), t, input_precision=PRECISION) * alpha
    else:
        da = tl.dot(tl.trans(dscores2), t, input_precision=PRECISION) * alpha
    if MECH == 2:  # add
        da += beta * dscores2
    dt = tl.dot(dscores2, a, input_precision=PRECISION) * alpha
    _store_square_partial(DM1, bh * n * n, tl.dot(tl.trans(a), dt, input_precision=PRECISION), idx, off, n, TILE)
    da += tl.dot(dt, tl.trans(_load_square(M1, h * m_head_stride, idx, n)), input_precision=PRECISION)
    return da


@triton.jit
def _staged_refine_fwd(
    WS,
    ws,
    a,
    vis,
    M1,
    WRV,
    h,
    off,
    n,
    alpha,
    beta,
    m_head_stride,
    wrv_head_stride,
    MECH: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """_refine_window's P for a window whose (TILE, TILE) tiles live in the program's scratch slots at WS +
    ws (TILE * TILE floats each) and whose products are summed over K_SLICE slices read back from there
    (_staged_dot): the fp32 fused backward, where a product with K = 64 holding both tf32x3 operands in
    registers spills. Writes slot 0 A, 1 T, and for "value" 2 U and 3 R; the caller may use slot 2 (4
    for "value") for dropout(P) afterwards. MECH 0: P = A, no slot is written."""
    TT: tl.constexpr = TILE * TILE
    valid = n - off
    p = a
    if MECH > 0:
        _slot_store(WS, ws, a, TILE)
        tl.debug_barrier()
        m_base = h * m_head_stride + off * n + off
        t = _staged_dot(
            WS, ws, TILE, 1, TILE, TILE, M1, m_base, n, 1, valid, valid, TILE, TILE, TILE, K_SLICE, PRECISION
        )
        _slot_store(WS, ws + TT, t, TILE)
        if MECH == 3:
            w_base = h * wrv_head_stride + off * n + off
            u = _staged_dot(
                WS, ws, TILE, 1, TILE, TILE, WRV, w_base, n, 1, valid, valid, TILE, TILE, TILE, K_SLICE, PRECISION
            )
            _slot_store(WS, ws + 2 * TT, u, TILE)
        tl.debug_barrier()
        scores2 = alpha * _staged_dot(
            WS, ws + TT, TILE, 1, TILE, TILE, WS, ws, 1, TILE, TILE, TILE, TILE, TILE, TILE, K_SLICE, PRECISION
        )
        if MECH == 2:  # add
            scores2 += beta * a
        p = _masked_softmax_rows(scores2, vis)
        if MECH == 3:  # value: R = that softmax (slot 3), P = softmax(R U)
            _slot_store(WS, ws + 3 * TT, p, TILE)
            tl.debug_barrier()
            r_u = _staged_dot(
                WS,
                ws + 3 * TT,
                TILE,
                1,
                TILE,
                TILE,
                WS,
                ws + 2 * TT,
                TILE,
                1,
                TILE,
                TILE,
                TILE,
                TILE,
                TILE,
                K_SLICE,
                PRECISION,
            )
            p = _masked_softmax_rows(r_u, vis)
    return p


@triton.jit
def _staged_p_slot(ws, MECH: tl.constexpr, TILE: tl.constexpr):
    """The slot a caller of _staged_refine_fwd may use for dropout(P): 2, or 4 for "value" (whose U and
    R are in 2 and 3); _staged_refine_bwd reuses it after its first barrier."""
    if MECH == 3:
        return ws + 4 * TILE * TILE
    else:
        return ws + 2 * TILE * TILE


@triton.jit
def _staged_refine_bwd(
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
    MECH: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """_refine_window_bwd on the slots of _staged_refine_fwd: dL/dA from dL/d(logits of P), and this
    program's partials of dM1 (and dW_RV). Starts with a barrier, after which it reuses the caller's
    dropout(P) slot: "value" writes dlogits to slot 4 and dU to 5; then dS2 goes to slot 2 and dT to 3.
    On return slots 0 (A) and 1 are no longer read here. MECH 0: dA = dlogits."""
    TT: tl.constexpr = TILE * TILE
    valid = n - off
    da = dlogits
    if MECH > 0:
        dscores2 = dlogits
        tl.debug_barrier()  # every reader of the caller's dropout(P) slot is done
        if MECH == 3:  # P = softmax(R U): dU = R^T dlogits, dR = dlogits U^T, then the inner softmax
            _slot_store(WS, ws + 4 * TT, dlogits, TILE)
            tl.debug_barrier()
            du = _staged_dot(
                WS,
                ws + 3 * TT,
                1,
                TILE,
                TILE,
                TILE,
                WS,
                ws + 4 * TT,
                TILE,
                1,
                TILE,
                TILE,
                TILE,
                TILE,
                TILE,
                K_SLICE,
                PRECISION,
            )
            _slot_store(WS, ws + 5 * TT, du, TILE)
            dr = _staged_dot(
                WS,
                ws + 4 * TT,
                TILE,
                1,
                TILE,
                TILE,
                WS,
                ws + 2 * TT,
                1,
                TILE,
                TILE,
                TILE,
                TILE,
                TILE,
                TILE,
                K_SLICE,
                PRECISION,
            )
            r = _slot_load(WS, ws + 3 * TT, TILE)
            dscores2 = r * (dr - tl.sum(r * dr, 1)[:, None])
            tl.debug_barrier()  # dU is in slot 5; U (slot 2) and R (slot 3) are read
            d_wrv = _staged_dot(
                WS, ws, 1, TILE, TILE, TILE, WS, ws + 5 * TT, TILE, 1, TILE, TILE, TILE, TILE, TILE, K_SLICE, PRECISION
            )
            _store_square_partial(DWRV, bh * n * n, d_wrv, idx, off, n, TILE)
            w_base = h * wrv_head_stride + off * n + off
            da = _staged_dot(
                WS,
                ws + 5 * TT,
                TILE,
                1,
                TILE,
                TILE,
                WRV,
                w_base,
                1,
                n,
                valid,
                valid,
                TILE,
                TILE,
                TILE,
                K_SLICE,
                PRECISION,
            )
        else:
            da = tl.zeros([TILE, TILE], tl.float32)
        if MECH == 2:  # add
            da += beta * dscores2
        # dA += alpha dS2^T T; dT = alpha dS2 A (slot 3); dM1 partial = A^T dT; dA += dT M1^T
        _slot_store(WS, ws + 2 * TT, dscores2, TILE)
        tl.debug_barrier()
        da += alpha * _staged_dot(
            WS, ws + 2 * TT, 1, TILE, TILE, TILE, WS, ws + TT, TILE, 1, TILE, TILE, TILE, TILE, TILE, K_SLICE, PRECISION
        )
        dt = alpha * _staged_dot(
            WS, ws + 2 * TT, TILE, 1, TILE, TILE, WS, ws, TILE, 1, TILE, TILE, TILE, TILE, TILE, K_SLICE, PRECISION
        )
        _slot_store(WS, ws + 3 * TT, dt, TILE)
        tl.debug_barrier()
        d_m1 = _staged_dot(
            WS, ws, 1, TILE, TILE, TILE, WS, ws + 3 * TT, TILE, 1, TILE, TILE, TILE, TILE, TILE, K_SLICE, PRECISION
        )
        _store_square_partial(DM1, bh * n * n, d_m1, idx, off, n, TILE)
        m_base = h * m_head_stride + off * n + off
        da += _staged_dot(
            WS, ws + 3 * TT, TILE, 1, TILE, TILE, M1, m_base, 1, n, valid, valid, TILE, TILE, TILE, K_SLICE, PRECISION
        )
    return da


@triton.jit
def _weight_grads(
    DM,
    DRV,
    FIRST,
    SECOND,
    D_FIRST,
    D_SECOND,
    D_RV,
    B,
    H,
    n,
    r,
    first_hs,
    second_hs,
    rv_hs,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_PAD: tl.constexpr,
):
    """The refinement weights' gradients from a fused backward's per-program partials, in one launch
    (SPEC §3b). With dM_h = sum_b DM[b, h] and M = FIRST SECOND^T:
        side 0: dFIRST = dM SECOND,    side 1: dSECOND = dM^T FIRST,    side 2: dW_RV = sum_b DRV[b, h].
    A weight shared by the heads (head stride 0) sums every head's term, each with that head's other
    factor. Program (row block, column block, side + 3 * output head); the batch is summed in a fixed
    order, so the result is deterministic. Weights (n, r) or (H, n, r), contiguous; DRV may be DM when
    there is no W_RV (side 2 then has no output: rv_hs < 0)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    side = tl.program_id(2) % 3
    h_out = tl.program_id(2) // 3
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, N_PAD)
    out_hs = tl.where(side == 0, first_hs, tl.where(side == 1, second_hs, rv_hs))
    width = tl.where(side == 2, n, r)
    exists = (out_hs > 0) | ((out_hs == 0) & (h_out == 0))  # a shared weight has one output head
    if exists & (pid_r * BLOCK_R < width):
        h_lo = tl.where(out_hs > 0, h_out, 0)
        h_hi = tl.where(out_hs > 0, h_out + 1, H)
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        if side == 2:
            inside = (rows[:, None] < n) & (cols[None, :] < n)
            for h in range(h_lo, h_hi):
                for b in range(0, B):
                    at = DRV + (b * H + h) * n * n + rows[:, None] * n + cols[None, :]
                    acc += tl.load(at, mask=inside, other=0.0)
            tl.store(
                D_RV + h_out * rv_hs + rows[:, None] * n + cols[None, :], acc.to(D_RV.dtype.element_ty), mask=inside
            )
        else:
            # P's entry (i, k) for dFIRST, (k, i) for dSECOND: the rows of dM, or of dM^T
            s_i = tl.where(side == 0, n, 1)
            s_k = tl.where(side == 0, 1, n)
            other_hs = tl.where(side == 0, second_hs, first_hs)
            part_ok = (rows[:, None] < n) & (ks[None, :] < n)
            w_ok = (ks[:, None] < n) & (cols[None, :] < r)
            for h in range(h_lo, h_hi):
                dm = tl.zeros([BLOCK_M, N_PAD], tl.float32)
                for b in range(0, B):
                    at = DM + (b * H + h) * n * n + rows[:, None] * s_i + ks[None, :] * s_k
                    dm += tl.load(at, mask=part_ok, other=0.0)
                w_at = h * other_hs + ks[:, None] * r + cols[None, :]
                if side == 0:
                    w = tl.load(SECOND + w_at, mask=w_ok, other=0.0)
                else:
                    w = tl.load(FIRST + w_at, mask=w_ok, other=0.0)
                acc += tl.dot(dm, w.to(tl.float32), input_precision=PRECISION)
            out_at = h_out * out_hs + rows[:, None] * r + cols[None, :]
            out_ok = (rows[:, None] < n) & (cols[None, :] < r)
            if side == 0:
                tl.store(D_FIRST + out_at, acc.to(D_FIRST.dtype.element_ty), mask=out_ok)
            else:
                tl.store(D_SECOND + out_at, acc.to(D_SECOND.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------- launcher


def staged_slots(mechanism: str) -> int:
    """Scratch slots per program of _staged_refine_fwd / _bwd plus the caller's dropout(P) slot."""
    return 6 if mechanism == "value" else 4


def _launch_tril_matmul(L: _Launch, x, w, out=None, transpose_w=False, triangular=True):
    """x (B, H, n, n), zero in the padding (and above the diagonal if triangular); w (n, n) shared or
    (H, n, n); returns x @ w (or x @ w^T), or adds it to `out`."""
    accumulate = out is not None
    out = L.scratch() if out is None else out
    head_stride = w.stride(0) if w.dim() == 3 else 0
    stride_r, stride_c = w.stride(-2), w.stride(-1)
    if transpose_w:
        stride_r, stride_c = stride_c, stride_r
    # 64x64 tiles over 32-wide K steps on 8 warps: 64-wide K steps on 4 warps spilled 320 B (fp32) and
    # 64 B (half inputs) on sm_90, 872 B on sm_80; these spill nothing (bench/results/kernel_resources.md)
    block = 64 if L.n > 32 else 32
    grid = (_cdiv(L.n, block), _cdiv(L.n, block), L.bh)
    launch(
        _tril_matmul,
        grid,
        x,
        w,
        out,
        L.kpm,
        L.n,
        L.heads,
        head_stride,
        stride_r,
        stride_c,
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        ACCUMULATE=accumulate,
        TRIANGULAR=triangular,
        PRECISION=L.precision,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_K=32 if L.n > 32 else 16,
        num_warps=8 if L.n > 32 else 4,
    )
    return out


def _launch_flash_fwd(L: _Launch, xq, xk, y, bias, alpha, beta, dropout_p, seed, out_dtype):
    di, dv = xq.shape[-1], y.shape[-1]
    out = torch.empty(L.batch, L.heads, L.n, dv, dtype=out_dtype, device=L.device)
    lse = torch.empty(L.batch, L.heads, L.n, dtype=torch.float32, device=L.device)
    # at most 32-row blocks on 8 warps, two stages: whole 64-row blocks (n <= 64) on 4 warps, or three
    # stages, spilled up to 368 B per thread in fp32 (sm_80; 232 B at n = 100 on sm_90), these nothing
    bm, bn, _ = _blocks(max(L.n, 65), di)
    launch(
        _flash_fwd,
        L.grid_rows(bm),
        xq,
        xk,
        y,
        bias if bias is not None else xq,
        L.kpm,
        seed,
        out,
        lse,
        alpha,
        beta,
        dropout_p,
        L.n,
        di,
        dv,
        L.heads,
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0,
        PRECISION=L.precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        DI_PAD=_pad(di),
        DV_PAD=_pad(dv),
        num_warps=8,
        num_stages=2,
    )
    return out, lse


def _launch_flash_bwd(L: _Launch, grad, xq, xk, y, bias, out, lse, alpha, beta, dropout_p, seed, grad_dtypes):
    """Gradients of the flash pass: (dXq, dXk, dY, dBias or None)."""
    di, dv = xq.shape[-1], y.shape[-1]
    dxq = torch.empty(L.batch, L.heads, L.n, di, dtype=grad_dtypes[0], device=L.device)
    dxk = torch.empty(L.batch, L.heads, L.n, di, dtype=grad_dtypes[1], device=L.device)
    dy = torch.empty(L.batch, L.heads, L.n, dv, dtype=grad_dtypes[2], device=L.device)
    dbias = L.scratch() if bias is not None else None
    bm, bn, _ = _blocks(max(L.n, 65), di)  # 32-row blocks: whole 64-row ones overflow shared memory
    # 8 warps, and for fp32 (tf32x3 operands are held whole in registers, hi and lo parts) S and dP summed
    # over 32-column slices read from memory, unpipelined: 4 warps with whole operands spilled up to 2.2 KB
    # per thread at n = 200 (value) on sm_90 and sm_80, these nothing (bench/results/kernel_resources.md)
    fp32 = L.precision == "tf32x3"
    dkdv_meta = dict(DI_SLICE=32, DV_SLICE=32, num_stages=1) if fp32 else dict(DI_SLICE=0, DV_SLICE=0)
    sliced_dq = fp32 and (di > 64 or dropout_p > 0)  # d_h = 64 without dropout: 0 B whole, 8 B sliced
    dq_meta = dict(DI_SLICE=32, DV_SLICE=32, num_stages=1) if sliced_dq else dict(DI_SLICE=0, DV_SLICE=0)
    common = dict(
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0,
        PRECISION=L.precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        DI_PAD=_pad(di),
        DV_PAD=_pad(dv),
        maxnreg=MAX_REGISTERS,
    )
    bias_arg = bias if bias is not None else xq
    launch(
        _flash_bwd_dkdv,
        (_cdiv(L.n, bn), L.bh),
        xq,
        xk,
        y,
        bias_arg,
        L.kpm,
        seed,
        grad,
        lse,
        out,
        dxk,
        dy,
        alpha,
        beta,
        dropout_p,
        L.n,
        di,
        dv,
        L.heads,
        num_warps=8,
        **dkdv_meta,
        **common,
    )
    launch(
        _flash_bwd_dq,
        L.grid_rows(bm),
        xq,
        xk,
        y,
        bias_arg,
        L.kpm,
        seed,
        grad,
        lse,
        out,
        dxq,
        dbias if dbias is not None else dxq,
        alpha,
        beta,
        dropout_p,
        L.n,
        di,
        dv,
        L.heads,
        num_warps=8,
        **dq_meta,
        **common,
    )
    return dxq, dxk, dy, dbias


def _launch_value_out_fwd(L: _Launch, bv, v, seed, dropout_p):
    """out = dropout(softmax(mask(Bv))) V of "value" and its log-sum-exp."""
    out = torch.empty_like(v)
    lse3 = torch.empty(L.batch, L.heads, L.n, dtype=torch.float32, device=L.device)
    bm, bn, _ = _blocks(max(L.n, 65), L.d)  # 32-row blocks: whole 64-row ones spilled 456 B in fp32 on sm_80
    launch(
        _value_out_fwd,
        L.grid_rows(bm),
        bv,
        v,
        L.kpm,
        seed,
        out,
        lse3,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        DROPOUT=dropout_p > 0,
        PRECISION=L.precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        D_PAD=_pad(L.d),
        num_warps=4,
        num_stages=2,  # three stages spilled 8 B in fp32 at n = 256 on sm_90 (8 warps: 8 B too)
    )
    return out, lse3


def _launch_value_out_bwd(L: _Launch, grad, bv, v, out, lse3, seed, dropout_p):
    """(dBv, the dropped P3) of "value"'s last softmax."""
    dbv, p3 = L.scratch(), L.scratch()
    bm, bn, _ = _blocks(max(L.n, 65), L.d)  # 32-row blocks, as the flash backward
    launch(
        _value_out_bwd,
        L.grid_rows(bm),
        bv,
        v,
        grad,
        lse3,
        out,
        L.kpm,
        seed,
        dbv,
        p3,
        dropout_p,
        L.n,
        L.d,
        L.heads,
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        DROPOUT=dropout_p > 0,
        PRECISION=L.precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        D_PAD=_pad(L.d),
        num_warps=8,  # 4 warps spilled 8 B in fp32 on sm_90
    )
    return dbv, p3


def _launch_softmax_probs(L: _Launch, xq, xk, bias, alpha, beta):
    """masked softmax(alpha xq xk^T + beta bias) as a (B, H, n, n) float32 tensor (xq, xk or bias None)."""
    p = L.scratch()
    di = L.n if xq is None else xq.shape[-1]
    bm, bn, warps = _blocks(L.n, min(di, 64))  # the inner dimension is looped over in chunks
    launch(
        _softmax_probs_fwd,
        L.grid_rows(bm),
        xq if xq is not None else p,
        xk if xk is not None else p,
        bias if bias is not None else p,
        L.kpm,
        p,
        alpha,
        beta,
        L.n,
        di,
        L.heads,
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        HAS_QK=xq is not None,
        HAS_BIAS=bias is not None,
        PRECISION=L.precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        DI_BLOCK=min(_pad(di), 32),
        # fp32 32-row blocks on 4 warps spilled 16 B on sm_80 (half inputs: 8 warps spill 8 B on sm_90)
        num_warps=8 if bm < 64 and L.precision == "tf32x3" else warps,
    )
    return p


def _launch_softmax_probs_bwd(L: _Launch, p, dp):
    """dp (B, H, n, n) float32 becomes the gradient of the logits of p = masked softmax(logits)."""
    bm, bn, warps = _blocks(L.n, L.d)
    launch(
        _softmax_probs_bwd,
        L.grid_rows(bm),
        p,
        dp,
        L.kpm,
        L.n,
        L.heads,
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=warps,
    )
    return dp


def refinement_weight_grads(L: _Launch, mechanism: str, dm_part, drv_part, w_rq, w_rk, w_rv) -> tuple:
    """(dW_RQ, dW_RK, dW_RV or None) from a fused backward's (B, H, n, n) float32 partials of dM and dW_RV:
    one launch of _weight_grads in place of the partials' sums, the two GEMMs of SPEC §3b and the casts
    (M = W_F W_S^T, dW_F = dM W_S, dW_S = dM^T W_F, (W_F, W_S) = (W_RK, W_RQ) for "add"), each in its
    weight's dtype and shape."""
    first, second = (w_rk, w_rq) if mechanism == "add" else (w_rq, w_rk)
    first, second = first.contiguous(), second.contiguous()
    d_first, d_second = torch.empty_like(first), torch.empty_like(second)
    d_rv, rv_hs, width = d_first, -1, first.shape[-1]
    if w_rv is not None:
        w_rv = w_rv.contiguous()
        d_rv, rv_hs, width = torch.empty_like(w_rv), _head_stride(w_rv), max(width, L.n)
    block_r = min(64, _pad(width))
    launch(
        _weight_grads,
        (_cdiv(L.n, 16), _cdiv(width, block_r), 3 * L.heads),
        dm_part,
        dm_part if drv_part is None else drv_part,
        first,
        second,
        d_first,
        d_second,
        d_rv,
        L.batch,
        L.heads,
        L.n,
        first.shape[-1],
        _head_stride(first),
        _head_stride(second),
        rv_hs,
        PRECISION=L.precision,
        BLOCK_M=16,
        BLOCK_R=block_r,
        N_PAD=L.n_pad,
        num_warps=4,
    )
    dw_rq, dw_rk = (d_second, d_first) if mechanism == "add" else (d_first, d_second)
    return dw_rq, dw_rk, None if w_rv is None else d_rv


# ------------------------------------------------------------------------------------------------- entry


def refine_forward(L: _Launch, a, v, m1, w_rv, mechanism, refine_scale, dropout_p, seed):
    """Tiled refinement from A (B, H, n, n) float32: (out, lse, T, U, Bv, lse3), None where unused."""
    t = _launch_tril_matmul(L, a, m1)
    if mechanism == "value":
        u = _launch_tril_matmul(L, a, w_rv)
        bv, lse = _launch_flash_fwd(L, t, a, u, None, refine_scale, 0.0, 0.0, seed, torch.float32)
        out, lse3 = _launch_value_out_fwd(L, bv, v, seed, dropout_p)
        return out, lse, t, u, bv, lse3
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    out, lse = _launch_flash_fwd(L, t, a, v, a if beta else None, alpha, beta, dropout_p, seed, v.dtype)
    return out, lse, t, None, None, None


def refine_backward(
    L: _Launch, grad, a, t, u, bv, lse, lse3, out, v, m1, w_rv, mechanism, refine_scale, dropout_p, seed
):
    """Tiled refinement backward: (dA float32 (B, H, n, n), dV, dM1, dW_RV or None)."""
    f32 = (torch.float32,) * 3
    dw_rv = None
    if mechanism == "value":
        dbv, p3 = _launch_value_out_bwd(L, grad, bv, v, out, lse3, seed, dropout_p)
        dv = (p3.transpose(-1, -2) @ grad.float()).to(v.dtype)
        dt, da, du, _ = _launch_flash_bwd(L, dbv, t, a, u, None, bv, lse, refine_scale, 0.0, 0.0, seed, f32)
        _launch_tril_matmul(L, du, w_rv, out=da, transpose_w=True, triangular=False)  # dU is not triangular
        dw_rv = _reduce_over_batch(a, du, w_rv.dim() == 3).to(w_rv.dtype)
    else:
        alpha, beta = _refine_coefficients(mechanism, refine_scale)
        dt, da, dv, dbias = _launch_flash_bwd(
            L,
            grad,
            t,
            a,
            v,
            a if beta else None,
            out,
            lse,
            alpha,
            beta,
            dropout_p,
            seed,
            (torch.float32, torch.float32, v.dtype),
        )
        if dbias is not None:
            da += dbias
    _launch_tril_matmul(L, dt, m1, out=da, transpose_w=True)
    dm1 = _reduce_over_batch(a, dt, m1.dim() == 3).to(m1.dtype)
    return da, dv, dm1, dw_rv


def refine_probs_forward(L: _Launch, a, m1, w_rv, mechanism, refine_scale):
    """Tiled refinement from A (B, H, n, n) float32 to the final weights P, written out, for a family whose
    output is not one P V (W2: P V_mu and (P o P) V_sigma): (P, T, U, R), None where unused."""
    t = _launch_tril_matmul(L, a, m1)
    if mechanism == "value":
        u = _launch_tril_matmul(L, a, w_rv)
        r = _launch_softmax_probs(L, t, a, None, refine_scale, 0.0)
        p = _launch_softmax_probs(L, None, None, r @ u, 0.0, 1.0)  # B = R U is dense: one GEMM
        return p, t, u, r
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    return _launch_softmax_probs(L, t, a, a if beta else None, alpha, beta), t, None, None


def refine_probs_backward(L: _Launch, dp, a, t, u, r, p, m1, w_rv, mechanism, refine_scale):
    """refine_probs_forward's backward from dL/dP (float32, overwritten): (dA, dM1, dW_RV or None).
    The GEMMs over whole (n, n) blocks (dT = dB A, dB^T T, the R U pair of "value") run as torch matmuls."""
    dlogits = _launch_softmax_probs_bwd(L, p, dp)
    dw_rv = None
    if mechanism == "value":
        dr = dlogits @ u.transpose(-1, -2)
        du = r.transpose(-1, -2) @ dlogits
        dlogits = _launch_softmax_probs_bwd(L, r, dr)
        alpha, beta = refine_scale, 0.0
    else:
        alpha, beta = _refine_coefficients(mechanism, refine_scale)
    da = torch.matmul(dlogits.transpose(-1, -2), t).mul_(alpha)
    if beta:
        da.add_(dlogits, alpha=beta)
    dt = torch.matmul(dlogits, a).mul_(alpha)
    if mechanism == "value":
        _launch_tril_matmul(L, du, w_rv, out=da, transpose_w=True, triangular=False)  # dU is not triangular
        dw_rv = _reduce_over_batch(a, du, w_rv.dim() == 3).to(w_rv.dtype)
    _launch_tril_matmul(L, dt, m1, out=da, transpose_w=True)
    dm1 = _reduce_over_batch(a, dt, m1.dim() == 3).to(m1.dtype)
    return da, dm1, dw_rv
