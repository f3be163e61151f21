"""Correctness machinery shared by the tests and the benchmarks: random cases over one shared grid of
shapes, padding kinds, weight shapes and mechanisms for every op, a runner that collects the outputs and
every gradient through the public API on a chosen backend, and the one tolerance rule.

The tolerance rule (flash-attention's): a backend's error against the float64 oracle is at most twice the
error the reference itself makes in the same dtype, plus a floor scaled by the size of the true value. In
float64 the reference's own error is zero, so the floor alone bounds it. Where the op has a factored form
(SPEC §3b, B = A M A^T with M = W_RQ W_RK^T, what every fast backend computes), "the reference's error"
is the larger of the spelled-out reference's and the factored eager backend's in that dtype: on
ill-conditioned cases (refine_input="scores" with W2 logits, |B| ~ 10^3) the factorization itself costs
up to ~9x in float32, however exactly a kernel carries it out.

    case = make_case("dot_refined", "simp", n=37, padding="arbitrary")
    assert_matches_oracle(case, "eager")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from . import api
from .backends import UnsupportedInputError
from .ops import SPECS

PADDINGS = ("none", "left", "left_short", "arbitrary")
#: shared (n, n); per_head (H, n, n); mixed: W_RQ (or W_mu) per head, the others shared; rectangular: the
#: projections (n, r) with r != n (W_RV stays square).
WEIGHT_KINDS = ("shared", "per_head", "mixed", "rectangular")
GRID_N = (1, 7, 37)
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
#: The public function of every op.
FUNCTIONS = {
    "dot_refined": api.refined_attention,
    "w2_refined": api.wasserstein_attention,
    "w2_scores": api.w2_scores,
    "calibrated": api.calibrated_attention,
}


def left_padding_mask(lengths, n: int, device="cpu") -> torch.Tensor:
    """bool (B, n), True = padding, for left-padded sequences of the given lengths."""
    lengths = torch.as_tensor(lengths, device=device)
    return torch.arange(n, device=device)[None, :] < (n - lengths)[:, None]


def random_lengths(batch: int, n: int, generator=None) -> torch.Tensor:
    """Random lengths in [0, n], edge cases first: n (full), 0 (fully padded), then random, 1 last."""
    lengths = torch.randint(0, n + 1, (batch,), generator=generator)
    lengths[0] = n
    if batch > 1:
        lengths[1] = 0
    if batch > 3:
        lengths[-1] = 1
    return lengths


def padding_mask(kind: str, batch: int, n: int, seed: int = 0) -> torch.Tensor | None:
    """None, or bool (batch, n), True = padding. left: lengths n, 0, random..., 1; left_short: every length
    below n (a backend may crop to a window); arbitrary: not left padding, with a leading run padded in
    every row and one fully padded sequence."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "left":
        return left_padding_mask(random_lengths(batch, n, g), n)
    if kind == "left_short":
        lengths = torch.randint(0, max(1, n // 2), (batch,), generator=g)
        lengths[-1] = 1
        return left_padding_mask(lengths, n)
    if kind == "arbitrary":
        mask = torch.rand(batch, n, generator=g) < 0.4
        mask[:, : n // 3] = True
        mask[min(1, batch - 1)] = True
        return mask
    raise ValueError(f"padding: expected one of {list(PADDINGS)}, got {kind!r}")


@dataclass(frozen=True)
class Case:
    """One call of an op: its tensors (leaves), weights, other options, and the output gradients."""

    op: str
    mechanism: str | None
    tensors: dict
    weights: dict
    options: dict
    grad_outputs: tuple
    label: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def to(self, dtype: torch.dtype | None = None, device=None) -> Case:
        def move(t):
            if not isinstance(t, torch.Tensor) or (t.dtype == torch.bool):
                return t if not isinstance(t, torch.Tensor) else t.to(device=device)
            return t.to(dtype=dtype, device=device)

        return replace(
            self,
            tensors={k: move(t) for k, t in self.tensors.items()},
            weights={k: move(t) for k, t in self.weights.items()},
            options={k: move(t) for k, t in self.options.items()},
            grad_outputs=tuple(move(t) for t in self.grad_outputs),
        )


def _weight_shape(name: str, kind: str, heads: int, n: int, mechanism: str) -> tuple:
    square = name == "w_rv" or mechanism == "value_literal"
    width = n if square or kind != "rectangular" else max(1, n // 2 + 2)
    per_head = kind == "per_head" or (kind in ("mixed", "rectangular") and name in ("w_rq", "w_mu"))
    return (heads, n, width) if per_head else (n, width)


def make_case(
    op: str,
    mechanism: str | None = None,
    *,
    batch: int = 4,
    heads: int = 2,
    n: int = 7,
    d_h: int = 3,
    padding: str = "left",
    weights: str = "shared",
    refine_input: str = "probs",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    device="cpu",
) -> Case:
    """A random case of `op` (nothing zero; covariances positive; refinement weights of xavier-like scale
    times 4, so the second-order scores are O(1) as in a trained model)."""
    spec = SPECS[op]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def positive(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5

    shape = (batch, heads, n, d_h)
    mask = padding_mask(padding, batch, n, seed=seed + n)
    options: dict = {}
    weight_tensors: dict = {}
    if op == "w2_scores":
        items = 11
        tensors = {
            "mu": randn(batch, d_h),
            "sig": positive(batch, d_h),
            "item_mu": randn(items, d_h),
            "item_sig": positive(items, d_h),
        }
        grads = (randn(batch, items),)
    elif op == "calibrated":
        tensors = {name: randn(*shape) for name in ("q", "k", "v")}
        weight_tensors = {name: randn(d_h) for name in spec.VECTORS}
        weight_tensors.update({name: randn(()) for name in spec.SCALARS})
        if mechanism == "adversarial":
            tensors.update(q_adv=randn(*shape), k_adv=randn(*shape))
            weight_tensors["gate_logits"] = randn(batch, n, n)
            options["noise"] = randn(batch, heads, n, n)
        options["key_padding_mask"] = mask
        # out_cal, and with the adversarial calibrator out_att and the perturbation mask M too
        grads = (randn(*shape), randn(*shape), randn(batch, heads, n, n))[: 3 if mechanism == "adversarial" else 1]
    else:
        if op == "dot_refined":
            tensors = {name: randn(*shape) for name in ("q", "k", "v")}
        else:
            tensors = {name: (positive if name.startswith("sig") else randn)(*shape) for name in spec.TENSORS}
        for name in spec.WEIGHTS[mechanism]:
            w_shape = _weight_shape(name, weights, heads, n, mechanism)
            weight_tensors[name] = randn(*w_shape) * (4.0 * math.sqrt(1.0 / (n + w_shape[-1])))
        options.update(key_padding_mask=mask, refine_input=refine_input)
        grads = tuple(randn(*shape) for _ in range(1 if op == "dot_refined" else 2))
    label = f"{op}-{mechanism}-n{n}-{padding}-{weights}-{refine_input}".replace("-None", "")
    case = Case(
        op, mechanism, tensors, weight_tensors, options, grads, label, {"n": n, "padding": padding, "weights": weights}
    )
    return case.to(dtype=dtype, device=device)


def grid(op: str, mechanisms=None, small: bool = False) -> list[dict]:
    """The shared grid of make_case keyword arguments for `op`: every mechanism at every n of GRID_N and
    every padding kind, with the weight kinds and refine inputs rotated through them (small: each
    mechanism once per padding kind, at n = 7 and 37 in turn)."""
    spec = SPECS[op]
    if op == "w2_scores":
        return [dict(batch=b, d_h=d) for b, d in ((1, 1), (4, 3), (5, 16))]
    if op == "calibrated":
        return [dict(mechanism=m, n=n, padding=p) for m in spec.MECHANISMS for n in GRID_N[1:] for p in PADDINGS]
    out = []
    for m_index, mechanism in enumerate(mechanisms or spec.MECHANISMS):
        for n_index, n in enumerate((7, 37) if small else GRID_N):
            for p_index, padding in enumerate(PADDINGS):
                if small and (p_index + n_index) % 2:
                    continue
                turn = m_index + n_index + p_index
                kind = WEIGHT_KINDS[turn % len(WEIGHT_KINDS)] if spec.WEIGHTS[mechanism] else "shared"
                refine_input = "scores" if turn % 3 == 2 and mechanism != "none" else "probs"
                out.append(dict(mechanism=mechanism, n=n, padding=padding, weights=kind, refine_input=refine_input))
    return out


def run(case: Case, backend: str, *, grad: bool = True, **extra) -> dict[str, torch.Tensor]:
    """Call the op's public function on `backend`: {"out0", "out1", ..., "d<leaf>"} (detached); with
    grad=False only the outputs, computed under no_grad (a forward-only backend)."""
    leaves = {name: t.detach().clone().requires_grad_(grad) for name, t in {**case.tensors, **case.weights}.items()}
    kwargs = {name: leaves[name] for name in leaves if name not in _POSITIONAL[case.op]}
    positional = [leaves[name] for name in _POSITIONAL[case.op]]
    if case.op in ("dot_refined", "w2_refined"):
        kwargs["mechanism"] = case.mechanism
    with torch.set_grad_enabled(grad):
        result = FUNCTIONS[case.op](*positional, **kwargs, **case.options, backend=backend, **extra)
    outs = [result] if isinstance(result, torch.Tensor) else [t for t in result if t is not None]
    outs = outs[: len(case.grad_outputs)]
    if not grad:
        return {f"out{i}": t.detach() for i, t in enumerate(outs)}
    grads = torch.autograd.grad(outs, list(leaves.values()), list(case.grad_outputs))
    return {**{f"out{i}": t.detach() for i, t in enumerate(outs)}, **{f"d{name}": g for name, g in zip(leaves, grads)}}


_POSITIONAL = {
    "dot_refined": ("q", "k", "v"),
    "w2_refined": SPECS["w2_refined"].TENSORS,
    "w2_scores": ("mu", "sig", "item_mu", "item_sig"),
    "calibrated": ("q", "k", "v"),
}


def oracle_errors(case: Case, backend: str, *, grad: bool = True) -> list[str]:
    """What differs from the float64 oracle beyond the tolerance rule, in words ([] when it matches);
    grad=False compares the outputs only (a forward-only backend)."""
    ours = run(case, backend, grad=grad)
    exact = run(case.to(torch.float64), "reference", grad=grad)
    same = [run(case, "reference", grad=grad)] if case.dtype != torch.float64 else [exact]
    if case.dtype != torch.float64 and backend not in ("reference", "eager"):
        try:  # the factored form's own error in this dtype (module docstring)
            same.append(run(case, "eager", grad=grad))
        except UnsupportedInputError:
            pass
    failures = []
    for name, truth in exact.items():
        got = ours[name]
        if got.shape != truth.shape:
            failures.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}")
            continue
        if not torch.isfinite(got).all():
            failures.append(f"{name}: non-finite values")
            continue
        err = (got.double() - truth).abs().max().item() if truth.numel() else 0.0
        ref_err = max((ref[name].double() - truth).abs().max().item() for ref in same) if truth.numel() else 0.0
        scale = max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
        bound = 2.0 * ref_err + FLOOR[case.dtype] * scale
        if err > bound:
            failures.append(f"{name}: error {err:.3e} > bound {bound:.3e} (reference in {case.dtype}: {ref_err:.3e})")
    return failures


def assert_matches_oracle(case: Case, backend: str, *, grad: bool = True) -> None:
    failures = oracle_errors(case, backend, grad=grad)
    assert not failures, f"{case.label} on {backend}: " + "; ".join(failures)


# ------------------------------------------------------------------- tensor-core precision in the interpreter


def round_to_tf32(x):
    """numpy float32 -> the nearest TF32 value (10 mantissa bits, ties away from zero: cvt.rna.tf32.f32),
    kept as float32; inf and NaN pass through."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(np.isfinite(x), rounded, x).astype(np.float32)


def tensor_core_matmul(a, b, input_precision: str):
    """a @ b in float32 as a GPU's tl.dot computes it for float32 operands: "ieee" exact fp32 products,
    "tf32" both operands rounded to TF32, "tf32x3" the split a = hi + lo (hi, lo TF32) and
    hi_a hi_b + hi_a lo_b + lo_a hi_b (the lo*lo term dropped), as Triton decomposes it."""
    import numpy as np

    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if input_precision == "ieee":
        return np.matmul(a, b)
    a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
    if input_precision == "tf32":
        return np.matmul(a_hi, b_hi)
    if input_precision != "tf32x3":
        raise ValueError(f"input_precision: expected 'ieee', 'tf32' or 'tf32x3', got {input_precision!r}")
    a_lo, b_lo = round_to_tf32(a - a_hi), round_to_tf32(b - b_hi)
    return np.matmul(a_hi, b_lo) + np.matmul(a_lo, b_hi) + np.matmul(a_hi, b_hi)


def emulate_tensor_core_dots() -> bool:
    """Make the Triton interpreter's tl.dot honour input_precision for float32 operands (it otherwise
    multiplies in exact fp32 whatever the kernel asks for), so the CPU tests check the arithmetic a GPU
    runs. Returns False where this Triton's interpreter has no such hook (the dots then stay exact)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None or getattr(original, "_awr_fast_emulated", False):
        return original is not None
    tensor_handle = interpreter.TensorHandle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        import numpy as np

        if a.data.dtype != np.float32 or b.data.dtype != np.float32 or input_precision is None:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        precision = getattr(input_precision, "name", str(input_precision)).lower()
        if precision not in ("ieee", "tf32", "tf32x3"):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = tensor_core_matmul(a.data, b.data, precision)
        return tensor_handle(product.astype(d.data.dtype) + d.data, d.dtype.scalar)

    create_dot._awr_fast_emulated = True
    builder.create_dot = create_dot
    return True
