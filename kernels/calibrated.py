"""Triton: AC-TSR calibrated attention (SPEC §5), forward for n <= 256 (evaluation and inference).

One program per (batch, head) holds the whole calibrated attention of its sequence on the smallest window
of trailing positions that holds it (16, 32 or the padded n, as the dot family's fused kernels):

    S = Q K^T; the spatial calibrator's order and distance terms from the separable projections
    (w_oq.q_i + w_ok.k_j + b_o and w_dq.q_i + w_dk.k_j + b_d: never an (n, n, 2 d_h) tensor) and the
    learned distance scale; P_sp = softmax(mask((S + E_o + E_d) scale))
    adversarial calibrator: M = softmax(mask(Q_adv K_adv^T scale)); P_att = softmax(P_sp o M + N o (1 - M));
    P_cal = softmax(P_sp o exp(1 - M)); G = sigmoid(gate); P_fin = softmax(G o P_sp + (1 - G) o P_cal)
    optionally AWRSR refinement of the final weights (kernels/_refine.py's fused window refinement)
    out_cal = P_fin V, out_att = P_att V, and M written out (the adversarial loss's penalty reads it)

Longer sequences (FUSED_MAX_N < n <= 256) run one program per block of 16 query rows
(_calibrated_rows_fwd): every softmax is over a row, so a row block is exact on its own; its key loop
runs four times from the first real position (the statistics of P_sp and M, of P_att and P_cal, of P_fin,
then the outputs), and a refined P_fin goes through float32 scratch to the dot family's tiled refinement.

Forward only, without dropout (the capability row says so): training runs the reference, whose backward
this kernel does not have yet. N is the noise tensor (drawn with torch.randn when not given, as the
reference does).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from awr_fast.ops.calibrated import ADVERSARIAL

from ._common import (
    _first_real_position,
    _fused_meta,
    _head_stride,
    _Launch,
    _load_rows,
    _masked_softmax_rows,
    _pad,
    _program_sequence,
    _refine_coefficients,
    _store_rows,
    _store_square_partial,
    _store_zero_rows,
    _visible,
    refinement_matrix,
)
from ._launch import launch
from ._op import TritonOp
from ._refine import _refine_window, refine_forward

FUSED_MAX_N = 64  # longer sequences (up to TRITON_MAX_N) take the row-block kernel
ROWS_BLOCK_M, ROWS_BLOCK_N = 16, 32  # the row-block kernel's query rows per program and key block
ORDER_EPS = tl.constexpr(1e-24)  # the released log(1 - p_o + 1e-24), computed in float32

# ------------------------------------------------------------------------------------------- jit kernels


@triton.jit
def _calibrator(VEC, SCAL, D, D_PAD: tl.constexpr):
    """The spatial calibrator's parameters: VEC rows w_oq, w_ok, w_dq, w_dk; SCAL b_o, b_d, s (float32)."""
    dcols = tl.arange(0, D_PAD)
    dmask = dcols < D
    w_oq = tl.load(VEC + 0 * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    w_ok = tl.load(VEC + 1 * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    w_dq = tl.load(VEC + 2 * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    w_dk = tl.load(VEC + 3 * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    return (
        w_oq,
        w_ok,
        w_dq,
        w_dk,
        tl.load(SCAL + 0).to(tl.float32),
        tl.load(SCAL + 1).to(tl.float32),
        tl.load(SCAL + 2).to(tl.float32),
    )


@triton.jit
def _window_fwd(
    Q,
    K,
    V,
    QA,
    KA,
    GATE,
    NOISE,
    VEC,
    SCAL,
    M1,
    WRV,
    KPM,
    OC,
    OA,
    PERT,
    bh,
    b,
    h,
    start,
    scale,
    alpha,
    beta,
    n,
    D,
    m_head_stride,
    wrv_head_stride,
    ADV: tl.constexpr,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    D_PAD: tl.constexpr,
):
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    sq_base = bh * n * n
    inside = (idx[:, None] < n) & (idx[None, :] < n)
    vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
    q = _load_rows(Q, base, idx, n, D, D_PAD)
    k = _load_rows(K, base, idx, n, D, D_PAD)
    # the spatial calibrator's separable projections
    w_oq, w_ok, w_dq, w_dk, b_o, b_d, dist_scale = _calibrator(VEC, SCAL, D, D_PAD)
    order = tl.sum(q * w_oq[None, :], 1)[:, None] + tl.sum(k * w_ok[None, :], 1)[None, :] + b_o
    p_o = tl.sigmoid(order)
    e_o = tl.where(vis, tl.log(1.0 - p_o + ORDER_EPS), 0.0)
    p_d = tl.sum(q * w_dq[None, :], 1)[:, None] + tl.sum(k * w_dk[None, :], 1)[None, :] + b_d
    miss = tl.log(tl.abs(idx[:, None] - idx[None, :]).to(tl.float32) + 1.0) - p_d  # log(|i - j| + 1) - p_d
    e_d = -miss * miss * (dist_scale * dist_scale) * 0.5
    p_sp = _masked_softmax_rows((tl.dot(q, tl.trans(k), input_precision=PRECISION) + e_o + e_d) * scale, vis)
    p_fin = p_sp
    if ADV:  # ordered for few live (TILE, TILE) tiles: each output stored as soon as it is complete
        qa = _load_rows(QA, base, idx, n, D, D_PAD)
        ka = _load_rows(KA, base, idx, n, D, D_PAD)
        m = _masked_softmax_rows(tl.dot(qa, tl.trans(ka), input_precision=PRECISION) * scale, vis)
        _store_square_partial(PERT, sq_base, m.to(PERT.dtype.element_ty), idx, off, n, TILE)
        noise = tl.load(NOISE + sq_base + idx[:, None] * n + idx[None, :], mask=inside, other=0.0).to(tl.float32)
        p_att = _masked_softmax_rows(p_sp * m + noise * (1.0 - m), vis)
        _store_rows(
            OA, base, tl.dot(p_att, _load_rows(V, base, idx, n, D, D_PAD), input_precision=PRECISION), idx, n, D, D_PAD
        )
        _store_zero_rows(OA, base, off, n, D, TILE, D_PAD)
        p_cal = _masked_softmax_rows(p_sp * tl.exp(1.0 - m), vis)
        gate = tl.load(GATE + b * n * n + idx[:, None] * n + idx[None, :], mask=inside, other=0.0).to(tl.float32)
        g = tl.sigmoid(gate)
        p_fin = _masked_softmax_rows(g * p_sp + (1.0 - g) * p_cal, vis)
    if MECH > 0:
        _, _, _, p_fin = _refine_window(
            p_fin, vis, M1, WRV, h, idx, n, alpha, beta, m_head_stride, wrv_head_stride, MECH, PRECISION
        )
    v = _load_rows(V, base, idx, n, D, D_PAD)
    _store_rows(OC, base, tl.dot(p_fin, v, input_precision=PRECISION), idx, n, D, D_PAD)
    _store_zero_rows(OC, base, off, n, D, TILE, D_PAD)


@triton.jit
def _calibrated_fwd(
    Q,
    K,
    V,
    QA,
    KA,
    GATE,
    NOISE,
    VEC,
    SCAL,
    M1,
    WRV,
    KPM,
    OC,
    OA,
    PERT,
    scale,
    alpha,
    beta,
    n,
    D,
    H,
    m_head_stride,
    wrv_head_stride,
    ADV: tl.constexpr,
    MECH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    TILE_S: tl.constexpr,
    TILE_M: tl.constexpr,
):
    """One program per (batch, head): out_cal (and out_att, M) on the smallest window that holds the sequence."""
    bh, b, h, start, length = _program_sequence(KPM, n, H, HAS_MASK, N_PAD)
    # TILE is a compile-time shape, so each window size is its own branch
    if length <= TILE_S:
        _window_fwd(
            Q,
            K,
            V,
            QA,
            KA,
            GATE,
            NOISE,
            VEC,
            SCAL,
            M1,
            WRV,
            KPM,
            OC,
            OA,
            PERT,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            ADV,
            MECH,
            HAS_MASK,
            PRECISION,
            TILE_S,
            D_PAD,
        )
    elif length <= TILE_M:
        _window_fwd(
            Q,
            K,
            V,
            QA,
            KA,
            GATE,
            NOISE,
            VEC,
            SCAL,
            M1,
            WRV,
            KPM,
            OC,
            OA,
            PERT,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            ADV,
            MECH,
            HAS_MASK,
            PRECISION,
            TILE_M,
            D_PAD,
        )
    else:
        _window_fwd(
            Q,
            K,
            V,
            QA,
            KA,
            GATE,
            NOISE,
            VEC,
            SCAL,
            M1,
            WRV,
            KPM,
            OC,
            OA,
            PERT,
            bh,
            b,
            h,
            start,
            scale,
            alpha,
            beta,
            n,
            D,
            m_head_stride,
            wrv_head_stride,
            ADV,
            MECH,
            HAS_MASK,
            PRECISION,
            N_PAD,
            D_PAD,
        )


# ---- row-block path (FUSED_MAX_N < n <= TILED_MAX_N): one program per (block of query rows, batch*head);
# each softmax is over a row, so a block of rows is exact on its own. The key loop runs four times
# (every softmax needs the normalised weights of the one before it): statistics of P_sp and M; of P_att
# and P_cal; of P_fin; then the outputs. Nothing but the outputs (and M) is written, except P_fin when
# it is to be refined (the shared tiled refinement then reads it as A).


@triton.jit
def _rows_logits(
    Q,
    K,
    QA,
    KA,
    base,
    rows,
    cols,
    n,
    D,
    q,
    q_order,
    q_dist,
    w_ok,
    w_dk,
    b_o,
    b_d,
    dist_scale,
    scale,
    vis,
    ADV: tl.constexpr,
    PRECISION: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """(spatial logits, adversarial logits) of rows x a block of key columns, -inf where not visible (the
    adversarial ones are 0 without the adversary)."""
    k = _load_rows(K, base, cols, n, D, D_PAD)
    order = q_order[:, None] + tl.sum(k * w_ok[None, :], 1)[None, :] + b_o
    e_o = tl.where(vis, tl.log(1.0 - tl.sigmoid(order) + ORDER_EPS), 0.0)
    p_d = q_dist[:, None] + tl.sum(k * w_dk[None, :], 1)[None, :] + b_d
    miss = tl.log(tl.abs(rows[:, None] - cols[None, :]).to(tl.float32) + 1.0) - p_d
    e_d = -miss * miss * (dist_scale * dist_scale) * 0.5
    s = tl.where(vis, (tl.dot(q, tl.trans(k), input_precision=PRECISION) + e_o + e_d) * scale, float("-inf"))
    a = tl.zeros_like(s)
    if ADV:
        qa = _load_rows(QA, base, rows, n, D, D_PAD)
        ka = _load_rows(KA, base, cols, n, D, D_PAD)
        a = tl.where(vis, tl.dot(qa, tl.trans(ka), input_precision=PRECISION) * scale, float("-inf"))
    return s, a


@triton.jit
def _online(m_i, l_i, x, vis):
    """One key block's update of a row softmax's running (max, sum) over the visible entries."""
    m_new = tl.maximum(m_i, tl.max(tl.where(vis, x, float("-inf")), 1))
    e = tl.where(vis, tl.exp(tl.where(vis, x - m_new[:, None], 0.0)), 0.0)
    return m_new, l_i * tl.exp(m_i - m_new) + tl.sum(e, 1)


@triton.jit
def _normalised(x, m_i, l_i, vis):
    return tl.where(vis, tl.exp(tl.where(vis, x - m_i[:, None], 0.0)), 0.0) / tl.where(l_i > 0, l_i, 1.0)[:, None]


@triton.jit
def _calibrated_rows_fwd(
    Q,
    K,
    V,
    QA,
    KA,
    GATE,
    NOISE,
    VEC,
    SCAL,
    KPM,
    OC,
    OA,
    PERT,
    PFIN,
    scale,
    n,
    D,
    H,
    ADV: tl.constexpr,
    STORE_PFIN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out_cal = P_fin V (or P_fin written to PFIN for the refinement), out_att = P_att V and M for one block
    of query rows, in four passes over the causal key blocks from the first real position."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = bh * n * D
    sq_base = bh * n * n
    w_oq, w_ok, w_dq, w_dk, b_o, b_d, dist_scale = _calibrator(VEC, SCAL, D, D_PAD)
    q = _load_rows(Q, base, rows, n, D, D_PAD)
    q_order = tl.sum(q * w_oq[None, :], 1)
    q_dist = tl.sum(q * w_dq[None, :], 1)
    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n)
    # pass 1: row statistics of P_sp and M
    m_sp = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_sp = tl.zeros([BLOCK_M], tl.float32)
    m_pm = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_pm = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        s, a = _rows_logits(
            Q,
            K,
            QA,
            KA,
            base,
            rows,
            cols,
            n,
            D,
            q,
            q_order,
            q_dist,
            w_ok,
            w_dk,
            b_o,
            b_d,
            dist_scale,
            scale,
            vis,
            ADV,
            PRECISION,
            D_PAD,
        )
        m_sp, l_sp = _online(m_sp, l_sp, s, vis)
        if ADV:
            m_pm, l_pm = _online(m_pm, l_pm, a, vis)
    # pass 2: row statistics of P_att and P_cal (they read the normalised P_sp and M)
    m_att = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_att = tl.zeros([BLOCK_M], tl.float32)
    m_cal = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_cal = tl.zeros([BLOCK_M], tl.float32)
    if ADV:
        for j0 in range(lo, hi, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            inside = (rows[:, None] < n) & (cols[None, :] < n)
            vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
            s, a = _rows_logits(
                Q,
                K,
                QA,
                KA,
                base,
                rows,
                cols,
                n,
                D,
                q,
                q_order,
                q_dist,
                w_ok,
                w_dk,
                b_o,
                b_d,
                dist_scale,
                scale,
                vis,
                ADV,
                PRECISION,
                D_PAD,
            )
            p_sp = _normalised(s, m_sp, l_sp, vis)
            pm = _normalised(a, m_pm, l_pm, vis)
            noise = tl.load(NOISE + sq_base + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
            m_att, l_att = _online(m_att, l_att, p_sp * pm + noise.to(tl.float32) * (1.0 - pm), vis)
            m_cal, l_cal = _online(m_cal, l_cal, p_sp * tl.exp(1.0 - pm), vis)
    # pass 3: row statistics of P_fin (it reads the normalised P_cal)
    m_fin = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_fin = tl.zeros([BLOCK_M], tl.float32)
    if ADV:
        for j0 in range(lo, hi, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            inside = (rows[:, None] < n) & (cols[None, :] < n)
            vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
            s, a = _rows_logits(
                Q,
                K,
                QA,
                KA,
                base,
                rows,
                cols,
                n,
                D,
                q,
                q_order,
                q_dist,
                w_ok,
                w_dk,
                b_o,
                b_d,
                dist_scale,
                scale,
                vis,
                ADV,
                PRECISION,
                D_PAD,
            )
            p_sp = _normalised(s, m_sp, l_sp, vis)
            pm = _normalised(a, m_pm, l_pm, vis)
            p_cal = _normalised(p_sp * tl.exp(1.0 - pm), m_cal, l_cal, vis)
            g = tl.sigmoid(
                tl.load(GATE + b * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            )
            m_fin, l_fin = _online(m_fin, l_fin, g * p_sp + (1.0 - g) * p_cal, vis)
    # pass 4: the outputs
    acc_cal = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc_att = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < n) & (cols[None, :] < n)
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        s, a = _rows_logits(
            Q,
            K,
            QA,
            KA,
            base,
            rows,
            cols,
            n,
            D,
            q,
            q_order,
            q_dist,
            w_ok,
            w_dk,
            b_o,
            b_d,
            dist_scale,
            scale,
            vis,
            ADV,
            PRECISION,
            D_PAD,
        )
        p_fin = _normalised(s, m_sp, l_sp, vis)
        v = _load_rows(V, base, cols, n, D, D_PAD)
        if ADV:
            p_sp = p_fin
            pm = _normalised(a, m_pm, l_pm, vis)
            tl.store(PERT + sq_base + rows[:, None] * n + cols[None, :], pm.to(PERT.dtype.element_ty), mask=inside)
            noise = tl.load(NOISE + sq_base + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
            p_att = _normalised(p_sp * pm + noise.to(tl.float32) * (1.0 - pm), m_att, l_att, vis)
            acc_att += tl.dot(p_att, v, input_precision=PRECISION)
            p_cal = _normalised(p_sp * tl.exp(1.0 - pm), m_cal, l_cal, vis)
            g = tl.sigmoid(
                tl.load(GATE + b * n * n + rows[:, None] * n + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            )
            p_fin = _normalised(g * p_sp + (1.0 - g) * p_cal, m_fin, l_fin, vis)
        if STORE_PFIN:
            tl.store(PFIN + sq_base + rows[:, None] * n + cols[None, :], p_fin, mask=inside)
        else:
            acc_cal += tl.dot(p_fin, v, input_precision=PRECISION)
    if not STORE_PFIN:
        _store_rows(OC, base, acc_cal, rows, n, D, D_PAD)
    if ADV:
        _store_rows(OA, base, acc_att, rows, n, D, D_PAD)


# ---------------------------------------------------------------------------------------------- launcher


def _forward(
    q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, key_padding_mask, m1, w_rv, scale, refine, refine_scale
):
    L = _Launch(q, key_padding_mask, refine, 0.0)
    if L.n > FUSED_MAX_N:
        return _forward_rows(
            L, q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, m1, w_rv, scale, refine, refine_scale
        )
    adversarial = q_adv is not None
    out_cal = torch.empty_like(q)
    out_att = torch.empty_like(q) if adversarial else None
    perturb = q.new_empty(L.batch, L.heads, L.n, L.n) if adversarial else None
    alpha, beta = _refine_coefficients(refine, refine_scale)
    meta = _fused_meta(L, refine, False)  # the dot family's windows and warps; A here is always P_fin
    del meta["REFINE_SCORES"], meta["DROPOUT"]  # (probabilities, no dropout: the row refuses it)
    launch(
        _calibrated_fwd,
        (L.bh,),
        q,
        k,
        v,
        q_adv if adversarial else q,
        k_adv if adversarial else q,
        gate_logits if adversarial else q,
        noise if adversarial else q,
        vectors,
        scalars,
        q if m1 is None else m1,
        q if w_rv is None else w_rv,
        L.kpm,
        out_cal,
        out_att if adversarial else out_cal,
        perturb if adversarial else out_cal,
        scale,
        alpha,
        beta,
        L.n,
        L.d,
        L.heads,
        _head_stride(m1),
        _head_stride(w_rv),
        ADV=adversarial,
        **meta,
    )
    return out_cal, out_att, perturb


def _forward_rows(
    L, q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, m1, w_rv, scale, refine, refine_scale
):
    """The row-block path: one launch; with a refinement P_fin goes to float32 scratch and the dot family's
    tiled refinement (kernels/_refine.py refine_forward) turns it into out_cal."""
    adversarial = q_adv is not None
    out_cal = torch.empty_like(q)
    out_att = torch.empty_like(q) if adversarial else None
    perturb = q.new_zeros(L.batch, L.heads, L.n, L.n) if adversarial else None  # M is 0 off the causal blocks
    p_fin = L.scratch() if m1 is not None else None
    launch(
        _calibrated_rows_fwd,
        (triton.cdiv(L.n, ROWS_BLOCK_M), L.bh),
        q,
        k,
        v,
        q_adv if adversarial else q,
        k_adv if adversarial else q,
        gate_logits if adversarial else q,
        noise if adversarial else q,
        vectors,
        scalars,
        L.kpm,
        out_cal,
        out_att if adversarial else out_cal,
        perturb if adversarial else out_cal,
        out_cal if p_fin is None else p_fin,
        scale,
        L.n,
        L.d,
        L.heads,
        ADV=adversarial,
        STORE_PFIN=p_fin is not None,
        HAS_MASK=L.has_mask,
        PRECISION=L.precision,
        N_PAD=L.n_pad,
        D_PAD=_pad(L.d),
        BLOCK_M=ROWS_BLOCK_M,
        BLOCK_N=ROWS_BLOCK_N,
        num_warps=4,
    )
    if p_fin is not None:
        out_cal = refine_forward(L, p_fin, v, m1, w_rv, refine, refine_scale, 0.0, q)[0].to(q.dtype)
    return out_cal, out_att, perturb


def _fake_forward(q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, key_padding_mask, m1, w_rv, *options):
    batch, heads, n, _ = q.shape
    if q_adv is None:
        return torch.empty_like(q), q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(q), q.new_empty(batch, heads, n, n)


def _no_backward(*args):
    raise RuntimeError("calibrated: the Triton kernel is forward only (its capability row says grad=False)")


# ------------------------------------------------------------------------ custom op (torch.compile)

#: awr_fast::calibrated_fwd with a fake kernel, so torch.compile traces evaluation without a graph break
CALIBRATED = TritonOp(
    "calibrated",
    tensors=(
        "q",
        "k",
        "v",
        "vectors",
        "scalars",
        "q_adv?",
        "k_adv?",
        "gate_logits?",
        "noise?",
        "key_padding_mask?",
        "m1?",
        "w_rv?",
    ),
    options=(("scale", "float"), ("refine", "str"), ("refine_scale", "float")),
    differentiable=(),
    forward=_forward,
    backward=_no_backward,
    fake_forward=_fake_forward,
    outputs=3,
)


# ----------------------------------------------------------------------------------------- public entry


def reasons(inputs) -> list[str]:
    """What the fused forward cannot take beyond the capability table (awr_fast/ops/calibrated.py)."""
    out = []
    if inputs.perturb_dropout_p > 0.0:
        out.append(
            "perturb_dropout_p > 0 is not supported (forward-only kernel for evaluation; training runs the reference)"
        )
    return out


@torch.no_grad()
def calibrated(
    q,
    k,
    v,
    *,
    w_oq,
    w_ok,
    b_o,
    w_dq,
    w_dk,
    b_d,
    dist_scale,
    q_adv=None,
    k_adv=None,
    gate_logits=None,
    noise=None,
    key_padding_mask=None,
    scale=None,
    dropout_p=0.0,
    perturb_dropout_p=0.0,
    refine="none",
    w_rq=None,
    w_rk=None,
    w_rv=None,
    refine_scale=None,
):
    """Same contract as awr_fast.reference.calibrated.calibrated (inputs validated by the API; the row
    admits no dropout and no gradient): (out_cal, out_att, perturb), the last two None without the
    adversarial calibrator."""
    if dropout_p > 0.0 or perturb_dropout_p > 0.0:
        raise ValueError(
            "dropout_p, perturb_dropout_p: expected 0 for the Triton calibrated forward, got "
            f"{dropout_p}, {perturb_dropout_p}"
        )
    d_h = q.shape[-1]
    scale = 1.0 / math.sqrt(d_h) if scale is None else float(scale)
    c = 1.0 / math.sqrt(d_h) if refine_scale is None else float(refine_scale)
    vectors = torch.stack([w.to(torch.float32) for w in (w_oq, w_ok, w_dq, w_dk)]).contiguous()
    scalars = torch.stack([s.reshape(()).to(torch.float32) for s in (b_o, b_d, dist_scale)]).contiguous()
    adversarial = q_adv is not None
    if adversarial and noise is None:
        noise = torch.randn(*q.shape[:-1], q.shape[-2], device=q.device, dtype=q.dtype)
    m1 = refinement_matrix(refine, w_rq, w_rk)
    tensors = [t if t is None else t.contiguous() for t in (q, k, v, q_adv, k_adv, gate_logits, noise)]
    out_cal, out_att, perturb = CALIBRATED(
        *tensors[:3],
        vectors,
        scalars,
        *tensors[3:],
        key_padding_mask,
        m1 if m1 is None else m1.float().contiguous(),
        w_rv if w_rv is None else w_rv.float().contiguous(),
        scale,
        refine,
        c,
    )
    if not adversarial:  # the custom op's empty placeholders
        out_att = perturb = None
    return out_cal, out_att, perturb


__all__ = ["ADVERSARIAL", "FUSED_MAX_N", "calibrated", "reasons"]
