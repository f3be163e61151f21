"""Triton: AC-TSR calibrated attention (SPEC §5), forward and backward for n <= 256.

Evaluation (no gradient, no dropout, n <= FUSED_MAX_N): one program per (batch, head) holds the whole
calibrated attention of its sequence on the smallest window of trailing positions that holds it (16, 32
or the padded n, as the dot family's fused kernels):

    S = Q K^T; the spatial calibrator's order and distance terms from the separable projections
    (w_oq.q_i + w_ok.k_j + b_o and w_dq.q_i + w_dk.k_j + b_d: never an (n, n, 2 d_h) tensor) and the
    learned distance scale; P_sp = softmax(mask((S + E_o + E_d) scale))
    adversarial calibrator: M = softmax(mask(Q_adv K_adv^T scale)); P_att = softmax(P_sp o M + N o (1 - M));
    P_cal = softmax(P_sp o exp(1 - M)); G = sigmoid(gate); P_fin = softmax(G o P_sp + (1 - G) o P_cal)
    optionally AWRSR refinement of the final weights (kernels/_refine.py's fused window refinement)
    out_cal = P_fin V, out_att = P_att V, and M written out (the adversarial loss's penalty reads it)

Longer sequences, dropout and training-time noise run one program per block of 16 query rows
(_calibrated_rows_fwd): every softmax is over a row, so a row block is exact on its own; its key loop
runs four times from the first real position (the statistics of P_sp and M, of P_att and P_cal, of P_fin,
then the outputs), and a refined P_fin goes through float32 scratch to the dot family's tiled refinement.

Backward: a row-block kernel recomputes the statistics, takes the deltas sum_j P dL/dP of the five
softmaxes (dO . out for P_fin and P_att, one key pass for P_cal, one for P_sp and M) and writes dQ,
dQ_adv, the gate's gradient and the statistics; a column-block kernel recomputes each block from those
and accumulates dK, dV, dK_adv. Nothing n x n is saved by the forward. A refined out_cal recomputes P_fin
into scratch and its tiled refinement, whose backward (kernels/_refine.py) hands dL/dP_fin to the two
kernels (the delta of P_fin then takes the P_cal pass too).

Dropout (dropout_p on the weights of both outputs, perturb_dropout_p on M) and, when the call trains
without a noise tensor, the noise N are drawn in the kernels from one Philox seed per call, so the
backward recomputes them. Evaluation without a noise tensor draws it with torch.randn, as the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from awr_fast.ops.calibrated import ADVERSARIAL

from ._common import (
    _cdiv,
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
    _refine_coefficients,
    _slot_store,
    _staged_dot,
    _stages_forward,
    _store_rows,
    _store_rows_slice,
    _store_square_partial,
    _store_zero_rows,
    _visible,
    dropout_seed,
    refinement_factor_grads,
    refinement_matrix,
)
from ._launch import launch
from ._op import TritonOp
from ._refine import _refine_window, _staged_p_slot, _staged_refine_fwd, refine_backward, refine_forward, staged_slots

FUSED_MAX_N = 64  # longer sequences (up to TRITON_MAX_N) take the row-block kernel
# the row-block kernels' query rows per program and key block: 16-column key blocks in the forward (32
# spilled 40-176 B in fp32 on sm_90, 72-96 B on sm_80; 16: 0-144 B) and in the backward for half inputs
# (104-152 B -> 16-64 B, the adversarial training configuration), 32 in the fp32 backward (16 spills more)
ROWS_BLOCK_M, ROWS_BLOCK_N, ROWS_FP32_BACKWARD_BLOCK_N = 16, 16, 32
ROWS_WARPS = 4
# the backward keeps about twice the tiles of the forward live: twice the threads, and 16-column blocks in
# the column kernel (its three (block, d_h) accumulators); measured on sm_90 fp32 (tf32x3), 2026-12-05
BACKWARD_WARPS, COLUMNS_BLOCK_N = 8, 16
ORDER_EPS = tl.constexpr(1e-24)  # the released log(1 - p_o + 1e-24), computed in float32

# ------------------------------------------------------------------------------------------- jit kernels


@triton.jit
def _calibrator(VEC, SCAL, D, D_PAD: tl.constexpr):
    """The spatial calibrator's parameters: VEC rows w_oq, w_dq, w_ok, w_dk; SCAL b_o, b_d, s (float32)."""
    dcols = tl.arange(0, D_PAD)
    dmask = dcols < D
    w_oq = tl.load(VEC + 0 * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    w_dq = tl.load(VEC + 1 * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    w_ok = tl.load(VEC + 2 * D + dcols, mask=dmask, other=0.0).to(tl.float32)
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
def _spatial_bias(order_q, order_k, dist_q, dist_k, b_o, b_d, dist_scale, rows, cols, vis):
    """(E_o, E_d) of the spatial calibrator on rows x cols from the separable projections (w_oq.q_i, w_ok.k_j,
    w_dq.q_i, w_dk.k_j): log(1 - sigmoid(order logit)) where visible, and -(log(|i - j| + 1) - p_d)^2 s^2 / 2."""
    order = order_q[:, None] + order_k[None, :] + b_o
    e_o = tl.where(vis, tl.log(1.0 - tl.sigmoid(order) + ORDER_EPS), 0.0)
    p_d = dist_q[:, None] + dist_k[None, :] + b_d
    miss = tl.log(tl.abs(rows[:, None] - cols[None, :]).to(tl.float32) + 1.0) - p_d
    return e_o, -miss * miss * (dist_scale * dist_scale) * 0.5


@triton.jit
def _store_output(O, V, p, base, idx, n, D, PRECISION: tl.constexpr, D_PAD: tl.constexpr, SLICED: tl.constexpr):
    """O = P V on one window's rows, in 16-column slices of V and O when SLICED."""
    if SLICED:
        for c in tl.static_range(0, D_PAD, 16):
            o = tl.dot(p, _load_rows_slice(V, base, idx, n, D, c, 16), input_precision=PRECISION)
            _store_rows_slice(O, base, o, idx, n, D, c, 16)
    else:
        _store_rows(
            O, base, tl.dot(p, _load_rows(V, base, idx, n, D, D_PAD), input_precision=PRECISION), idx, n, D, D_PAD
        )


@triton.jit
def _window_fwd_registers(
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
    # Without a refinement, S = Q K^T, the calibrator's projections, S_adv and the outputs are summed over d
    # in 16-column slices (K's read transposed): sm_80 fp32 spilled 1.6 KB, now 0.2 KB (sm_90 192 -> 168 B).
    # With one, slices spill more on sm_90 (value 200 -> 304 B), so those keep whole-d operands.
    if MECH == 0:
        qk = tl.zeros((TILE, TILE), tl.float32)
        proj_oq = tl.zeros((TILE,), tl.float32)
        proj_dq = tl.zeros((TILE,), tl.float32)
        proj_ok = tl.zeros((TILE,), tl.float32)
        proj_dk = tl.zeros((TILE,), tl.float32)
        for c in tl.static_range(0, D_PAD, 16):
            cols = c + tl.arange(0, 16)
            real = cols < D
            q_c = _load_rows_slice(Q, base, idx, n, D, c, 16)
            k_t = _load_cols_slice(K, base, idx, n, D, c, 16)
            qk += tl.dot(q_c, k_t, input_precision=PRECISION)
            proj_oq += tl.sum(q_c * tl.load(VEC + 0 * D + cols, mask=real, other=0.0).to(tl.float32)[None, :], 1)
            proj_dq += tl.sum(q_c * tl.load(VEC + 1 * D + cols, mask=real, other=0.0).to(tl.float32)[None, :], 1)
            proj_ok += tl.sum(k_t * tl.load(VEC + 2 * D + cols, mask=real, other=0.0).to(tl.float32)[:, None], 0)
            proj_dk += tl.sum(k_t * tl.load(VEC + 3 * D + cols, mask=real, other=0.0).to(tl.float32)[:, None], 0)
        b_o = tl.load(SCAL + 0).to(tl.float32)
        b_d = tl.load(SCAL + 1).to(tl.float32)
        dist_scale = tl.load(SCAL + 2).to(tl.float32)
    else:
        q = _load_rows(Q, base, idx, n, D, D_PAD)
        k = _load_rows(K, base, idx, n, D, D_PAD)
        w_oq, w_ok, w_dq, w_dk, b_o, b_d, dist_scale = _calibrator(VEC, SCAL, D, D_PAD)
        proj_oq = tl.sum(q * w_oq[None, :], 1)
        proj_dq = tl.sum(q * w_dq[None, :], 1)
        proj_ok = tl.sum(k * w_ok[None, :], 1)
        proj_dk = tl.sum(k * w_dk[None, :], 1)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    # the spatial calibrator's separable projections
    e_o, e_d = _spatial_bias(proj_oq, proj_ok, proj_dq, proj_dk, b_o, b_d, dist_scale, idx, idx, vis)
    p_sp = _masked_softmax_rows((qk + e_o + e_d) * scale, vis)
    p_fin = p_sp
    if ADV:  # ordered for few live (TILE, TILE) tiles: each output stored as soon as it is complete
        if MECH == 0:
            s_adv = tl.zeros((TILE, TILE), tl.float32)
            for c in tl.static_range(0, D_PAD, 16):
                qa_c = _load_rows_slice(QA, base, idx, n, D, c, 16)
                s_adv += tl.dot(qa_c, _load_cols_slice(KA, base, idx, n, D, c, 16), input_precision=PRECISION)
        else:
            qa = _load_rows(QA, base, idx, n, D, D_PAD)
            ka = _load_rows(KA, base, idx, n, D, D_PAD)
            s_adv = tl.dot(qa, tl.trans(ka), input_precision=PRECISION)
        m = _masked_softmax_rows(s_adv * scale, vis)
        _store_square_partial(PERT, sq_base, m.to(PERT.dtype.element_ty), idx, off, n, TILE)
        noise = tl.load(NOISE + sq_base + idx[:, None] * n + idx[None, :], mask=inside, other=0.0).to(tl.float32)
        p_att = _masked_softmax_rows(p_sp * m + noise * (1.0 - m), vis)
        _store_output(OA, V, p_att, base, idx, n, D, PRECISION, D_PAD, MECH == 0)
        _store_zero_rows(OA, base, off, n, D, TILE, D_PAD)
        p_cal = _masked_softmax_rows(p_sp * tl.exp(1.0 - m), vis)
        gate = tl.load(GATE + b * n * n + idx[:, None] * n + idx[None, :], mask=inside, other=0.0).to(tl.float32)
        g = tl.sigmoid(gate)
        p_fin = _masked_softmax_rows(g * p_sp + (1.0 - g) * p_cal, vis)
    if MECH > 0:
        _, _, _, p_fin = _refine_window(
            p_fin, vis, M1, WRV, h, idx, n, alpha, beta, m_head_stride, wrv_head_stride, MECH, PRECISION
        )
    _store_output(OC, V, p_fin, base, idx, n, D, PRECISION, D_PAD, MECH == 0)
    _store_zero_rows(OC, base, off, n, D, TILE, D_PAD)


@triton.jit
def _projections(Q, K, VEC, base, idx, n, D, D_PAD: tl.constexpr, D_SLICE: tl.constexpr):
    """The spatial calibrator's per-row projections w_oq.q_i, w_dq.q_i, w_ok.k_j, w_dk.k_j on a window,
    summed over D_SLICE-column slices of Q and K (neither whole in registers)."""
    TILE: tl.constexpr = idx.shape[0]
    proj_oq = tl.zeros((TILE,), tl.float32)
    proj_dq = tl.zeros((TILE,), tl.float32)
    proj_ok = tl.zeros((TILE,), tl.float32)
    proj_dk = tl.zeros((TILE,), tl.float32)
    for c in tl.static_range(0, D_PAD, D_SLICE):
        cols = c + tl.arange(0, D_SLICE)
        real = cols < D
        q_c = _load_rows_slice(Q, base, idx, n, D, c, D_SLICE)
        k_c = _load_rows_slice(K, base, idx, n, D, c, D_SLICE)
        proj_oq += tl.sum(q_c * tl.load(VEC + 0 * D + cols, mask=real, other=0.0).to(tl.float32)[None, :], 1)
        proj_dq += tl.sum(q_c * tl.load(VEC + 1 * D + cols, mask=real, other=0.0).to(tl.float32)[None, :], 1)
        proj_ok += tl.sum(k_c * tl.load(VEC + 2 * D + cols, mask=real, other=0.0).to(tl.float32)[None, :], 1)
        proj_dk += tl.sum(k_c * tl.load(VEC + 3 * D + cols, mask=real, other=0.0).to(tl.float32)[None, :], 1)
    return proj_oq, proj_dq, proj_ok, proj_dk


@triton.jit
def _window_fwd_staged(
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
    WS,
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
    D_SLICE: tl.constexpr,
    SLOTS: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """_window_fwd_registers with its products summed over slices read from memory: S and S_adv from the
    inputs, P_att V and P_fin V from a scratch slot (the dot family's _window_fwd_staged), the refinement
    through _staged_refine_fwd's slots. No (TILE, TILE) operand of a product is ever whole in registers."""
    TT: tl.constexpr = TILE * TILE
    off = tl.maximum(n - TILE, 0)
    idx = off + tl.arange(0, TILE)
    base = bh * n * D
    sq_base = bh * n * n
    ws = bh * SLOTS * TT
    p_slot = ws if MECH == 0 else _staged_p_slot(ws, MECH, TILE)
    valid = n - off
    row_base = base + off * D
    inside = (idx[:, None] < n) & (idx[None, :] < n)
    vis = _visible(idx, idx, n, start, b, KPM, HAS_MASK)
    qk = _staged_dot(Q, row_base, D, 1, valid, D, K, row_base, 1, D, D, valid, TILE, TILE, D_PAD, D_SLICE, PRECISION)
    proj_oq, proj_dq, proj_ok, proj_dk = _projections(Q, K, VEC, base, idx, n, D, D_PAD, D_SLICE)
    b_o = tl.load(SCAL + 0).to(tl.float32)
    b_d = tl.load(SCAL + 1).to(tl.float32)
    dist_scale = tl.load(SCAL + 2).to(tl.float32)
    e_o, e_d = _spatial_bias(proj_oq, proj_ok, proj_dq, proj_dk, b_o, b_d, dist_scale, idx, idx, vis)
    p_sp = _masked_softmax_rows((qk + e_o + e_d) * scale, vis)
    p_fin = p_sp
    if ADV:  # P_att to its slot, then P_cal and P_fin in registers while P_att V reads the slot
        s_adv = _staged_dot(
            QA, row_base, D, 1, valid, D, KA, row_base, 1, D, D, valid, TILE, TILE, D_PAD, D_SLICE, PRECISION
        )
        m = _masked_softmax_rows(s_adv * scale, vis)
        _store_square_partial(PERT, sq_base, m.to(PERT.dtype.element_ty), idx, off, n, TILE)
        noise = tl.load(NOISE + sq_base + idx[:, None] * n + idx[None, :], mask=inside, other=0.0).to(tl.float32)
        _slot_store(WS, p_slot, _masked_softmax_rows(p_sp * m + noise * (1.0 - m), vis), TILE)
        p_cal = _masked_softmax_rows(p_sp * tl.exp(1.0 - m), vis)
        gate = tl.load(GATE + b * n * n + idx[:, None] * n + idx[None, :], mask=inside, other=0.0).to(tl.float32)
        g = tl.sigmoid(gate)
        p_fin = _masked_softmax_rows(g * p_sp + (1.0 - g) * p_cal, vis)
        tl.debug_barrier()
        out_att = _staged_dot(
            WS, p_slot, TILE, 1, TILE, TILE, V, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
        )
        _store_rows(OA, base, out_att, idx, n, D, D_PAD)
        _store_zero_rows(OA, base, off, n, D, TILE, D_PAD)
        tl.debug_barrier()  # every thread's reads of P_att before the slots are written again
    p_fin = _staged_refine_fwd(
        WS,
        ws,
        p_fin,
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
        MECH,
        PRECISION,
        TILE,
        K_SLICE,
    )
    _slot_store(WS, p_slot, p_fin, TILE)
    tl.debug_barrier()
    out = _staged_dot(
        WS, p_slot, TILE, 1, TILE, TILE, V, row_base, D, 1, valid, D, TILE, D_PAD, TILE, K_SLICE, PRECISION
    )
    _store_rows(OC, base, out, idx, n, D, D_PAD)
    _store_zero_rows(OC, base, off, n, D, TILE, D_PAD)


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
    WS,
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
    D_SLICE: tl.constexpr,
    STAGED: tl.constexpr,
    SLOTS: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """One window's forward: its tiles staged through scratch (_stages_forward with extra_live_tiles) or in
    registers."""
    if STAGED:
        _window_fwd_staged(
            Q, K, V, QA, KA, GATE, NOISE, VEC, SCAL, M1, WRV, KPM, OC, OA, PERT, WS, bh, b, h, start, scale, alpha,
            beta, n, D, m_head_stride, wrv_head_stride, ADV, MECH, HAS_MASK, PRECISION, TILE, D_PAD, D_SLICE, SLOTS,
            K_SLICE,
        )  # fmt: skip
    else:
        _window_fwd_registers(
            Q, K, V, QA, KA, GATE, NOISE, VEC, SCAL, M1, WRV, KPM, OC, OA, PERT, bh, b, h, start, scale, alpha, beta,
            n, D, m_head_stride, wrv_head_stride, ADV, MECH, HAS_MASK, PRECISION, TILE, D_PAD,
        )  # fmt: skip


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
    WS,
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
    D_SLICE: tl.constexpr,
    STAGED: tl.constexpr,
    SLOTS: tl.constexpr,
    K_SLICE: tl.constexpr,
):
    """One program per (batch, head): out_cal (and out_att, M) on the smallest window that holds the sequence."""
    bh, b, h, start, length = _program_sequence(KPM, n, H, HAS_MASK, N_PAD)
    # TILE is a compile-time shape, so each window size is its own branch
    if length <= TILE_S:
        _window_fwd(
            Q, K, V, QA, KA, GATE, NOISE, VEC, SCAL, M1, WRV, KPM, OC, OA, PERT, WS, bh, b, h, start, scale, alpha,
            beta, n, D, m_head_stride, wrv_head_stride, ADV, MECH, HAS_MASK, PRECISION, TILE_S, D_PAD, D_SLICE,
            STAGED, SLOTS, K_SLICE,
        )  # fmt: skip
    elif length <= TILE_M:
        _window_fwd(
            Q, K, V, QA, KA, GATE, NOISE, VEC, SCAL, M1, WRV, KPM, OC, OA, PERT, WS, bh, b, h, start, scale, alpha,
            beta, n, D, m_head_stride, wrv_head_stride, ADV, MECH, HAS_MASK, PRECISION, TILE_M, D_PAD, D_SLICE,
            STAGED, SLOTS, K_SLICE,
        )  # fmt: skip
    else:
        _window_fwd(
            Q, K, V, QA, KA, GATE, NOISE, VEC, SCAL, M1, WRV, KPM, OC, OA, PERT, WS, bh, b, h, start, scale, alpha,
            beta, n, D, m_head_stride, wrv_head_stride, ADV, MECH, HAS_MASK, PRECISION, N_PAD, D_PAD, D_SLICE,
            STAGED, SLOTS, K_SLICE,
        )  # fmt: skip


# ---- row-block path (FUSED_MAX_N < n <= TILED_MAX_N, dropout, and every backward): one program per
# (block of query rows, batch*head); each softmax is over a row, so a block of rows is exact on its own.
# The key loop runs several times (every softmax needs the normalised weights of the one before it): the
# statistics of P_sp and M; of P_att and P_cal; of P_fin; then the outputs. Nothing but the outputs (and
# M) is written, except P_fin when it is to be refined (the shared tiled refinement then reads it as A).
# Dropout draws three keep masks from one Philox call (tl.rand4x): the weights of out_cal, of out_att, and M.


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
    """(spatial logits, adversarial logits, K block, K_adv block) of rows x a block of key columns, the
    logits -inf where not visible (the adversarial ones 0 and K_adv = K without the adversary)."""
    k = _load_rows(K, base, cols, n, D, D_PAD)
    order_k, dist_k = tl.sum(k * w_ok[None, :], 1), tl.sum(k * w_dk[None, :], 1)
    e_o, e_d = _spatial_bias(q_order, order_k, q_dist, dist_k, b_o, b_d, dist_scale, rows, cols, vis)
    s = tl.where(vis, (tl.dot(q, tl.trans(k), input_precision=PRECISION) + e_o + e_d) * scale, float("-inf"))
    a = tl.zeros_like(s)
    ka = k
    if ADV:
        qa = _load_rows(QA, base, rows, n, D, D_PAD)
        ka = _load_rows(KA, base, cols, n, D, D_PAD)
        a = tl.where(vis, tl.dot(qa, tl.trans(ka), input_precision=PRECISION) * scale, float("-inf"))
    return s, a, k, ka


@triton.jit
def _calibrator_grads(dlogit, q_order, q_dist, k, w_ok, w_dk, b_o, b_d, dist_scale, rows, cols, vis):
    """d/d(order logit), d/d(distance estimate) and d/d(distance scale) of one block, given the gradient of
    the unscaled spatial logit Q K^T + E_o + E_d."""
    order = q_order[:, None] + tl.sum(k * w_ok[None, :], 1)[None, :] + b_o
    sig = tl.sigmoid(order)
    d_order = tl.where(vis, -dlogit * sig * (1.0 - sig) / (1.0 - sig + ORDER_EPS), 0.0)
    p_d = q_dist[:, None] + tl.sum(k * w_dk[None, :], 1)[None, :] + b_d
    miss = tl.log(tl.abs(rows[:, None] - cols[None, :]).to(tl.float32) + 1.0) - p_d
    d_dist = tl.where(vis, dlogit * miss * (dist_scale * dist_scale), 0.0)
    d_scale = tl.where(vis, -dlogit * miss * miss * dist_scale, 0.0)
    return d_order, d_dist, d_scale


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
def _square_block(X, sq_base, rows, cols, n):
    """The float32 (rows, cols) block of an (n, n) map (noise, gate logits, dM); zero outside it."""
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    return tl.load(X + sq_base + rows[:, None] * n + cols[None, :], mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _keeps(SEED, bh, rows, cols, n, dropout_p, perturb_dropout_p, DROPOUT: tl.constexpr, PERTURB: tl.constexpr):
    """Keep masks of the three dropout streams (out_cal's weights, P_att, M) from one Philox draw per
    (batch*head, i, j); all true without dropout."""
    if DROPOUT or PERTURB:
        u_fin, u_att, u_m, _ = tl.rand4x(tl.load(SEED), bh * n * n + rows[:, None] * n + cols[None, :])
        return u_fin >= dropout_p, u_att >= dropout_p, u_m >= perturb_dropout_p
    else:
        keep = (rows[:, None] >= 0) & (cols[None, :] >= 0)
        return keep, keep, keep


@triton.jit
def _noise_block(NOISE, SEED, bh, rows, cols, n, DRAW_NOISE: tl.constexpr):
    """The perturbation noise N of one block: read from NOISE, or drawn (N(0, 1), Philox keyed by seed + 1,
    so independent of the dropout masks) at the same (batch*head, i, j) in every kernel that asks."""
    if DRAW_NOISE:
        return tl.randn(tl.load(SEED) + 1, bh * n * n + rows[:, None] * n + cols[None, :])
    else:
        return _square_block(NOISE, bh * n * n, rows, cols, n)


@triton.jit
def _perturbation(a, m_pm, l_pm, keep_m, perturb_scale, vis):
    """(M before its dropout, M) of one block."""
    pm_raw = _normalised(a, m_pm, l_pm, vis)
    return pm_raw, tl.where(keep_m, pm_raw * perturb_scale, 0.0)


@triton.jit
def _row_statistics(
    Q, K, QA, KA, GATE, NOISE, KPM, SEED, b, bh, start, rows, lo, hi, n, D, q, q_order, q_dist, w_ok, w_dk,
    b_o, b_d, dist_scale, scale, perturb_dropout_p, ADV: tl.constexpr, PERTURB_DROPOUT: tl.constexpr,
    DRAW_NOISE: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Running (max, sum) of the five row softmaxes P_sp, M, P_att, P_cal, P_fin over the key blocks
    [lo, hi), three passes (the last four are 0 without the adversary)."""
    base = bh * n * D
    perturb_scale = 1.0 / (1.0 - perturb_dropout_p)
    m_sp = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_sp = tl.zeros([BLOCK_M], tl.float32)
    m_pm = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_pm = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
        s, a, _, _ = _rows_logits(
            Q, K, QA, KA, base, rows, cols, n, D, q, q_order, q_dist, w_ok, w_dk, b_o, b_d, dist_scale, scale, vis,
            ADV, PRECISION, D_PAD,
        )  # fmt: skip
        m_sp, l_sp = _online(m_sp, l_sp, s, vis)
        if ADV:
            m_pm, l_pm = _online(m_pm, l_pm, a, vis)
    m_att = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_att = tl.zeros([BLOCK_M], tl.float32)
    m_cal = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_cal = tl.zeros([BLOCK_M], tl.float32)
    m_fin = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_fin = tl.zeros([BLOCK_M], tl.float32)
    if ADV:
        for j0 in range(lo, hi, BLOCK_N):  # P_att and P_cal read the normalised P_sp and M
            cols = j0 + tl.arange(0, BLOCK_N)
            vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
            s, a, _, _ = _rows_logits(
                Q, K, QA, KA, base, rows, cols, n, D, q, q_order, q_dist, w_ok, w_dk, b_o, b_d, dist_scale, scale,
                vis, ADV, PRECISION, D_PAD,
            )  # fmt: skip
            p_sp = _normalised(s, m_sp, l_sp, vis)
            _, _, keep_m = _keeps(SEED, bh, rows, cols, n, 0.0, perturb_dropout_p, False, PERTURB_DROPOUT)
            _, pm = _perturbation(a, m_pm, l_pm, keep_m, perturb_scale, vis)
            noise = _noise_block(NOISE, SEED, bh, rows, cols, n, DRAW_NOISE)
            m_att, l_att = _online(m_att, l_att, p_sp * pm + noise * (1.0 - pm), vis)
            m_cal, l_cal = _online(m_cal, l_cal, p_sp * tl.exp(1.0 - pm), vis)
        for j0 in range(lo, hi, BLOCK_N):  # P_fin reads the normalised P_cal
            cols = j0 + tl.arange(0, BLOCK_N)
            vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
            s, a, _, _ = _rows_logits(
                Q, K, QA, KA, base, rows, cols, n, D, q, q_order, q_dist, w_ok, w_dk, b_o, b_d, dist_scale, scale,
                vis, ADV, PRECISION, D_PAD,
            )  # fmt: skip
            p_sp = _normalised(s, m_sp, l_sp, vis)
            _, _, keep_m = _keeps(SEED, bh, rows, cols, n, 0.0, perturb_dropout_p, False, PERTURB_DROPOUT)
            _, pm = _perturbation(a, m_pm, l_pm, keep_m, perturb_scale, vis)
            p_cal = _normalised(p_sp * tl.exp(1.0 - pm), m_cal, l_cal, vis)
            g = tl.sigmoid(_square_block(GATE, b * n * n, rows, cols, n))
            m_fin, l_fin = _online(m_fin, l_fin, g * p_sp + (1.0 - g) * p_cal, vis)
    return m_sp, l_sp, m_pm, l_pm, m_att, l_att, m_cal, l_cal, m_fin, l_fin


@triton.jit
def _row_program(
    Q, K, QA, KA, GATE, NOISE, VEC, SCAL, KPM, SEED, scale, perturb_dropout_p, n, D, H, ADV: tl.constexpr,
    PERTURB_DROPOUT: tl.constexpr, DRAW_NOISE: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    N_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """A row-block program's sequence and rows: (batch*head, batch, first real position, rows, queries, their
    order and distance projections, the calibrator, the causal key range [lo, hi) in BLOCK_N steps, and the
    rows' softmax statistics (_row_statistics))."""
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    w_oq, w_ok, w_dq, w_dk, b_o, b_d, dist_scale = _calibrator(VEC, SCAL, D, D_PAD)
    q = _load_rows(Q, bh * n * D, rows, n, D, D_PAD)
    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, n)
    q_order = tl.sum(q * w_oq[None, :], 1)
    q_dist = tl.sum(q * w_dq[None, :], 1)
    stats = _row_statistics(
        Q, K, QA, KA, GATE, NOISE, KPM, SEED, b, bh, start, rows, lo, hi, n, D, q, q_order, q_dist, w_ok, w_dk,
        b_o, b_d, dist_scale, scale, perturb_dropout_p, ADV, PERTURB_DROPOUT, DRAW_NOISE, HAS_MASK, PRECISION, D_PAD,
        BLOCK_M, BLOCK_N,
    )  # fmt: skip
    return bh, b, start, rows, q, q_order, q_dist, w_oq, w_ok, w_dq, w_dk, b_o, b_d, dist_scale, lo, hi, stats


@triton.jit
def _block(
    Q, K, QA, KA, GATE, NOISE, KPM, SEED, b, bh, start, rows, cols, n, D, q, q_order, q_dist, w_ok, w_dk, b_o,
    b_d, dist_scale, scale, dropout_p, perturb_dropout_p, m_sp, l_sp, m_pm, l_pm, m_att, l_att, m_cal, l_cal,
    m_fin, l_fin, ADV: tl.constexpr, DROPOUT: tl.constexpr, PERTURB_DROPOUT: tl.constexpr,
    DRAW_NOISE: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """Everything of one (rows, cols) block from the row statistics: visibility, the K and K_adv blocks, the
    noise, the three keep masks, and the weights P_sp, M before and after its dropout, exp(1 - M), P_att,
    P_cal, G and P_fin (P_fin = P_sp and the adversary's 0 without it)."""
    vis = _visible(rows, cols, n, start, b, KPM, HAS_MASK)
    s, a, k, ka = _rows_logits(
        Q, K, QA, KA, bh * n * D, rows, cols, n, D, q, q_order, q_dist, w_ok, w_dk, b_o, b_d, dist_scale, scale,
        vis, ADV, PRECISION, D_PAD,
    )  # fmt: skip
    keep_f, keep_a, keep_m = _keeps(SEED, bh, rows, cols, n, dropout_p, perturb_dropout_p, DROPOUT, PERTURB_DROPOUT)
    p_sp = _normalised(s, m_sp, l_sp, vis)
    zero = tl.zeros_like(p_sp)
    noise, pm_raw, pm, ex, p_att, p_cal, g, p_fin = zero, zero, zero, zero, zero, zero, zero, p_sp
    if ADV:
        noise = _noise_block(NOISE, SEED, bh, rows, cols, n, DRAW_NOISE)
        pm_raw, pm = _perturbation(a, m_pm, l_pm, keep_m, 1.0 / (1.0 - perturb_dropout_p), vis)
        ex = tl.exp(1.0 - pm)
        p_att = _normalised(p_sp * pm + noise * (1.0 - pm), m_att, l_att, vis)
        p_cal = _normalised(p_sp * ex, m_cal, l_cal, vis)
        g = tl.sigmoid(_square_block(GATE, b * n * n, rows, cols, n))
        p_fin = _normalised(g * p_sp + (1.0 - g) * p_cal, m_fin, l_fin, vis)
    return vis, k, ka, noise, keep_f, keep_a, keep_m, p_sp, pm_raw, pm, ex, p_att, p_cal, g, p_fin


@triton.jit
def _weights_grad(do, v, keep, dropout_p, PRECISION: tl.constexpr):
    """dL/dP (before dropout) of out = dropout(P) V, given dO."""
    return tl.where(keep, tl.dot(do, tl.trans(v), input_precision=PRECISION) / (1.0 - dropout_p), 0.0)


@triton.jit
def _fin_grad(
    DPFIN, sq_base, do_c, v, keep_f, dropout_p, rows, cols, n, REFINED: tl.constexpr, PRECISION: tl.constexpr
):
    """dL/dP_fin of one block: read from DPFIN (the tiled refinement's backward wrote dL/dA there), or that
    of out_cal = dropout(P_fin) V."""
    if REFINED:
        return _square_block(DPFIN, sq_base, rows, cols, n)
    else:
        return _weights_grad(do_c, v, keep_f, dropout_p, PRECISION)


@triton.jit
def _block_grads(
    p_sp, pm, ex, p_att, p_cal, g, p_fin, noise, keep_m, dp_fin, dp_att, dpert, d_fin, d_att, d_cal,
    perturb_dropout_p, ADV: tl.constexpr,
):  # fmt: skip
    """(dL/dP_sp, dL/dM before its dropout, dL/d(G o P_sp + (1 - G) o P_cal)) of one block, from the gradients
    of P_fin and P_att (before their dropout), of the returned M, and the row deltas sum_j P dL/dP."""
    dp_sp = dp_fin
    dm_raw = tl.zeros_like(dp_fin)
    dx_fin = tl.zeros_like(dp_fin)
    if ADV:
        dx_fin = p_fin * (dp_fin - d_fin[:, None])
        dx_att = p_att * (dp_att - d_att[:, None])
        dx_cal = p_cal * ((1.0 - g) * dx_fin - d_cal[:, None])
        dp_sp = g * dx_fin + dx_cal * ex + dx_att * pm
        dm = dx_att * (p_sp - noise) - dx_cal * p_sp * ex + dpert
        dm_raw = tl.where(keep_m, dm / (1.0 - perturb_dropout_p), 0.0)
    return dp_sp, dm_raw, dx_fin


@triton.jit
def _calibrated_rows_fwd(
    Q, K, V, QA, KA, GATE, NOISE, VEC, SCAL, KPM, SEED, OC, OA, PERT, PFIN, scale, dropout_p, perturb_dropout_p,
    n, D, H, ADV: tl.constexpr, STORE_PFIN: tl.constexpr, DROPOUT: tl.constexpr, PERTURB_DROPOUT: tl.constexpr,
    DRAW_NOISE: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, N_PAD: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out_cal = P_fin V (or P_fin written to PFIN for the refinement), out_att = P_att V and M for one block
    of query rows, in four passes over the causal key blocks from the first real position."""
    bh, b, start, rows, q, q_order, q_dist, w_oq, w_ok, w_dq, w_dk, b_o, b_d, dist_scale, lo, hi, stats = _row_program(
        Q, K, QA, KA, GATE, NOISE, VEC, SCAL, KPM, SEED, scale, perturb_dropout_p, n, D, H, ADV, PERTURB_DROPOUT,
        DRAW_NOISE, HAS_MASK, PRECISION, N_PAD, D_PAD, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    m_sp, l_sp, m_pm, l_pm, m_att, l_att, m_cal, l_cal, m_fin, l_fin = stats
    base = bh * n * D
    sq_base = bh * n * n
    drop_scale = 1.0 / (1.0 - dropout_p)
    acc_cal = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc_att = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < n) & (cols[None, :] < n)
        _, _, _, _, keep_f, keep_a, _, _, _, pm, _, p_att, _, _, p_fin = _block(
            Q, K, QA, KA, GATE, NOISE, KPM, SEED, b, bh, start, rows, cols, n, D, q, q_order, q_dist, w_ok, w_dk,
            b_o, b_d, dist_scale, scale, dropout_p, perturb_dropout_p, m_sp, l_sp, m_pm, l_pm, m_att, l_att, m_cal,
            l_cal, m_fin, l_fin, ADV, DROPOUT, PERTURB_DROPOUT, DRAW_NOISE, HAS_MASK, PRECISION, D_PAD,
        )  # fmt: skip
        v = _load_rows(V, base, cols, n, D, D_PAD)
        if ADV:
            tl.store(PERT + sq_base + rows[:, None] * n + cols[None, :], pm.to(PERT.dtype.element_ty), mask=inside)
            acc_att += tl.dot(tl.where(keep_a, p_att * drop_scale, 0.0), v, input_precision=PRECISION)
        if STORE_PFIN:
            tl.store(PFIN + sq_base + rows[:, None] * n + cols[None, :], p_fin, mask=inside)
        else:
            acc_cal += tl.dot(tl.where(keep_f, p_fin * drop_scale, 0.0), v, input_precision=PRECISION)
    if not STORE_PFIN:
        _store_rows(OC, base, acc_cal, rows, n, D, D_PAD)
    if ADV:
        _store_rows(OA, base, acc_att, rows, n, D, D_PAD)


@triton.jit
def _drawn_noise(SEED, OUT, n, BLOCK: tl.constexpr):
    """OUT[bh] = the noise the row-block kernels draw for batch*head bh (every (i, j) of its n x n map)."""
    bh = tl.program_id(1)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # i * n + j: _noise_block's Philox counter
    noise = tl.randn(tl.load(SEED) + 1, bh * n * n + idx)
    tl.store(OUT + bh * n * n + idx, noise, mask=idx < n * n)


# ---- backward: a row-block kernel (dQ, dQ_adv, the gate's gradient, the row deltas) and a column-block
# kernel (dK, dV, dK_adv) that recomputes each block from the row statistics and deltas the first one
# saved. The deltas sum_j P dL/dP of P_fin and P_att are dO . out (no pass); those of P_cal, then P_sp and
# M take one pass each. The spatial calibrator's weight gradients leave as per-row / per-column sums.
STAT_ROWS = tl.constexpr(15)  # m, l of P_sp, M, P_att, P_cal, P_fin; deltas of P_fin, P_att, P_cal, P_sp, M


@triton.jit
def _calibrated_rows_bwd(
    Q, K, V, QA, KA, GATE, NOISE, VEC, SCAL, KPM, SEED, OC, OA, DOC, DOA, DPERT, DPFIN, DQ, DQA, DGATE, STATS,
    ROWSUMS, scale, dropout_p, perturb_dropout_p, n, D, H, ADV: tl.constexpr, HAS_DPERT: tl.constexpr,
    REFINED: tl.constexpr,
    DROPOUT: tl.constexpr, PERTURB_DROPOUT: tl.constexpr, DRAW_NOISE: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, N_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ, dQ_adv and the gate's gradient of one block of query rows; its statistics and deltas to STATS
    (for _calibrated_cols_bwd) and the calibrator's row sums to ROWSUMS."""
    bh, b, start, rows, q, q_order, q_dist, w_oq, w_ok, w_dq, w_dk, b_o, b_d, dist_scale, lo, hi, stats = _row_program(
        Q, K, QA, KA, GATE, NOISE, VEC, SCAL, KPM, SEED, scale, perturb_dropout_p, n, D, H, ADV, PERTURB_DROPOUT,
        DRAW_NOISE, HAS_MASK, PRECISION, N_PAD, D_PAD, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    m_sp, l_sp, m_pm, l_pm, m_att, l_att, m_cal, l_cal, m_fin, l_fin = stats
    base = bh * n * D
    sq_base = bh * n * n
    do_c = _load_rows(DOC, base, rows, n, D, D_PAD)
    do_a = _load_rows(DOA, base, rows, n, D, D_PAD) if ADV else do_c
    # sum_j P_ij dL/dP_ij = dO_i . out_i for the weights that multiply V (dropout included); a refined
    # out_cal does not multiply P_fin: its delta takes the pass below
    d_fin = tl.zeros([BLOCK_M], tl.float32) if REFINED else tl.sum(do_c * _load_rows(OC, base, rows, n, D, D_PAD), 1)
    d_att = tl.sum(do_a * _load_rows(OA, base, rows, n, D, D_PAD), 1) if ADV else d_fin
    d_cal = tl.zeros([BLOCK_M], tl.float32)
    d_m = tl.zeros([BLOCK_M], tl.float32)
    if ADV or REFINED:
        # the deltas of P_fin and P_cal in one pass: with C = P_cal o (1 - G) o P_fin, the latter is
        # sum_j C dP_fin - d_fin sum_j C
        s_fin = tl.zeros([BLOCK_M], tl.float32)
        s_cal = tl.zeros([BLOCK_M], tl.float32)
        c_sum = tl.zeros([BLOCK_M], tl.float32)
        for j0 in range(lo, hi, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            _, _, _, _, keep_f, _, _, _, _, _, _, _, p_cal, g, p_fin = _block(
                Q, K, QA, KA, GATE, NOISE, KPM, SEED, b, bh, start, rows, cols, n, D, q, q_order, q_dist, w_ok,
                w_dk, b_o, b_d, dist_scale, scale, dropout_p, perturb_dropout_p, m_sp, l_sp, m_pm, l_pm, m_att,
                l_att, m_cal, l_cal, m_fin, l_fin, ADV, DROPOUT, PERTURB_DROPOUT, DRAW_NOISE, HAS_MASK, PRECISION,
                D_PAD,
            )  # fmt: skip
            v = _load_rows(V, base, cols, n, D, D_PAD)
            dp_fin = _fin_grad(DPFIN, sq_base, do_c, v, keep_f, dropout_p, rows, cols, n, REFINED, PRECISION)
            c = p_cal * (1.0 - g) * p_fin
            s_fin += tl.sum(p_fin * dp_fin, 1)
            s_cal += tl.sum(c * dp_fin, 1)
            c_sum += tl.sum(c, 1)
        if REFINED:
            d_fin = s_fin
        d_cal = s_cal - d_fin * c_sum
    d_sp = d_fin
    if ADV:
        d_sp = tl.zeros([BLOCK_M], tl.float32)
        for j0 in range(lo, hi, BLOCK_N):  # the deltas of P_sp and M
            cols = j0 + tl.arange(0, BLOCK_N)
            _, _, _, noise, keep_f, keep_a, keep_m, p_sp, pm_raw, pm, ex, p_att, p_cal, g, p_fin = _block(
                Q, K, QA, KA, GATE, NOISE, KPM, SEED, b, bh, start, rows, cols, n, D, q, q_order, q_dist, w_ok,
                w_dk, b_o, b_d, dist_scale, scale, dropout_p, perturb_dropout_p, m_sp, l_sp, m_pm, l_pm, m_att,
                l_att, m_cal, l_cal, m_fin, l_fin, ADV, DROPOUT, PERTURB_DROPOUT, DRAW_NOISE, HAS_MASK, PRECISION,
                D_PAD,
            )  # fmt: skip
            v = _load_rows(V, base, cols, n, D, D_PAD)
            dp_fin = _fin_grad(DPFIN, sq_base, do_c, v, keep_f, dropout_p, rows, cols, n, REFINED, PRECISION)
            dp_att = _weights_grad(do_a, v, keep_a, dropout_p, PRECISION)
            dpert = _square_block(DPERT, sq_base, rows, cols, n) if HAS_DPERT else tl.zeros_like(p_sp)
            dp_sp, dm_raw, _ = _block_grads(
                p_sp, pm, ex, p_att, p_cal, g, p_fin, noise, keep_m, dp_fin, dp_att, dpert, d_fin, d_att, d_cal,
                perturb_dropout_p, ADV,
            )  # fmt: skip
            d_sp += tl.sum(p_sp * dp_sp, 1)
            d_m += tl.sum(pm_raw * dm_raw, 1)
    # the gradients: dQ, dQ_adv, the gate's (per head) and the calibrator's row sums
    acc_q = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc_qa = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    r_order = tl.zeros([BLOCK_M], tl.float32)
    r_dist = tl.zeros([BLOCK_M], tl.float32)
    r_scale = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        vis, k, ka, noise, keep_f, keep_a, keep_m, p_sp, pm_raw, pm, ex, p_att, p_cal, g, p_fin = _block(
            Q, K, QA, KA, GATE, NOISE, KPM, SEED, b, bh, start, rows, cols, n, D, q, q_order, q_dist, w_ok, w_dk,
            b_o, b_d, dist_scale, scale, dropout_p, perturb_dropout_p, m_sp, l_sp, m_pm, l_pm, m_att, l_att, m_cal,
            l_cal, m_fin, l_fin, ADV, DROPOUT, PERTURB_DROPOUT, DRAW_NOISE, HAS_MASK, PRECISION, D_PAD,
        )  # fmt: skip
        v = _load_rows(V, base, cols, n, D, D_PAD)
        dp_fin = _fin_grad(DPFIN, sq_base, do_c, v, keep_f, dropout_p, rows, cols, n, REFINED, PRECISION)
        dp_att = dp_fin
        dpert = tl.zeros_like(p_sp)
        if ADV:
            dp_att = _weights_grad(do_a, v, keep_a, dropout_p, PRECISION)
            if HAS_DPERT:
                dpert = _square_block(DPERT, sq_base, rows, cols, n)
        dp_sp, dm_raw, dx_fin = _block_grads(
            p_sp, pm, ex, p_att, p_cal, g, p_fin, noise, keep_m, dp_fin, dp_att, dpert, d_fin, d_att, d_cal,
            perturb_dropout_p, ADV,
        )  # fmt: skip
        dlogit = p_sp * (dp_sp - d_sp[:, None]) * scale
        acc_q += tl.dot(dlogit, k, input_precision=PRECISION)
        d_order, d_dist, d_scale = _calibrator_grads(
            dlogit, q_order, q_dist, k, w_ok, w_dk, b_o, b_d, dist_scale, rows, cols, vis
        )
        r_order += tl.sum(d_order, 1)
        r_dist += tl.sum(d_dist, 1)
        r_scale += tl.sum(d_scale, 1)
        if ADV:
            acc_qa += tl.dot(pm_raw * (dm_raw - d_m[:, None]) * scale, ka, input_precision=PRECISION)
            inside = (rows[:, None] < n) & (cols[None, :] < n)
            dgate = dx_fin * (p_sp - p_cal) * g * (1.0 - g)
            tl.store(DGATE + sq_base + rows[:, None] * n + cols[None, :], dgate, mask=inside)
    acc_q += r_order[:, None] * w_oq[None, :] + r_dist[:, None] * w_dq[None, :]
    _store_rows(DQ, base, acc_q, rows, n, D, D_PAD)
    if ADV:
        _store_rows(DQA, base, acc_qa, rows, n, D, D_PAD)
    in_rows = rows < n
    st = STATS + bh * STAT_ROWS * n + rows
    tl.store(st + 0 * n, m_sp, mask=in_rows)
    tl.store(st + 1 * n, l_sp, mask=in_rows)
    tl.store(st + 2 * n, m_pm, mask=in_rows)
    tl.store(st + 3 * n, l_pm, mask=in_rows)
    tl.store(st + 4 * n, m_att, mask=in_rows)
    tl.store(st + 5 * n, l_att, mask=in_rows)
    tl.store(st + 6 * n, m_cal, mask=in_rows)
    tl.store(st + 7 * n, l_cal, mask=in_rows)
    tl.store(st + 8 * n, m_fin, mask=in_rows)
    tl.store(st + 9 * n, l_fin, mask=in_rows)
    tl.store(st + 10 * n, d_fin, mask=in_rows)
    tl.store(st + 11 * n, d_att, mask=in_rows)
    tl.store(st + 12 * n, d_cal, mask=in_rows)
    tl.store(st + 13 * n, d_sp, mask=in_rows)
    tl.store(st + 14 * n, d_m, mask=in_rows)
    rs = ROWSUMS + bh * n + rows  # (3, batch*heads, n): the host's weight-gradient GEMM reads it as is
    plane = tl.num_programs(1) * n
    tl.store(rs, r_order, mask=in_rows)
    tl.store(rs + plane, r_dist, mask=in_rows)
    tl.store(rs + 2 * plane, r_scale, mask=in_rows)


@triton.jit
def _calibrated_cols_bwd(
    Q, K, V, QA, KA, GATE, NOISE, VEC, SCAL, KPM, SEED, DOC, DOA, DPERT, DPFIN, STATS, DK, DV, DKA, COLSUMS,
    scale, dropout_p, perturb_dropout_p, n, D, H, ADV: tl.constexpr, HAS_DPERT: tl.constexpr,
    REFINED: tl.constexpr, DROPOUT: tl.constexpr,
    PERTURB_DROPOUT: tl.constexpr, DRAW_NOISE: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    N_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV, dK_adv of one block of key columns: the query row blocks that see it, recomputed from the
    row statistics and deltas of _calibrated_rows_bwd."""
    bh = tl.program_id(1)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = bh * n * D
    sq_base = bh * n * n
    w_oq, w_ok, w_dq, w_dk, b_o, b_d, dist_scale = _calibrator(VEC, SCAL, D, D_PAD)
    drop_scale = 1.0 / (1.0 - dropout_p)
    v = _load_rows(V, base, cols, n, D, D_PAD)
    acc_k = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    acc_v = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    acc_ka = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    c_order = tl.zeros([BLOCK_N], tl.float32)
    c_dist = tl.zeros([BLOCK_N], tl.float32)
    for i0 in range((tl.maximum(tl.program_id(0) * BLOCK_N, start) // BLOCK_M) * BLOCK_M, n, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        in_rows = rows < n
        q = _load_rows(Q, base, rows, n, D, D_PAD)
        q_order = tl.sum(q * w_oq[None, :], 1)
        q_dist = tl.sum(q * w_dq[None, :], 1)
        st = STATS + bh * STAT_ROWS * n + rows
        vis, k, _, noise, keep_f, keep_a, keep_m, p_sp, pm_raw, pm, ex, p_att, p_cal, g, p_fin = _block(
            Q, K, QA, KA, GATE, NOISE, KPM, SEED, b, bh, start, rows, cols, n, D, q, q_order, q_dist, w_ok, w_dk,
            b_o, b_d, dist_scale, scale, dropout_p, perturb_dropout_p, tl.load(st + 0 * n, mask=in_rows, other=0.0),
            tl.load(st + 1 * n, mask=in_rows, other=0.0), tl.load(st + 2 * n, mask=in_rows, other=0.0),
            tl.load(st + 3 * n, mask=in_rows, other=0.0), tl.load(st + 4 * n, mask=in_rows, other=0.0),
            tl.load(st + 5 * n, mask=in_rows, other=0.0), tl.load(st + 6 * n, mask=in_rows, other=0.0),
            tl.load(st + 7 * n, mask=in_rows, other=0.0), tl.load(st + 8 * n, mask=in_rows, other=0.0),
            tl.load(st + 9 * n, mask=in_rows, other=0.0), ADV, DROPOUT, PERTURB_DROPOUT, DRAW_NOISE, HAS_MASK,
            PRECISION, D_PAD,
        )  # fmt: skip
        d_fin = tl.load(st + 10 * n, mask=in_rows, other=0.0)
        d_att = tl.load(st + 11 * n, mask=in_rows, other=0.0)
        d_cal = tl.load(st + 12 * n, mask=in_rows, other=0.0)
        d_sp = tl.load(st + 13 * n, mask=in_rows, other=0.0)
        d_m = tl.load(st + 14 * n, mask=in_rows, other=0.0)
        do_c = _load_rows(DOC, base, rows, n, D, D_PAD)
        dp_fin = _fin_grad(DPFIN, sq_base, do_c, v, keep_f, dropout_p, rows, cols, n, REFINED, PRECISION)
        if not REFINED:  # (a refined out_cal's dV comes from the refinement's backward)
            acc_v += tl.dot(tl.trans(tl.where(keep_f, p_fin * drop_scale, 0.0)), do_c, input_precision=PRECISION)
        dp_att = dp_fin
        dpert = tl.zeros_like(p_sp)
        if ADV:
            do_a = _load_rows(DOA, base, rows, n, D, D_PAD)
            dp_att = _weights_grad(do_a, v, keep_a, dropout_p, PRECISION)
            acc_v += tl.dot(tl.trans(tl.where(keep_a, p_att * drop_scale, 0.0)), do_a, input_precision=PRECISION)
            if HAS_DPERT:
                dpert = _square_block(DPERT, sq_base, rows, cols, n)
        dp_sp, dm_raw, _ = _block_grads(
            p_sp, pm, ex, p_att, p_cal, g, p_fin, noise, keep_m, dp_fin, dp_att, dpert, d_fin, d_att, d_cal,
            perturb_dropout_p, ADV,
        )  # fmt: skip
        dlogit = p_sp * (dp_sp - d_sp[:, None]) * scale
        acc_k += tl.dot(tl.trans(dlogit), q, input_precision=PRECISION)
        d_order, d_dist, _ = _calibrator_grads(
            dlogit, q_order, q_dist, k, w_ok, w_dk, b_o, b_d, dist_scale, rows, cols, vis
        )
        c_order += tl.sum(d_order, 0)
        c_dist += tl.sum(d_dist, 0)
        if ADV:
            qa = _load_rows(QA, base, rows, n, D, D_PAD)
            acc_ka += tl.dot(tl.trans(pm_raw * (dm_raw - d_m[:, None]) * scale), qa, input_precision=PRECISION)
    acc_k += c_order[:, None] * w_ok[None, :] + c_dist[:, None] * w_dk[None, :]
    _store_rows(DK, base, acc_k, cols, n, D, D_PAD)
    _store_rows(DV, base, acc_v, cols, n, D, D_PAD)
    if ADV:
        _store_rows(DKA, base, acc_ka, cols, n, D, D_PAD)
    in_cols = cols < n
    tl.store(COLSUMS + bh * n + cols, c_order, mask=in_cols)  # (2, batch*heads, n)
    tl.store(COLSUMS + tl.num_programs(1) * n + bh * n + cols, c_dist, mask=in_cols)


# ---------------------------------------------------------------------------------------------- launcher


def _forward(
    q,
    k,
    v,
    vectors,
    scalars,
    q_adv,
    k_adv,
    gate_logits,
    noise,
    key_padding_mask,
    w_rq,
    w_rk,
    w_rv,
    seed,
    scale,
    refine,
    refine_scale,
    dropout_p,
    perturb_dropout_p,
):
    L = _Launch(q, key_padding_mask, refine, dropout_p)
    m1, w_rv = _refinement(refine, w_rq, w_rk, w_rv)
    drawn = q_adv is not None and noise is None
    if L.n > FUSED_MAX_N or dropout_p > 0.0 or perturb_dropout_p > 0.0 or drawn:  # the fused windows draw nothing
        return _forward_rows(
            L, q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, m1, w_rv, seed, scale, refine,
            refine_scale, dropout_p, perturb_dropout_p,
        )  # fmt: skip
    adversarial = q_adv is not None
    out_cal = torch.empty_like(q)
    out_att = torch.empty_like(q) if adversarial else None
    perturb = q.new_empty(L.batch, L.heads, L.n, L.n) if adversarial else None
    alpha, beta = _refine_coefficients(refine, refine_scale)
    meta = _fused_meta(L, refine, False)  # the dot family's windows and warps; A here is always P_fin
    del meta["REFINE_SCORES"], meta["DROPOUT"]  # (probabilities, no dropout: the row path draws it)
    staged = _stages_forward(L, extra_live_tiles=True)
    slots = (1 if refine == "none" else staged_slots(refine)) if staged else 0
    ws = torch.empty(L.bh * slots * L.n_pad**2, dtype=torch.float32, device=L.device) if staged else out_cal
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
        ws,
        scale,
        alpha,
        beta,
        L.n,
        L.d,
        L.heads,
        _head_stride(m1),
        _head_stride(w_rv),
        ADV=adversarial,
        D_SLICE=min(16, _pad(L.d)),
        STAGED=staged,
        SLOTS=slots,
        K_SLICE=16,
        **meta,
    )
    return out_cal, out_att, perturb


def _rows_meta(
    L: _Launch, adversarial, noise, dropout_p, perturb_dropout_p, num_warps=ROWS_WARPS, block_n=ROWS_BLOCK_N
) -> dict:
    return dict(
        ADV=adversarial,
        DROPOUT=dropout_p > 0.0,
        PERTURB_DROPOUT=adversarial and perturb_dropout_p > 0.0,
        DRAW_NOISE=adversarial and noise is None,
        HAS_MASK=L.has_mask,
        PRECISION=L.precision,
        N_PAD=L.n_pad,
        D_PAD=_pad(L.d),
        BLOCK_M=ROWS_BLOCK_M,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )


def _forward_rows(
    L, q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, m1, w_rv, seed, scale, refine, refine_scale,
    dropout_p, perturb_dropout_p, saved=None,
):  # fmt: skip
    """The row-block path: one launch; with a refinement P_fin goes to float32 scratch and the dot family's
    tiled refinement (kernels/_refine.py refine_forward) turns it into out_cal (`saved`, a list, receives
    P_fin and the refinement's (out, lse, T, U, Bv, lse3) for its backward)."""
    adversarial = q_adv is not None
    out_cal = torch.empty_like(q)
    out_att = torch.empty_like(q) if adversarial else None
    perturb = q.new_zeros(L.batch, L.heads, L.n, L.n) if adversarial else None  # M is 0 off the causal blocks
    p_fin = L.scratch() if m1 is not None else None
    launch(
        _calibrated_rows_fwd,
        (_cdiv(L.n, ROWS_BLOCK_M), L.bh),
        q,
        k,
        v,
        q_adv if adversarial else q,
        k_adv if adversarial else q,
        gate_logits if adversarial else q,
        noise if adversarial and noise is not None else q,
        vectors,
        scalars,
        L.kpm,
        seed,
        out_cal,
        out_att if adversarial else out_cal,
        perturb if adversarial else out_cal,
        out_cal if p_fin is None else p_fin,
        scale,
        dropout_p,
        perturb_dropout_p,
        L.n,
        L.d,
        L.heads,
        STORE_PFIN=p_fin is not None,
        **_rows_meta(L, adversarial, noise, dropout_p, perturb_dropout_p),
    )
    if p_fin is not None:  # the refinement draws out_cal's dropout (with the dot family's stream of seed)
        refined = refine_forward(L, p_fin, v, m1, w_rv, refine, refine_scale, dropout_p, seed)
        out_cal = refined[0].to(q.dtype)
        if saved is not None:
            saved.extend((p_fin, *refined))
    return out_cal, out_att, perturb


def _refinement(refine, w_rq, w_rk, w_rv):
    """(M = W_RQ W_RK^T or its transpose for "add", W_RV) in float32 for the kernels; None where unused."""
    m1 = refinement_matrix(refine, w_rq, w_rk)
    m1 = None if m1 is None else m1.float().contiguous()
    return m1, None if w_rv is None else w_rv.float().contiguous()


def _present(t):
    """A gradient that reached the op: None, or an empty placeholder from the custom op, count as absent."""
    return t is not None and t.numel() > 0


def _backward(
    d_cal,
    d_att,
    d_perturb,
    q,
    k,
    v,
    vectors,
    scalars,
    q_adv,
    k_adv,
    gate_logits,
    noise,
    key_padding_mask,
    w_rq,
    w_rk,
    w_rv,
    seed,
    out_cal,
    out_att,
    perturb,
    scale,
    refine,
    refine_scale,
    dropout_p,
    perturb_dropout_p,
):
    """Gradients of q, k, v, the calibrator's vectors and scalars, q_adv, k_adv, gate_logits and the
    refinement's weights. A refinement recomputes P_fin (row blocks) and its tiled refinement, whose
    backward gives dL/dP_fin to the calibrated kernels and out_cal's dV."""
    L = _Launch(q, key_padding_mask, refine, dropout_p)
    adversarial = q_adv is not None and q_adv.numel() > 0
    d_cal = d_cal.contiguous() if _present(d_cal) else torch.zeros_like(q)
    d_att = d_att.contiguous() if adversarial and _present(d_att) else d_cal
    has_dpert = adversarial and _present(d_perturb)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dqa = torch.empty_like(q_adv) if adversarial else None
    dka = torch.empty_like(k_adv) if adversarial else None
    dgate = L.scratch() if adversarial else None  # per head, summed below (the gate is shared by the heads)
    stats = q.new_empty(L.bh, STAT_ROWS.value, L.n, dtype=torch.float32)
    rowsums = q.new_empty(3, L.bh * L.n, dtype=torch.float32)  # order, distance, scale terms per query
    colsums = q.new_empty(2, L.bh * L.n, dtype=torch.float32)  # order, distance terms per key
    noise = noise if _present(noise) else None  # None: drawn in the kernels from the seed, as the forward did
    refined = refine != "none"
    d_pfin = dv_refined = dm1 = dw_rv = None
    if refined:
        m1, w_rv32 = _refinement(refine, w_rq, w_rk, w_rv)
        d_pfin, dv_refined, dm1, dw_rv = _refined_backward(
            L, d_cal, q, k, v, vectors, scalars, q_adv if adversarial else None, k_adv, gate_logits, noise, m1,
            w_rv32, seed, scale, refine, refine_scale, dropout_p, perturb_dropout_p,
        )  # fmt: skip
    block_n = ROWS_FP32_BACKWARD_BLOCK_N if L.precision == "tf32x3" else ROWS_BLOCK_N
    meta = _rows_meta(L, adversarial, noise, dropout_p, perturb_dropout_p, BACKWARD_WARPS, block_n)
    qa, ka = (q_adv, k_adv) if adversarial else (q, q)
    gate, nz = (gate_logits, noise if noise is not None else q) if adversarial else (q, q)
    inputs = (q, k, v, qa, ka, gate, nz, vectors, scalars, L.kpm, seed)  # both kernels' leading arguments
    d_outs = (d_cal, d_att, d_perturb.contiguous() if has_dpert else q, q if d_pfin is None else d_pfin)
    options = (scale, dropout_p, perturb_dropout_p, L.n, L.d, L.heads)
    rows_out = (dq, dqa if adversarial else dq, dgate if adversarial else dq, stats, rowsums)
    grid = (_cdiv(L.n, ROWS_BLOCK_M), L.bh)
    launch(
        _calibrated_rows_bwd,
        grid,
        *inputs,
        out_cal,
        out_att if adversarial else out_cal,
        *d_outs,
        *rows_out,
        *options,
        HAS_DPERT=has_dpert,
        REFINED=refined,
        **meta,
    )
    cols_out = (stats, dk, dv, dka if adversarial else dk, colsums)
    grid = (_cdiv(L.n, COLUMNS_BLOCK_N), L.bh)
    cols_meta = {**meta, "BLOCK_N": COLUMNS_BLOCK_N}
    launch(
        _calibrated_cols_bwd, grid, *inputs, *d_outs, *cols_out, *options, HAS_DPERT=has_dpert, REFINED=refined,
        **cols_meta,
    )  # fmt: skip
    if dv_refined is not None:
        dv = dv + dv_refined
    dw_rq, dw_rk = refinement_factor_grads(refine, dm1, w_rq, w_rk)
    # the calibrator's weights: w_oq . q_i and w_ok . k_j enter every logit of row i / column j
    # (vectors are stacked w_oq, w_dq, w_ok, w_dk: two GEMMs and one cat give their gradient)
    d_vectors = torch.cat((rowsums[:2] @ q.reshape(-1, L.d).float(), colsums @ k.reshape(-1, L.d).float()))
    d_scalars = rowsums.sum(1)
    return (
        dq,
        dk,
        dv,
        d_vectors.to(vectors.dtype),
        d_scalars.to(scalars.dtype),
        dqa,
        dka,
        dgate.sum(1).to(gate_logits.dtype) if adversarial else None,
        dw_rq,
        dw_rk,
        None if dw_rv is None else dw_rv.to(w_rv.dtype),
    )


def _refined_backward(
    L, d_cal, q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, m1, w_rv, seed, scale, refine,
    refine_scale, dropout_p, perturb_dropout_p,
):  # fmt: skip
    """(dL/dP_fin float32, out_cal's dV, dM, dW_RV) of a refined out_cal: P_fin recomputed by the row-block
    forward into scratch and its tiled refinement recomputed and differentiated (kernels/_refine.py)."""
    saved: list = []
    _forward_rows(
        L, q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, m1, w_rv, seed, scale, refine, refine_scale,
        dropout_p, perturb_dropout_p, saved,
    )  # fmt: skip
    p_fin, out, lse, t, u, bv, lse3 = saved
    return refine_backward(
        L, d_cal, p_fin, t, u, bv, lse, lse3, out, v, m1, w_rv, refine, refine_scale, dropout_p, seed
    )


def drawn_noise(seed: torch.Tensor, batch: int, heads: int, n: int) -> torch.Tensor:
    """The (batch, heads, n, n) float32 noise the kernels draw from `seed` (a call's dropout_seed) when the
    perturbation noise is not given: what a test compares against an explicit-noise call."""
    out = torch.empty(batch, heads, n, n, device=seed.device, dtype=torch.float32)
    block = 256
    _drawn_noise[(_cdiv(n * n, block), batch * heads)](seed, out, n, BLOCK=block)
    return out


def _fake_forward(
    q, k, v, vectors, scalars, q_adv, k_adv, gate_logits, noise, key_padding_mask, w_rq, w_rk, w_rv, seed, *options
):
    batch, heads, n, _ = q.shape
    if q_adv is None:
        return torch.empty_like(q), q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(q), q.new_empty(batch, heads, n, n)


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
        "w_rq?",
        "w_rk?",
        "w_rv?",
        "seed",
    ),
    options=(
        ("scale", "float"),
        ("refine", "str"),
        ("refine_scale", "float"),
        ("dropout_p", "float"),
        ("perturb_dropout_p", "float"),
    ),
    differentiable=("q", "k", "v", "vectors", "scalars", "q_adv", "k_adv", "gate_logits", "w_rq", "w_rk", "w_rv"),
    forward=_forward,
    backward=_backward,
    fake_forward=_fake_forward,
    outputs=3,
)


# ----------------------------------------------------------------------------------------- public entry


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
    """Same contract as awr_fast.reference.calibrated.calibrated (inputs validated by the API):
    (out_cal, out_att, perturb), the last two None without the adversarial calibrator. Differentiable in
    q, k, v, the calibrator's parameters, q_adv, k_adv, gate_logits and the refinement's weights.
    Dropout draws its own masks (Philox), so its values differ from the reference's draws; so does the
    perturbation noise when it is not given and the call trains (the row-block kernels draw it from the
    call's seed, and the backward recomputes it instead of saving a (B, H, n, n) tensor)."""
    leaves = (q, k, v, w_oq, w_ok, b_o, w_dq, w_dk, b_d, dist_scale, q_adv, k_adv, gate_logits, w_rq, w_rk, w_rv)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
    d_h = q.shape[-1]
    scale = 1.0 / math.sqrt(d_h) if scale is None else float(scale)
    c = 1.0 / math.sqrt(d_h) if refine_scale is None else float(refine_scale)
    vectors = torch.stack([w.to(torch.float32) for w in (w_oq, w_dq, w_ok, w_dk)]).contiguous()
    scalars = torch.stack([s.reshape(()).to(torch.float32) for s in (b_o, b_d, dist_scale)]).contiguous()
    adversarial = q_adv is not None
    draw = adversarial and noise is None and (training or dropout_p > 0.0 or perturb_dropout_p > 0.0)
    if adversarial and noise is None and not draw:  # evaluation: the fused forward reads a drawn tensor
        noise = torch.randn(*q.shape[:-1], q.shape[-2], device=q.device, dtype=q.dtype)
    contiguous = (q, k, v, q_adv, k_adv, gate_logits, noise, w_rq, w_rk, w_rv)
    tensors = [t if t is None else t.contiguous() for t in contiguous]
    out_cal, out_att, perturb = CALIBRATED(
        *tensors[:3],
        vectors,
        scalars,
        *tensors[3:7],
        key_padding_mask,
        *tensors[7:],
        # one Philox seed for the dropout masks and the drawn noise
        dropout_seed(max(dropout_p, perturb_dropout_p if adversarial else 0.0, float(draw)), q),
        scale,
        refine,
        c,
        float(dropout_p),
        float(perturb_dropout_p) if adversarial else 0.0,
    )
    if not adversarial:  # the custom op's empty placeholders
        out_att = perturb = None
    return out_cal, out_att, perturb


__all__ = ["ADVERSARIAL", "FUSED_MAX_N", "calibrated", "drawn_noise"]
