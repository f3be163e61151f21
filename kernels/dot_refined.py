"""Triton: causal dot-product attention with AWRSR refinement, forward and backward (SPEC §1-3, §3b).

Per (batch, head), with A the first-order weights (lower triangular, zero in the left padding):
    simp   B = c A M A^T              M = W_RQ W_RK^T   (one n x n GEMM per call, shared by all heads)
    add    B = (c A M^T A^T + A) / 2
    value  R = softmax(c A M A^T),   B = R (A W_RV)
    out = dropout(softmax(mask(B))) V
The factored form (SPEC §3b) turns the refinement into one attention-shaped pass: with T = A M as
"queries" and the rows of A as "keys", B_ij = c T_i . A_j (+ beta A_ij), so the second softmax and P V
(or R U for "value") run as a flash-style online-softmax pass that never materialises B.

Two paths, chosen by length (uses_fused_kernels):

Fused, n <= FUSED_MAX_N (64; SASRec's n=50): one program per (batch, head) holds the whole sequence on
chip. The forward is one launch that saves nothing but its inputs; the backward is one launch that
recomputes A, T, B and P and writes dQ, dK, dV and per-program partial sums of dM (and dW_RV), which one
torch sum reduces. Each program works on the smallest window of 16, 32 or N_PAD trailing positions that
holds its sequence (left padding), so the work follows the real length L.
    _fused_fwd / _fused_bwd      the two kernels; _window_* do the work for one window size

Tiled, longer n (all scratch is float32; every loop starts at the sequence's first non-padding
position, so the work per head follows its real length L rather than n):
    _attn_probs_fwd     A = masked softmax(Q K^T * scale), two passes over key blocks
    _tril_matmul        C (+)= X W for X lower triangular from `start` (T = A M1, U = A W_RV, dA += dT M1^T)
    _flash_fwd          online softmax of alpha Xq Xk^T + beta*bias over causal key blocks, times Y
    _value_out_fwd      out = softmax(mask(Bv)) V for "value", two passes
    _value_out_bwd      dBv and the dropped P3 for "value"
    _flash_bwd_dkdv     dXk, dY of the flash pass (grid over key blocks)
    _flash_bwd_dq       dXq (and beta*dB into dA) of the flash pass (grid over query blocks)
    _attn_probs_bwd     dS = softmax backward of A, dQ = dS K
The reductions that are plain GEMMs over the whole batch (dK = dS^T Q, dM = sum A^T dT, dW_RV, dV of
"value") run as torch matmuls on the float32 scratch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch._dynamo  # noqa: F401  initialised up front: torch 2.11's custom-op call imports it lazily
import triton
import triton.language as tl

from awr_fast.ops.dot_refined import default_scale


# Sequences up to this length run the fused single-program kernels (one launch forward, one backward);
# longer ones the tiled kernels. AWR_FAST_TRITON_FUSED_MAX_N=0 forces the tiled path (for comparison).
def _fused_max_n_from_env() -> int:
    text = os.environ.get("AWR_FAST_TRITON_FUSED_MAX_N", "64")
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 128:
        raise ValueError(f"AWR_FAST_TRITON_FUSED_MAX_N: expected an integer in [0, 128], got {text!r}")
    return value


FUSED_MAX_N = _fused_max_n_from_env()
# ptxas -O3 answers the tiled backward's register pressure by dropping it to 32 registers and spilling
# 5 KB per thread (bench/results/kernel_resources.md); a .maxnreg bound keeps it at the most a thread
# of a 256-thread program can have (2 KB spilled instead).
MAX_REGISTERS = 255
_MECHANISM_CODE = {"none": 0, "simp": 1, "add": 2, "value": 3}  # MECH of the fused kernels


# ------------------------------------------------------------------------------------------- jit kernels


@triton.jit
def _visible(rows, cols, n, start, b, KPM, HAS_MASK: tl.constexpr):
    """SPEC §1: key j visible to query i iff j <= i and neither is padding."""
    vis = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= start) & (rows[:, None] < n) & (cols[None, :] < n)
    if HAS_MASK:
        q_pad = tl.load(KPM + b * n + rows, mask=rows < n, other=1)
        k_pad = tl.load(KPM + b * n + cols, mask=cols < n, other=1)
        vis = vis & (q_pad[:, None] == 0) & (k_pad[None, :] == 0)
    return vis


@triton.jit
def _first_real_position(KPM, b, n, HAS_MASK: tl.constexpr, N_PAD: tl.constexpr):
    """Index of the sequence's first non-padding position (n if none): every loop starts there, so the
    work per head follows the real length. Computed here rather than by extra torch launches."""
    if HAS_MASK:
        idx = tl.arange(0, N_PAD)
        pad = tl.load(KPM + b * n + idx, mask=idx < n, other=1)
        return tl.min(tl.where(pad == 0, idx, n), 0)
    else:
        return 0


@triton.jit
def _probs_from_lse(s, lse, vis):
    """Recompute softmax weights from the saved log-sum-exp; masked entries exactly 0 (no inf on the way)."""
    return tl.where(vis, tl.exp(tl.where(vis, s - lse[:, None], 0.0)), 0.0)


@triton.jit
def _dropout_keep(SEED, bh, rows, cols, n, dropout_p):
    """Philox draw per (batch*head, i, j): the same keep mask in every kernel that asks for it."""
    seed = tl.load(SEED)
    offsets = bh * n * n + rows[:, None] * n + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropped_pair(p, dp, SEED, bh, rows, cols, n, dropout_p, DROPOUT: tl.constexpr):
    """(dropout(P), dL/dP) of out = dropout(P) Y given dL/d(dropout(P)) = dp: one keep mask, kept entries
    scaled by 1 / (1 - p), dropped ones 0 in both."""
    if DROPOUT:
        keep = _dropout_keep(SEED, bh, rows, cols, n, dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    return p, dp


@triton.jit
def _attn_probs_fwd(
    Q,
    K,
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
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, D_PAD)
    q = tl.load(
        Q + bh * n * D + rows[:, None] * D + dcols[None, :], mask=(rows[:, None] < n) & (dcols[None, :] < D), other=0.0
    ).to(tl.float32)
    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if not REFINE_SCORES:
        for j0 in range(lo, hi, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            k = tl.load(
                K + bh * n * D + cols[:, None] * D + dcols[None, :],
                mask=(cols[:, None] < n) & (dcols[None, :] < D),
                other=0.0,
            ).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(_visible(rows, cols, n, start, b, KPM, HAS_MASK), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + bh * n * D + cols[:, None] * D + dcols[None, :],
            mask=(cols[:, None] < n) & (dcols[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        if REFINE_SCORES:
            a = tl.where(vis, s, 0.0)
        else:
            a = tl.where(vis, tl.exp(tl.where(vis, s - m_i[:, None], 0.0)) * inv_l[:, None], 0.0)
        tl.store(A + bh * n * n + rows[:, None] * n + cols[None, :], a, mask=(rows[:, None] < n) & (cols[None, :] < n))


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
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    di = tl.arange(0, DI_PAD)
    dv = tl.arange(0, DV_PAD)
    col_ok = cols < n
    xk = tl.load(
        XK + bh * n * DI + cols[:, None] * DI + di[None, :], mask=col_ok[:, None] & (di[None, :] < DI), other=0.0
    ).to(tl.float32)
    y = tl.load(
        Y + bh * n * DV + cols[:, None] * DV + dv[None, :], mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0
    ).to(tl.float32)
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
        s = tl.dot(xq, tl.trans(xk), input_precision=PRECISION) * alpha
        if HAS_BIAS:
            s += beta * tl.load(
                BIAS + bh * n * n + rows[:, None] * n + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
            )
        p = _probs_from_lse(s, lse, _visible(rows, cols, n, start, b, KPM, HAS_MASK))
        dp = tl.dot(do, tl.trans(y), input_precision=PRECISION)
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
):
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
        xk = tl.load(
            XK + bh * n * DI + cols[:, None] * DI + di[None, :],
            mask=(cols[:, None] < n) & (di[None, :] < DI),
            other=0.0,
        ).to(tl.float32)
        y = tl.load(
            Y + bh * n * DV + cols[:, None] * DV + dv[None, :], mask=(cols[:, None] < n) & (dv[None, :] < DV), other=0.0
        ).to(tl.float32)
        s = tl.dot(xq, tl.trans(xk), input_precision=PRECISION) * alpha
        if HAS_BIAS:
            s += beta * tl.load(BIAS + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        p = _probs_from_lse(s, lse, _visible(rows, cols, n, start, b, KPM, HAS_MASK))
        dp = tl.dot(do, tl.trans(y), input_precision=PRECISION)
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
def _attn_probs_bwd(
    A,
    DA,
    K,
    KPM,
    DQ,
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
    """dS = d(A)/d(scores) applied to dA, overwriting dA in place; dQ = dS K * scale."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, D_PAD)
    row_ok = rows < n
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
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = row_ok[:, None] & (cols[None, :] < n)
        da = tl.load(DA + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        if REFINE_SCORES:
            ds = tl.where(vis, da, 0.0) * scale
        else:
            a = tl.load(A + bh * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
            ds = tl.where(vis, a * (da - row_dot[:, None]), 0.0) * scale
        tl.store(DA + bh * n * n + rows[:, None] * n + cols[None, :], ds, mask=inside)
        k = tl.load(
            K + bh * n * D + cols[:, None] * D + dcols[None, :],
            mask=(cols[:, None] < n) & (dcols[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        dq += tl.dot(ds, k, input_precision=PRECISION)
    # dA holds dT M^T in every column; leave only dS behind (dK = dS^T Q reads whole rows).
    zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for j0 in range(0, lo, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        tl.store(DA + bh * n * n + rows[:, None] * n + cols[None, :], zeros, mask=row_ok[:, None] & (cols[None, :] < n))
    for j0 in range(lo + tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N) * BLOCK_N, n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        tl.store(DA + bh * n * n + rows[:, None] * n + cols[None, :], zeros, mask=row_ok[:, None] & (cols[None, :] < n))
    tl.store(
        DQ + bh * n * D + rows[:, None] * D + dcols[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (dcols[None, :] < D),
    )


# ---- fused single-program path (n <= FUSED_MAX_N): one program per (batch, head) keeps A, T, B and P on
# chip, so the forward is one launch and the backward (which recomputes everything) is one more. The
# program picks the smallest window of TILE in {16, 32, N_PAD} trailing positions that holds the whole
# sequence (left padding: every real position is >= start), so the work follows the real length.


@triton.jit
def _masked_softmax_rows(x, vis):
    """Row softmax of x over the visible entries; rows without one are all zero (never NaN)."""
    x = tl.where(vis, x, float("-inf"))
    row_max = tl.max(x, 1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    e = tl.where(vis, tl.exp(x - row_max[:, None]), 0.0)
    total = tl.sum(e, 1)
    return e / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _store_zero_rows(X, base, off, n, D, TILE: tl.constexpr, D_PAD: tl.constexpr):
    """Rows [0, off) of an (n, D) block lie wholly in the padding: their outputs/gradients are zeros."""
    dcols = tl.arange(0, D_PAD)
    zeros = tl.zeros([TILE, D_PAD], tl.float32)
    for r0 in range(0, off, TILE):
        rows = r0 + tl.arange(0, TILE)
        tl.store(
            X + base + rows[:, None] * D + dcols[None, :],
            zeros.to(X.dtype.element_ty),
            mask=(rows[:, None] < off) & (dcols[None, :] < D),
        )


@triton.jit
def _store_square_partial(X, base, val, idx, off, n, TILE: tl.constexpr):
    """Write one program's (n, n) float32 partial sum: `val` on the window, zeros everywhere else
    (disjoint masks, so no element is written twice)."""
    tl.store(X + base + idx[:, None] * n + idx[None, :], val, mask=(idx[:, None] < n) & (idx[None, :] < n))
    zeros = tl.zeros([TILE, TILE], tl.float32)
    for r0 in range(0, n, TILE):
        rows = r0 + tl.arange(0, TILE)
        for c0 in range(0, n, TILE):
            cols = c0 + tl.arange(0, TILE)
            outside = (rows[:, None] < off) | (cols[None, :] < off)
            tl.store(
                X + base + rows[:, None] * n + cols[None, :],
                zeros,
                mask=outside & (rows[:, None] < n) & (cols[None, :] < n),
            )


@triton.jit
def _load_rows(X, base, idx, n, D, D_PAD: tl.constexpr):
    """The (TILE, D_PAD) float32 tile of rows idx of an (n, D) block; zero outside it."""
    dcols = tl.arange(0, D_PAD)
    io = (idx[:, None] < n) & (dcols[None, :] < D)
    return tl.load(X + base + idx[:, None] * D + dcols[None, :], mask=io, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(X, base, val, idx, n, D, D_PAD: tl.constexpr):
    dcols = tl.arange(0, D_PAD)
    io = (idx[:, None] < n) & (dcols[None, :] < D)
    tl.store(X + base + idx[:, None] * D + dcols[None, :], val.to(X.dtype.element_ty), mask=io)


@triton.jit
def _load_square(W, base, idx, n):
    """The (TILE, TILE) float32 window of an (n, n) weight; zero outside it."""
    sq = (idx[:, None] < n) & (idx[None, :] < n)
    return tl.load(W + base + idx[:, None] * n + idx[None, :], mask=sq, other=0.0).to(tl.float32)


@triton.jit
def _window_recompute(
    Q,
    K,
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
    """The forward pass on one window up to the final (pre-dropout) weights: (A, T, U, R, P, vis); the
    entries a mechanism does not use are A. Q, K, M1 and W_RV are loaded here and not returned, so the
    backward, which loads them again where it needs them, does not keep them live."""
    base = bh * n * D
    idx = off + tl.arange(0, TILE)
    q = _load_rows(Q, base, idx, n, D, D_PAD)
    k = _load_rows(K, base, idx, n, D, D_PAD)
    vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    a = _masked_softmax_rows(s, vis)
    if MECH > 0:
        if REFINE_SCORES:
            a = tl.where(vis, s, 0.0)
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
    return a, t, u, r, p, vis


@triton.jit
def _window_fwd(
    Q,
    K,
    V,
    M1,
    WRV,
    KPM,
    SEED,
    O,
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
    a, t, u, r, p, vis = _window_recompute(
        Q,
        K,
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
    if DROPOUT:
        p = tl.where(_dropout_keep(SEED, bh, idx, idx, n, dropout_p), p / (1.0 - dropout_p), 0.0)
    out = tl.dot(p, _load_rows(V, bh * n * D, idx, n, D, D_PAD), input_precision=PRECISION)
    _store_rows(O, bh * n * D, out, idx, n, D, D_PAD)
    _store_zero_rows(O, bh * n * D, off, n, D, TILE, D_PAD)


@triton.jit
def _window_bwd(
    Q,
    K,
    V,
    M1,
    WRV,
    KPM,
    SEED,
    DO,
    DQ,
    DK,
    DV,
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
    # Ordered for few live (TILE, TILE) tiles: each gradient is stored as soon as it is complete, and
    # Q, K, M1 and W_RV are loaded again where the backward needs them rather than kept from the
    # recompute (a reload from L1/L2 is cheaper than a register spill).
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    a, t, u, r, p, vis = _window_recompute(
        Q,
        K,
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
    # out = dropout(P) V
    do = _load_rows(DO, base, idx, n, D, D_PAD)
    dp = tl.dot(do, tl.trans(_load_rows(V, base, idx, n, D, D_PAD)), input_precision=PRECISION)
    p_dropped, dp = _dropped_pair(p, dp, SEED, bh, idx, idx, n, dropout_p, DROPOUT)
    _store_rows(DV, base, tl.dot(tl.trans(p_dropped), do, input_precision=PRECISION), idx, n, D, D_PAD)
    dlogits = p * (dp - tl.sum(p * dp, 1)[:, None])  # softmax backward; zero where P is masked
    if MECH > 0:
        dscores2 = dlogits
        if MECH == 3:  # value: P = softmax(R U): dR, dU, then the inner softmax R = softmax(c T A^T)
            dr = tl.dot(dlogits, tl.trans(u), input_precision=PRECISION)
            du = tl.dot(tl.trans(r), dlogits, input_precision=PRECISION)
            dscores2 = r * (dr - tl.sum(r * dr, 1)[:, None])
            _store_square_partial(
                DWRV, bh * n * n, tl.dot(tl.trans(a), du, input_precision=PRECISION), idx, off, n, TILE
            )
            da = tl.dot(du, tl.trans(_load_square(WRV, h * wrv_head_stride, idx, n)), input_precision=PRECISION)
            da += tl.dot(tl.trans(dscores2), t, input_precision=PRECISION) * alpha
        else:
            da = tl.dot(tl.trans(dscores2), t, input_precision=PRECISION) * alpha
        if MECH == 2:  # add
            da += beta * dscores2
        dt = tl.dot(dscores2, a, input_precision=PRECISION) * alpha
        _store_square_partial(DM1, bh * n * n, tl.dot(tl.trans(a), dt, input_precision=PRECISION), idx, off, n, TILE)
        da += tl.dot(dt, tl.trans(_load_square(M1, h * m_head_stride, idx, n)), input_precision=PRECISION)
        if REFINE_SCORES:
            ds = tl.where(vis, da, 0.0)
        else:
            ds = a * (da - tl.sum(a * da, 1)[:, None])
    else:
        ds = dlogits
    ds = ds * scale
    _store_rows(
        DK,
        base,
        tl.dot(tl.trans(ds), _load_rows(Q, base, idx, n, D, D_PAD), input_precision=PRECISION),
        idx,
        n,
        D,
        D_PAD,
    )
    _store_rows(
        DQ, base, tl.dot(ds, _load_rows(K, base, idx, n, D, D_PAD), input_precision=PRECISION), idx, n, D, D_PAD
    )
    _store_zero_rows(DQ, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DK, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DV, base, off, n, D, TILE, D_PAD)


@triton.jit
def _program_sequence(KPM, n, H, HAS_MASK: tl.constexpr, N_PAD: tl.constexpr):
    """(batch*head, batch, head, first real position, real length) of this program's sequence."""
    bh = tl.program_id(0)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    return bh, b, bh % H, start, n - start


@triton.jit
def _fused_fwd(
    Q,
    K,
    V,
    M1,
    WRV,
    KPM,
    SEED,
    O,
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
    """One program per (batch, head): out for MECH 0 none, 1 simp (B = alpha T A^T), 2 add (+ beta A),
    3 value, on the smallest window of trailing positions that holds the sequence."""
    bh, b, h, start, length = _program_sequence(KPM, n, H, HAS_MASK, N_PAD)
    # TILE is a compile-time shape, so each window size is its own branch (TILE_S = 16, TILE_M = 32 or less)
    if length <= TILE_S:
        _window_fwd(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            O,
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
        _window_fwd(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            O,
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
        _window_fwd(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            O,
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
def _fused_bwd(
    Q,
    K,
    V,
    M1,
    WRV,
    KPM,
    SEED,
    DO,
    DQ,
    DK,
    DV,
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
    """dQ, dK, dV and per-program partial sums of dM1 (and dW_RV), all recomputed from the inputs."""
    bh, b, h, start, length = _program_sequence(KPM, n, H, HAS_MASK, N_PAD)
    # TILE is a compile-time shape, so each window size is its own branch (TILE_S = 16, TILE_M = 32 or less)
    if length <= TILE_S:
        _window_bwd(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            DO,
            DQ,
            DK,
            DV,
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
        _window_bwd(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            DO,
            DQ,
            DK,
            DV,
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
        _window_bwd(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            DO,
            DQ,
            DK,
            DV,
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


def _pad(x: int) -> int:
    """The power-of-two block (>= 16, tl.dot's minimum) that holds x; plain Python, as this runs on every
    call of a host-bound op (triton.next_power_of_2 costs several microseconds a call)."""
    return max(16, 1 << (max(int(x), 1) - 1).bit_length())


def _blocks(n: int, inner: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows for short sequences, 32-row tiles when the inner
    dimension of the flash pass is the full padded length (refinement with n > 64)."""
    n_pad = _pad(n)
    if n_pad <= 64 and inner <= 64:
        return n_pad, n_pad, 4
    if inner > 128:  # (BLOCK, 256) fp32 tiles: 16 rows and 8 warps keep the resident ones in registers
        return 16, 16, 8
    return 32, 32, 4


def _precision(dtype: torch.dtype) -> str:
    """input_precision of every tl.dot. fp32 inputs: "tf32x3" (three TF32 tensor-core products, hi*hi +
    hi*lo + lo*hi: close to fp32, and checked against the float64 reference at the fp32 tolerance);
    "ieee" runs on FFMA, needs the operands in registers and spilled up to 11 KB per thread in the fused
    backward (bench/results/kernel_resources.md). Half inputs are upcast on load and tolerate TF32."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


class _Launch:
    """Shapes and flags shared by the launches of one call."""

    def __init__(self, q, key_padding_mask, mechanism, dropout_p):
        self.batch, self.heads, self.n, self.d = q.shape
        self.bh = self.batch * self.heads
        self.device = q.device
        self.precision = _precision(q.dtype)
        self.n_pad = _pad(self.n)
        self.has_mask = key_padding_mask is not None
        # a free reinterpretation of the bool mask (no conversion launch); unused without a mask
        self.kpm = key_padding_mask.contiguous().view(torch.uint8) if self.has_mask else q
        self.dropout = dropout_p > 0.0
        self.refined = mechanism != "none"

    def scratch(self, cols: int | None = None):
        return torch.zeros(
            self.batch, self.heads, self.n, self.n if cols is None else cols, dtype=torch.float32, device=self.device
        )

    def scratch_uninitialised(self):
        return torch.empty(self.batch, self.heads, self.n, self.n, dtype=torch.float32, device=self.device)

    def grid_rows(self, block):
        return (triton.cdiv(self.n, block), self.bh)


def uses_fused_kernels(n: int) -> bool:
    """Whether a call of length n runs the fused single-program kernels (else the tiled ones)."""
    return n <= FUSED_MAX_N


def _refine_coefficients(mechanism: str, refine_scale: float) -> tuple[float, float]:
    """(alpha, beta) of B = alpha T A^T + beta A: simp and value (inner scores) c and 0; add c/2 and 1/2."""
    return (0.5 * refine_scale, 0.5) if mechanism == "add" else (refine_scale, 0.0)


def _head_stride(w) -> int:
    return w.stride(0) if w is not None and w.dim() == 3 else 0


def _fused_meta(L: _Launch, mechanism: str, refine_scores: bool) -> dict:
    return dict(
        MECH=_MECHANISM_CODE[mechanism],
        HAS_MASK=L.has_mask,
        REFINE_SCORES=refine_scores,
        DROPOUT=L.dropout,
        PRECISION=L.precision,
        N_PAD=L.n_pad,
        D_PAD=_pad(L.d),
        TILE_S=16,
        TILE_M=min(32, L.n_pad),
        num_warps=4 if L.n_pad <= 32 else 8,  # no maxnreg: it doubles the fused backward's spills
    )


def _launch_fused_fwd(L: _Launch, q, k, v, m1, w_rv, seed, mechanism, scale, refine_scale, refine_scores, dropout_p):
    out = torch.empty_like(q)
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    _fused_fwd[(L.bh,)](
        q,
        k,
        v,
        q if m1 is None else m1,
        q if w_rv is None else w_rv,
        L.kpm,
        seed,
        out,
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
    return out


def _sum_partials(partial: torch.Tensor, per_head: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, n, n) per-program partial sums -> (H, n, n) per-head or (n, n) shared weight gradient."""
    return (partial.sum(0) if per_head else partial.sum((0, 1))).to(dtype)


def _launch_fused_bwd(
    L: _Launch, grad, q, k, v, m1, w_rv, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dm1_part = L.scratch_uninitialised() if m1 is not None else None
    dwrv_part = L.scratch_uninitialised() if w_rv is not None else None
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    _fused_bwd[(L.bh,)](
        q,
        k,
        v,
        q if m1 is None else m1,
        q if w_rv is None else w_rv,
        L.kpm,
        seed,
        grad,
        dq,
        dk,
        dv,
        dq if dm1_part is None else dm1_part,
        dq if dwrv_part is None else dwrv_part,
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
    dm1 = None if m1 is None else _sum_partials(dm1_part, m1.dim() == 3, m1.dtype)
    dw_rv = None if w_rv is None else _sum_partials(dwrv_part, w_rv.dim() == 3, w_rv.dtype)
    return dq, dk, dv, dm1, dw_rv


def _launch_attn_probs(L: _Launch, q, k, scale, refine_scores):
    a = L.scratch()
    bm, bn, warps = _blocks(L.n, L.d)
    _attn_probs_fwd[L.grid_rows(bm)](
        q,
        k,
        L.kpm,
        a,
        scale,
        L.n,
        L.d,
        L.heads,
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        REFINE_SCORES=refine_scores,
        PRECISION=L.precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        D_PAD=_pad(L.d),
        num_warps=warps,
    )
    return a


def _launch_tril_matmul(L: _Launch, x, w, out=None, transpose_w=False, triangular=True):
    """x (B, H, n, n), zero in the padding (and above the diagonal if triangular); w (n, n) shared or
    (H, n, n); returns x @ w (or x @ w^T), or adds it to `out`."""
    accumulate = out is not None
    out = L.scratch() if out is None else out
    head_stride = w.stride(0) if w.dim() == 3 else 0
    stride_r, stride_c = w.stride(-2), w.stride(-1)
    if transpose_w:
        stride_r, stride_c = stride_c, stride_r
    block = 64 if L.n > 32 else 32
    grid = (triton.cdiv(L.n, block), triton.cdiv(L.n, block), L.bh)
    _tril_matmul[grid](
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
        BLOCK_K=block if L.n > 32 else 16,
        num_warps=4,
    )
    return out


def _launch_flash_fwd(L: _Launch, xq, xk, y, bias, alpha, beta, dropout_p, seed, out_dtype):
    di, dv = xq.shape[-1], y.shape[-1]
    out = torch.empty(L.batch, L.heads, L.n, dv, dtype=out_dtype, device=L.device)
    lse = torch.empty(L.batch, L.heads, L.n, dtype=torch.float32, device=L.device)
    bm, bn, warps = _blocks(L.n, di)
    _flash_fwd[L.grid_rows(bm)](
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
        num_warps=warps,
    )
    return out, lse


def _launch_flash_bwd(L: _Launch, grad, xq, xk, y, bias, out, lse, alpha, beta, dropout_p, seed, grad_dtypes):
    """Gradients of the flash pass: (dXq, dXk, dY, dBias or None)."""
    di, dv = xq.shape[-1], y.shape[-1]
    dxq = torch.empty(L.batch, L.heads, L.n, di, dtype=grad_dtypes[0], device=L.device)
    dxk = torch.empty(L.batch, L.heads, L.n, di, dtype=grad_dtypes[1], device=L.device)
    dy = torch.empty(L.batch, L.heads, L.n, dv, dtype=grad_dtypes[2], device=L.device)
    dbias = L.scratch() if bias is not None else None
    bm, bn, warps = _blocks(L.n, di)
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
        num_warps=warps,
        maxnreg=MAX_REGISTERS,
    )
    bias_arg = bias if bias is not None else xq
    _flash_bwd_dkdv[(triton.cdiv(L.n, bn), L.bh)](
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
        **common,
    )
    _flash_bwd_dq[L.grid_rows(bm)](
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
        **common,
    )
    return dxq, dxk, dy, dbias


def _reduce_over_batch(x: torch.Tensor, y: torch.Tensor, per_head: bool) -> torch.Tensor:
    """sum over batch (and heads unless per_head) of x^T y, for (B, H, n, n) x and y."""
    batch, heads, n, _ = x.shape
    if per_head:
        return torch.bmm(
            x.transpose(0, 1).reshape(heads, batch * n, n).transpose(1, 2),
            y.transpose(0, 1).reshape(heads, batch * n, n),
        )
    return x.reshape(-1, n).t() @ y.reshape(-1, n)


def _forward(q, k, v, m1, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, refine_scores, dropout_p):
    """(out, lse, A, T, U, Bv, lse3): what the backward needs, None where a path does not save it."""
    L = _Launch(q, key_padding_mask, mechanism, dropout_p)
    if uses_fused_kernels(L.n):  # saves nothing: the backward recomputes everything on chip
        out = _launch_fused_fwd(L, q, k, v, m1, w_rv, seed, mechanism, scale, refine_scale, refine_scores, dropout_p)
        return out, None, None, None, None, None, None
    if mechanism == "none":
        out, lse = _launch_flash_fwd(L, q, k, v, None, scale, 0.0, dropout_p, seed, q.dtype)
        return out, lse, None, None, None, None, None
    a = _launch_attn_probs(L, q, k, scale, refine_scores)
    t = _launch_tril_matmul(L, a, m1)
    if mechanism == "value":
        u = _launch_tril_matmul(L, a, w_rv)
        bv, lse = _launch_flash_fwd(L, t, a, u, None, refine_scale, 0.0, 0.0, seed, torch.float32)
        out = torch.empty_like(q)
        lse3 = torch.empty(L.batch, L.heads, L.n, dtype=torch.float32, device=L.device)
        bm, bn, warps = _blocks(L.n, L.d)
        _value_out_fwd[L.grid_rows(bm)](
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
            num_warps=warps,
        )
        return out, lse, a, t, u, bv, lse3
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    out, lse = _launch_flash_fwd(L, t, a, v, a if beta else None, alpha, beta, dropout_p, seed, q.dtype)
    return out, lse, a, t, None, None, None


def _backward(
    grad,
    q,
    k,
    v,
    m1,
    w_rv,
    key_padding_mask,
    seed,
    out,
    lse,
    a,
    t,
    u,
    bv,
    lse3,
    mechanism,
    scale,
    refine_scale,
    refine_scores,
    dropout_p,
):
    L = _Launch(q, key_padding_mask, mechanism, dropout_p)
    grad = grad.contiguous()
    if uses_fused_kernels(L.n):
        return _launch_fused_bwd(
            L, grad, q, k, v, m1, w_rv, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
        )
    if mechanism == "none":
        dq, dk, dv, _ = _launch_flash_bwd(
            L, grad, q, k, v, None, out, lse, scale, 0.0, dropout_p, seed, (q.dtype, k.dtype, v.dtype)
        )
        return dq, dk, dv, None, None
    f32 = (torch.float32,) * 3
    dw_rv = None
    if mechanism == "value":
        dbv, p3 = L.scratch(), L.scratch()
        bm, bn, warps = _blocks(L.n, L.d)
        _value_out_bwd[L.grid_rows(bm)](
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
            num_warps=warps,
        )
        dv = (p3.transpose(-1, -2) @ grad.float()).to(v.dtype)
        dt, da, du, _ = _launch_flash_bwd(L, dbv, t, a, u, None, bv, lse, refine_scale, 0.0, 0.0, seed, f32)
        _launch_tril_matmul(L, du, w_rv, out=da, transpose_w=True, triangular=False)  # dU is not triangular
        dw_rv = _reduce_over_batch(a, du, w_rv.dim() == 3).to(w_rv.dtype)
    else:
        alpha, beta = _refine_coefficients(mechanism, refine_scale)
        dt, da, dv_, dbias = _launch_flash_bwd(
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
        dv = dv_
        if dbias is not None:
            da += dbias
    _launch_tril_matmul(L, dt, m1, out=da, transpose_w=True)
    dm1 = _reduce_over_batch(a, dt, m1.dim() == 3).to(m1.dtype)
    dq = torch.empty_like(q)
    bm, bn, warps = _blocks(L.n, L.d)
    _attn_probs_bwd[L.grid_rows(bm)](
        a,
        da,
        k,
        L.kpm,
        dq,
        scale,
        L.n,
        L.d,
        L.heads,
        HAS_MASK=L.has_mask,
        N_PAD=L.n_pad,
        REFINE_SCORES=refine_scores,
        PRECISION=L.precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        D_PAD=_pad(L.d),
        num_warps=warps,
    )
    dk = (da.transpose(-1, -2) @ q.float()).to(k.dtype)  # da now holds dS (scaled)
    return dq, dk, dv, dm1, dw_rv


# ---------------------------------------------------------------------- custom ops and autograd function


@torch.library.custom_op("awr_fast::dot_refined_fwd", mutates_args=())
def dot_refined_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    m1: Optional[torch.Tensor],
    w_rv: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    seed: torch.Tensor,
    mechanism: str,
    scale: float,
    refine_scale: float,
    refine_scores: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lse, A, T, U, Bv, lse3); all but out are saved for the backward (empty when the
    path does not need them)."""
    outputs = _forward(
        q, k, v, m1, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
    )
    return tuple(q.new_empty(0, dtype=torch.float32) if t is None else t for t in outputs)


@dot_refined_fwd.register_fake
def _(q, k, v, m1, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, refine_scores, dropout_p):
    batch, heads, n, _ = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    square = q.new_empty(batch, heads, n, n, **f32)
    rows = q.new_empty(batch, heads, n, **f32)

    def empty():
        return q.new_empty(0, **f32)

    if uses_fused_kernels(n):
        return torch.empty_like(q), empty(), empty(), empty(), empty(), empty(), empty()
    if mechanism == "none":
        return torch.empty_like(q), rows, empty(), empty(), empty(), empty(), empty()
    if mechanism == "value":
        return torch.empty_like(q), rows, square, square.clone(), square.clone(), square.clone(), rows.clone()
    return torch.empty_like(q), rows, square, square.clone(), empty(), empty(), empty()


@torch.library.custom_op("awr_fast::dot_refined_bwd", mutates_args=())
def dot_refined_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    m1: Optional[torch.Tensor],
    w_rv: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    seed: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    a: torch.Tensor,
    t: torch.Tensor,
    u: torch.Tensor,
    bv: torch.Tensor,
    lse3: torch.Tensor,
    mechanism: str,
    scale: float,
    refine_scale: float,
    refine_scores: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dm1, dw_rv); dm1/dw_rv are empty when the mechanism has no such weight."""
    dq, dk, dv, dm1, dw_rv = _backward(
        grad,
        q,
        k,
        v,
        m1,
        w_rv,
        key_padding_mask,
        seed,
        out,
        lse,
        a,
        t,
        u,
        bv,
        lse3,
        mechanism,
        scale,
        refine_scale,
        refine_scores,
        dropout_p,
    )
    return dq, dk, dv, q.new_empty(0) if dm1 is None else dm1, q.new_empty(0) if dw_rv is None else dw_rv


@dot_refined_bwd.register_fake
def _(
    grad,
    q,
    k,
    v,
    m1,
    w_rv,
    key_padding_mask,
    seed,
    out,
    lse,
    a,
    t,
    u,
    bv,
    lse3,
    mechanism,
    scale,
    refine_scale,
    refine_scores,
    dropout_p,
):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        q.new_empty(0) if m1 is None else torch.empty_like(m1),
        q.new_empty(0) if w_rv is None else torch.empty_like(w_rv),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, m1, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, refine_scores, dropout_p = inputs
    ctx.save_for_backward(q, k, v, m1, w_rv, key_padding_mask, seed, *output)
    ctx.options = (mechanism, scale, refine_scale, refine_scores, dropout_p)


def _backward_rule(ctx, grad, *unused_grads):
    q, k, v, m1, w_rv, key_padding_mask, seed, out, lse, a, t, u, bv, lse3 = ctx.saved_tensors
    dq, dk, dv, dm1, dw_rv = dot_refined_bwd(
        grad, q, k, v, m1, w_rv, key_padding_mask, seed, out, lse, a, t, u, bv, lse3, *ctx.options
    )
    return (
        dq,
        dk,
        dv,
        dm1 if m1 is not None else None,
        dw_rv if w_rv is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


dot_refined_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


class _DotRefinedFunction(torch.autograd.Function):
    """The eager path: the same _forward/_backward as the custom ops above, without the custom-op
    dispatch layers (at these sizes the host, not the GPU, sets the pace). torch.compile traces the
    custom ops instead, so compiled models keep one graph."""

    @staticmethod
    def forward(
        ctx, q, k, v, m1, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
    ):
        outputs = _forward(
            q, k, v, m1, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
        )
        ctx.save_for_backward(q, k, v, m1, w_rv, key_padding_mask, seed, *outputs)
        ctx.options = (mechanism, scale, refine_scale, refine_scores, dropout_p)
        return outputs[0]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, m1, w_rv, key_padding_mask, seed, out, lse, a, t, u, bv, lse3 = ctx.saved_tensors
        dq, dk, dv, dm1, dw_rv = _backward(
            grad, q, k, v, m1, w_rv, key_padding_mask, seed, out, lse, a, t, u, bv, lse3, *ctx.options
        )
        return dq, dk, dv, dm1, dw_rv, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------- public entry


def dot_refined(
    q,
    k,
    v,
    *,
    mechanism="none",
    w_rq=None,
    w_rk=None,
    w_rv=None,
    key_padding_mask=None,
    scale=None,
    refine_scale=None,
    refine_input="probs",
    dropout_p=0.0,
):
    """Same contract as awr_fast.reference.dot_refined.dot_refined (inputs validated by the API; what runs
    here is the triton row of awr_fast.ops.dot_refined.CAPABILITIES)."""
    d_h = q.shape[-1]
    scale = default_scale(d_h) if scale is None else float(scale)
    refine_scale = default_scale(d_h) if refine_scale is None else float(refine_scale)
    m1 = None
    if mechanism != "none":
        # M = W_RQ W_RK^T once per call (SPEC §3b); "add" swaps the roles, i.e. uses M^T.
        first, second = (w_rk, w_rq) if mechanism == "add" else (w_rq, w_rk)
        m1 = (first @ second.transpose(-1, -2)).contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    w_rv = None if w_rv is None else w_rv.contiguous()
    if dropout_p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=q.device, dtype=torch.int64)
    elif torch.compiler.is_compiling():
        seed = torch.zeros(1, device=q.device, dtype=torch.int64)
    else:
        seed = q  # never read without dropout; saves a launch on the host-bound eager path
    options = (mechanism, scale, refine_scale, refine_input == "scores", float(dropout_p))
    if torch.compiler.is_compiling():
        return dot_refined_fwd(q, k, v, m1, w_rv, key_padding_mask, seed, *options)[0]
    return _DotRefinedFunction.apply(q, k, v, m1, w_rv, key_padding_mask, seed, *options)
