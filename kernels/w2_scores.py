"""Triton: squared-W2 item scoring (SPEC §4): forward, backward and a fused top-k for evaluation.

B query Gaussians (mu, sig: (B, d), diagonal covariances) against |V| items (item_mu, item_sig: (|V|, d)):
    W2sq(b, v) = |mu_b|^2 + |imu_v|^2 - 2 mu_b.imu_v + sum sig_b + sum isig_v - 2 r_b.ir_v,
    r = sqrt(max(sig, 1e-24)) (the reference's clamp), so one output tile is two GEMM-like tl.dot
    accumulations over d plus row and column norms, exactly awr_fast.reference.w2_scores.

    _w2_scores_fwd    one program per (BLOCK_B, BLOCK_V) output tile, d in BLOCK_D chunks; float32 out
    _w2_scores_bwd    with G = dL/dW2sq: dmu = 2 (rowsum(G) mu - G imu), dsig = rowsum(G) - (G ir) / r
                      (0 where sig is clamped); one kernel for both sides, the item side reading G^T
                      through swapped strides; the item (or query) loop split across programs when the
                      grid is small, per-split partials summed by one torch sum
    _w2_topk          each program scans its rows against a range of items in BLOCK_V chunks and keeps a
                      running top-K_PAD of packed (distance, index) int64 keys in registers (bitonic
                      merge): the (B, |V|) matrix is never written
    _exclusion_bits   per-row excluded item ids -> a packed bit mask the top-k kernel reads

Entry points: w2_scores (differentiable; the torch.library op awr_fast::w2_scores_fwd/_bwd under
torch.compile) and w2_topk (no grad).
"""

from __future__ import annotations

import torch
import torch._dynamo  # noqa: F401  initialised up front: torch 2.11's custom-op call imports it lazily
import triton
import triton.language as tl
from triton.language.standard import bitonic_merge as _bitonic_merge

from awr_fast.ops.w2_refined import SQRT_CLAMP
from awr_fast.ops.w2_scores import TopkRequest, make_topk_request

from ._common import _pad, _precision
from ._launch import launch
from ._op import TritonOp

_CLAMP = tl.constexpr(SQRT_CLAMP)  # a jit function may read a module global only as a constexpr
_EMPTY = tl.constexpr(2**63 - 1)  # the key of "no item" (excluded, out of range): above every real key
_EMPTY_KEY = 2**63 - 1
#: A launch with fewer programs than this splits its loop over items (or queries) across programs: about
#: two per SM of an H100/H200 (132 SMs), a constant rather than a device query (host cost per call).
_TARGET_PROGRAMS = 256
EXCLUDE_NONE, EXCLUDE_BITS, EXCLUDE_BYTES = 0, 1, 2  # EXCLUDE of _w2_topk


# ------------------------------------------------------------------------------------------- jit kernels


@triton.jit
def _root(sig, inside):
    """sqrt(max(sigma, clamp)) where `inside`, 0 elsewhere (padded rows and columns)."""
    return tl.where(inside, tl.sqrt(tl.maximum(sig, _CLAMP)), 0.0)


@triton.jit
def _w2_tile(
    MU,
    SIG,
    IMU,
    ISIG,
    rows,
    cols,
    B,
    V,
    D,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The float32 (BLOCK_B, BLOCK_V) tile W2sq(rows, cols); padded rows and columns hold finite junk."""
    q_off = rows.to(tl.int64)[:, None] * D
    v_off = cols.to(tl.int64)[:, None] * D
    q_in = (rows < B)[:, None]
    v_in = (cols < V)[:, None]
    acc = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)  # mu.imu + r.ir
    q_norm = tl.zeros([BLOCK_B], tl.float32)  # |mu|^2 + sum sig
    v_norm = tl.zeros([BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = (d0 + tl.arange(0, BLOCK_D))[None, :]
        qm = q_in & (dc < D)
        vm = v_in & (dc < D)
        mq = tl.load(MU + q_off + dc, mask=qm, other=0.0).to(tl.float32)
        sq = tl.load(SIG + q_off + dc, mask=qm, other=0.0).to(tl.float32)
        mv = tl.load(IMU + v_off + dc, mask=vm, other=0.0).to(tl.float32)
        sv = tl.load(ISIG + v_off + dc, mask=vm, other=0.0).to(tl.float32)
        acc = tl.dot(mq, tl.trans(mv), acc, input_precision=PRECISION)
        acc = tl.dot(_root(sq, qm), tl.trans(_root(sv, vm)), acc, input_precision=PRECISION)
        q_norm += tl.sum(mq * mq + sq, 1)
        v_norm += tl.sum(mv * mv + sv, 1)
    return q_norm[:, None] + v_norm[None, :] - 2.0 * acc


@triton.jit
def _w2_scores_fwd(
    MU,
    SIG,
    IMU,
    ISIG,
    OUT,
    B,
    V,
    D,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """OUT (B, V) float32 = W2sq: program (item block, query block)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    w2 = _w2_tile(MU, SIG, IMU, ISIG, rows, cols, B, V, D, PRECISION, BLOCK_B, BLOCK_V, BLOCK_D)
    out = OUT + rows.to(tl.int64)[:, None] * V + cols[None, :]
    tl.store(out, w2, mask=(rows < B)[:, None] & (cols < V)[None, :])


@triton.jit
def _w2_scores_bwd(
    G,
    XM,
    XS,
    YM,
    YS,
    DXM,
    DXS,
    NX,
    NY,
    D,
    stride_gx,
    stride_gy,
    span,
    split_stride,
    PRECISION: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Gradients of one side's (mu, sig), the X rows, from G (NX, NY) read through its strides:
        dX_mu  = 2 (rowsum(G) X_mu - G Y_mu)
        dX_sig = rowsum(G) - (G Y_r) / X_r     where X_sig >= clamp, rowsum(G) elsewhere
    (the sums of sigma pass the gradient unchanged; -2 X_r.Y_r goes through sqrt(max(sigma, clamp))).
    Program (X block, d block, split) covers Y rows [split * span, (split + 1) * span) and writes its
    share of both, which is linear in G, to DX + split * split_stride."""
    xs = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
    dc = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    split = tl.program_id(2)
    x_in = (xs < NX)[:, None]
    g_rows = G + xs.to(tl.int64)[:, None] * stride_gx
    acc_mu = tl.zeros([BLOCK_X, BLOCK_D], tl.float32)
    acc_root = tl.zeros([BLOCK_X, BLOCK_D], tl.float32)
    row_sum = tl.zeros([BLOCK_X], tl.float32)
    lo = split * span
    for y0 in range(lo, tl.minimum(NY, lo + span), BLOCK_Y):  # span is a multiple of BLOCK_Y
        ys = y0 + tl.arange(0, BLOCK_Y)
        y_in = ys < NY
        g = tl.load(g_rows + ys.to(tl.int64)[None, :] * stride_gy, mask=x_in & y_in[None, :], other=0.0)
        g = g.to(tl.float32)
        y_off = ys.to(tl.int64)[:, None] * D + dc
        ym = y_in[:, None] & (dc < D)
        acc_mu = tl.dot(g, tl.load(YM + y_off, mask=ym, other=0.0).to(tl.float32), acc_mu, input_precision=PRECISION)
        y_root = _root(tl.load(YS + y_off, mask=ym, other=0.0).to(tl.float32), ym)
        acc_root = tl.dot(g, y_root, acc_root, input_precision=PRECISION)
        row_sum += tl.sum(g, 1)
    x_off = xs.to(tl.int64)[:, None] * D + dc
    xm = x_in & (dc < D)
    x_mu = tl.load(XM + x_off, mask=xm, other=0.0).to(tl.float32)
    x_sig = tl.load(XS + x_off, mask=xm, other=0.0).to(tl.float32)
    x_root = _root(x_sig, xm)
    through = tl.where(xm & (x_sig >= _CLAMP), 1.0 / tl.where(x_root > 0, x_root, 1.0), 0.0)
    d_mu = 2.0 * (row_sum[:, None] * x_mu - acc_mu)
    d_sig = row_sum[:, None] - acc_root * through
    out = split * split_stride + x_off
    tl.store(DXM + out, d_mu.to(DXM.dtype.element_ty), mask=xm)
    tl.store(DXS + out, d_sig.to(DXS.dtype.element_ty), mask=xm)


@triton.jit
def _exclusion_bits(IDS, BITS, L, V, words, BLOCK_L: tl.constexpr):
    """BITS (B, words) int32 |= 1 << (id % 32) at word id // 32 for every id of IDS (B, L) in [0, V)."""
    row = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ids = tl.load(IDS + row.to(tl.int64) * L + idx, mask=idx < L, other=-1)
    keep = (ids >= 0) & (ids < V)
    ids = tl.where(keep, ids, 0).to(tl.int32)
    bit = tl.full([BLOCK_L], 1, tl.int32) << (ids & 31)
    tl.atomic_or(BITS + row.to(tl.int64) * words + (ids >> 5), bit, mask=keep)  # OR: duplicates are harmless


@triton.jit
def _w2_topk(
    MU,
    SIG,
    IMU,
    ISIG,
    EX,
    KEYS,
    B,
    V,
    D,
    ex_stride,
    span,
    EXCLUDE: tl.constexpr,
    SKIP_PADDING: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr,
):
    """KEYS (splits, B, K_PAD) int64: per row, the K_PAD smallest keys of the items [split * span,
    (split + 1) * span), ascending. A key packs (distance, index) so that integer order is distance order
    with ties to the lower index: the float32 bits made order-preserving as an int32 (negative floats
    have their 31 low bits flipped) in the high word, the index in the low word; "no item" is _EMPTY.
    The running top-k merges each chunk's own top-k by one bitonic step (the minimum of the ascending
    running list and the reversed chunk list holds the K_PAD smallest of both), skipped when no key of
    the chunk beats a row's current K_PAD-th."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    split = tl.program_id(1)
    best = tl.full([BLOCK_B, K_PAD], _EMPTY, tl.int64)
    ex_rows = EX + rows.to(tl.int64)[:, None] * ex_stride
    lo = split * span
    for v0 in range(lo, tl.minimum(V, lo + span), BLOCK_V):  # span is a multiple of BLOCK_V
        cols = v0 + tl.arange(0, BLOCK_V)
        w2 = _w2_tile(MU, SIG, IMU, ISIG, rows, cols, B, V, D, PRECISION, BLOCK_B, BLOCK_V, BLOCK_D)
        ok = (rows < B)[:, None] & (cols < V)[None, :]
        if SKIP_PADDING:
            ok = ok & (cols != 0)[None, :]
        if EXCLUDE == 1:  # packed bits, 32 items a word
            word = tl.load(ex_rows + (cols >> 5)[None, :], mask=ok, other=0)
            ok = ok & (((word >> (cols & 31)[None, :]) & 1) == 0)
        elif EXCLUDE == 2:  # one byte per item (a bool mask)
            ok = ok & (tl.load(ex_rows + cols[None, :], mask=ok, other=1) == 0)
        w2 = tl.where(w2 == 0.0, 0.0, w2)  # -0.0 -> +0.0: equal distances get equal high words
        w2 = tl.where(w2 != w2, float("nan"), w2)  # one NaN (positive): it sorts after +inf, as in torch.topk
        bits = w2.to(tl.int32, bitcast=True)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (bits.to(tl.int64) << 32) | cols.to(tl.int64)[None, :]
        key = tl.where(ok, key, _EMPTY)
        worst = tl.max(best, 1)
        if tl.sum(tl.where(key < worst[:, None], 1, 0)) > 0:
            top = tl.topk(key, K_PAD, descending=False)  # ascending
            best = _bitonic_merge(tl.minimum(best, tl.flip(top, 1)))
    out = KEYS + (split * B + rows).to(tl.int64)[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
    tl.store(out, best, mask=(rows < B)[:, None])


# --------------------------------------------------------------------------------------------- launchers


def _splits(programs: int, chunks: int) -> tuple[int, int]:
    """(splits, chunks per split) of a loop of `chunks` blocks: one split when the grid has enough
    programs, otherwise enough to reach about _TARGET_PROGRAMS, none of them empty."""
    if chunks <= 1 or programs >= _TARGET_PROGRAMS:
        return 1, max(chunks, 1)
    per = triton.cdiv(chunks, min(chunks, triton.cdiv(_TARGET_PROGRAMS, max(programs, 1))))
    return triton.cdiv(chunks, per), per


def _tile_blocks(rows: int, cols: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_V, BLOCK_D) of an output tile (tl.dot wants every side >= 16). The d chunk is 16:
    tf32x3 splits every fp32 operand into two TF32 halves in registers, and with 64 x 64 tiles a chunk
    of 32 already spills on sm_90 (compiled on bench/kernel_resources.py's stand-in)."""
    return min(64, _pad(rows)), min(64, _pad(cols)), 16


def _forward(mu, sig, item_mu, item_sig):
    """(scores,): float32 (B, |V|); the op saves its inputs for the backward, nothing else."""
    (B, d), V = mu.shape, item_mu.shape[0]
    out = torch.empty(B, V, dtype=torch.float32, device=mu.device)
    if out.numel() == 0 or d == 0:
        return (out.zero_(),)
    block_b, block_v, block_d = _tile_blocks(B, V)
    launch(
        _w2_scores_fwd,
        (triton.cdiv(V, block_v), triton.cdiv(B, block_b)),
        mu,
        sig,
        item_mu,
        item_sig,
        out,
        B,
        V,
        d,
        PRECISION=_precision(mu.dtype),
        BLOCK_B=block_b,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return (out,)


def _side_grads(grad, stride_x, stride_y, x_mu, x_sig, y_mu, y_sig):
    """(dX_mu, dX_sig) of one side through _w2_scores_bwd; G is read in place through (stride_x,
    stride_y), so an expanded or transposed gradient costs no copy."""
    (nx, d), ny = x_mu.shape, y_mu.shape[0]
    if x_mu.numel() == 0:
        return torch.zeros_like(x_mu), torch.zeros_like(x_sig)
    # 64 x 32 chunks of d: with 64 the fp32 kernel spills on sm_80 (56 B per thread), with 32 neither target does
    block_x, block_y, block_d = min(64, _pad(nx)), min(32, _pad(ny)), min(32, _pad(d))
    grid_xd = triton.cdiv(nx, block_x) * triton.cdiv(d, block_d)
    splits, per = _splits(grid_xd, triton.cdiv(ny, block_y))
    if splits == 1:
        d_mu, d_sig = torch.empty_like(x_mu), torch.empty_like(x_sig)
    else:
        d_mu, d_sig = (torch.empty(splits, nx, d, dtype=torch.float32, device=x_mu.device) for _ in range(2))
    launch(
        _w2_scores_bwd,
        (triton.cdiv(nx, block_x), triton.cdiv(d, block_d), splits),
        grad,
        x_mu,
        x_sig,
        y_mu,
        y_sig,
        d_mu,
        d_sig,
        nx,
        ny,
        d,
        stride_x,
        stride_y,
        per * block_y,
        nx * d,
        PRECISION=_precision(x_mu.dtype),
        BLOCK_X=block_x,
        BLOCK_Y=block_y,
        BLOCK_D=block_d,
        num_warps=4,
    )
    if splits == 1:
        return d_mu, d_sig
    return d_mu.sum(0).to(x_mu.dtype), d_sig.sum(0).to(x_sig.dtype)


def _backward(grad, mu, sig, item_mu, item_sig, scores):
    """(dmu, dsig, ditem_mu, ditem_sig), each in its input's dtype: the query side from G, the item side
    from G^T (the same kernel with G's strides swapped)."""
    g0, g1 = grad.stride()
    return (
        *_side_grads(grad, g0, g1, mu, sig, item_mu, item_sig),
        *_side_grads(grad, g1, g0, item_mu, item_sig, mu, sig),
    )


def _fake_forward(mu, sig, item_mu, item_sig):
    return (mu.new_empty(mu.shape[0], item_mu.shape[0], dtype=torch.float32),)


def _exclusion(request: TopkRequest, batch: int, items: int) -> tuple[int, torch.Tensor | None, int]:
    """(EXCLUDE mode, the tensor the top-k kernel reads, its row stride) of a validated request."""
    if request.kind == "none":
        return EXCLUDE_NONE, None, 0
    if request.kind == "mask":
        return EXCLUDE_BYTES, request.exclude.contiguous().view(torch.uint8), items
    words = triton.cdiv(items, 32)
    ids = request.exclude.contiguous()
    bits = torch.zeros(batch, words, dtype=torch.int32, device=ids.device)
    block_l = min(128, _pad(ids.shape[1]))
    launch(
        _exclusion_bits,
        (batch, triton.cdiv(ids.shape[1], block_l)),
        ids,
        bits,
        ids.shape[1],
        items,
        words,
        BLOCK_L=block_l,
        num_warps=4,
    )
    return EXCLUDE_BITS, bits, words


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 distances, int64 indices) of packed top-k keys; "no item" -> (+inf, -1). Elementwise
    torch ops on the (B, k) result: a few small launches, no kernel needed."""
    high = keys >> 32
    values = (high ^ ((high >> 31) & 0x7FFFFFFF)).to(torch.int32).view(torch.float32)
    empty = keys == _EMPTY_KEY
    return values.masked_fill(empty, float("inf")), (keys & 0xFFFFFFFF).masked_fill(empty, -1)


# ------------------------------------------------------------------------ custom ops and autograd function

#: awr_fast::w2_scores_fwd / _bwd for torch.compile, an autograd.Function for eager calls (kernels/_op.py)
W2_SCORES = TritonOp(
    "w2_scores",
    tensors=("mu", "sig", "item_mu", "item_sig"),
    options=(),
    differentiable=("mu", "sig", "item_mu", "item_sig"),
    forward=_forward,
    backward=_backward,
    fake_forward=_fake_forward,
)


# ----------------------------------------------------------------------------------------- public entry


def w2_scores(mu, sig, item_mu, item_sig):
    """Same contract as awr_fast.reference.w2_scores.w2_scores (inputs validated by the API), differentiable
    in all four inputs, except that the result is float32 whatever the input dtype (float32 accumulation,
    as the CUDA backend; the model ranks in float32 or wider, awr_fast.models.stosa.score_all). float32
    inputs run their dots as tf32x3 (kernels/_common.py _precision), half ones upcast on load."""
    return W2_SCORES(*(x.contiguous() for x in (mu, sig, item_mu, item_sig)))


@torch.no_grad()
def w2_topk(mu, sig, item_mu, item_sig, k, exclude=None, *, exclude_padding=False):
    """(values, indices) of the k items nearest each query, by ascending squared W2 (the best first):
    float32 and int64 (B, k), without writing the (B, |V|) scores. Equal distances rank the lower index
    first, so the result is torch.topk(w2_scores(...), k, largest=False) on distinct values, and
    deterministic on ties; NaN distances rank last.

    exclude: None; or int64/int32 (B, L) item ids per row, padded with -1 (duplicates allowed), e.g. the
    user's history (pack a CSR history as rows of its ids); or a bool (B, |V|) mask, True = skip, the
    layout of SeqDataset.history_mask. exclude_padding=True also skips item 0 (the padding row of the
    models' tables). A row left with fewer than k items fills its tail with (+inf, -1).
    Validation: awr_fast.ops.w2_scores.make_topk_request (dtypes float32/bfloat16/float16, 1 <= k <=
    min(|V|, TOPK_MAX_K), ids in -1..|V|-1 with one host sync)."""
    request = make_topk_request(mu, sig, item_mu, item_sig, k, exclude, exclude_padding)
    (B, d), V = mu.shape, item_mu.shape[0]
    k = request.k
    mode, ex, ex_stride = _exclusion(request, B, V)
    k_pad = 1 << (k - 1).bit_length()
    # 16 query rows a program: the running keys of k <= 128 stay in registers (8 warps from k > 16: with 4,
    # k = 32 spills 24 B per thread on sm_90)
    block_b, block_v, block_d, warps = 16, max(64, k_pad), 16, 8 if k_pad >= 32 else 4
    row_blocks = triton.cdiv(B, block_b)
    splits, per = _splits(row_blocks, triton.cdiv(V, block_v))
    keys = torch.empty(splits, B, k_pad, dtype=torch.int64, device=mu.device)
    if B:
        launch(
            _w2_topk,
            (row_blocks, splits),
            *(x.contiguous() for x in (mu, sig, item_mu, item_sig)),
            mu if ex is None else ex,
            keys,
            B,
            V,
            d,
            ex_stride,
            per * block_v,
            EXCLUDE=mode,
            SKIP_PADDING=request.exclude_padding,
            PRECISION=_precision(mu.dtype),
            BLOCK_B=block_b,
            BLOCK_V=block_v,
            BLOCK_D=block_d,
            K_PAD=k_pad,
            num_warps=warps,
        )
    if splits == 1:
        best = keys[0, :, :k]
    else:  # keys are unique per row (they hold the index), so torch.topk's order is fully determined
        best = keys.transpose(0, 1).reshape(B, splits * k_pad).topk(k, dim=1, largest=False).values
    return _decode(best)
