"""The Triton calibrated family's backward and dropout (kernels/calibrated.py: _calibrated_rows_bwd and
_calibrated_cols_bwd, the row-block forward's Philox streams): every gradient (q, k, v, the spatial
calibrator's vectors and scalars, q_adv, k_adv, gate_logits) against the float64 reference, with the
loss on out_cal, out_att and the returned M in every combination; odd n, padding, fully padded rows,
several row and key blocks, fp32/bf16; causality of the gradients; dropout masks shared by forward and
backward; training-time use through the module and torch.compile.

On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py)."""

import pytest
import torch
from test_triton_calibrated import DEVICE, _case

import awr_fast
from awr_fast import testing
from awr_fast.kernels import calibrated as triton_cal
from awr_fast.reference import calibrated as reference
from awr_fast.reference.dot_refined import refine_scores
from awr_fast.reference.masking import masked_softmax, visible_mask, zero_padded_queries

PARAMS = ("w_oq", "w_ok", "w_dq", "w_dk", "b_o", "b_d", "dist_scale")


def _upstream(kwargs, seed=11):
    """Random gradients of (out_cal, out_att, M) in float64."""
    q = kwargs["q"]
    g = torch.Generator().manual_seed(seed)
    batch, heads, n, d_h = q.shape
    return (
        torch.randn(batch, heads, n, d_h, generator=g, dtype=torch.float64),
        torch.randn(batch, heads, n, d_h, generator=g, dtype=torch.float64),
        torch.randn(batch, heads, n, n, generator=g, dtype=torch.float64),
    )


def _run(fn, kwargs, dtype, upstream, use=(True, True, True), **extra):
    """Outputs and the gradient of every floating input (noise excluded) of sum(out * upstream)."""
    leaves, args = {}, {}
    for name, t in kwargs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.to(device=DEVICE, dtype=dtype)
            if name != "noise":
                t = t.detach().requires_grad_(True)
                leaves[name] = t
        elif isinstance(t, torch.Tensor):
            t = t.to(DEVICE)
        args[name] = t
    q, k, v = (args.pop(name) for name in ("q", "k", "v"))
    outs = fn(q, k, v, **args, **extra)
    loss = sum(
        (o * u.to(device=DEVICE, dtype=dtype)).sum() for o, u, on in zip(outs, upstream, use) if on and o is not None
    )
    loss.backward()
    result = {f"out{i}": o.detach().double().cpu() for i, o in enumerate(outs) if o is not None}
    for name, t in leaves.items():
        result[f"d{name}"] = None if t.grad is None else t.grad.double().cpu()
    return result


def _assert_gradients_match(kwargs, dtype=torch.float32, use=(True, True, True), fn=None, exact_fn=None, **extra):
    """Within 2x the same-dtype reference's error plus the dtype's floor (awr_fast.testing's rule)."""
    upstream = _upstream(kwargs)
    exact = _run(exact_fn or reference.calibrated, kwargs, torch.float64, upstream, use, **extra)
    same = _run(exact_fn or reference.calibrated, kwargs, dtype, upstream, use, **extra)
    ours = _run(fn or triton_cal.calibrated, kwargs, dtype, upstream, use, **extra)
    assert ours.keys() == exact.keys()
    for name, truth in exact.items():
        got = ours[name]
        if truth is None or not truth.abs().max() > 0:  # no gradient reaches it (e.g. q_adv with out_cal alone)
            assert got is None or got.abs().max() == 0, name
            continue
        assert got is not None, name
        assert torch.isfinite(got).all(), name
        err = (got - truth).abs().max().item()
        ref_err = (same[name] - truth).abs().max().item()
        bound = 2.0 * ref_err + testing.FLOOR[dtype] * max(1.0, truth.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference in {dtype}: {ref_err:.3e})"


# the fused forward's windows (n <= 64) and the row blocks past it; odd n, a fully padded row
SHAPES = [(7, [7, 3, 0], 16), (37, [37, 17, 1], 16), (50, [50, 33, 16, 0], 16), (64, [64, 31, 2], 16)]
LONG_SHAPES = [(97, [97, 40, 0], 8), (200, [200, 77], 8)]


@pytest.mark.parametrize("adversarial", [True, False])
@pytest.mark.parametrize("n,lengths,d_h", SHAPES + LONG_SHAPES, ids=[f"n{s[0]}" for s in SHAPES + LONG_SHAPES])
def test_gradients_match_reference(adversarial, n, lengths, d_h):
    _assert_gradients_match(_case(n, lengths, adversarial=adversarial, d_h=d_h, seed=n))


@pytest.mark.parametrize("refine", ["simp", "add", "value"])
@pytest.mark.parametrize("per_head", [False, True])
def test_refined_gradients_match_reference(refine, per_head):
    """AWRSR on P_fin: the refinement weights' gradients too, through the dot family's tiled core; the fused
    forward (n = 37) and the row blocks (n = 97), both calibrators."""
    _assert_gradients_match(_case(37, [37, 12, 0], refine=refine, per_head=per_head, seed=13))
    _assert_gradients_match(_case(97, [97, 30], refine=refine, per_head=per_head, d_h=8, seed=14))
    _assert_gradients_match(_case(21, [21, 5], adversarial=False, refine=refine, per_head=per_head, seed=15))


@pytest.mark.parametrize(
    "use", [(True, False, False), (False, True, False), (False, False, True)], ids=["cal", "att", "perturb"]
)
def test_each_output_alone(use):
    """AC-SASRec's two losses read different outputs: L_cal only out_cal (no gradient reaches q_adv, k_adv
    through M's softmax... except via P_fin), L_att out_att and the penalty on M."""
    _assert_gradients_match(_case(29, [29, 11, 0], seed=3), use=use)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(dtype):
    _assert_gradients_match(_case(37, [37, 12, 0], seed=4), dtype)


def test_gradients_are_causal():
    """A loss on positions <= t sends no gradient to any input at a position > t (every input that has
    positions: q, k, v, q_adv, k_adv and the gate's rows and columns)."""
    kwargs = _case(70, [70, 52], d_h=8, seed=5)
    t = 33
    upstream = [u.clone() for u in _upstream(kwargs)]
    for u in upstream:
        u[:, :, t + 1 :] = 0.0
    grads = _run(triton_cal.calibrated, kwargs, torch.float32, upstream)
    for name in ("dq", "dk", "dv", "dq_adv", "dk_adv"):
        assert grads[name][:, :, t + 1 :].abs().max() == 0, name
        assert grads[name][:, :, : t + 1].abs().max() > 0, name
    gate = grads["dgate_logits"]
    assert gate[:, t + 1 :].abs().max() == 0 and gate[:, :, t + 1 :].abs().max() == 0
    assert gate[:, : t + 1, : t + 1].abs().max() > 0


def test_padding_gets_no_gradient():
    kwargs = _case(40, [40, 6, 0], seed=6)
    grads = _run(triton_cal.calibrated, kwargs, torch.float32, _upstream(kwargs))
    pad = kwargs["key_padding_mask"]
    for name in ("dq", "dk", "dv", "dq_adv", "dk_adv"):
        assert grads[name][pad[:, None, :].expand(grads[name].shape[:3])].abs().max() == 0, name
    assert grads["dgate_logits"][2].abs().max() == 0  # the fully padded sequence


# ---- dropout: three Philox streams (out_cal's weights, P_att, M), the same in forward and backward -------


def _dropped_weights(kwargs, p, pp, seed):
    """With V = identity (d_h >= n) out_cal and out_att *are* the dropped P_fin and P_att; M is returned."""
    n = kwargs["q"].shape[2]
    v = torch.zeros_like(kwargs["v"])
    v[..., :n] = torch.eye(n, dtype=v.dtype)
    args = {key: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for key, t in kwargs.items()}
    args["v"] = v.float()
    q, k, v = (args.pop(name) for name in ("q", "k", "v"))
    torch.manual_seed(seed)
    with torch.no_grad():
        out_cal, out_att, perturb = triton_cal.calibrated(q, k, v, **args, dropout_p=p, perturb_dropout_p=pp)
    return out_cal[..., :n].double(), out_att[..., :n].double(), perturb.double()


def _masked_reference(keep_fin, keep_att, keep_m, p, pp):
    """The float64 reference with the given keep masks (SPEC §5 with dropout on the weights of out_cal, on
    P_att and on M; a refinement refines P_fin first)."""

    def calibrated(
        q, k, v, *, q_adv, k_adv, gate_logits, noise, key_padding_mask, refine="none", w_rq=None, w_rk=None,
        w_rv=None, **params,
    ):  # fmt: skip
        n, d_h = q.shape[-2:]
        scale = d_h**-0.5
        keep_fin_, keep_att_, keep_m_ = (
            keep.to(device=q.device, dtype=q.dtype) for keep in (keep_fin, keep_att, keep_m)
        )
        visible = visible_mask(n, key_padding_mask, q.device)
        p_sp = masked_softmax(reference.spatial_logits(q, k, visible, **params) * scale, visible)
        m = masked_softmax((q_adv @ k_adv.transpose(-1, -2)) * scale, visible) * keep_m_ / (1 - pp)
        p_att = masked_softmax(p_sp * m + noise * (1 - m), visible)
        p_cal = masked_softmax(p_sp * torch.exp(1 - m), visible)
        gate = torch.sigmoid(gate_logits)[:, None]
        p_fin = masked_softmax(gate * p_sp + (1 - gate) * p_cal, visible)
        if refine != "none":
            b = refine_scores(p_fin, visible, mechanism=refine, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv, c=d_h**-0.5)
            p_fin = masked_softmax(b, visible)
        out_cal = (p_fin * keep_fin_ / (1 - p)) @ v
        out_att = (p_att * keep_att_ / (1 - p)) @ v
        return zero_padded_queries(out_cal, key_padding_mask), zero_padded_queries(out_att, key_padding_mask), m

    return calibrated


@pytest.mark.parametrize("refine", ["none", "simp", "value"])
def test_dropout_masks_are_shared_by_forward_and_backward(refine):
    """The same keep masks in forward and backward; refined, out_cal's mask is the tiled refinement's."""
    p, pp, seed = 0.3, 0.2, 1234
    kwargs = _case(13, [13, 9, 0], refine=refine, seed=7)
    dropped_fin, dropped_att, perturb = _dropped_weights(kwargs, p, pp, seed)
    exact = reference.calibrated(
        *(kwargs[name] for name in "qkv"), **{k: t for k, t in kwargs.items() if k not in "qkv"}, return_weights=True
    )[1]
    visible = exact["P_sp"] > 0
    keep_fin, keep_att, keep_m = dropped_fin != 0, dropped_att != 0, perturb != 0
    # about p (pp) of the visible entries dropped, independently in the three streams
    for keep, rate in ((keep_fin, p), (keep_att, p), (keep_m, pp)):
        assert rate - 0.15 < 1 - keep[visible].double().mean().item() < rate + 0.15
    assert (keep_fin[visible] != keep_att[visible]).any() and (keep_fin[visible] != keep_m[visible]).any()
    # M: kept entries are M / (1 - pp) (P_fin and P_att read the dropped M: the masked reference below)
    torch.testing.assert_close(perturb[keep_m], exact["M"][keep_m] / (1 - pp), rtol=1e-4, atol=1e-6)
    # values and every gradient match the float64 reference that applies those masks
    masks = [(keep | ~visible).double() for keep in (keep_fin, keep_att, keep_m)]
    torch.manual_seed(seed)
    exact_fn = _masked_reference(*masks, p, pp)

    def ours(*args, **kw):
        torch.manual_seed(seed)
        return triton_cal.calibrated(*args, **kw, dropout_p=p, perturb_dropout_p=pp)

    _assert_gradients_match(kwargs, fn=ours, exact_fn=exact_fn)


def test_spatial_dropout_and_fresh_masks_per_call():
    kwargs = _case(13, [13, 5], adversarial=False, seed=8)
    args = {key: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for key, t in kwargs.items()}
    q, k, v = (args.pop(name) for name in ("q", "k", "v"))
    with torch.no_grad():
        a = triton_cal.calibrated(q, k, v, **args, dropout_p=0.5)[0]
        b = triton_cal.calibrated(q, k, v, **args, dropout_p=0.5)[0]
        plain = triton_cal.calibrated(q, k, v, **args)[0]
    assert not torch.equal(a, b) and not torch.equal(a, plain)
    # the expectation of dropout(P) V is P V: the mean over draws approaches the undropped output
    with torch.no_grad():
        mean = sum(triton_cal.calibrated(q, k, v, **args, dropout_p=0.5)[0] for _ in range(200)) / 200
    assert (mean - plain).abs().max() < 0.25 * plain.abs().max()


def test_drawn_noise_is_the_explicit_noise_of_its_seed():
    """Training without a noise tensor: the row-block kernels draw N(0, 1) from the call's seed, forward and
    backward alike; the same call given that noise explicitly has the same values and gradients."""
    from awr_fast.kernels._common import dropout_seed

    kwargs = _case(21, [21, 9, 0], seed=12)
    del kwargs["noise"]
    torch.manual_seed(77)
    noise = triton_cal.drawn_noise(dropout_seed(1.0, kwargs["q"].float()), 3, 2, 21)
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1.0) < 0.1
    assert noise[0, 0].ne(noise[0, 1]).all() and noise[0, 0].ne(noise[1, 0]).all()  # fresh per (batch, head)
    upstream = _upstream(kwargs)

    def drawn(*args, **kw):
        torch.manual_seed(77)  # the entry's seed, as drawn above
        return triton_cal.calibrated(*args, **kw)

    ours = _run(drawn, kwargs, torch.float32, upstream)
    explicit = _run(triton_cal.calibrated, {**kwargs, "noise": noise.double()}, torch.float32, upstream)
    assert ours.keys() == explicit.keys()
    for name, g in explicit.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # evaluation keeps the fused forward: it draws a tensor, fresh per call
        args = {key: t.float() for key, t in kwargs.items() if t.is_floating_point()}
        a = triton_cal.calibrated(**args, key_padding_mask=kwargs["key_padding_mask"])[1]
        b = triton_cal.calibrated(**args, key_padding_mask=kwargs["key_padding_mask"])[1]
    assert not torch.equal(a, b)


# ---- training-time use -----------------------------------------------------------------------------------


def test_module_trains_on_triton_like_the_reference():
    """One optimizer step of the AC-TSR layer on the Triton backend moves every parameter as the
    reference backend does (same noise, no dropout)."""
    from awr_fast.nn.calibrated import CalibratedAttention

    torch.manual_seed(0)
    layers = {
        b: CalibratedAttention(16, 2, 12, hidden_dropout=0.0, backend=b).to(DEVICE) for b in ("triton", "reference")
    }
    layers["reference"].load_state_dict(layers["triton"].state_dict())
    x = torch.randn(3, 12, 16, device=DEVICE)
    mask = testing.left_padding_mask([12, 7, 0], 12).to(DEVICE)
    noise = torch.randn(3, 2, 12, 12, device=DEVICE)
    grads = {}
    for backend, layer in layers.items():
        out_cal, out_att, perturb = layer(x, mask, noise=noise)
        (out_cal.square().sum() + out_att.sum() + perturb.sum()).backward()
        grads[backend] = {name: p.grad for name, p in layer.named_parameters()}
    assert grads["triton"].keys() == grads["reference"].keys()
    for name, g in grads["reference"].items():
        assert g is not None and g.abs().max() > 0, name
        torch.testing.assert_close(grads["triton"][name], g, rtol=2e-3, atol=2e-4, msg=name)


def test_torch_compile_training_fullgraph():
    """Forward and backward of the custom op trace without a graph break."""
    kwargs = _case(10, [10, 4, 0], seed=9)
    upstream = _upstream(kwargs)

    def fn(q, k, v, **kw):
        return torch.compile(triton_cal.calibrated, fullgraph=True, backend="aot_eager")(q, k, v, **kw)

    compiled = _run(fn, kwargs, torch.float32, upstream)
    eager = _run(triton_cal.calibrated, kwargs, torch.float32, upstream)
    assert compiled.keys() == eager.keys()
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_auto_backend_trains_on_triton_for_device_tensors(backend_log):
    """The capability row now has grad and dropout: a named "triton" call with grad runs the kernel."""
    kwargs = _case(9, [9, 4], seed=10)
    args = {key: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for key, t in kwargs.items()}
    q, k, v = (args.pop(name).requires_grad_(True) for name in ("q", "k", "v"))
    out = awr_fast.calibrated_attention(q, k, v, **args, dropout_p=0.1, perturb_dropout_p=0.1, backend="triton")
    out.out_cal.sum().backward()
    assert backend_log() == {"calibrated": "triton"}
    assert q.grad is not None and q.grad.abs().max() > 0
