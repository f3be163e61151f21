"""The WassersteinAttention (STOSA) and CalibratedAttention (AC-TSR) modules."""

import math

import pytest
import torch
import torch.nn.functional as F

from awr_fast.nn.calibrated import CalibratedAttention
from awr_fast.nn.wasserstein import WassersteinAttention
from awr_fast.ops.w2_refined import MECHANISMS as W2_MECHANISMS
from awr_fast.ops.w2_refined import WEIGHTS as W2_WEIGHTS
from helpers import left_padding_mask


def _gaussian_inputs(batch=3, n=7, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, n, d, generator=g, dtype=dtype)
    sigma = torch.rand(batch, n, d, generator=g, dtype=dtype) + 0.5
    return mu, sigma


# ---- WassersteinAttention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", W2_MECHANISMS)
@pytest.mark.parametrize("per_head", [False, True])
def test_w2_forward_shapes_and_backward_reaches_every_parameter(mechanism, per_head):
    torch.manual_seed(0)
    layer = WassersteinAttention(8, 2, 7, mechanism, per_head_refine=per_head, attn_dropout=0.1).double()
    mu, sigma = _gaussian_inputs()
    mask = left_padding_mask([7, 3, 0], 7)
    mu_out, sig_out = layer(mu, sigma, mask)
    assert mu_out.shape == sig_out.shape == (3, 7, 8)
    assert torch.isfinite(mu_out).all() and torch.isfinite(sig_out).all()
    (mu_out.square().sum() + sig_out.square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    expected = {name for names in W2_WEIGHTS.values() for name in names} & {n for n, _ in layer.named_parameters()}
    assert expected == set(W2_WEIGHTS[mechanism])
    for name in expected:
        assert getattr(layer, name).shape == ((2, 7, 7) if per_head else (7, 7))


def test_w2_matches_hand_written_stosa_layer():
    """STOSA DistSelfAttention.forward (eval), written out: projections, ELU + 1, -W2 / sqrt(d_h), P and P^2."""
    torch.manual_seed(0)
    d, heads, n = 8, 2, 6
    layer = WassersteinAttention(d, heads, n).double().eval()
    mu, sigma = _gaussian_inputs(batch=2, n=n, d=d)

    def split(x):
        return x.view(2, n, heads, d // heads).transpose(1, 2)

    mq, mk, mv = (split(lin(mu)) for lin in (layer.mean_query, layer.mean_key, layer.mean_value))
    sq, sk, sv = (split(F.elu(lin(sigma)) + 1) for lin in (layer.cov_query, layer.cov_key, layer.cov_value))
    w2 = ((mq[..., :, None, :] - mk[..., None, :, :]) ** 2).sum(-1) + (
        (sq.sqrt()[..., :, None, :] - sk.sqrt()[..., None, :, :]) ** 2
    ).sum(-1)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    p = torch.softmax((-w2 / math.sqrt(d // heads)).masked_fill(~causal, -math.inf), dim=-1)
    ctx_mu, ctx_sig = ((p @ mv).transpose(1, 2).reshape(2, n, d), ((p * p) @ sv).transpose(1, 2).reshape(2, n, d))
    exp_mu = layer.layer_norm(layer.mean_dense(ctx_mu) + mu)
    exp_sig = layer.layer_norm(layer.cov_dense(ctx_sig) + sigma)
    mu_out, sig_out = layer(mu, sigma)
    torch.testing.assert_close(mu_out, exp_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sig_out, exp_sig, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mechanism", ["simp", "stoc"])
def test_w2_init_statistics_follow_stosa(mechanism):
    torch.manual_seed(0)
    layer = WassersteinAttention(64, 4, 50, mechanism, per_head_refine=True)
    for name in W2_WEIGHTS[mechanism]:
        w = getattr(layer, name)
        assert abs(w.mean().item() - 0.01) < 0.002 and abs(w.std().item() - 0.02) < 0.002, name
    weights = torch.cat([lin.weight.flatten() for lin in layer.linears()])
    assert abs(weights.mean().item() - 0.01) < 0.002 and abs(weights.std().item() - 0.02) < 0.002
    assert all((lin.bias == 0).all() for lin in layer.linears())


@pytest.mark.parametrize("choice,expected", [("d_h", 1 / 4), ("d", 1 / 8), ("n", 1 / 5)])
def test_w2_refine_scale_options(choice, expected):
    layer = WassersteinAttention(64, 4, 25, "simp", refine_scale=choice)
    assert layer.refine_scale == pytest.approx(expected)


@pytest.mark.parametrize("mechanism", W2_MECHANISMS)
def test_w2_module_is_causal(mechanism):
    torch.manual_seed(0)
    n = 9
    layer = WassersteinAttention(8, 2, n, mechanism).double().eval()
    mu, sigma = _gaussian_inputs(batch=2, n=n)
    mask = left_padding_mask([9, 6], n)
    base = layer(mu, sigma, mask)
    t = 4
    mu2, sigma2 = mu.clone(), sigma.clone()
    mu2[:, t + 1 :] += 1.0
    sigma2[:, t + 1 :] *= 1.7
    out = layer(mu2, sigma2, mask)
    for o, b in zip(out, base):
        torch.testing.assert_close(o[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)


def test_w2_module_bad_input():
    layer = WassersteinAttention(8, 2, 7, "simp")
    with pytest.raises(ValueError, match="mu: expected \\(B, n, d=8\\) with 1 <= n <= max_len=7"):
        layer(torch.randn(2, 8, 8), torch.rand(2, 8, 8) + 0.5)
    with pytest.raises(ValueError, match="sigma: expected"):
        layer(torch.randn(2, 7, 8), torch.rand(2, 7, 4) + 0.5)
    with pytest.raises(ValueError, match="mechanism: expected one of"):
        WassersteinAttention(8, 2, 7, "value_literal")
    with pytest.raises(ValueError, match="n_heads"):
        WassersteinAttention(8, 3, 7)
    with pytest.raises(ValueError, match="refine_scale"):
        WassersteinAttention(8, 2, 7, "simp", refine_scale="sqrt")


# ---- CalibratedAttention ----------------------------------------------------------------------------------


def _x(batch=3, n=7, d=8, seed=0, dtype=torch.float64):
    return torch.randn(batch, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("adversarial", [True, False])
def test_calibrated_forward_shapes_and_backward(adversarial):
    torch.manual_seed(0)
    layer = CalibratedAttention(8, 2, 7, adversarial=adversarial, attn_dropout=0.1, hidden_dropout=0.2).double()
    x = _x()
    mask = left_padding_mask([7, 3, 0], 7)
    out = layer(x, mask)
    assert out.h_cal.shape == (3, 7, 8)
    if not adversarial:
        assert out.h_att is None and out.perturb is None
        assert layer.adversarial_parameters() == []
        out.h_cal.square().sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        return
    assert out.h_att.shape == (3, 7, 8) and out.perturb.shape == (3, 2, 7, 7)
    # L_cal reaches every calibrator parameter; L_att (with the ||1 - M|| penalty) reaches A_q and A_k.
    cal_params, adv_params = layer.calibrator_parameters(), layer.adversarial_parameters()
    cal_grads = torch.autograd.grad(out.h_cal.square().sum(), cal_params, retain_graph=True)
    for p, g in zip(cal_params, cal_grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, [n for n, q in layer.named_parameters() if q is p]
    att_loss = -out.h_att.square().sum() + 0.03 * torch.linalg.norm(1 - out.perturb)
    for g in torch.autograd.grad(att_loss, adv_params):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_calibrated_parameter_split_is_disjoint_and_complete():
    layer = CalibratedAttention(8, 2, 7)
    adv = {id(p) for p in layer.adversarial_parameters()}
    cal = {id(p) for p in layer.calibrator_parameters()}
    assert adv == {id(layer.a_q), id(layer.a_k)}
    assert not adv & cal
    assert adv | cal == {id(p) for p in layer.parameters()}
    assert len(cal) == len(list(layer.parameters())) - 2


def test_calibrated_shapes_and_init():
    torch.manual_seed(0)
    d, heads, n = 64, 4, 50
    layer = CalibratedAttention(d, heads, n)
    for name in ("w_oq", "w_ok", "w_dq", "w_dk"):
        assert getattr(layer, name).shape == (d // heads,)
    for name in ("b_o", "b_d", "dist_scale"):
        assert getattr(layer, name).numel() == 1
    assert layer.a_q.shape == layer.a_k.shape == (d, d)
    assert layer.gate.weight.shape == (n, d)
    for w in (layer.query.weight, layer.a_q, layer.gate.weight):
        assert abs(w.mean().item()) < 0.003 and abs(w.std().item() - 0.02) < 0.002
    assert (layer.b_o == 0) and (layer.b_d == 0) and (layer.query.bias == 0).all()


def test_calibrated_matches_functional_composition():
    """h = LN(W_o (P V) + x) for both outputs, sharing V, W_o and the LayerNorm; A_q applied before the split."""
    import awr_fast

    torch.manual_seed(0)
    layer = CalibratedAttention(8, 2, 7).double().eval()
    x = _x(batch=2)
    noise = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    out = layer(x, noise=noise)

    def split(t):
        return t.view(2, 7, 2, 4).transpose(1, 2)

    q_full, k_full = layer.query(x), layer.key(x)
    ref = awr_fast.calibrated_attention(
        split(q_full),
        split(k_full),
        split(layer.value(x)),
        w_oq=layer.w_oq,
        w_ok=layer.w_ok,
        b_o=layer.b_o,
        w_dq=layer.w_dq,
        w_dk=layer.w_dk,
        b_d=layer.b_d,
        dist_scale=layer.dist_scale,
        q_adv=split(q_full @ layer.a_q),
        k_adv=split(k_full @ layer.a_k),
        gate_logits=layer.gate(q_full),
        noise=noise,
    )
    for ctx, h in ((ref.out_cal, out.h_cal), (ref.out_att, out.h_att)):
        expected = layer.layer_norm(layer.dense(ctx.transpose(1, 2).reshape(2, 7, 8)) + x)
        torch.testing.assert_close(h, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.perturb, ref.perturb, rtol=0, atol=0)


@pytest.mark.parametrize("adversarial", [True, False])
def test_calibrated_module_is_causal(adversarial):
    torch.manual_seed(0)
    n = 9
    layer = CalibratedAttention(8, 2, n, adversarial=adversarial).double().eval()
    x = _x(batch=2, n=n)
    mask = left_padding_mask([9, 6], n)
    noise = torch.randn(2, 2, n, n, dtype=torch.float64) if adversarial else None
    base = layer(x, mask, noise=noise)
    t = 4
    x2 = x.clone()
    x2[:, t + 1 :] += 1.0
    out = layer(x2, mask, noise=noise)
    for o, b in zip(out, base):
        if b is not None:
            torch.testing.assert_close(o[..., : t + 1, :], b[..., : t + 1, :], rtol=0, atol=1e-12)


@pytest.mark.parametrize("adversarial", [True, False])
def test_calibrated_module_narrow_batch_is_the_padded_one(adversarial):
    """A batch of the last n < max_len positions computes what the batch padded back to max_len does on
    those positions (the gate's columns are absolute key positions)."""
    torch.manual_seed(0)
    n_max, n = 9, 5
    layer = CalibratedAttention(8, 2, n_max, adversarial=adversarial).double().eval()
    x = _x(batch=3, n=n_max)
    mask = left_padding_mask([5, 3, 1], n_max)
    x = x * (~mask)[..., None]
    noise = torch.randn(3, 2, n_max, n_max, dtype=torch.float64) if adversarial else None
    full = layer(x, mask, noise=noise)
    narrow = layer(x[:, -n:], mask[:, -n:], noise=None if noise is None else noise[..., -n:, -n:].contiguous())
    for a, b in zip(full, narrow):
        if a is not None:
            torch.testing.assert_close(b, a[..., -n:, :] if a.dim() == 3 else a[..., -n:, -n:], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(full.h_cal).all()


def test_calibrated_module_bad_input():
    layer = CalibratedAttention(8, 2, 7)
    with pytest.raises(ValueError, match="x: expected \\(B, n, d=8\\) with 1 <= n <= max_len=7"):
        layer(torch.randn(2, 8, 8))
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype torch.bool"):
        layer(torch.randn(2, 7, 8), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="n_heads"):
        CalibratedAttention(8, 3, 7)
