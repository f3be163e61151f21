"""Triton: causal dot-product attention with AWRSR refinement, forward and backward (SPEC §1-3, §3b).

The family's own part is the first-order attention A = masked softmax(Q K^T * scale) (or the masked
scores, refine_input="scores") and its backward dS -> dQ, dK; everything after A (T = A M, the flash pass
over (T, A), the value path, the fused window refinement) is the shared core in _refine.py, the
helpers in _common.py.

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
    (_refine.py)        refine_forward / refine_backward: A -> out, dout -> dA
    _attn_probs_bwd     dS = softmax backward of A, dQ = dS K
The reductions that are plain GEMMs over the whole batch (dK = dS^T Q, dM = sum A^T dT, dW_RV, dV of
"value") run as torch matmuls on the float32 scratch.
"""

from __future__ import annotations

import torch
import torch._dynamo  # noqa: F401  initialised up front: torch 2.11's custom-op call imports it lazily
import triton
import triton.language as tl

from awr_fast.ops.dot_refined import default_scale

from ._common import (
    _blocks,
    _dropout_keep,
    _dropped_pair,
    _first_real_position,
    _fused_meta,
    _head_stride,
    _Launch,
    _load_cols,
    _load_rows,
    _load_rows_slice,
    _masked_softmax_rows,
    _pad,
    _precision,  # noqa: F401  the dot precision of this family's launches (tests and bench read it here)
    _program_sequence,
    _refine_coefficients,
    _sliced_dot,
    _slot_load,
    _slot_store,
    _staged_dot,
    _staged_k_slice,
    _stages_backward,
    _stages_forward,
    _store_cols,
    _store_rows,
    _store_rows_slice,
    _store_zero_rows,
    _visible,
    dropout_seed,
    fused_max_n_from_env,
    refinement_factor_grads,
    refinement_matrix,
)
from ._launch import launch
from ._op import TritonOp
from ._refine import (
    _launch_flash_bwd,
    _launch_flash_fwd,
    _refine_window,
    _refine_window_bwd,
    _staged_p_slot,
    _staged_refine_bwd,
    _staged_refine_fwd,
    refine_backward,
    refine_forward,
    refinement_weight_grads,
    staged_slots,
)

_fused_max_n_from_env = fused_max_n_from_env
FUSED_MAX_N = fused_max_n_from_env()


# ------------------------------------------------------------------------------------------- jit kernels


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
    D_SLICE: tl.constexpr,
):
    """The forward pass on one window up to the final (pre-dropout) weights: (A, T, U, R, P, vis); the
    entries a mechanism does not use are A. Q, K, M1 and W_RV are loaded here and not returned, so the
    backward, which loads them again where it needs them, does not keep them live. D_SLICE > 0: S summed
    over d in slices of that width (the forward without a refinement: sm_80 fp32 spilled 544 B without)."""
    base = bh * n * D
    idx = off + tl.arange(0, TILE)
    if D_SLICE > 0:
        vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
        s = _sliced_dot(Q, K, base, idx, idx, n, D, D_PAD, D_SLICE, PRECISION) * scale
    elif MECH == 0:  # K^T read transposed from memory (see _window_bwd)
        q = _load_rows(Q, base, idx, n, D, D_PAD)
        vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
        s = tl.dot(q, _load_cols(K, base, idx, n, D, D_PAD), input_precision=PRECISION) * scale
    else:
        q = _load_rows(Q, base, idx, n, D, D_PAD)
        k = _load_rows(K, base, idx, n, D, D_PAD)
        vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    a = _masked_softmax_rows(s, vis)
    if MECH > 0:
        if REFINE_SCORES:
            a = tl.where(vis, s, 0.0)
    t, u, r, p = _refine_window(
        a, vis, M1, WRV, h, idx, n, alpha, beta, m_head_stride, wrv_head_stride, MECH, PRECISION
    )
    return a, t, u, r, p, vis


@triton.jit
def _window_fwd_registers(
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
    D_SLICE: tl.constexpr,
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
        D_SLICE if MECH == 0 else 0,
    )
    if DROPOUT:
        p = tl.where(_dropout_keep(SEED, bh, idx, idx, n, dropout_p), p / (1.0 - dropout_p), 0.0)
    if MECH == 0:  # out = P V in column slices of V and out, as S in the recompute
        for c in tl.static_range(0, D_PAD, D_SLICE):
            out = tl.dot(p, _load_rows_slice(V, bh * n * D, idx, n, D, c, D_SLICE), input_precision=PRECISION)
            _store_rows_slice(O, bh * n * D, out, idx, n, D, c, D_SLICE)
    else:  # with a refinement the slices spill more on sm_80 (the n x n operands dominate there)
        out = tl.dot(p, _load_rows(V, bh * n * D, idx, n, D, D_PAD), input_precision=PRECISION)
        _store_rows(O, bh * n * D, out, idx, n, D, D_PAD)
    _store_zero_rows(O, bh * n * D, off, n, D, TILE, D_PAD)


@triton.jit
def _window_fwd_staged(
    Q,
    K,
    V,
    M1,
    WRV,
    KPM,
    SEED,
    O,
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
    """_window_fwd_registers with its (TILE, TILE) tiles staged through scratch slots, as the backward's
    _window_bwd_staged (out = dropout(P) V from P's slot)."""
    TT: tl.constexpr = TILE * TILE
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    ws = bh * SLOTS * TT
    valid = n - off
    row_base = base + off * D
    s = _staged_dot(Q, row_base, D, 1, valid, D, K, row_base, 1, D, D, valid, TILE, TILE, D_PAD, D_SLICE, PRECISION)
    s = s * scale
    vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
    if MECH > 0 and REFINE_SCORES:
        a = tl.where(vis, s, 0.0)
    else:
        a = _masked_softmax_rows(s, vis)
    p = _staged_refine_fwd(
        WS, ws, a, vis, M1, WRV, h, off, n, alpha, beta, m_head_stride, wrv_head_stride, MECH, PRECISION, TILE, K_SLICE
    )
    if DROPOUT:
        p = tl.where(_dropout_keep(SEED, bh, idx, idx, n, dropout_p), p / (1.0 - dropout_p), 0.0)
    p_slot = _staged_p_slot(ws, MECH, TILE)
    _slot_store(WS, p_slot, p, TILE)
    tl.debug_barrier()
    out = _staged_dot(
        WS,
        p_slot,
        TILE,
        1,
        TILE,
        TILE,
        V,
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
    _store_rows(O, base, out, idx, n, D, D_PAD)
    _store_zero_rows(O, base, off, n, D, TILE, D_PAD)


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
    """The forward of one window: its tiles staged through scratch (see _stages_forward) or in registers."""
    if STAGED:
        _window_fwd_staged(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            O,
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
        _window_fwd_registers(
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
            TILE,
            D_PAD,
            D_SLICE,
        )


@triton.jit
def _window_bwd_registers(
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
    D_SLICE: tl.constexpr,
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
        0,
    )
    # out = dropout(P) V
    if MECH == 0:
        # Without a refinement every transposed operand is read transposed from memory and dV, dK are
        # stored transposed: no register transposes, and the fp32 backward spills nothing on sm_90
        # (48 B before; sm_80 2.6 -> 1.6 KB). With one, the same change spills more, so it stays as is.
        # dP = dO V^T summed over d in slices (sm_80 1.6 -> 1.2 KB; slicing dV and dK too spills more).
        dp = _sliced_dot(DO, V, base, idx, idx, n, D, D_PAD, D_SLICE, PRECISION)
        p_dropped, dp = _dropped_pair(p, dp, SEED, bh, idx, idx, n, dropout_p, DROPOUT)
        dv_t = tl.dot(_load_cols(DO, base, idx, n, D, D_PAD), p_dropped, input_precision=PRECISION)
        _store_cols(DV, base, dv_t, idx, n, D, D_PAD)
    else:
        do = _load_rows(DO, base, idx, n, D, D_PAD)
        dp = tl.dot(do, tl.trans(_load_rows(V, base, idx, n, D, D_PAD)), input_precision=PRECISION)
        p_dropped, dp = _dropped_pair(p, dp, SEED, bh, idx, idx, n, dropout_p, DROPOUT)
        _store_rows(DV, base, tl.dot(tl.trans(p_dropped), do, input_precision=PRECISION), idx, n, D, D_PAD)
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
    ds = ds * scale
    if MECH == 0:
        dk_t = tl.dot(_load_cols(Q, base, idx, n, D, D_PAD), ds, input_precision=PRECISION)
        _store_cols(DK, base, dk_t, idx, n, D, D_PAD)
    else:
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
def _window_bwd_staged(
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
    """_window_bwd_registers with every (TILE, TILE) operand staged through this
    program's scratch slots in WS and every product summed over K_SLICE slices read back from there
    (_staged_dot; the slots of _staged_refine_fwd / _bwd, then dS in slot 1): the fp32 path, where a
    product with K = 64 that holds both tf32x3 operands in registers spills."""
    TT: tl.constexpr = TILE * TILE
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    ws = bh * SLOTS * TT
    valid = n - off  # rows of the window inside the sequence
    row_base = base + off * D  # the window's first row of an (n, D) block
    s = scale * _staged_dot(
        Q, row_base, D, 1, valid, D, K, row_base, 1, D, D, valid, TILE, TILE, D_PAD, D_SLICE, PRECISION
    )
    vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
    if MECH > 0 and REFINE_SCORES:
        a = tl.where(vis, s, 0.0)
    else:
        a = _masked_softmax_rows(s, vis)
    p = _staged_refine_fwd(
        WS, ws, a, vis, M1, WRV, h, off, n, alpha, beta, m_head_stride, wrv_head_stride, MECH, PRECISION, TILE, K_SLICE
    )
    # out = dropout(P) V: dP = dO V^T, dV = dropout(P)^T dO (dropout(P) in the caller's slot)
    p_slot = _staged_p_slot(ws, MECH, TILE)
    dp = _staged_dot(DO, row_base, D, 1, valid, D, V, row_base, 1, D, D, valid, TILE, TILE, D_PAD, D_SLICE, PRECISION)
    p_dropped, dp = _dropped_pair(p, dp, SEED, bh, idx, idx, n, dropout_p, DROPOUT)
    _slot_store(WS, p_slot, p_dropped, TILE)
    tl.debug_barrier()
    dv = _staged_dot(
        WS, p_slot, 1, TILE, TILE, TILE, DO, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DV, base, dv, idx, n, D, D_PAD)
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
    if MECH == 0:
        ds = da
    elif REFINE_SCORES:  # the mask again rather than kept live through the backward
        ds = tl.where(_visible(idx, idx, n, start, b, KPM, HAS_MASK), da, 0.0)
    else:
        a = _slot_load(WS, ws, TILE)
        ds = a * (da - tl.sum(a * da, 1)[:, None])
    _slot_store(WS, ws + TT, ds * scale, TILE)  # slot 1 (T) was last read before the dT barrier
    tl.debug_barrier()
    dk = _staged_dot(
        WS, ws + TT, 1, TILE, TILE, TILE, Q, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DK, base, dk, idx, n, D, D_PAD)
    dq = _staged_dot(
        WS, ws + TT, TILE, 1, TILE, TILE, K, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(DQ, base, dq, idx, n, D, D_PAD)
    _store_zero_rows(DQ, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DK, base, off, n, D, TILE, D_PAD)
    _store_zero_rows(DV, base, off, n, D, TILE, D_PAD)


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
    """The backward of one window: its tiles staged through scratch (fp32 with a refinement, see
    stages_fused_backward) or held in registers."""
    if STAGED:
        _window_bwd_staged(
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
        _window_bwd_registers(
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
            TILE,
            D_PAD,
            D_SLICE,
        )


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
        _window_fwd(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            O,
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
        _window_fwd(
            Q,
            K,
            V,
            M1,
            WRV,
            KPM,
            SEED,
            O,
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


# ---------------------------------------------------------------------------------------------- launcher


def uses_fused_kernels(n: int) -> bool:
    """Whether a call of length n runs the fused single-program kernels (else the tiled ones)."""
    return n <= FUSED_MAX_N


def _launch_fused_fwd(L: _Launch, q, k, v, m1, w_rv, seed, mechanism, scale, refine_scale, refine_scores, dropout_p):
    out = torch.empty_like(q)
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    staged = _stages_forward(L)
    slots = staged_slots(mechanism) if staged else 0
    ws = torch.empty(L.bh * slots * L.n_pad**2, dtype=torch.float32, device=L.device) if staged else out
    launch(
        _fused_fwd,
        (L.bh,),
        q,
        k,
        v,
        q if m1 is None else m1,
        q if w_rv is None else w_rv,
        L.kpm,
        seed,
        out,
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
        D_SLICE=min(16, _pad(L.d)),
        STAGED=staged,
        SLOTS=slots,
        **_fused_meta(L, mechanism, refine_scores),
    )
    return out


def _launch_fused_bwd(
    L: _Launch, grad, q, k, v, m1, w_rv, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dm1_part = L.scratch_uninitialised() if m1 is not None else None
    dwrv_part = L.scratch_uninitialised() if w_rv is not None else None
    alpha, beta = _refine_coefficients(mechanism, refine_scale)
    staged = _stages_backward(L, mechanism)
    slots = staged_slots(mechanism) if staged else 0
    ws = torch.empty(L.bh * slots * L.n_pad * L.n_pad, dtype=torch.float32, device=L.device) if staged else dq
    launch(
        _fused_bwd,
        (L.bh,),
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
        D_SLICE=min(32, _pad(L.d)),  # 16 spills 8 B on sm_90 (928 B on sm_80, against 1216)
        STAGED=staged,
        SLOTS=slots,
        K_SLICE=_staged_k_slice(L),
        **_fused_meta(L, mechanism, refine_scores),
    )
    return dq, dk, dv, dm1_part, dwrv_part


def _launch_attn_probs(L: _Launch, q, k, scale, refine_scores):
    a = L.scratch()
    bm, bn, warps = _blocks(L.n, L.d)
    launch(
        _attn_probs_fwd,
        L.grid_rows(bm),
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


def _forward(
    q, k, v, w_rq, w_rk, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
):
    """(out, lse, A, T, U, Bv, lse3, M): what the backward needs, None where a path does not save it (M is
    saved so the backward needs no second GEMM for it)."""
    L = _Launch(q, key_padding_mask, mechanism, dropout_p)
    m1 = refinement_matrix(mechanism, w_rq, w_rk)
    if uses_fused_kernels(L.n):  # saves nothing: the backward recomputes everything on chip
        out = _launch_fused_fwd(L, q, k, v, m1, w_rv, seed, mechanism, scale, refine_scale, refine_scores, dropout_p)
        return out, None, None, None, None, None, None, m1
    if mechanism == "none":
        out, lse = _launch_flash_fwd(L, q, k, v, None, scale, 0.0, dropout_p, seed, q.dtype)
        return out, lse, None, None, None, None, None, None
    a = _launch_attn_probs(L, q, k, scale, refine_scores)
    out, lse, t, u, bv, lse3 = refine_forward(L, a, v, m1, w_rv, mechanism, refine_scale, dropout_p, seed)
    return out, lse, a, t, u, bv, lse3, m1


def _backward(
    grad,
    q,
    k,
    v,
    w_rq,
    w_rk,
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
    m1,
    mechanism,
    scale,
    refine_scale,
    refine_scores,
    dropout_p,
):
    m1 = m1 if m1 is not None and m1.numel() else None  # the custom op saves None as an empty tensor
    L = _Launch(q, key_padding_mask, mechanism, dropout_p)
    grad = grad.contiguous()
    if uses_fused_kernels(L.n):
        dq, dk, dv, dm1_part, dwrv_part = _launch_fused_bwd(
            L, grad, q, k, v, m1, w_rv, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
        )
        if m1 is None:
            return dq, dk, dv, None, None, None
        return (dq, dk, dv, *refinement_weight_grads(L, mechanism, dm1_part, dwrv_part, w_rq, w_rk, w_rv))
    if mechanism == "none":
        dq, dk, dv, _ = _launch_flash_bwd(
            L, grad, q, k, v, None, out, lse, scale, 0.0, dropout_p, seed, (q.dtype, k.dtype, v.dtype)
        )
        return dq, dk, dv, None, None, None
    da, dv, dm1, dw_rv = refine_backward(
        L, grad, a, t, u, bv, lse, lse3, out, v, m1, w_rv, mechanism, refine_scale, dropout_p, seed
    )
    dq = torch.empty_like(q)
    bm, bn, warps = _blocks(L.n, L.d)
    launch(
        _attn_probs_bwd,
        L.grid_rows(bm),
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
    return (dq, dk, dv, *refinement_factor_grads(mechanism, dm1, w_rq, w_rk), dw_rv)


# ------------------------------------------------------------------------ custom ops and autograd function


def _fake_forward(
    q, k, v, w_rq, w_rk, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, refine_scores, dropout_p
):
    """The shapes of _forward's (out, lse, A, T, U, Bv, lse3, M) for torch.compile; empty where unused."""
    batch, heads, n, _ = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    square = q.new_empty(batch, heads, n, n, **f32)
    rows = q.new_empty(batch, heads, n, **f32)

    def empty():
        return q.new_empty(0, **f32)

    m1 = refinement_matrix(mechanism, w_rq, w_rk)  # fake tensors: only its shape and dtype are computed
    m1 = empty() if m1 is None else m1
    if uses_fused_kernels(n):
        return torch.empty_like(q), empty(), empty(), empty(), empty(), empty(), empty(), m1
    if mechanism == "none":
        return torch.empty_like(q), rows, empty(), empty(), empty(), empty(), empty(), empty()
    if mechanism == "value":
        return torch.empty_like(q), rows, square, square.clone(), square.clone(), square.clone(), rows.clone(), m1
    return torch.empty_like(q), rows, square, square.clone(), empty(), empty(), empty(), m1


#: awr_fast::dot_refined_fwd / _bwd for torch.compile, an autograd.Function for eager calls (kernels/_op.py)
DOT_REFINED = TritonOp(
    "dot_refined",
    tensors=("q", "k", "v", "w_rq?", "w_rk?", "w_rv?", "key_padding_mask?", "seed"),
    options=(
        ("mechanism", "str"),
        ("scale", "float"),
        ("refine_scale", "float"),
        ("refine_scores", "bool"),
        ("dropout_p", "float"),
    ),
    differentiable=("q", "k", "v", "w_rq", "w_rk", "w_rv"),
    forward=_forward,
    backward=_backward,
    fake_forward=_fake_forward,
)


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
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    w_rv = None if w_rv is None else w_rv.contiguous()
    seed = dropout_seed(dropout_p, q)
    options = (mechanism, scale, refine_scale, refine_input == "scores", float(dropout_p))
    return DOT_REFINED(q, k, v, w_rq, w_rk, w_rv, key_padding_mask, seed, *options)
