"""The core of the eager backend: the AWRSR refinement in its factored form (SPEC §3b), shared by
eager.dot_refined and eager.w2_refined.

The reference stays the readable oracle; this is the same function, organised for speed on the CPU:

- B = A (c M) A^T with M = W_RQ W_RK^T (M_add uses M^T, M_value's inner scores are the same, M_stoc's mean
  part is the Gram matrix A W_mu W_mu^T A^T), so each head needs two n x n products with A instead of three;
- a sequence's positions before its first real one are padding (left padding), so the batch is split into
  a few buckets of similar length (one host sync), each cropped to the window [w0, n) of its longest
  sequence, and the outputs are padded back with zeros and merged;
- A is lower triangular and only the lower triangle of B is used, so every matrix after A is held as row
  blocks X_i = X[s_i:e_i, :e_i] and the all-zero blocks above the diagonal are never computed or stored
  (simp, forward and backward: about 2.7 n^3 multiply-adds per head with 4 blocks instead of 6 n^3);
- one autograd.Function runs the base masked softmax, the refinement and the final masked softmax with a
  hand-written backward, so the fills, softmaxes and softmax backwards run in place on tensors it owns, no
  n x n gradient is ever assembled densely, and only what the backward needs is kept.

Layout: every n x n tensor is (G, rows, cols) with G = B*H groups, ordered (B, H), or (H, B) when a weight is
per head (the per-head GEMMs then flatten over the batch). Every GEMM writes a fresh contiguous tensor or
accumulates into one (PyTorch's CPU bmm into a strided view is several times slower); strided views are
only read. Fully padded rows are zeros, never NaN, forward and backward: a padded query row keeps one finite
logit, on its diagonal, whose probability is zeroed after the softmax (a zero row has a zero softmax Jacobian).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

BLOCK_TARGET = 50  # rows per block: smaller blocks skip more zeros, larger ones make more efficient GEMMs
BUCKET_RATIO = 0.7  # a length bucket holds sequences down to this fraction of its longest one ...
BUCKET_MIN = 16  # ... and at least this many; ...
BUCKET_MIN_LENGTH = 64  # ... and sequences shorter than this share one bucket: the per-bucket ops (gather,
# merge, one more set of GEMM launches) cost more than the arithmetic a split would skip


def row_blocks(length: int, target: int) -> list[tuple[int, int]]:
    """Split [0, length) into about length / target nearly equal row blocks (s, e)."""
    count = max(1, round(length / target))
    bounds = [round(i * length / count) for i in range(count + 1)]
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


# ------------------------------------------------------------------------------------- window and layout


class Window:
    """One bucket's window [w0, n), its key padding and the (G, L, .) layout of its tensors."""

    def __init__(self, key_padding_mask, host_mask, batch: int, heads: int, n: int, weights):
        """key_padding_mask: None or the bucket's bool (batch, n), True = padding; host_mask: it on the CPU."""
        self.batch, self.heads, self.n = batch, heads, n
        self.heads_first = any(w is not None and w.dim() == 3 for w in weights)
        self.groups = (heads, batch) if self.heads_first else (batch, heads)
        self.w0, self.key_padding = 0, None
        if key_padding_mask is not None:
            real = (~host_mask).any(0).nonzero()
            # no real position at all: keep the last one (all padding, so every output is zero)
            self.w0 = int(real[0]) if len(real) else n - 1
            if bool(host_mask[:, self.w0 :].any()):
                self.key_padding = key_padding_mask[:, self.w0 :]
        self.length = n - self.w0

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, n, d) -> the window's rows (G, L, d)."""
        x = x[:, :, self.w0 :]
        if self.heads_first:
            x = x.transpose(0, 1)
        return x.reshape(-1, *x.shape[2:])

    def ungroup(self, x: torch.Tensor) -> torch.Tensor:
        """(G, L, d) -> (B, H, n, d) with zero rows before the window."""
        x = x.view(*self.groups, *x.shape[1:])
        if self.heads_first:
            x = x.transpose(0, 1)
        return F.pad(x, (0, 0, self.w0, 0))

    def ungroup_square(self, x: torch.Tensor) -> torch.Tensor:
        """(G, L, L) -> (B, H, n, n) with zeros outside the window."""
        x = F.pad(x, (self.w0, 0, self.w0, 0)).view(*self.groups, self.n, self.n)
        return x.transpose(0, 1) if self.heads_first else x


@dataclass
class Plan:
    """What the Function needs besides tensors: the mechanism, the row blocks and the window's masks."""

    mechanism: str
    refine_input: str
    blocks: list
    groups: tuple  # (d0, d1), G = d0 * d1
    hidden: torch.Tensor  # bool, broadcastable to (d0, d1, L, L): True where a query may not see a key
    padded_query: torch.Tensor | None  # bool, broadcastable to (d0, d1, L), True at padding; None: no padding
    causal_block: list  # per block: the strict upper triangle (bs, bs) of its diagonal block
    c: float  # refine_scale (stoc's covariance part; the other mechanisms carry c in m)
    sqrt_clamp: float  # stoc: covariances are clamped here before the square root

    @property
    def padded(self) -> bool:
        return self.padded_query is not None


_UPPER: dict = {}  # (length, device) -> the strict upper triangle, built once (read-only everywhere)


def _upper(length: int, device) -> torch.Tensor:
    key = (length, str(device))
    upper = _UPPER.get(key)
    if upper is None:
        upper = _UPPER[key] = torch.ones(length, length, dtype=torch.bool, device=device).triu_(1)
    return upper


def make_plan(window: Window, mechanism: str, refine_input: str, c: float, sqrt_clamp: float, device) -> Plan:
    length = window.length
    blocks = row_blocks(length, BLOCK_TARGET)
    upper = _upper(length, device)
    hidden, padded_query = upper, None
    if window.key_padding is not None:
        kp = window.key_padding[None] if window.heads_first else window.key_padding[:, None]
        hidden = upper | kp[..., None, :] | kp[..., :, None]  # padded keys, and every key of a padded query
        padded_query = kp
    causal_block = [upper[: e - s, : e - s] for s, e in blocks]
    return Plan(mechanism, refine_input, blocks, window.groups, hidden, padded_query, causal_block, c, sqrt_clamp)


# -------------------------------------------------------------------------------------- in-place pieces


def _masked_softmax_(x: torch.Tensor, plan: Plan, s: int, e: int, causal: torch.Tensor) -> torch.Tensor:
    """Softmax of the row block x = X[s:e, :e] (G, e-s, e) over its visible keys, in place; padded rows -> 0."""
    x4 = x.view(*plan.groups, e - s, e)
    if not plan.padded:  # only the diagonal block has hidden keys
        x4[..., s:e].masked_fill_(causal, float("-inf"))
        return torch.softmax(x, -1, out=x)
    x4.masked_fill_(plan.hidden[..., s:e, :e], float("-inf"))
    diagonal = x4.diagonal(offset=s, dim1=-2, dim2=-1)
    pad = plan.padded_query[..., s:e]
    diagonal.masked_fill_(pad, 0.0)  # a padded query row keeps one finite logit: no NaN ...
    torch.softmax(x, -1, out=x)
    diagonal.masked_fill_(pad, 0.0)  # ... and its one probability is then zeroed
    return x


def _hide_(x: torch.Tensor, plan: Plan, s: int, e: int) -> torch.Tensor:
    """Zero the hidden entries of the row block x = X[s:e, :e] in place."""
    x.view(*plan.groups, e - s, e).masked_fill_(plan.hidden[..., s:e, :e], 0.0)
    return x


def _softmax_backward_(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """probs * (grad - sum(probs * grad)), written over grad (which the caller owns)."""
    return torch._softmax_backward_data(grad, probs, -1, probs.dtype, grad_input=grad)


def _wmm(x: torch.Tensor, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x (G, r, e) times w (e, f) shared or (H, e, f) per head (G ordered (H, B)): one GEMM over all groups."""
    g, r, e = x.shape
    if transpose:
        w = w.transpose(-1, -2)
    if w.dim() == 2:
        return torch.mm(x.view(g * r, e), w).view(g, r, -1)
    return torch.bmm(x.view(w.shape[0], -1, e), w).view(g, r, -1)


def _wgrad(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient of a weight shaped like w from x (G, r, e) and y (G, r, f): the sum over the groups of
    x^T y, (e, f), or per head (H, e, f)."""
    g, r, e = x.shape
    if w.dim() == 2:
        return torch.mm(x.view(g * r, e).t(), y.view(g * r, -1))
    heads = w.shape[0]
    return torch.bmm(x.view(heads, -1, e).transpose(1, 2), y.view(heads, -1, y.shape[-1]))


# -------------------------------------------------------------------------------------------- Function


class RefinedProbs(torch.autograd.Function):
    """(fq, fk, m, w2, plan) -> (A, P_0, ..., P_k) for one window of length L.

    The base scores are S = fq fk^T (fq, fk (G, L, f): the scaled queries and the keys, or W2's augmented
    features); A (G, L, L) is their masked softmax (or the masked scores); P_i (G, e_i - s_i, e_i) holds the
    rows s_i:e_i, columns :e_i of the refined probabilities. m (L, L) or (H, L, L) is the scaled second-order
    matrix: c W_RQ W_RK^T (simp, value), (c/2) W_RK W_RQ^T (add), 2c W_mu W_mu^T (stoc). w2 is W_RV's window
    (value, (L, L)) or W_sigma's window rows (stoc, (L, n)); None otherwise.
    """

    @staticmethod
    def forward(ctx, fq, fk, m, w2, plan: Plan):
        ctx.set_materialize_grads(False)
        length = fq.shape[1]
        a = _base_forward_(torch.bmm(fq, fk.transpose(1, 2)), plan)
        rows = [a if (s, e) == (0, length) else a[:, s:e, :e].contiguous() for s, e in plan.blocks]
        sig = sq = col = None
        if plan.mechanism == "stoc":
            # sigma = ELU(A W_sigma) + 1 and its square root, dense: the covariance part has no shortcut
            sig = F.elu(_wmm(a, w2)).add_(1.0)
            sq = sig.clamp(min=plan.sqrt_clamp).sqrt_()
            col = sig.sum(-1).mul_(plan.c)  # c (|mu_t|^2 + sum sigma_t), completed block by block below
        t, r, z, p = [], [], [], []
        for i, (s, e) in enumerate(plan.blocks):
            lead = a[:, :e, :e]  # A[:e, :e]: row block i reads only these rows and columns of A
            t.append(_wmm(rows[i], m[..., :e, :e]))
            if plan.mechanism == "add":  # (c A M^T A^T + A) / 2; the first 1/2 is in m
                b = torch.baddbmm(rows[i], t[i], lead.transpose(1, 2), beta=0.5)
            elif plan.mechanism == "stoc":
                # -c W2sq(k, t) up to terms constant along the row k, which the softmax cancels:
                # 2c mu_k.mu_t + 2c sqrt(sig_k).sqrt(sig_t) - c (|mu_t|^2 + sum sigma_t), with mu mu^T = A W W^T A^T
                col[:, s:e] += 0.5 * (t[i] * rows[i]).sum(-1)  # |mu_t|^2 = (A M A^T)_tt, M = W_mu W_mu^T
                b = torch.baddbmm(col[:, None, :e].neg(), t[i], lead.transpose(1, 2))
                b.baddbmm_(sq[:, s:e], sq[:, :e].transpose(1, 2), alpha=2.0 * plan.c)
            else:
                b = torch.bmm(t[i], lead.transpose(1, 2))
            if plan.mechanism == "value":  # B = R (A W_RV) = (R A) W_RV with R = softmax(mask(c A M A^T))
                r.append(_masked_softmax_(b, plan, s, e, plan.causal_block[i]))
                z.append(torch.bmm(r[i], lead))
                b = _wmm(z[i], w2[..., :e, :e])
            p.append(_masked_softmax_(b, plan, s, e, plan.causal_block[i]))
        ctx.plan = plan
        ctx.counts = (len(plan.blocks), len(r))
        ctx.save_for_backward(fq, fk, m, w2, a, sig, sq, *rows, *t, *r, *z, *p)
        return (a, *p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a, *grad_p):
        plan, blocks = ctx.plan, ctx.plan.blocks
        nb, nr = ctx.counts
        fq, fk, m, w2, a, sig, sq, *rest = ctx.saved_tensors
        rows, t, p = rest[:nb], rest[nb : 2 * nb], rest[2 * nb + 2 * nr :]
        r, z = rest[2 * nb : 2 * nb + nr], rest[2 * nb + nr : 2 * nb + 2 * nr]
        # dB_i, the final softmax's backward; a missing gradient means the block was not used
        db = [
            torch.zeros_like(p[i])
            if grad_p[i] is None
            else torch._softmax_backward_data(grad_p[i], p[i], -1, p[i].dtype)
            for i in range(nb)
        ]
        dm = torch.zeros_like(m) if ctx.needs_input_grad[2] else None
        dw2 = torch.zeros_like(w2) if w2 is not None and ctx.needs_input_grad[3] else None
        d_second, dz, dcol = db, [], None  # d_second: the gradient of the second-order scores A m A^T
        if plan.mechanism == "value":
            d_second = []
            for i, (s, e) in enumerate(blocks):
                dz.append(_wmm(db[i], w2[..., :e, :e], transpose=True))  # Z = R A, B = Z W_RV
                if dw2 is not None:
                    dw2[..., :e, :e] += _wgrad(z[i], db[i], w2)
                d_second.append(_softmax_backward_(torch.bmm(dz[i], a[:, :e, :e].transpose(1, 2)), r[i]))
        elif plan.mechanism == "stoc":
            dcol = torch.zeros_like(a[:, 0])  # the column term enters every row with a minus sign
            for i, (s, e) in enumerate(blocks):
                dcol[:, :e] -= db[i].sum(1)
        ds = []
        for i, (s, e) in enumerate(blocks):
            dt = torch.bmm(d_second[i], a[:, :e, :e])  # dT_i = dB_i A[:e, :e]
            if dcol is not None:  # |mu_t|^2 = 1/2 (T o A)_t summed, in the column term
                dt.addcmul_(dcol[:, s:e, None], rows[i], value=0.5)
            if dm is not None:
                dm[..., :e, :e] += _wgrad(rows[i], dt, m)
            da = _wmm(dt, m[..., :e, :e], transpose=True)  # dA_i = dT_i M^T ...
            for j in range(i, nb):  # ... + dB^T T over the row blocks j >= i, which see columns s_i:e_i
                da.baddbmm_(d_second[j][:, :, s:e].transpose(1, 2), t[j][:, :, :e])
                if plan.mechanism == "value":  # ... + R^T dZ, as Z = R A
                    da.baddbmm_(r[j][:, :, s:e].transpose(1, 2), dz[j][:, :, :e])
            if plan.mechanism == "add":
                da.add_(db[i], alpha=0.5)
            elif plan.mechanism == "stoc":
                da.addcmul_(dcol[:, s:e, None], t[i], value=0.5)
                du = _stoc_sigma_grad(db, sig, sq, dcol, plan, i)
                da += _wmm(du, w2[..., :e, :], transpose=True)
                if dw2 is not None:
                    dw2[..., :e, :] += _wgrad(rows[i], du, w2)
            if grad_a is not None:
                da += grad_a[:, s:e, :e]
            # dA above the diagonal is not A's gradient (A is zero there by construction): the softmax
            # backward (A = 0 there) or the mask of the masked scores removes it
            ds.append(_softmax_backward_(da, rows[i]) if plan.refine_input == "probs" else _hide_(da, plan, s, e))
        # S = fq fk^T, from the row blocks dS_i = dS[s_i:e_i, :e_i]
        dfq = torch.cat([torch.bmm(ds_i, fk[:, :e]) for ds_i, (s, e) in zip(ds, blocks)], dim=1)
        dfk = torch.zeros_like(fk)
        for ds_i, (s, e) in zip(ds, blocks):
            dfk[:, :e] += torch.bmm(ds_i.transpose(1, 2), fq[:, s:e])
        return dfq, dfk, dm, dw2, None


def _base_forward_(scores: torch.Tensor, plan: Plan) -> torch.Tensor:
    """A of SPEC §3 from the window's scores, in place: the masked softmax, or the masked scores."""
    length = scores.shape[-1]
    if plan.refine_input == "scores":
        return _hide_(scores, plan, 0, length)
    return _masked_softmax_(scores, plan, 0, length, plan.hidden)  # unpadded, hidden is the causal triangle


def _stoc_sigma_grad(db, sig, sq, dcol, plan: Plan, i: int) -> torch.Tensor:
    """d(A W_sigma) for the rows of block i: through 2c sqrt(sig_k).sqrt(sig_t) (lower triangle of both
    row blocks) and c sum sigma_t (the column term), then sqrt(clamp(.)), then ELU(.) + 1."""
    blocks = plan.blocks
    s, e = blocks[i]
    dsq = torch.bmm(db[i], sq[:, :e])  # as the row k ...
    for j in range(i, len(blocks)):  # ... and as the column t of the row blocks j >= i
        sj, ej = blocks[j]
        dsq.baddbmm_(db[j][:, :, s:e].transpose(1, 2), sq[:, sj:ej])
    sig_i, sq_i = sig[:, s:e], sq[:, s:e]
    dsig = dsq.mul_(plan.c).div_(sq_i).masked_fill_(sig_i < plan.sqrt_clamp, 0.0)  # 2c * d sqrt = c / sqrt
    dsig += (plan.c * dcol[:, s:e])[..., None]
    return dsig.mul_(sig_i.clamp(max=1.0))  # ELU'(u) = 1 for u > 0, exp(u) = sigma otherwise


# ----------------------------------------------------------------------------------------- entry points


def refinement_weights(mechanism: str, weights: dict, c: float, w0: int):
    """(m, w2) of RefinedProbs for the window [w0, n), differentiably; m is computed once per call."""

    def window_rows(name):
        return weights[name][..., w0:, :]

    if mechanism == "stoc":
        w_mu = window_rows("w_mu")
        return (2.0 * c) * (w_mu @ w_mu.transpose(-1, -2)), window_rows("w_sigma")
    wq, wk = window_rows("w_rq"), window_rows("w_rk")
    if mechanism == "add":
        return (0.5 * c) * (wk @ wq.transpose(-1, -2)), None
    m = c * (wq @ wk.transpose(-1, -2))
    return m, (weights["w_rv"][..., w0:, w0:] if mechanism == "value" else None)


def refine(window: Window, fq, fk, *, mechanism, weights, c, refine_input, sqrt_clamp=1e-24):
    """The window's A (G, L, L) and refined probabilities as row blocks, for the base scores fq fk^T."""
    plan = make_plan(window, mechanism, refine_input, c, sqrt_clamp, fq.device)
    m, w2 = refinement_weights(mechanism, weights, c, window.w0)
    a, *probs = RefinedProbs.apply(fq, fk, m, w2, plan)
    return a, probs, plan


def dropout_blocks(probs, dropout_p: float):
    return [F.dropout(p, p=dropout_p, training=True) for p in probs] if dropout_p > 0.0 else probs


def apply_probs(probs, plan: Plan, values: torch.Tensor, square: bool = False) -> torch.Tensor:
    """P values (or (P o P) values) from the row blocks of P: (G, L, d)."""
    return torch.cat([torch.bmm(p * p if square else p, values[:, :e]) for p, (s, e) in zip(probs, plan.blocks)], dim=1)


def dense_probs(probs, plan: Plan) -> torch.Tensor:
    """Row blocks (G, e - s, e) -> the window's (G, L, L), zeros above the blocks (for return_weights)."""
    length = plan.blocks[-1][1]
    return torch.cat([F.pad(p, (0, length - e)) for p, (s, e) in zip(probs, plan.blocks)], dim=1)


def split_batch(key_padding_mask: torch.Tensor | None, batch: int, n: int):
    """The batch in buckets of similar length: (order, sizes, host masks), order None for one bucket.

    A sequence's positions before its first real one are padding, so a bucket is cropped to its longest
    sequence: sorted by length, a bucket takes the next sequences down to BUCKET_RATIO of its first, and at
    least BUCKET_MIN of them (tiny GEMMs cost more than they skip); the sequences shorter than
    BUCKET_MIN_LENGTH all go to the last bucket. This is the path's one host sync."""
    if key_padding_mask is None:
        return None, [batch], [None]
    host = key_padding_mask.detach().cpu()
    if batch < 2 * BUCKET_MIN:  # the remainder of a first bucket would be too small for a second
        return None, [batch], [host]
    real = ~host
    lengths = torch.where(real.any(1), n - real.int().argmax(1), 0)
    if int(lengths.max()) < BUCKET_MIN_LENGTH:
        return None, [batch], [host]
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    sizes, start = [], 0
    while start < len(order):
        stop = start + 1 if sorted_lengths[start] >= BUCKET_MIN_LENGTH else len(order)
        while stop < len(order) and (
            stop - start < BUCKET_MIN or sorted_lengths[stop] >= BUCKET_RATIO * sorted_lengths[start]
        ):
            stop += 1
        if len(order) - stop < BUCKET_MIN:  # too few left for a bucket of their own
            stop = len(order)
        sizes.append(stop - start)
        start = stop
    if len(sizes) == 1:
        return None, sizes, [host]
    return order.to(key_padding_mask.device), sizes, list(torch.split(host[order], sizes))


def run_buckets(key_padding_mask, inputs: dict, weights: dict, core):
    """Run core(window, bucket_inputs) -> (outputs (G, L, d), A, P row blocks, plan) on each length bucket of
    the (B, H, n, d) inputs; returns the outputs merged back to (B, H, n, d) and a function that builds
    {"A", "P"} as (B, H, n, n) (for return_weights)."""
    batch, heads, n, _ = next(iter(inputs.values())).shape
    order, sizes, hosts = split_batch(key_padding_mask, batch, n)

    def split(x):  # one gather and a split: their backwards touch each gradient once
        return [x] if order is None else list(torch.split(x.index_select(0, order), sizes))

    pieces = {name: split(x) for name, x in inputs.items()}
    masks = [None] * len(sizes) if key_padding_mask is None else split(key_padding_mask)
    parts = []
    for i, size in enumerate(sizes):
        window = Window(masks[i], hosts[i], size, heads, n, weights.values())
        outs, a, probs, plan = core(window, {name: xs[i] for name, xs in pieces.items()})
        parts.append((window, [window.ungroup(o) for o in outs], a, probs, plan))

    def merge(tensors):
        if order is None:
            return tensors[0]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(tensors).index_select(0, inverse)

    outs = [merge([part[1][j] for part in parts]) for j in range(len(parts[0][1]))]

    def weights_fn():
        return {
            "A": merge([window.ungroup_square(a) for window, _, a, _, _ in parts]),
            "P": merge([window.ungroup_square(dense_probs(probs, plan)) for window, _, _, probs, plan in parts]),
        }

    return outs, weights_fn


def expand(w: torch.Tensor) -> torch.Tensor:
    """(n, r) shared or (H, n, r) per head -> broadcastable against (B, H, n, r)."""
    return w[None, None] if w.dim() == 2 else w[None]


def visible_mask(n: int, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    """(B | 1, 1, n, n) bool: key j is visible to query i (SPEC §1)."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril_()[None, None]
    if key_padding_mask is None:
        return causal
    keep = ~key_padding_mask
    return causal & keep[:, None, :, None] & keep[:, None, None, :]


def dense_masked_softmax(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    empty = ~visible.any(-1, keepdim=True)
    x = x.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(x, dim=-1).masked_fill(empty, 0.0)


def dense_second_order(a: torch.Tensor, mechanism: str, weights: dict, c: float, key_padding_mask, sqrt_clamp=1e-24):
    """B of SPEC §3 (not yet masked) as (B, H, n, n) from the dense A, through the factored weights: what
    return_weights reports. Never on the training path, so plainly dense."""
    if mechanism == "stoc":
        w_mu = expand(weights["w_mu"])
        gram = (a @ (w_mu @ w_mu.transpose(-1, -2))) @ a.transpose(-1, -2)
        sq = gram.diagonal(dim1=-2, dim2=-1)
        sig = F.elu(a @ expand(weights["w_sigma"])) + 1.0
        root = sig.clamp(min=sqrt_clamp).sqrt()
        total = sq + sig.sum(-1)
        w2 = total[..., :, None] + total[..., None, :] - 2.0 * (gram + root @ root.transpose(-1, -2))
        return -c * w2
    m, w_rv = refinement_weights(mechanism, weights, c, 0)
    b = (a @ expand(m)) @ a.transpose(-1, -2)
    if mechanism == "add":
        return b + 0.5 * a
    if mechanism == "value":
        return dense_masked_softmax(b, visible_mask(a.shape[-1], key_padding_mask, a.device)) @ (a @ expand(w_rv))
    return b
