"""The dot-product reference and the public API: gradients, causality, padding, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import awr_fast
from awr_fast.ops.dot_refined import CAUSAL_MECHANISMS, WEIGHTS
from helpers import left_padding_mask

MECHANISMS = CAUSAL_MECHANISMS


def make_inputs(
    batch=2, heads=2, n=7, d_h=3, mechanism="simp", per_head=False, dtype=torch.float64, seed=0, requires_grad=False
):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d_h, generator=g, dtype=dtype) for _ in range(3))
    wshape = (heads, n, n) if per_head else (n, n)
    ws = {}
    if mechanism != "none":
        names = WEIGHTS[mechanism]
        ws = {name: torch.randn(*wshape, generator=g, dtype=dtype) / math.sqrt(n) for name in names}
    if requires_grad:
        for t in (q, k, v, *ws.values()):
            t.requires_grad_(True)
    return q, k, v, ws


@pytest.mark.parametrize("mechanism", MECHANISMS + ("value_literal",))
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("n,lengths", [(7, None), (13, [13, 5]), (7, [0, 4])])
def test_gradcheck(mechanism, per_head, n, lengths):
    q, k, v, ws = make_inputs(n=n, mechanism=mechanism, per_head=per_head, requires_grad=True)
    mask = None if lengths is None else left_padding_mask(lengths, n)
    names = list(ws)

    def fn(q, k, v, *w):
        return awr_fast.refined_attention(
            q, k, v, mechanism=mechanism, key_padding_mask=mask, backend="reference", **dict(zip(names, w))
        )

    with pytest.warns(UserWarning) if mechanism == "value_literal" else _no_warning():
        assert torch.autograd.gradcheck(fn, (q, k, v, *ws.values()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mechanism", ["simp", "value"])
def test_gradcheck_refine_input_scores(mechanism):
    q, k, v, ws = make_inputs(n=7, mechanism=mechanism, requires_grad=True)
    mask = left_padding_mask([7, 3], 7)
    names = list(ws)

    def fn(q, k, v, *w):
        return awr_fast.refined_attention(
            q,
            k,
            v,
            mechanism=mechanism,
            key_padding_mask=mask,
            refine_input="scores",
            refine_scale=0.3,
            scale=0.7,
            **dict(zip(names, w)),
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, *ws.values()), eps=1e-6, atol=1e-6)


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_none_matches_sdpa():
    q, k, v, _ = make_inputs(batch=3, heads=2, n=11, d_h=8, mechanism="none")
    ours = awr_fast.refined_attention(q, k, v, mechanism="none")
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_simp_matches_hand_written_formula():
    """B = c (A W_RQ)(A W_RK)^T, softmax, times V, written out independently of the library."""
    n, d_h = 5, 4
    q, k, v, ws = make_inputs(batch=1, heads=1, n=n, d_h=d_h, mechanism="simp")
    s = (q[0, 0] @ k[0, 0].T) / math.sqrt(d_h)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    a = torch.softmax(s.masked_fill(~causal, -math.inf), dim=-1)
    b = (a @ ws["w_rq"]) @ (a @ ws["w_rk"]).T / math.sqrt(d_h)
    expected = torch.softmax(b.masked_fill(~causal, -math.inf), dim=-1) @ v[0, 0]
    out = awr_fast.refined_attention(q, k, v, mechanism="simp", **ws)
    torch.testing.assert_close(out[0, 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("refine_input", ["probs", "scores"])
def test_causality(mechanism, refine_input):
    n = 13
    q, k, v, ws = make_inputs(batch=2, n=n, d_h=5, mechanism=mechanism)
    mask = left_padding_mask([13, 9], n)
    out = awr_fast.refined_attention(
        q, k, v, mechanism=mechanism, key_padding_mask=mask, refine_input=refine_input, **ws
    )
    for t in (3, 8, 11):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        g = torch.Generator().manual_seed(t)
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=g, dtype=x.dtype) * 3
        out2 = awr_fast.refined_attention(
            q2, k2, v2, mechanism=mechanism, key_padding_mask=mask, refine_input=refine_input, **ws
        )
        assert (out2[:, :, : t + 1] - out[:, :, : t + 1]).abs().max() <= 1e-12
        assert (out2[:, :, t + 1 :] - out[:, :, t + 1 :]).abs().max() > 1e-6  # the perturbation did something


def test_value_literal_leaks_the_future():
    n, t = 9, 4
    q, k, v, ws = make_inputs(batch=1, n=n, d_h=5, mechanism="value_literal")
    with pytest.warns(UserWarning, match="future"):
        out = awr_fast.refined_attention(q, k, v, mechanism="value_literal", **ws)
        k2 = k.clone()
        k2[:, :, t + 1 :] += 2.0
        out2 = awr_fast.refined_attention(q, k2, v, mechanism="value_literal", **ws)
    assert (out2[:, :, : t + 1] - out[:, :, : t + 1]).abs().max() > 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fully_padded_rows_are_zero_and_finite(dtype, mechanism):
    n = 8
    q, k, v, ws = make_inputs(batch=3, n=n, d_h=4, mechanism=mechanism, dtype=dtype, requires_grad=True)
    mask = left_padding_mask([0, 3, 8], n)
    out = awr_fast.refined_attention(q, k, v, mechanism=mechanism, key_padding_mask=mask, **ws)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    assert (out[1, :, : n - 3] == 0).all() and (out[1, :, n - 3 :] != 0).any()
    (out.float() * torch.randn(out.shape)).sum().backward()
    for t in (q, k, v, *ws.values()):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0] == 0).all() and (k.grad[0] == 0).all() and (v.grad[0] == 0).all()


def test_dropout_is_random_and_unbiased():
    q, k, v, ws = make_inputs(batch=2, n=9, d_h=4, mechanism="simp")
    torch.manual_seed(0)
    outs = torch.stack([awr_fast.refined_attention(q, k, v, mechanism="simp", dropout_p=0.3, **ws) for _ in range(400)])
    plain = awr_fast.refined_attention(q, k, v, mechanism="simp", **ws)
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs.mean(0), plain, atol=0.15, rtol=0)


# ---- bad input: errors name the argument --------------------------------------------------------------


def _good(n=7):
    q, k, v, ws = make_inputs(n=n, mechanism="simp", dtype=torch.float32)
    return q, k, v, ws


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("k_shape", ValueError, "k: expected shape"),
        ("v_dtype", TypeError, "v: expected dtype"),
        ("int_q", TypeError, "q: expected a floating dtype"),
        ("q_3d", ValueError, "q: expected a 4-d tensor"),
        ("w_size", ValueError, "w_rq: expected shape \\(7, r\\)"),
        ("w_columns", ValueError, "w_rk: expected 9 columns \\(those of w_rq"),
        ("w_rv_square", ValueError, "w_rv: expected shape \\(7, 7\\)"),
        ("w_heads", ValueError, "w_rk: expected shape"),
        ("w_missing", ValueError, "w_rk: required"),
        ("w_rv_unused", ValueError, "w_rv: expected None \\(mechanism='"),
        ("mask_shape", ValueError, "key_padding_mask: expected shape"),
        ("mask_dtype", TypeError, "key_padding_mask: expected dtype torch.bool"),
        ("mechanism", ValueError, "mechanism: expected one of"),
        ("backend", ValueError, "backend: expected one of"),
        ("refine_input", ValueError, "refine_input: expected one of"),
        ("dropout", ValueError, "dropout_p: expected a float in"),
        ("scale", ValueError, "scale: expected None or a positive float"),
        ("w_device", ValueError, "w_rq: expected device"),
    ],
)
def test_bad_input(case, exc, match):
    q, k, v, ws = _good()
    kwargs = dict(mechanism="simp", **ws)
    if case == "k_shape":
        k = k[:, :, :5]
    elif case == "v_dtype":
        v = v.double()
    elif case == "int_q":
        q, k, v = (x.to(torch.int64) for x in (q, k, v))
    elif case == "q_3d":
        q, k, v = q[0], k[0], v[0]
    elif case == "w_size":
        kwargs["w_rq"] = torch.randn(8, 8)
    elif case == "w_columns":
        kwargs["w_rq"], kwargs["w_rk"] = torch.randn(7, 9), torch.randn(7, 8)
    elif case == "w_rv_square":
        kwargs.update(mechanism="value", w_rv=torch.randn(7, 9))
    elif case == "w_heads":
        kwargs["w_rk"] = torch.randn(3, 7, 7)
    elif case == "w_missing":
        kwargs["w_rk"] = None
    elif case == "w_rv_unused":
        kwargs["w_rv"] = torch.randn(7, 7)
    elif case == "mask_shape":
        kwargs["key_padding_mask"] = torch.zeros(2, 8, dtype=torch.bool)
    elif case == "mask_dtype":
        kwargs["key_padding_mask"] = torch.zeros(2, 7)
    elif case == "mechanism":
        kwargs["mechanism"] = "simple"
    elif case == "backend":
        kwargs["backend"] = "tensorrt"
    elif case == "refine_input":
        kwargs["refine_input"] = "logits"
    elif case == "dropout":
        kwargs["dropout_p"] = 1.5
    elif case == "scale":
        kwargs["scale"] = -1.0
    elif case == "w_device":
        kwargs["w_rq"] = torch.randn(7, 7, device="meta")
    with pytest.raises(exc, match=match):
        awr_fast.refined_attention(q, k, v, **kwargs)


def test_explicit_backend_explains_refusal(monkeypatch):
    q, k, v, ws = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("AWR_FAST_CUDA_EMULATE", "0")  # without it the CUDA ops take CPU tensors
    with pytest.raises(awr_fast.UnsupportedInputError, match="backend='triton' cannot run dot_refined: .*CUDA"):
        awr_fast.refined_attention(q, k, v, mechanism="simp", backend="triton", **ws)
    with pytest.raises(awr_fast.UnsupportedInputError, match="backend='cuda' cannot run dot_refined: .*CUDA"):
        awr_fast.refined_attention(q, k, v, mechanism="simp", backend="cuda", **ws)


def test_lengths_equal_left_padding_mask():
    q, k, v, ws = make_inputs(batch=3, n=9, d_h=4, mechanism="simp")
    lengths = torch.tensor([9, 4, 0])
    via_lengths = awr_fast.refined_attention(q, k, v, mechanism="simp", lengths=lengths, **ws)
    via_mask = awr_fast.refined_attention(
        q, k, v, mechanism="simp", key_padding_mask=left_padding_mask(lengths, 9), **ws
    )
    assert torch.equal(via_lengths, via_mask)


@pytest.mark.parametrize(
    "lengths,exc,match",
    [
        (torch.tensor([9, 10]), ValueError, "lengths: expected values in \\[0, n=9\\]"),
        (torch.tensor([9]), ValueError, "lengths: expected shape \\(2,\\)"),
        (torch.tensor([9.0, 3.0]), TypeError, "lengths: expected an int32/int64"),
    ],
)
def test_bad_lengths(lengths, exc, match):
    q, k, v, ws = make_inputs(batch=2, n=9, d_h=4, mechanism="simp")
    with pytest.raises(exc, match=match):
        awr_fast.refined_attention(q, k, v, mechanism="simp", lengths=lengths, **ws)


def test_lengths_on_a_device_build_the_mask_without_reading_the_values():
    """Off the CPU the mask comes from device ops alone (no host sync): meta tensors have no values, so
    any read of them here would raise."""
    from awr_fast.validation import lengths_to_padding_mask

    meta = torch.tensor([9, 4, 0, -2, 12], device="meta")
    mask = lengths_to_padding_mask(meta, None, 5, 9, meta.device)
    assert mask.shape == (5, 9) and mask.dtype == torch.bool and mask.device.type == "meta"


def test_lengths_and_mask_together_is_an_error():
    q, k, v, ws = make_inputs(batch=2, n=9, d_h=4, mechanism="simp")
    with pytest.raises(ValueError, match="lengths: expected None when key_padding_mask is given"):
        awr_fast.refined_attention(
            q, k, v, mechanism="simp", lengths=torch.tensor([9, 3]), key_padding_mask=left_padding_mask([9, 3], 9), **ws
        )
