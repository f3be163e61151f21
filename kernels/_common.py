"""Family-independent pieces of the Triton kernels: the jit helpers every family's kernels inline
(visibility, first real position, dropout keep mask, masked softmax, tile loads and stores) and the host
helpers of every launcher (padding, block sizes, dot precision, the per-call launch record, weight-gradient
reductions). A family file (dot_refined.py, ...) imports these and adds its own score kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def fused_max_n_from_env() -> int:
    """Sequences up to this length run a family's fused single-program kernels (one launch forward, one
    backward); longer ones its tiled kernels. AWR_FAST_TRITON_FUSED_MAX_N=0 forces the tiled path."""
    text = os.environ.get("AWR_FAST_TRITON_FUSED_MAX_N", "64")
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 128:
        raise ValueError(f"AWR_FAST_TRITON_FUSED_MAX_N: expected an integer in [0, 128], got {text!r}")
    return value


# ptxas -O3 answers the tiled backward's register pressure by dropping it to 32 registers and spilling
# 5 KB per thread (bench/results/kernel_resources.md); a .maxnreg bound keeps it at the most a thread
# of a 256-thread program can have (2 KB spilled instead).
MAX_REGISTERS = 255
MECHANISM_CODE = {"none": 0, "simp": 1, "add": 2, "value": 3}  # MECH of the fused kernels


# ------------------------------------------------------------------------------------------- jit helpers


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
    """Write one program's (n, n) block (a float32 partial sum, or a map such as the calibrated family's M):
    `val` on the window, zeros everywhere else (disjoint masks, so no element is written twice)."""
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
    return _load_rows_slice(X, base, idx, n, D, 0, D_PAD)


@triton.jit
def _load_cols(X, base, idx, n, D, D_PAD: tl.constexpr):
    """The (D_PAD, TILE) float32 transpose of rows idx of an (n, D) block, read transposed from memory: a
    dot operand without a register transpose; zero outside it."""
    return _load_cols_slice(X, base, idx, n, D, 0, D_PAD)


@triton.jit
def _store_cols(X, base, val_t, idx, n, D, D_PAD: tl.constexpr):
    """Store the (D_PAD, TILE) transpose val_t as rows idx of an (n, D) block."""
    dcols = tl.arange(0, D_PAD)
    io = (idx[None, :] < n) & (dcols[:, None] < D)
    tl.store(X + base + idx[None, :] * D + dcols[:, None], val_t.to(X.dtype.element_ty), mask=io)


@triton.jit
def _load_rows_slice(X, base, idx, n, D, c0, WIDTH: tl.constexpr):
    """Columns c0 .. c0 + WIDTH of _load_rows' tile: a K-slice of a dot operand. On sm_80 an fp32 (tf32x3)
    operand is held in registers whole (hi and lo parts), so a product over d = 64 in slices of 16 keeps a
    quarter of it live."""
    dcols = c0 + tl.arange(0, WIDTH)
    io = (idx[:, None] < n) & (dcols[None, :] < D)
    return tl.load(X + base + idx[:, None] * D + dcols[None, :], mask=io, other=0.0).to(tl.float32)


@triton.jit
def _load_cols_slice(X, base, idx, n, D, c0, WIDTH: tl.constexpr):
    """Rows c0 .. c0 + WIDTH of _load_cols' transposed tile."""
    dcols = c0 + tl.arange(0, WIDTH)
    io = (idx[None, :] < n) & (dcols[:, None] < D)
    return tl.load(X + base + idx[None, :] * D + dcols[:, None], mask=io, other=0.0).to(tl.float32)


@triton.jit
def _sliced_dot(X, Y, base, rows, cols, n, D, D_PAD: tl.constexpr, SLICE: tl.constexpr, PRECISION: tl.constexpr):
    """X[rows] Y[cols]^T of two (n, D) blocks at the same base, summed over D in SLICE-column slices read
    from memory (Y's transposed): neither operand is ever live whole in registers."""
    acc = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    for c in tl.static_range(0, D_PAD, SLICE):
        x_c = _load_rows_slice(X, base, rows, n, D, c, SLICE)
        acc += tl.dot(x_c, _load_cols_slice(Y, base, cols, n, D, c, SLICE), input_precision=PRECISION)
    return acc


@triton.jit
def _slot_store(WS, slot, val, TILE: tl.constexpr):
    """Write a (TILE, TILE) float32 tile to a program's scratch slot (row-major, no padding rows)."""
    r = tl.arange(0, TILE)
    tl.store(WS + slot + r[:, None] * TILE + r[None, :], val)


@triton.jit
def _slot_load(WS, slot, TILE: tl.constexpr):
    r = tl.arange(0, TILE)
    return tl.load(WS + slot + r[:, None] * TILE + r[None, :])


@triton.jit
def _staged_dot(
    X,
    x_base,
    x_rs,
    x_cs,
    x_rows,
    x_cols,
    Y,
    y_base,
    y_rs,
    y_cs,
    y_rows,
    y_cols,
    M: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    K_SLICE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """X Y for operands in memory, summed over K in K_SLICE slices: each operand is (pointer, base, row
    stride, column stride, valid rows, valid columns) of its (M, K) or (K, N) view (a transposed operand
    swaps its strides), zero outside the valid part. No operand is ever whole in registers: this is what
    keeps an fp32 (tf32x3: hi and lo parts) product with K = 64 from spilling."""
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    acc = tl.zeros([M, N], tl.float32)
    for k0 in range(0, K, K_SLICE):
        rk = k0 + tl.arange(0, K_SLICE)
        x_ok = (rm[:, None] < x_rows) & (rk[None, :] < x_cols)
        x = tl.load(X + x_base + rm[:, None] * x_rs + rk[None, :] * x_cs, mask=x_ok, other=0.0).to(tl.float32)
        y_ok = (rk[:, None] < y_rows) & (rn[None, :] < y_cols)
        y = tl.load(Y + y_base + rk[:, None] * y_rs + rn[None, :] * y_cs, mask=y_ok, other=0.0).to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_rows_slice(X, base, val, idx, n, D, c0, WIDTH: tl.constexpr):
    """Store val as columns c0 .. c0 + WIDTH of rows idx of an (n, D) block."""
    dcols = c0 + tl.arange(0, WIDTH)
    io = (idx[:, None] < n) & (dcols[None, :] < D)
    tl.store(X + base + idx[:, None] * D + dcols[None, :], val.to(X.dtype.element_ty), mask=io)


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
def _program_sequence(KPM, n, H, HAS_MASK: tl.constexpr, N_PAD: tl.constexpr):
    """(batch*head, batch, head, first real position, real length) of this program's sequence."""
    bh = tl.program_id(0)
    b = bh // H
    start = _first_real_position(KPM, b, n, HAS_MASK, N_PAD)
    return bh, b, bh % H, start, n - start


# ------------------------------------------------------------------------------------------ host helpers


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python: triton.cdiv is a constexpr function, several microseconds a host call."""
    return -(-a // b)


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
        # the bool mask as it is (Triton reads torch.bool as int1, a byte per entry); unused without a mask
        self.kpm = key_padding_mask.contiguous() if self.has_mask else q
        self.dropout = dropout_p > 0.0
        self.refined = mechanism != "none"

    def scratch(self, cols: int | None = None):
        return torch.zeros(
            self.batch, self.heads, self.n, self.n if cols is None else cols, dtype=torch.float32, device=self.device
        )

    def scratch_uninitialised(self):
        return torch.empty(self.batch, self.heads, self.n, self.n, dtype=torch.float32, device=self.device)

    def grid_rows(self, block):
        return (_cdiv(self.n, block), self.bh)


#: None: each family's launcher decides whether its fused backward stages its (n, n) tiles through scratch
#: (stages_fused_backward); True or False forces it (the tests run both paths in every dtype)
STAGED_BACKWARD: bool | None = None
STAGED_FORWARD: bool | None = None  # the same for the fused forward (_stages_forward)
_TARGET_ARCH: dict = {}  # device -> Triton's target arch, None without a driver (host cost: one lookup a call)


def _target_arch(device: torch.device) -> int | None:
    """The compute capability Triton compiles for on `device` (the GPU, or bench/kernel_resources.py's
    stand-in, which clears this cache per target); None under the interpreter."""
    key = (device.type, device.index)
    if key not in _TARGET_ARCH:
        try:
            arch = triton.runtime.driver.active.get_current_target().arch
        except Exception:  # the interpreter, or no driver
            arch = None
        _TARGET_ARCH[key] = arch if isinstance(arch, int) else None
    return _TARGET_ARCH[key]


def _stages_backward(L: _Launch, mechanism: str, extra_live_tiles: bool = False) -> bool:
    """Whether a fused backward stages its (n, n) tiles through scratch slots (_staged_refine_fwd / _bwd)
    instead of holding them in registers, where that spills (bench/results/kernel_resources.md, triton
    3.8, n = 50): fp32 (tf32x3 holds hi and lo parts of every operand: 0.4-1.5 KB per thread on sm_90),
    "value" (two more (n, n) tiles: 48-200 B in half precision on sm_90) and every refinement on
    pre-Hopper targets (sm_80's mma.sync takes both operands from registers: 168 B - 1 KB in half
    precision). extra_live_tiles (W2, whose covariance path adds a product): plain attention too on
    pre-Hopper targets (64-160 B in half precision in registers), and every call with dropout (the keep
    mask's Philox state: 144-152 B in half precision on sm_90). Elsewhere (half inputs on sm_90 without
    "value", and the dot family's plain attention in half precision) the registers hold them, and no
    scratch is written."""
    if STAGED_BACKWARD is not None:
        return STAGED_BACKWARD
    if L.precision == "tf32x3" or mechanism == "value" or (extra_live_tiles and L.dropout):
        return True
    arch = _target_arch(L.device)
    return arch is not None and arch < 90 and (L.refined or extra_live_tiles)


def _stages_forward(L: _Launch, extra_live_tiles: bool = False) -> bool:
    """Whether a fused forward stages its (n, n) tiles through scratch slots (as _stages_backward): fp32
    on pre-Hopper targets, where tf32x3's register operands spilled 0.5-2.6 KB per thread at n = 50, and
    fp32 with dropout everywhere (the keep mask's Philox state: 32-40 B on sm_90 in registers); otherwise
    the dot and W2 forwards hold their tiles in registers without a spill on sm_90, and half inputs do on
    sm_80. extra_live_tiles (the calibrated forward, which keeps P_sp, M and the noise live beside its
    products): fp32 on every target (168-272 B on sm_90 in registers) and, as the backward, every
    refinement on pre-Hopper targets (16-120 B in half precision on sm_80)."""
    if STAGED_FORWARD is not None:
        return STAGED_FORWARD
    arch = _target_arch(L.device)
    if arch is None:
        return False
    if L.precision == "tf32x3":
        return extra_live_tiles or L.dropout or arch < 90
    return extra_live_tiles and L.refined and arch < 90


def _staged_k_slice(L: _Launch) -> int:
    """Width of the K-slices a staged fused backward sums its (n, n) products over (_staged_dot): 16 for
    fp32 inputs, whose tf32x3 products keep hi and lo parts of both operands (32 spilled 152 B on sm_80
    in "value"), 32 for half inputs (16 left 16-176 B of spills on sm_80 and 8 B on sm_90 in "value"; 32
    none: bench/results/kernel_resources.md, triton 3.8, n = 50)."""
    return 16 if L.precision == "tf32x3" else 32


def _refine_coefficients(mechanism: str, refine_scale: float) -> tuple[float, float]:
    """(alpha, beta) of B = alpha T A^T + beta A: simp and value (inner scores) c and 0; add c/2 and 1/2."""
    return (0.5 * refine_scale, 0.5) if mechanism == "add" else (refine_scale, 0.0)


def _head_stride(w) -> int:
    return w.stride(0) if w is not None and w.dim() == 3 else 0


def _reduce_over_batch(x: torch.Tensor, y: torch.Tensor, per_head: bool) -> torch.Tensor:
    """sum over batch (and heads unless per_head) of x^T y, for (B, H, n, n) x and (B, H, n, m) y."""
    batch, heads, n, _ = x.shape
    m = y.shape[-1]
    if per_head:
        return torch.bmm(
            x.transpose(0, 1).reshape(heads, batch * n, n).transpose(1, 2),
            y.transpose(0, 1).reshape(heads, batch * n, m),
        )
    return x.reshape(-1, n).t() @ y.reshape(-1, m)


def _fused_meta(L: _Launch, mechanism: str, refine_scores: bool) -> dict:
    """Meta-parameters of a family's fused single-program kernels (windows of 16, 32 and N_PAD)."""
    return dict(
        MECH=MECHANISM_CODE[mechanism],
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


def refinement_matrix(mechanism: str, w_rq, w_rk):
    """M = W_RQ W_RK^T once per call (SPEC §3b), shared by the batch and the heads; "add" swaps the roles,
    i.e. uses M^T; None for "none". Computed inside the op's forward (one small GEMM) and saved for its
    backward, not as an autograd op: that keeps M's autograd nodes off the host-bound eager path."""
    if mechanism == "none":
        return None
    first, second = (w_rk, w_rq) if mechanism == "add" else (w_rq, w_rk)
    return (first @ second.transpose(-1, -2)).contiguous()


def refinement_factor_grads(mechanism: str, dm, w_rq, w_rk) -> tuple:
    """(dW_RQ, dW_RK) from dM of refinement_matrix (SPEC §3b: M = W_F W_S^T, dW_F = dM W_S, dW_S = dM^T W_F,
    with (W_F, W_S) = (W_RK, W_RQ) for "add"), each summed over the heads where its weight is shared;
    (None, None) for "none"."""
    if mechanism == "none" or dm is None:
        return None, None
    first, second = (w_rk, w_rq) if mechanism == "add" else (w_rq, w_rk)
    d_first = dm @ second.to(dm.dtype)
    d_second = dm.transpose(-1, -2) @ first.to(dm.dtype)
    if first.dim() == 2 and d_first.dim() == 3:
        d_first = d_first.sum(0)
    if second.dim() == 2 and d_second.dim() == 3:
        d_second = d_second.sum(0)
    d_first, d_second = d_first.to(first.dtype), d_second.to(second.dtype)
    return (d_second, d_first) if mechanism == "add" else (d_first, d_second)


def dropout_seed(dropout_p: float, like: torch.Tensor) -> torch.Tensor:
    """The Philox seed of a call's dropout masks (one tensor, so forward and backward draw the same)."""
    if dropout_p > 0:
        return torch.randint(0, 2**31 - 1, (1,), device=like.device, dtype=torch.int64)
    if torch.compiler.is_compiling():
        return torch.zeros(1, device=like.device, dtype=torch.int64)
    return like  # never read without dropout; saves a launch on the host-bound eager path
