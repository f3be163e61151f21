"""The AC-TSR calibrated-attention reference and its public function: the released algorithm, gradients,
causality, padding, bad input."""

import math

import pytest
import torch

import awr_fast
from awr_fast.reference.calibrated import calibrated
from helpers import left_padding_mask

PARAM_NAMES = ("w_oq", "w_ok", "b_o", "w_dq", "w_dk", "b_d", "dist_scale")
ADV_NAMES = ("q_adv", "k_adv", "gate_logits")


def make_inputs(batch=2, heads=2, n=7, d_h=3, adversarial=True, dtype=torch.float64, seed=0, requires_grad=False):
    """(qkv dict, calibrator params dict, adversarial dict incl. a fixed noise draw); nothing zero."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    qkv = {name: randn(batch, heads, n, d_h) for name in ("q", "k", "v")}
    params = dict(
        w_oq=randn(d_h),
        w_ok=randn(d_h),
        b_o=randn(()),
        w_dq=randn(d_h),
        w_dk=randn(d_h),
        b_d=randn(()),
        dist_scale=randn(()),
    )
    adv = {}
    if adversarial:
        adv = dict(
            q_adv=randn(batch, heads, n, d_h),
            k_adv=randn(batch, heads, n, d_h),
            gate_logits=randn(batch, n, n),
            noise=randn(batch, heads, n, n),
        )
    if requires_grad:
        for t in (*qkv.values(), *params.values(), *(adv[k] for k in ADV_NAMES if k in adv)):
            t.requires_grad_(True)
    return qkv, params, adv


def _call(qkv, params, adv, **kwargs):
    return awr_fast.calibrated_attention(*qkv.values(), **params, **adv, **kwargs)


# ---- the released algorithm, literally -------------------------------------------------------------------


def released_ac_tsr(q, k, v, w_oq, w_ok, b_o, w_dq, w_dk, b_d, dist_scale, q_adv, k_adv, gate_logits, noise):
    """AttackRTransformerLayer (AIM-SE/AC-TSR, combine_option='gate', two_level=True, eval mode) on
    (B, H, n, d_h) tensors without padding: [n, n, 2 d_h] concatenation, additive -10000 mask."""
    batch, heads, n, d_h = q.shape
    mask = (1.0 - torch.tril(torch.ones(n, n, dtype=q.dtype))) * -10000.0
    q_k = torch.cat((q.unsqueeze(3).expand(-1, -1, -1, n, -1), k.unsqueeze(2).expand(-1, -1, n, -1, -1)), dim=-1)
    gd_order = torch.triu(torch.ones(n, n, dtype=q.dtype), diagonal=1)
    pr_order = torch.sigmoid(q_k @ torch.cat((w_oq, w_ok)) + b_o)
    error_order = torch.log(pr_order + 1e-24) * gd_order + torch.log(1 - pr_order + 1e-24) * (1 - gd_order)
    row = torch.arange(n).unsqueeze(0).expand(n, n)
    col = torch.arange(n).unsqueeze(1).expand(n, n)
    gd_distance = torch.log(torch.abs(row - col).to(q.dtype) + 1)
    pr_distance = q_k @ torch.cat((w_dq, w_dk)) + b_d
    error_distance = -torch.square(gd_distance - pr_distance) * torch.square(dist_scale) / 2
    scores = q @ k.transpose(-1, -2) + error_order + error_distance
    p_sp = torch.softmax(scores / math.sqrt(d_h) + mask, dim=-1)
    m = torch.softmax(q_adv @ k_adv.transpose(-1, -2) / math.sqrt(d_h) + mask, dim=-1)
    p_att = torch.softmax(p_sp * m + noise * (1 - m) + mask, dim=-1)
    p_cal = torch.softmax(p_sp * torch.exp(1 - m) + mask, dim=-1)
    gate = torch.sigmoid(gate_logits).unsqueeze(1)
    p_fin = torch.softmax(gate * p_sp + (1 - gate) * p_cal + mask, dim=-1)
    return p_fin @ v, p_att @ v, m, p_sp @ v


def test_matches_released_algorithm():
    qkv, params, adv = make_inputs(batch=2, heads=3, n=9, d_h=4)
    out_cal, out_att, perturb = _call(qkv, params, adv)
    exp_cal, exp_att, exp_m, exp_sp = released_ac_tsr(*qkv.values(), *params.values(), *adv.values())
    torch.testing.assert_close(out_cal, exp_cal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_att, exp_att, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(perturb, exp_m, rtol=1e-12, atol=1e-12)
    spatial = _call(qkv, params, {})
    assert spatial.out_att is None and spatial.perturb is None
    torch.testing.assert_close(spatial.out_cal, exp_sp, rtol=1e-12, atol=1e-12)


def test_returned_weights_are_masked_distributions():
    """What a kernel can be checked against: every P is a distribution over the visible keys, or zeros."""
    qkv, params, adv = make_inputs(n=8)
    mask = left_padding_mask([8, 3], 8)
    _, weights = calibrated(*qkv.values(), **params, **adv, key_padding_mask=mask, return_weights=True)
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    live = ~mask[:, None, :, None]  # (B, 1, n, 1) real query rows
    assert set(weights) == {"P_sp", "M", "P_att", "P_cal", "P_fin"}
    for name, p in weights.items():
        assert (p[..., ~causal] == 0).all() and (p.transpose(-1, -2)[mask[:, None].expand(-1, 2, -1)] == 0).all(), name
        sums = p.sum(-1, keepdim=True)
        torch.testing.assert_close(sums, live.expand_as(sums).to(sums.dtype), rtol=0, atol=1e-12)


def test_noise_is_drawn_when_not_given():
    qkv, params, adv = make_inputs(n=7)
    adv["noise"] = None
    torch.manual_seed(0)
    first = _call(qkv, params, adv)
    second = _call(qkv, params, adv)
    assert torch.equal(first.out_cal, second.out_cal)  # the noise only enters P_att
    assert not torch.equal(first.out_att, second.out_att)
    torch.manual_seed(0)
    noise = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(first.out_att, _call(qkv, params, {**adv, "noise": noise}).out_att, rtol=0, atol=0)


def test_dropout_draws_and_stays_finite():
    qkv, params, adv = make_inputs(n=7)
    mask = left_padding_mask([7, 0], 7)
    torch.manual_seed(1)
    a = _call(qkv, params, adv, key_padding_mask=mask, dropout_p=0.3, perturb_dropout_p=0.3)
    b = _call(qkv, params, adv, key_padding_mask=mask, dropout_p=0.3, perturb_dropout_p=0.3)
    assert not torch.equal(a.out_cal, b.out_cal) and not torch.equal(a.perturb, b.perturb)
    for t in (*a, *b):
        assert torch.isfinite(t).all() and (t[1] == 0).all()


# ---- gradients --------------------------------------------------------------------------------------------

# (n, lengths, fast_mode): gradcheck's fast mode (random projections u^T J v, as PyTorch's OpInfo tests)
# everywhere, plus one full-Jacobian case with padding, to stay fast on 2 cores.
GRAD_CASES = [(7, None), (7, [0, 4]), (13, [13, 5])]


@pytest.mark.parametrize("adversarial", [True, False])
@pytest.mark.parametrize("n,lengths", GRAD_CASES)
def test_gradcheck(adversarial, n, lengths):
    _gradcheck(adversarial, n, lengths, fast_mode=True)


def test_gradcheck_full_jacobian():
    _gradcheck(True, 7, [5, 0], fast_mode=False)


def _gradcheck(adversarial, n, lengths, fast_mode):
    qkv, params, adv = make_inputs(n=n, adversarial=adversarial, requires_grad=True)
    mask = None if lengths is None else left_padding_mask(lengths, n)
    noise = adv.pop("noise", None)
    names = (*PARAM_NAMES, *adv)

    def fn(q, k, v, *rest):
        out = awr_fast.calibrated_attention(
            q, k, v, noise=noise, key_padding_mask=mask, backend="reference", **dict(zip(names, rest))
        )
        return tuple(t for t in out if t is not None)  # (out_cal, out_att, perturb) or (out_cal,)

    inputs = (*qkv.values(), *params.values(), *adv.values())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=fast_mode)


def test_every_input_receives_gradient():
    qkv, params, adv = make_inputs(n=7, requires_grad=True)
    out = _call(qkv, params, adv, key_padding_mask=left_padding_mask([7, 4], 7))
    (out.out_cal.square().sum() + out.out_att.square().sum() + out.perturb.square().sum()).backward()
    for name, t in (*qkv.items(), *params.items(), *((k, adv[k]) for k in ADV_NAMES)):
        assert t.grad is not None and t.grad.abs().sum() > 0, name


# ---- causality --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adversarial", [True, False])
def test_causality(adversarial):
    n = 13
    qkv, params, adv = make_inputs(batch=2, n=n, d_h=5, adversarial=adversarial)
    mask = left_padding_mask([13, 9], n)
    base = _call(qkv, params, adv, key_padding_mask=mask)
    g = torch.Generator().manual_seed(7)
    for pos in (0, 5, 11):
        later = slice(pos + 1, None)
        new_qkv = {name: x.clone() for name, x in qkv.items()}
        new_adv = {name: x.clone() for name, x in adv.items()}
        for x in (*new_qkv.values(), *(new_adv[k] for k in ("q_adv", "k_adv") if k in new_adv)):
            x[..., later, :] = torch.randn(x[..., later, :].shape, generator=g, dtype=x.dtype)
        if adversarial:
            # gate_logits[b, i, j] and noise[b, h, i, j] belong to query i; entries j > i are never visible
            for name in ("gate_logits", "noise"):
                x = new_adv[name]
                x[..., later, :] = torch.randn(x[..., later, :].shape, generator=g, dtype=x.dtype)
                x[..., :, later] = torch.randn(x[..., :, later].shape, generator=g, dtype=x.dtype)
        out = _call(new_qkv, params, new_adv, key_padding_mask=mask)
        for o, b in zip(out, base):
            if b is None:
                assert o is None
                continue
            torch.testing.assert_close(o[..., : pos + 1, :], b[..., : pos + 1, :], rtol=0, atol=1e-12)
        assert not torch.allclose(out.out_cal[..., later, :], base.out_cal[..., later, :])


# ---- padding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adversarial", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_padding_rows_are_zero_never_nan(adversarial, dtype):
    n = 9
    qkv, params, adv = make_inputs(batch=3, n=n, d_h=4, adversarial=adversarial, dtype=dtype, requires_grad=True)
    mask = left_padding_mask([0, 1, 6], n)
    out = _call(qkv, params, adv, key_padding_mask=mask)
    loss = 0
    for t in out:
        if t is None:
            continue
        assert torch.isfinite(t).all()
        assert (t[0] == 0).all()  # fully padded sequence
        assert (t.transpose(1, 2)[mask] == 0).all()  # every padded query row
        loss = loss + t.float().square().sum()
    loss.backward()
    leaves = (*qkv.values(), *params.values(), *(adv[k] for k in ADV_NAMES if k in adv))
    for x in leaves:
        assert torch.isfinite(x.grad).all()
    for x in (*qkv.values(), *(adv[k] for k in ADV_NAMES if k in adv)):
        assert (x.grad[0] == 0).all()


def test_float16_order_term_stays_finite():
    """1e-24 underflows in float16: where sigmoid saturates to 1, E_o must stay finite, forward and backward."""
    qkv, params, adv = make_inputs(n=7, dtype=torch.float16, requires_grad=True)
    b_o = torch.tensor(9.0, dtype=torch.float16, requires_grad=True)
    out = _call(qkv, {**params, "b_o": b_o}, adv)
    assert all(torch.isfinite(t).all() for t in out)
    sum(t.float().sum() for t in out).backward()
    for x in (*qkv.values(), *params.values(), b_o):
        assert x.grad is None or torch.isfinite(x.grad).all()


# ---- bad input: errors name the argument ------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("k_shape", ValueError, "k: expected shape"),
        ("v_dtype", TypeError, "v: expected dtype"),
        ("int_q", TypeError, "q: expected a floating dtype"),
        ("w_oq_shape", ValueError, "w_oq: expected shape \\(3,\\)"),
        ("w_dk_2d", ValueError, "w_dk: expected a 1-d tensor"),
        ("b_o_vector", ValueError, "b_o: expected a scalar"),
        ("dist_scale_type", TypeError, "dist_scale: expected a torch.Tensor"),
        ("partial_adv", ValueError, "q_adv, k_adv, gate_logits"),
        ("k_adv_shape", ValueError, "k_adv: expected shape"),
        ("q_adv_dtype", TypeError, "q_adv: expected dtype"),
        ("gate_shape", ValueError, "gate_logits: expected shape"),
        ("noise_shape", ValueError, "noise: expected shape"),
        ("noise_without_adv", ValueError, "noise: expected None without the adversarial calibrator"),
        ("mask_shape", ValueError, "key_padding_mask: expected shape"),
        ("mask_dtype", TypeError, "key_padding_mask: expected dtype torch.bool"),
        ("dropout", ValueError, "dropout_p: expected a float in"),
        ("perturb_dropout", ValueError, "perturb_dropout_p: expected a float in"),
        ("scale", ValueError, "scale: expected None or a positive float"),
        ("backend", ValueError, "backend: expected one of"),
    ],
)
def test_bad_input(case, exc, match):
    qkv, params, adv = make_inputs(n=7, dtype=torch.float32)
    kwargs = {}
    if case == "k_shape":
        qkv["k"] = qkv["k"][:, :, :5]
    elif case == "v_dtype":
        qkv["v"] = qkv["v"].double()
    elif case == "int_q":
        qkv = {k: v.long() for k, v in qkv.items()}
    elif case == "w_oq_shape":
        params["w_oq"] = torch.randn(4)
    elif case == "w_dk_2d":
        params["w_dk"] = torch.randn(3, 1)
    elif case == "b_o_vector":
        params["b_o"] = torch.randn(2)
    elif case == "dist_scale_type":
        params["dist_scale"] = 0.5
    elif case == "partial_adv":
        adv["gate_logits"] = None
    elif case == "k_adv_shape":
        adv["k_adv"] = adv["k_adv"][..., :2]
    elif case == "q_adv_dtype":
        adv["q_adv"] = adv["q_adv"].double()
    elif case == "gate_shape":
        adv["gate_logits"] = torch.randn(2, 7, 8)
    elif case == "noise_shape":
        adv["noise"] = torch.randn(2, 1, 7, 7)
    elif case == "noise_without_adv":
        adv = {"noise": adv["noise"]}
    elif case == "mask_shape":
        kwargs["key_padding_mask"] = torch.zeros(2, 6, dtype=torch.bool)
    elif case == "mask_dtype":
        kwargs["key_padding_mask"] = torch.zeros(2, 7, dtype=torch.int64)
    elif case == "dropout":
        kwargs["dropout_p"] = 1.0
    elif case == "perturb_dropout":
        kwargs["perturb_dropout_p"] = -0.1
    elif case == "scale":
        kwargs["scale"] = 0
    elif case == "backend":
        kwargs["backend"] = "xla"
    with pytest.raises(exc, match=match):
        _call(qkv, params, adv, **kwargs)


# ---- AWRSR refinement of the final weights ----------------------------------------------------------------


def refine_weights(refine, n, heads=None, seed=3):
    """W_RQ, W_RK (, W_RV) of a mechanism: (n, n), or (heads, n, n) per head; nothing zero."""
    from awr_fast.ops.calibrated import REFINE_WEIGHTS

    g = torch.Generator().manual_seed(seed)
    shape = (n, n) if heads is None else (heads, n, n)
    return {name: torch.randn(*shape, generator=g, dtype=torch.float64) for name in REFINE_WEIGHTS[refine]}


@pytest.mark.parametrize("adversarial", [True, False])
@pytest.mark.parametrize("refine", ["simp", "add", "value"])
def test_refinement_refines_the_final_weights(adversarial, refine):
    """refine= is AWRSR's refinement (dot_refined's B) of P_fin (P_sp without the adversarial calibrator):
    out_cal = softmax(mask(B(P_fin))) V; out_att and the mask are those of the unrefined call."""
    from awr_fast.reference.dot_refined import refine_scores
    from awr_fast.reference.masking import masked_softmax, visible_mask

    n = 9
    qkv, params, adv = make_inputs(n=n, adversarial=adversarial)
    mask = left_padding_mask([9, 4], n)
    weights = refine_weights(refine, n, heads=2 if refine == "value" else None)
    plain, maps = calibrated(*qkv.values(), **params, **adv, key_padding_mask=mask, return_weights=True)
    out, refined_maps = calibrated(
        *qkv.values(),
        **params,
        **adv,
        key_padding_mask=mask,
        refine=refine,
        refine_scale=0.7,
        **weights,
        return_weights=True,
    )
    visible = visible_mask(n, mask, qkv["q"].device)
    a = maps["P_fin"] if adversarial else maps["P_sp"]
    probs = masked_softmax(refine_scores(a, visible, mechanism=refine, c=0.7, **{"w_rv": None, **weights}), visible)
    expected = (probs @ qkv["v"]) * (~mask)[:, None, :, None]
    torch.testing.assert_close(out[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(refined_maps["P"], probs, rtol=1e-12, atol=1e-12)
    assert (out[0] - plain[0]).abs().max() > 1e-3  # the refinement changes out_cal
    for o, p in zip(out[1:], plain[1:]):
        assert (o is None) == (p is None)
        if o is not None:
            torch.testing.assert_close(o, p, rtol=0, atol=0)


@pytest.mark.parametrize("refine", ["simp", "value"])
def test_refinement_gradcheck(refine):
    n = 7
    qkv, params, adv = make_inputs(n=n, requires_grad=True)
    mask = left_padding_mask([7, 3], n)
    noise = adv.pop("noise")
    weights = {k: w.requires_grad_(True) for k, w in refine_weights(refine, n).items()}
    names = (*PARAM_NAMES, *adv, *weights)

    def fn(q, k, v, *rest):
        out = awr_fast.calibrated_attention(
            q, k, v, noise=noise, key_padding_mask=mask, refine=refine, backend="reference", **dict(zip(names, rest))
        )
        return tuple(out)

    inputs = (*qkv.values(), *params.values(), *adv.values(), *weights.values())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("adversarial", [True, False])
@pytest.mark.parametrize("refine", ["add", "value"])
def test_refinement_is_causal(adversarial, refine):
    n = 11
    qkv, params, adv = make_inputs(batch=2, n=n, d_h=4, adversarial=adversarial)
    mask = left_padding_mask([11, 7], n)
    weights = refine_weights(refine, n)
    base = _call(qkv, params, adv, key_padding_mask=mask, refine=refine, **weights)
    pos = 5
    later = slice(pos + 1, None)
    new_qkv = {name: x.clone() for name, x in qkv.items()}
    g = torch.Generator().manual_seed(9)
    for x in new_qkv.values():
        x[..., later, :] = torch.randn(x[..., later, :].shape, generator=g, dtype=x.dtype)
    out = _call(new_qkv, params, adv, key_padding_mask=mask, refine=refine, **weights)
    torch.testing.assert_close(out.out_cal[..., : pos + 1, :], base.out_cal[..., : pos + 1, :], rtol=0, atol=1e-12)
    assert not torch.allclose(out.out_cal[..., later, :], base.out_cal[..., later, :])


def test_refinement_bad_input_names_the_argument():
    qkv, params, adv = make_inputs(n=7)
    with pytest.raises(ValueError, match="^refine: expected one of"):
        _call(qkv, params, adv, refine="stoc")
    with pytest.raises(ValueError, match="^w_rq: required"):
        _call(qkv, params, adv, refine="simp")
    with pytest.raises(ValueError, match="^w_rv"):
        _call(qkv, params, adv, refine="simp", w_rv=torch.ones(7, 7, dtype=torch.float64), **refine_weights("simp", 7))
