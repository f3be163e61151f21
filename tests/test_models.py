"""Models (awr_fast.models): shapes, gradients, padding invariance, causality, negatives, losses, options.

Small sizes on the CPU (num_items 30, max_len 8, d 16); invariance checks run the models in float64.
"""

import pytest
import torch
import torch.nn.functional as F

from awr_fast.backends import capabilities, device_reasons
from awr_fast.models import (
    MODELS,
    STOSA,
    SASRec,
    bce_loss,
    build_model,
    full_ce_loss,
    model_options,
    sample_negatives,
    sampled_ce_loss,
    w2_bpr_loss,
    w2_pair_distance,
)
from awr_fast.models.sasrec import REFINE_PARAMS, SASREC_ATTENTIONS
from awr_fast.models.stosa import STOSA_ATTENTIONS
from awr_fast.reference.w2_refined import w2_distance

MODEL_OPS = {"sasrec": "dot_refined", "stosa": "w2_refined"}

NUM_ITEMS, MAX_LEN, D = 30, 8, 16

#: The models with AWRSR refinement (AC-SASRec has its own tests: tests/test_acsasrec.py).
REFINED_MODELS = [name for name in MODELS if name != "acsasrec"]
CASES = (
    [("sasrec", a, {"layout": lay}) for lay in ("original", "post_ln") for a in SASREC_ATTENTIONS]
    + [("stosa", a, {}) for a in STOSA_ATTENTIONS]
    + [
        ("sasrec", "value", {"refine_input": "scores", "per_head_refine": True}),
        ("stosa", "stoc", {"refine_input": "scores", "per_head_refine": True}),
    ]
)
CASE_IDS = [f"{name}-{att}-{'-'.join(map(str, extra.values()))}".rstrip("-") for name, att, extra in CASES]


def make(name, attention="none", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("d_model", D)
    kwargs.setdefault("n_heads", 2)
    return build_model(name, num_items=NUM_ITEMS, max_len=MAX_LEN, attention=attention, **kwargs)


def batch(lengths=(8, 5, 1, 3), seed=1):
    """Left-padded seq and next-item targets pos (pos[t] = seq[t + 1], last target a fresh item)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(len(lengths), MAX_LEN, dtype=torch.long)
    pos = torch.zeros_like(seq)
    for row, length in enumerate(lengths):
        items = torch.randperm(NUM_ITEMS, generator=g)[: length + 1] + 1
        if length:
            seq[row, MAX_LEN - length :] = items[:-1]
            pos[row, MAX_LEN - length :] = items[1:]
    return seq, pos


def hidden(model, seq):
    out = model(seq)
    return torch.cat(out, dim=-1) if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------------------------- shapes, grads


@pytest.mark.parametrize("name,attention,extra", CASES, ids=CASE_IDS)
def test_shapes_loss_and_gradients(name, attention, extra):
    model = make(name, attention, **extra)
    seq, pos = batch()
    out = model(seq)
    if name == "sasrec":
        assert out.shape == (4, MAX_LEN, D)
    else:
        assert isinstance(out, tuple) and [t.shape for t in out] == [(4, MAX_LEN, D)] * 2
        assert bool((out[1] > 0).all()), "covariances must stay positive"
    loss = model.loss(seq, pos)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"
    tables = [model.item_emb] if name == "sasrec" else [model.item_mean_emb, model.item_cov_emb]
    assert all(table.weight.grad[0].abs().sum() == 0 for table in tables)  # padding_idx: no update

    model.eval()
    with torch.no_grad():
        scores = model.score_all(seq)
        assert scores.shape == (4, NUM_ITEMS + 1)
        assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
        items = torch.tensor([[1, 5, 0], [2, 3, 4], [30, 7, 9], [11, 12, 13]])
        sub = model.score_items(seq, items)
        assert sub.shape == (4, 3)
        torch.testing.assert_close(sub, scores.gather(1, items), rtol=1e-5, atol=1e-5)

    maps = model.attention_maps(seq)
    heads = 2
    expected = {"A", "P", "key_padding_mask"} | ({"B"} if attention != "none" else set())
    assert set(maps) == expected
    for key in expected - {"key_padding_mask"}:
        assert maps[key].shape == (4, heads, MAX_LEN, MAX_LEN)
    p = maps["P"]
    real = seq != 0
    torch.testing.assert_close(
        p.sum(-1)[real[:, None].expand(-1, heads, -1)], torch.ones(int(real.sum()) * heads), rtol=1e-5, atol=1e-5
    )
    assert (p.triu(1) == 0).all() and (p[~real[:, None].expand(-1, heads, -1)] == 0).all()


def test_attention_maps_are_the_weights_the_sasrec_forward_uses():
    model = make("sasrec", "simp", layout="original", n_layers=2).double().eval()
    seq, _ = batch()
    captured = {}
    attn = model.blocks[-1].attn
    hook = attn.register_forward_hook(lambda mod, args, out: captured.update(args=args, out=out))
    model(seq)
    hook.remove()  # attention_maps calls the layer too (with return_weights=True)
    queries, keys, _ = captured["args"]
    maps = model.attention_maps(seq)
    v = attn.split_heads(attn.v_proj(keys))
    out = (maps["P"] @ v).transpose(1, 2).reshape(seq.shape[0], MAX_LEN, D)
    out = out.masked_fill((seq == 0)[..., None], 0.0)
    torch.testing.assert_close(out, captured["out"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "sampled_ce"])
def test_sasrec_softmax_losses_train_everything(loss):
    model = make("sasrec", "add", loss=loss)
    assert model.num_negatives == (100 if loss == "sampled_ce" else 1)
    seq, pos = batch()
    value = model.loss(seq, pos)
    assert torch.isfinite(value)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_narrow_batches_and_too_long_ones():
    for name in REFINED_MODELS:
        model = make(name, "simp").double().eval()
        seq, pos = batch(lengths=(5, 3, 1, 0))
        narrow, narrow_pos = seq[:, -5:], pos[:, -5:]
        h_full, h_narrow = hidden(model, seq), hidden(model, narrow)
        assert h_narrow.shape[1] == 5
        torch.testing.assert_close(h_narrow, h_full[:, -5:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.score_all(narrow), model.score_all(seq), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(model.loss(narrow, narrow_pos))
        with pytest.raises(ValueError, match=rf"^seq: expected at most max_len={MAX_LEN} positions, got {MAX_LEN + 1}"):
            model(torch.ones(2, MAX_LEN + 1, dtype=torch.long))
        with pytest.raises(
            ValueError,
            match=rf"^pos: expected a tensor of shape \(4, {MAX_LEN}\) \(that of seq\), "
            rf"got \(4, {MAX_LEN - 1}\)$",
        ):
            model.loss(seq, pos[:, 1:])


@pytest.mark.parametrize("name,attention,extra", CASES, ids=CASE_IDS)
def test_trimmed_batch_is_the_same_function(name, attention, extra):
    """A batch without its all-padding columns (the last n positions) gives the same hidden states, loss
    and gradient of every parameter as the full-width batch: the window uses the rows of the position
    tables and refinement matrices of its absolute positions, and the padding never mattered."""
    model = make(name, attention, **extra).double().eval()
    seq, pos = batch(lengths=(5, 3, 1, 0))
    neg = (pos % NUM_ITEMS) + 1  # fixed negatives, so that both widths draw nothing
    width = 5
    results = []
    for s, p, q in ((seq, pos, neg), (seq[:, -width:], pos[:, -width:], neg[:, -width:])):
        model.zero_grad()
        loss = model.loss(s, p, q if name == "stosa" or model.loss_type != "ce" else None)
        loss.backward()
        results.append(
            (
                hidden(model, s)[:, -width:].detach(),
                loss.detach(),
                {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
            )
        )
    (h_full, loss_full, g_full), (h_trim, loss_trim, g_trim) = results
    torch.testing.assert_close(h_trim, h_full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_trim, loss_full, rtol=1e-10, atol=1e-12)
    assert g_full.keys() == g_trim.keys()
    refinement = [k for k in g_full if k.split(".")[-1] in REFINE_PARAMS]
    assert (attention == "none") == (not refinement)
    for key in g_full:
        torch.testing.assert_close(g_trim[key], g_full[key], rtol=1e-9, atol=1e-11, msg=key)
    for key in refinement:  # the window reaches the refinement matrices, but only rows of its positions
        rows_outside = g_full[key][..., : MAX_LEN - width, :]
        assert torch.count_nonzero(rows_outside) == 0 and torch.count_nonzero(g_full[key]) > 0, key


@pytest.mark.parametrize("name", REFINED_MODELS)
def test_scores_stay_float32_under_autocast(name):
    model = make(name, "simp")
    seq, pos = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model.loss(seq, pos))
        with torch.no_grad():
            scores = model.score_all(seq)
            sub = model.score_items(seq, pos[:, -3:])
    assert scores.dtype == sub.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name,attention,extra", CASES, ids=CASE_IDS)
def test_padding_invariance(name, attention, extra):
    """The last-position scores of a sequence depend only on its items: not on how much left padding
    surrounds it (narrow vs max_len batches, other rows of the batch) nor on any parameter that only
    padding positions touch (the padding embedding row, padded positions' embeddings, the rows of the
    refinement matrices indexed by padded positions)."""
    model = make(name, attention, n_layers=2, **extra).double().eval()
    seq, _ = batch(lengths=(3, 2, 3, 1))
    longest = 3
    with torch.no_grad():
        ref = model.score_all(seq)
        alone = torch.cat([model.score_all(seq[i : i + 1, -longest:]) for i in range(seq.shape[0])])
        torch.testing.assert_close(alone, ref, rtol=1e-12, atol=1e-12)
        g = torch.Generator().manual_seed(5)
        pad_rows = slice(0, MAX_LEN - longest)
        for pname, param in model.named_parameters():
            if pname.split(".")[-1] in REFINE_PARAMS:
                param[..., pad_rows, :] += torch.randn(param[..., pad_rows, :].shape, generator=g, dtype=param.dtype)
            elif pname.startswith("pos_"):
                param[pad_rows] += torch.randn(param[pad_rows].shape, generator=g, dtype=param.dtype)
            elif pname.startswith("item_"):
                param[0] += torch.randn(param[0].shape, generator=g, dtype=param.dtype)
        torch.testing.assert_close(model.score_all(seq), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,attention,extra", CASES, ids=CASE_IDS)
def test_causality(name, attention, extra):
    """Changing the items after position t leaves every hidden state at positions <= t unchanged."""
    model = make(name, attention, n_layers=2, **extra).double().eval()
    seq, _ = batch(lengths=(8, 6))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        base = hidden(model, seq)
        for t in (2, 4, 6):
            changed = seq.clone()
            changed[:, t + 1 :] = torch.randint(1, NUM_ITEMS + 1, changed[:, t + 1 :].shape, generator=g)
            out = hidden(model, changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=1e-12, atol=1e-12)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def _training_backends():
    """(model, attention, backend) for every registered backend of the model's op other than the reference."""
    out = []
    for name, op, attentions in (
        ("sasrec", "dot_refined", ("simp", "value")),
        ("stosa", "w2_refined", ("simp", "stoc")),
    ):
        for backend, row in capabilities(op).items():
            for attention in attentions:
                if backend != "reference" and (row.mechanisms is None or attention in row.mechanisms):
                    out.append(pytest.param(name, attention, backend, id=f"{name}-{attention}-{backend}"))
    return out


@pytest.mark.parametrize("name,attention,backend", _training_backends())
def test_training_steps_match_the_reference_backend(name, attention, backend, backend_log):
    """A few SGD steps with `backend` and with "reference" from the same start: the same losses and the
    same parameters within the dtype's tolerance (float64 where the backend has it, else float32). SGD, not
    Adam: Adam rescales the rounding noise of gradients that are zero in exact arithmetic (the key bias's,
    as softmax ignores a per-row constant) into full-size steps."""
    reasons = device_reasons(backend, torch.device("cpu"))
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")
    row = capabilities(MODEL_OPS[name])[backend]
    dtype = torch.float64 if torch.float64 in row.dtypes else torch.float32
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    seq, pos = batch()
    neg = sample_negatives(seq, pos, NUM_ITEMS, generator=torch.Generator().manual_seed(0))
    runs = {}
    for which in (backend, "reference"):
        model = make(name, attention, backend=which, dropout=0.0, n_layers=2).to(dtype)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = model.loss(seq, pos, neg)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        runs[which] = (torch.stack(losses), dict(model.named_parameters()))
    assert backend_log()[MODEL_OPS[name]] == "+".join(sorted({backend, "reference"}))
    torch.testing.assert_close(runs[backend][0], runs["reference"][0], **tol)
    for pname, param in runs[backend][1].items():
        torch.testing.assert_close(param, runs["reference"][1][pname], **tol, msg=lambda m: f"{pname}: {m}")
    assert not torch.equal(runs["reference"][0][0], runs["reference"][0][-1])  # the steps did train


# ---------------------------------------------------------------------------------------------- STOSA specifics


def test_stosa_compat_changes_only_the_mean_stream():
    seq, pos = batch()
    fixed = make("stosa", "simp").double().eval()
    compat = make("stosa", "simp", stosa_compat=True).double().eval()
    compat.load_state_dict(fixed.state_dict())
    with torch.no_grad():
        mu_f, sig_f = fixed(seq)
        mu_c, sig_c = compat(seq)
        mu0, _ = compat.embed(seq)
    torch.testing.assert_close(sig_c, sig_f, rtol=0, atol=0)  # one layer: the covariance stream is the same
    assert not torch.allclose(mu_c, mu_f)
    torch.testing.assert_close(mu_c, mu0, rtol=0, atol=0)  # the released encoder returns the input means

    deep = make("stosa", "stoc", n_layers=2, stosa_compat=True)
    deep.loss(seq, pos).backward()
    frozen = {n for n, p in deep.named_parameters() if p.grad is None}
    assert frozen == {
        f"layers.{i}.{m}.{w}"
        for i in range(2)
        for w in ("weight", "bias")
        for m in (
            "attention.mean_value",
            "attention.mean_dense",
            "mean_ffn.dense_1",
            "mean_ffn.dense_2",
            "mean_ffn.layer_norm",
        )
    }
    assert deep.layers[0].attention.mean_query.weight.grad.abs().sum() > 0  # still steers the attention


def test_stosa_scores_are_negative_w2_to_item_gaussians():
    model = make("stosa", "stoc").double().eval()
    seq, _ = batch()
    with torch.no_grad():
        mu, sig = model(seq)
        item_mu, item_sig = model.item_gaussians()
        torch.testing.assert_close(item_sig, F.elu(model.item_cov_emb.weight) + 1)
        expected = -w2_distance(mu[:, -1], sig[:, -1], item_mu, item_sig)
        scores = model.score_all(seq)
    torch.testing.assert_close(scores[:, 1:], expected[:, 1:], rtol=1e-12, atol=1e-10)


def test_w2_bpr_loss_matches_stosa_trainer():
    g = torch.Generator().manual_seed(0)
    B, n, d, V = 3, 5, 4, 12
    mu = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    sig = torch.rand(B, n, d, generator=g, dtype=torch.float64) + 0.5
    item_mu = torch.randn(V + 1, d, generator=g, dtype=torch.float64)
    item_sig = F.elu(torch.randn(V + 1, d, generator=g, dtype=torch.float64)) + 1
    pos = torch.randint(1, V + 1, (B, n), generator=g)
    pos[0, :2] = 0
    neg = torch.randint(1, V + 1, (B, n), generator=g)

    def stosa_w2(m1, c1, m2, c2):  # zfan20/STOSA modules.wasserstein_distance
        ret = torch.sum((m1 - m2) * (m1 - m2), -1)
        s1, s2 = torch.sqrt(torch.clamp(c1, min=1e-24)), torch.sqrt(torch.clamp(c2, min=1e-24))
        return ret + torch.sum((s1 - s2) * (s1 - s2), -1)

    # zfan20/STOSA trainers.DistSAModelTrainer.bpr_optimization, transcribed
    pm, pc = item_mu[pos].view(-1, d), item_sig[pos].view(-1, d)
    nm, nc = item_mu[neg].view(-1, d), item_sig[neg].view(-1, d)
    sm, sc = mu.view(-1, d), sig.view(-1, d)
    pos_logits, neg_logits, pos_vs_neg = stosa_w2(sm, sc, pm, pc), stosa_w2(sm, sc, nm, nc), stosa_w2(pm, pc, nm, nc)
    istarget = (pos > 0).view(-1).double()
    loss = torch.sum(-torch.log(torch.sigmoid(neg_logits - pos_logits + 1e-24)) * istarget) / torch.sum(istarget)
    pvn = 0.005 * torch.sum(torch.clamp(pos_logits - pos_vs_neg, 0) * istarget) / torch.sum(istarget)

    total, bpr, pvn_term = w2_bpr_loss(mu, sig, item_mu, item_sig, pos, neg, 0.005, return_terms=True)
    torch.testing.assert_close(bpr, loss)
    torch.testing.assert_close(0.005 * pvn_term, pvn)
    torch.testing.assert_close(total, loss + pvn)
    torch.testing.assert_close(w2_pair_distance(sm, sc, pm, pc), w2_distance(sm, sc, pm, pc).diagonal())
    # k negatives: the mean of the per-negative losses
    neg_k = torch.stack([neg, torch.roll(neg, 1, 0)], dim=-1)
    both = [w2_bpr_loss(mu, sig, item_mu, item_sig, pos, neg_k[..., j], 0.005) for j in range(2)]
    torch.testing.assert_close(w2_bpr_loss(mu, sig, item_mu, item_sig, pos, neg_k, 0.005), sum(both) / 2)


# ---------------------------------------------------------------------------------------------- SASRec losses


def test_dot_losses_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    B, n, d, V = 3, 5, 4, 12
    h = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    emb = torch.randn(V + 1, d, generator=g, dtype=torch.float64)
    pos = torch.randint(1, V + 1, (B, n), generator=g)
    pos[1, :3] = 0
    neg = torch.randint(1, V + 1, (B, n), generator=g)
    idx = pos != 0

    # pmixer: BCEWithLogits over the non-padding positions, positive + negative
    pl, nl = (h * emb[pos]).sum(-1)[idx], (h * emb[neg]).sum(-1)[idx]
    expected = F.binary_cross_entropy_with_logits(pl, torch.ones_like(pl)) + F.binary_cross_entropy_with_logits(
        nl, torch.zeros_like(nl)
    )
    torch.testing.assert_close(bce_loss(h, emb, pos, neg), expected)

    logits = h[idx] @ emb.T
    logits[:, 0] = float("-inf")
    torch.testing.assert_close(full_ce_loss(h, emb, pos), F.cross_entropy(logits, pos[idx]))

    neg_k = torch.randint(1, V + 1, (B, n, 3), generator=g)
    cand = torch.cat([pos[..., None], neg_k], -1)[idx]
    sl = (emb[cand] * h[idx][:, None]).sum(-1)
    expected = F.cross_entropy(sl, torch.zeros(len(sl), dtype=torch.long))
    torch.testing.assert_close(sampled_ce_loss(h, emb, pos, neg_k), expected)


def test_losses_without_targets_are_zero_with_finite_gradients():
    h = torch.randn(2, 4, 3, requires_grad=True)
    emb = torch.randn(6, 3, requires_grad=True)
    pos = neg = torch.zeros(2, 4, dtype=torch.long)
    for value in (
        bce_loss(h, emb, pos, neg),
        full_ce_loss(h, emb, pos),
        sampled_ce_loss(h, emb, pos, neg),
        w2_bpr_loss(h, h.abs() + 1, emb, emb.abs() + 1, pos, neg),
    ):
        assert value.item() == 0.0
        gh, ge = torch.autograd.grad(value, (h, emb), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in (gh, ge))


# ---------------------------------------------------------------------------------------------- negatives


def test_negatives_avoid_the_row_are_in_range_and_reproducible():
    seq, pos = batch(lengths=(8, 5, 1, 0))
    neg = sample_negatives(seq, pos, NUM_ITEMS, k=4, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (4, MAX_LEN, 4) and neg.dtype == torch.long
    real = pos != 0
    assert ((neg[real] >= 1) & (neg[real] <= NUM_ITEMS)).all()
    assert (neg[~real] == 0).all()
    for b in range(seq.shape[0]):
        row = set(seq[b].tolist()) | set(pos[b].tolist())
        assert not row & set(neg[b][real[b]].flatten().tolist())
    again = sample_negatives(seq, pos, NUM_ITEMS, k=4, generator=torch.Generator().manual_seed(0))
    other = sample_negatives(seq, pos, NUM_ITEMS, k=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(neg, again) and not torch.equal(neg, other)
    assert sample_negatives(seq, pos, NUM_ITEMS).shape == seq.shape  # k = 1: (B, n)


def test_negatives_when_avoiding_the_row_is_hard_or_impossible():
    g = torch.Generator().manual_seed(0)
    # the row holds 7 of 8 items: only item 8 is valid, and the rejection loop finds it
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    pos = torch.tensor([[2, 3, 4, 5, 6, 7, 1]])
    assert (sample_negatives(seq, pos, 8, k=3, generator=g, max_rounds=400) == 8).all()
    # half of the items are taken: the default number of rounds is plenty
    half = sample_negatives(seq[:, :4], pos[:, :4] * 0 + 4, 8, k=8, generator=g)
    assert ((half >= 5) & (half <= 8)).all()
    # the row holds every item: no valid negative exists, the bounded loop accepts collisions
    full = sample_negatives(seq, pos, 7, k=3, generator=g, max_rounds=5)
    assert ((full >= 1) & (full <= 7)).all()
    # exclude_seq=False: plainly uniform, hits the row
    plain = sample_negatives(seq, pos, 8, k=50, generator=g, exclude_seq=False)
    assert (plain < 8).any()
    with pytest.raises(ValueError, match=r"^k: expected an int >= 1, got 0$"):
        sample_negatives(seq, pos, 8, k=0)
    with pytest.raises(ValueError, match=r"^num_items: expected an int >= 1, got 0$"):
        sample_negatives(seq, pos, 0)


def test_model_loss_samples_reproducibly_with_a_generator():
    model = make("sasrec", "none", dropout=0.0).eval()
    seq, pos = batch()
    a = model.loss(seq, pos, generator=torch.Generator().manual_seed(4))
    b = model.loss(seq, pos, generator=torch.Generator().manual_seed(4))
    neg = sample_negatives(seq, pos, NUM_ITEMS, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item() == model.loss(seq, pos, neg).item()


# ---------------------------------------------------------------------------------------------- options


def test_defaults_and_options():
    sas, sto = model_options("sasrec"), model_options("stosa")
    assert (sas["d_model"], sas["n_layers"], sas["n_heads"]) == (64, 1, 1)
    assert (sas["dropout"], sas["attn_dropout"], sas["num_negatives"]) == (0.2, 0.0, None)
    assert (sas["layout"], sas["loss"], sas["attention"], sas["backend"]) == ("original", "bce", "none", "auto")
    assert (sto["d_model"], sto["n_layers"], sto["n_heads"], sto["dropout"], sto["pvn"], sto["stosa_compat"]) == (
        64,
        1,
        4,
        0.3,
        0.005,
        False,
    )
    model = build_model("sasrec", num_items=5, max_len=4)
    assert isinstance(model, SASRec) and (model.num_items, model.max_len) == (5, 4)
    assert isinstance(model.blocks[0].attn.out_proj, torch.nn.Identity)  # kang205: no output projection
    assert isinstance(
        build_model("sasrec", num_items=5, max_len=4, layout="post_ln").blocks[0].attn.out_proj, torch.nn.Linear
    )
    assert isinstance(build_model("stosa", num_items=5, max_len=4), STOSA)
    # SASRec embeddings: padding row zero, the sqrt(d) scale
    assert model.item_emb.weight[0].abs().sum() == 0
    parts = model.parameter_parts()
    assert set(parts["refinement"]) == set() and set(parts["item_embedding"]) == {"item_emb.weight"}
    assert sum(len(v) for v in parts.values()) == len(list(model.parameters()))
    sparts = make("stosa", "stoc").parameter_parts()
    assert set(sparts["refinement"]) == {"layers.0.attention.w_mu", "layers.0.attention.w_sigma"}
    assert set(sparts["item_embedding"]) == {"item_mean_emb.weight", "item_cov_emb.weight"}


@pytest.mark.parametrize(
    "name,kwargs,argument",
    [
        ("bert4rec", {}, "name"),
        ("sasrec", {"attention": "stoc"}, "attention"),
        ("sasrec", {"layout": "pre_ln"}, "layout"),
        ("sasrec", {"loss": "bpr"}, "loss"),
        ("sasrec", {"num_negatives": 0}, "num_negatives"),
        ("sasrec", {"pvn": 0.1}, "pvn"),
        ("stosa", {"layout": "original"}, "layout"),
        ("stosa", {"attention": "value_literal"}, "attention"),
        ("stosa", {"pvn": -1.0}, "pvn"),
        ("stosa", {"stosa_compat": 1}, "stosa_compat"),
        ("sasrec", {"d_model": 10, "n_heads": 4}, "n_heads"),
        ("sasrec", {"dropout": 1.0}, "dropout"),
        ("stosa", {"attn_dropout": -0.1}, "attn_dropout"),
        ("sasrec", {"refine_input": "logits"}, "refine_input"),
        ("stosa", {"refine_scale": "sqrt"}, "refine_scale"),
        ("sasrec", {"backend": "cudnn"}, "backend"),
        ("stosa", {"per_head_refine": "yes"}, "per_head_refine"),
    ],
)
def test_bad_options_name_the_argument(name, kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}: expected "):
        build_model(name, num_items=5, max_len=4, **kwargs)
    if name in MODELS and all(key in model_options(name) for key in kwargs):
        with pytest.raises(ValueError, match=f"^{argument}: expected "):  # the constructors check the same way
            MODELS[name](5, 4, **kwargs)
    with pytest.raises(ValueError, match="^num_items: expected an int >= 1, got 0$"):
        build_model("sasrec", num_items=0, max_len=4)
