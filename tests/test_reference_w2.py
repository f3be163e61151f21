"""The W2 (STOSA) reference and its public functions: gradients, causality, padding, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import awr_fast
from awr_fast.ops.w2_refined import MECHANISMS
from awr_fast.ops.w2_refined import TENSORS as TENSOR_NAMES
from awr_fast.ops.w2_refined import WEIGHTS as WEIGHT_NAMES
from awr_fast.reference.w2_refined import w2_distance, w2_refined
from helpers import left_padding_mask


def make_inputs(
    batch=2, heads=2, n=7, d_h=3, mechanism="simp", per_head=False, dtype=torch.float64, seed=0, requires_grad=False
):
    """(tensors dict, weights dict); covariances positive (rand + 0.5), nothing zero."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in TENSOR_NAMES:
        if name.startswith("sig"):
            tensors[name] = (torch.rand(batch, heads, n, d_h, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        else:
            tensors[name] = torch.randn(batch, heads, n, d_h, generator=g, dtype=torch.float64).to(dtype)
    wshape = (heads, n, n) if per_head else (n, n)
    ws = {
        name: (torch.randn(*wshape, generator=g, dtype=torch.float64) / math.sqrt(n)).to(dtype)
        for name in WEIGHT_NAMES[mechanism]
    }
    if requires_grad:
        for t in (*tensors.values(), *ws.values()):
            t.requires_grad_(True)
    return tensors, ws


def _call(mechanism, tensors, ws, **kwargs):
    return awr_fast.wasserstein_attention(*tensors.values(), mechanism=mechanism, **ws, **kwargs)


# ---- W2 distance ------------------------------------------------------------------------------------------


def _w2_elementwise(mu1, sig1, mu2, sig2):
    """sum_c (mu1 - mu2)^2 + (sqrt sig1 - sqrt sig2)^2 over every pair, by broadcasting (no matmul)."""
    dm = mu1[..., :, None, :] - mu2[..., None, :, :]
    ds = sig1.sqrt()[..., :, None, :] - sig2.sqrt()[..., None, :, :]
    return (dm * dm + ds * ds).sum(-1)


@pytest.mark.parametrize("shape1,shape2", [((5, 4), (9, 4)), ((2, 3, 7, 5), (2, 3, 6, 5))])
def test_w2_distance_closed_form(shape1, shape2):
    g = torch.Generator().manual_seed(1)
    mu1 = torch.randn(*shape1, generator=g, dtype=torch.float64)
    mu2 = torch.randn(*shape2, generator=g, dtype=torch.float64)
    sig1 = torch.rand(*shape1, generator=g, dtype=torch.float64) + 0.5
    sig2 = torch.rand(*shape2, generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(
        w2_distance(mu1, sig1, mu2, sig2), _w2_elementwise(mu1, sig1, mu2, sig2), rtol=1e-12, atol=1e-12
    )


def test_w2_scores_public():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(3, 6, generator=g, dtype=torch.float64)
    item_mu = torch.randn(11, 6, generator=g, dtype=torch.float64)
    sig = (torch.rand(3, 6, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    item_sig = (torch.rand(11, 6, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    mu.requires_grad_(True)
    item_mu.requires_grad_(True)
    out = awr_fast.w2_scores(mu, sig, item_mu, item_sig)
    assert out.shape == (3, 11)
    torch.testing.assert_close(out, _w2_elementwise(mu, sig, item_mu, item_sig), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *a: awr_fast.w2_scores(*a, backend="reference"), (mu, sig, item_mu, item_sig), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("mu_1d", ValueError, "mu: expected a 2-d"),
        ("sig_shape", ValueError, "sig: expected shape"),
        ("item_sig_dtype", TypeError, "item_sig: expected dtype"),
        ("item_width", ValueError, "item_mu: expected 6 columns"),
        ("item_dtype", TypeError, "item_mu: expected dtype"),
        ("int_mu", TypeError, "mu: expected a floating dtype"),
    ],
)
def test_w2_scores_bad_input(case, exc, match):
    mu, sig = torch.randn(3, 6), torch.rand(3, 6) + 0.5
    item_mu, item_sig = torch.randn(11, 6), torch.rand(11, 6) + 0.5
    if case == "mu_1d":
        mu = mu[0]
    elif case == "sig_shape":
        sig = sig[:2]
    elif case == "item_sig_dtype":
        item_sig = item_sig.double()
    elif case == "item_width":
        item_mu, item_sig = item_mu[:, :5], item_sig[:, :5]
    elif case == "item_dtype":
        item_mu, item_sig = item_mu.double(), item_sig.double()
    elif case == "int_mu":
        mu = mu.long()
    with pytest.raises(exc, match=match):
        awr_fast.w2_scores(mu, sig, item_mu, item_sig)


# ---- forward semantics ------------------------------------------------------------------------------------


def test_none_matches_hand_written_stosa():
    """STOSA DistSelfAttention's attention, written out independently: -W2 / sqrt(d_h), -inf mask, P^2 for sigma."""
    n, d_h = 6, 4
    t, _ = make_inputs(batch=1, heads=1, n=n, d_h=d_h, mechanism="none")
    mu_q, sig_q, mu_k, sig_k, mu_v, sig_v = (x[0, 0] for x in t.values())
    w2 = torch.stack(
        [
            torch.stack(
                [((mu_q[i] - mu_k[j]) ** 2).sum() + ((sig_q[i].sqrt() - sig_k[j].sqrt()) ** 2).sum() for j in range(n)]
            )
            for i in range(n)
        ]
    )
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    p = torch.softmax((-w2 / math.sqrt(d_h)).masked_fill(~causal, -math.inf), dim=-1)
    mu_out, sig_out = _call("none", t, {})
    torch.testing.assert_close(mu_out[0, 0], p @ mu_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sig_out[0, 0], (p * p) @ sig_v, rtol=1e-12, atol=1e-12)


def test_stoc_matches_hand_written_formula():
    n, d_h = 5, 3
    t, ws = make_inputs(batch=1, heads=1, n=n, d_h=d_h, mechanism="stoc")
    (_, weights) = w2_refined(*t.values(), mechanism="none", return_weights=True)
    a = weights["P"][0, 0]
    mu, sig = a @ ws["w_mu"], F.elu(a @ ws["w_sigma"]) + 1
    b = -_w2_elementwise(mu, sig, mu, sig) / math.sqrt(d_h)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    p = torch.softmax(b.masked_fill(~causal, -math.inf), dim=-1)
    mu_out, sig_out = _call("stoc", t, ws)
    torch.testing.assert_close(mu_out[0, 0], p @ t["mu_v"][0, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sig_out[0, 0], (p * p) @ t["sig_v"][0, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mechanism", ["simp", "add", "value"])
def test_refinement_is_dot_refined_on_w2_probs(mechanism):
    """The same mechanism code as the dot-product family, applied to the W2 probabilities A."""
    from awr_fast.reference.dot_refined import refine_scores
    from awr_fast.reference.masking import masked_softmax, visible_mask

    n = 9
    t, ws = make_inputs(n=n, mechanism=mechanism, d_h=4)
    mask = left_padding_mask([9, 4], n)
    (_, weights) = w2_refined(*t.values(), mechanism=mechanism, key_padding_mask=mask, return_weights=True, **ws)
    (_, plain) = w2_refined(*t.values(), mechanism="none", key_padding_mask=mask, return_weights=True)
    visible = visible_mask(n, mask, "cpu")
    b = refine_scores(
        plain["P"], visible, mechanism=mechanism, c=0.5, w_rv=ws.get("w_rv"), w_rq=ws["w_rq"], w_rk=ws["w_rk"]
    )
    torch.testing.assert_close(weights["A"], plain["P"], rtol=0, atol=0)
    torch.testing.assert_close(weights["P"], masked_softmax(b, visible), rtol=1e-12, atol=1e-12)


def test_refine_input_scores_uses_masked_logits():
    n = 7
    t, ws = make_inputs(n=n, mechanism="simp")
    mask = left_padding_mask([7, 3], n)
    (_, w) = w2_refined(
        *t.values(),
        mechanism="simp",
        key_padding_mask=mask,
        refine_input="scores",
        scale=0.7,
        return_weights=True,
        **ws,
    )
    from awr_fast.reference.masking import visible_mask

    visible = visible_mask(n, mask, "cpu")
    expected = torch.where(visible, -w2_distance(t["mu_q"], t["sig_q"], t["mu_k"], t["sig_k"]) * 0.7, 0.0)
    torch.testing.assert_close(w["A"], expected, rtol=0, atol=0)


def test_dropout_reuses_dropped_weights_for_both_streams():
    """P' = dropout(P_final); mu_out = P' mu_v and sig_out = (P' o P') sig_v with the same draw (STOSA)."""
    t, ws = make_inputs(n=7, mechanism="simp")
    torch.manual_seed(123)
    (mu_out, sig_out), w = w2_refined(*t.values(), mechanism="simp", dropout_p=0.4, return_weights=True, **ws)
    torch.manual_seed(123)
    dropped = F.dropout(w["P"], p=0.4, training=True)
    torch.testing.assert_close(mu_out, dropped @ t["mu_v"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sig_out, (dropped * dropped) @ t["sig_v"], rtol=1e-12, atol=1e-12)
    assert not torch.equal(dropped, w["P"])


# ---- gradients --------------------------------------------------------------------------------------------

# (n, lengths, per_head) in gradcheck's fast mode, which compares random projections u^T J v of the
# analytical and numerical Jacobians (what PyTorch's own OpInfo tests use); one full-Jacobian case per
# mechanism family keeps the suite fast on 2 cores.
GRAD_CASES = [(7, None, False), (7, [0, 4], True), (13, [13, 5], False)]
FULL_JACOBIAN_CASES = [("value", 7, [7, 0], True), ("stoc", 7, [3, 7], False)]


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("n,lengths,per_head", GRAD_CASES)
def test_gradcheck(mechanism, n, lengths, per_head):
    _gradcheck(mechanism, n, lengths, per_head, fast_mode=True)


@pytest.mark.parametrize("mechanism,n,lengths,per_head", FULL_JACOBIAN_CASES)
def test_gradcheck_full_jacobian(mechanism, n, lengths, per_head):
    _gradcheck(mechanism, n, lengths, per_head, fast_mode=False)


def _gradcheck(mechanism, n, lengths, per_head, fast_mode):
    t, ws = make_inputs(n=n, mechanism=mechanism, per_head=per_head, requires_grad=True)
    mask = None if lengths is None else left_padding_mask(lengths, n)
    names = list(ws)

    def fn(*args):
        return awr_fast.wasserstein_attention(
            *args[:6], mechanism=mechanism, key_padding_mask=mask, backend="reference", **dict(zip(names, args[6:]))
        )

    assert torch.autograd.gradcheck(fn, (*t.values(), *ws.values()), eps=1e-6, atol=1e-6, fast_mode=fast_mode)


@pytest.mark.parametrize("mechanism", ["simp", "value", "stoc"])
def test_gradcheck_refine_input_scores(mechanism):
    t, ws = make_inputs(n=7, mechanism=mechanism, requires_grad=True)
    mask = left_padding_mask([7, 3], 7)
    names = list(ws)

    def fn(*args):
        return awr_fast.wasserstein_attention(
            *args[:6],
            mechanism=mechanism,
            key_padding_mask=mask,
            refine_input="scores",
            refine_scale=0.3,
            scale=0.7,
            **dict(zip(names, args[6:])),
        )

    assert torch.autograd.gradcheck(fn, (*t.values(), *ws.values()), eps=1e-6, atol=1e-6, fast_mode=True)


# ---- causality --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("refine_input", ["probs", "scores"])
def test_causality(mechanism, refine_input):
    n = 13
    t, ws = make_inputs(batch=2, n=n, d_h=5, mechanism=mechanism)
    mask = left_padding_mask([13, 9], n)
    base = _call(mechanism, t, ws, key_padding_mask=mask, refine_input=refine_input)
    g = torch.Generator().manual_seed(7)
    for pos in (0, 5, 11):
        changed = {}
        for name, x in t.items():
            x = x.clone()
            shape = x[..., pos + 1 :, :].shape
            if name.startswith("sig"):
                x[..., pos + 1 :, :] = torch.rand(shape, generator=g, dtype=x.dtype) + 0.5
            else:
                x[..., pos + 1 :, :] = torch.randn(shape, generator=g, dtype=x.dtype)
            changed[name] = x
        out = _call(mechanism, changed, ws, key_padding_mask=mask, refine_input=refine_input)
        for o, b in zip(out, base):
            torch.testing.assert_close(o[..., : pos + 1, :], b[..., : pos + 1, :], rtol=0, atol=1e-12)
            assert not torch.allclose(o[..., pos + 1 :, :], b[..., pos + 1 :, :])


# ---- padding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_padding_rows_are_zero_never_nan(mechanism, dtype):
    n = 9
    t, ws = make_inputs(batch=3, n=n, d_h=4, mechanism=mechanism, dtype=dtype, requires_grad=True)
    mask = left_padding_mask([0, 1, 6], n)
    mu_out, sig_out = _call(mechanism, t, ws, key_padding_mask=mask)
    for out in (mu_out, sig_out):
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all()  # fully padded sequence
        assert (out.transpose(1, 2)[mask] == 0).all()  # every padded query row
    (mu_out.sum() + sig_out.square().sum()).backward()
    for x in (*t.values(), *ws.values()):
        assert torch.isfinite(x.grad).all()
    for name in TENSOR_NAMES:
        assert (t[name].grad[0] == 0).all()  # nothing flows from or into a fully padded sequence


# ---- bad input: errors name the argument ------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("sig_k_shape", ValueError, "sig_k: expected shape"),
        ("mu_v_dtype", TypeError, "mu_v: expected dtype"),
        ("int_inputs", TypeError, "mu_q: expected a floating dtype"),
        ("mu_q_3d", ValueError, "mu_q: expected a 4-d tensor"),
        ("w_size", ValueError, "w_rq: expected shape \\(7, r\\)"),
        ("w_heads", ValueError, "w_rk: expected shape"),
        ("w_missing", ValueError, "w_rk: required"),
        ("w_rv_unused", ValueError, "w_rv: expected None \\(mechanism='"),
        ("w_mu_unused", ValueError, "w_mu: expected None \\(mechanism='"),
        ("stoc_missing_w_mu", ValueError, "w_mu: required"),
        ("stoc_missing_w_sigma", ValueError, "w_sigma: required"),
        ("stoc_w_sigma_size", ValueError, "w_sigma: expected shape \\(7, r\\)"),
        ("stoc_w_sigma_columns", ValueError, "w_sigma: expected 7 columns \\(those of w_mu"),
        ("stoc_w_rq_unused", ValueError, "w_rq: expected None \\(mechanism='"),
        ("mask_shape", ValueError, "key_padding_mask: expected shape"),
        ("mask_dtype", TypeError, "key_padding_mask: expected dtype torch.bool"),
        ("mechanism", ValueError, "mechanism: expected one of"),
        ("value_literal", ValueError, "mechanism: expected one of"),
        ("backend", ValueError, "backend: expected one of"),
        ("refine_input", ValueError, "refine_input: expected one of"),
        ("dropout", ValueError, "dropout_p: expected a float in"),
        ("refine_scale", ValueError, "refine_scale: expected None or a positive float"),
    ],
)
def test_bad_input(case, exc, match):
    t, ws = make_inputs(n=7, mechanism="simp", dtype=torch.float32)
    mechanism = "simp"
    kwargs = dict(ws)
    if case == "sig_k_shape":
        t["sig_k"] = t["sig_k"][:, :, :5]
    elif case == "mu_v_dtype":
        t["mu_v"] = t["mu_v"].double()
    elif case == "int_inputs":
        t = {k: v.to(torch.int64) for k, v in t.items()}
    elif case == "mu_q_3d":
        t = {k: v[0] for k, v in t.items()}
    elif case == "w_size":
        kwargs["w_rq"] = torch.randn(8, 8)
    elif case == "w_heads":
        kwargs["w_rk"] = torch.randn(3, 7, 7)
    elif case == "w_missing":
        kwargs["w_rk"] = None
    elif case == "w_rv_unused":
        kwargs["w_rv"] = torch.randn(7, 7)
    elif case == "w_mu_unused":
        kwargs["w_mu"] = torch.randn(7, 7)
    elif case.startswith("stoc"):
        mechanism = "stoc"
        kwargs = dict(w_mu=torch.randn(7, 7), w_sigma=torch.randn(7, 7))
        if case == "stoc_missing_w_mu":
            kwargs["w_mu"] = None
        elif case == "stoc_missing_w_sigma":
            del kwargs["w_sigma"]
        elif case == "stoc_w_sigma_size":
            kwargs["w_sigma"] = torch.randn(6, 6)
        elif case == "stoc_w_sigma_columns":
            kwargs["w_sigma"] = torch.randn(7, 5)
        elif case == "stoc_w_rq_unused":
            kwargs["w_rq"] = torch.randn(7, 7)
    elif case == "mask_shape":
        kwargs["key_padding_mask"] = torch.zeros(2, 8, dtype=torch.bool)
    elif case == "mask_dtype":
        kwargs["key_padding_mask"] = torch.zeros(2, 7)
    elif case == "mechanism":
        mechanism = "stochastic"
    elif case == "value_literal":
        mechanism = "value_literal"
    elif case == "backend":
        kwargs["backend"] = "tensorrt"
    elif case == "refine_input":
        kwargs["refine_input"] = "logits"
    elif case == "dropout":
        kwargs["dropout_p"] = 1.5
    elif case == "refine_scale":
        kwargs["refine_scale"] = 0.0
    with pytest.raises(exc, match=match):
        _call(mechanism, t, {}, **kwargs)
