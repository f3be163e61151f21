"""AC-SASRec (SPEC §5): gradient routing of its two losses, the adversary's sign, causality, narrow
batches, prefix samples, training (convergence, exact resume, the CLI's released defaults, DDP)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_training import _subprocess_env, crafted_sequences

from awr_fast.data import build_dataset, prefix_arrays, sequences_from_lists
from awr_fast.models import ACSASRec, RoutedLoss, build_model
from awr_fast.models import losses as L
from awr_fast.train import read_metrics, train
from awr_fast.training import config_from_args, load_checkpoint
from awr_fast.training.loop import backward
from helpers import check_subprocess

MAX_LEN = 12


def _model(**kw):
    torch.manual_seed(0)
    opts = dict(d_model=16, n_layers=2, n_heads=2, dropout=0.2, attn_dropout=0.2, mask_loss_weight=0.3)
    opts.update(kw)
    return build_model("acsasrec", num_items=40, max_len=MAX_LEN, **opts).double()


def _batch(batch=6, n=MAX_LEN, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 41, (batch, n), generator=g)
    pos = torch.randint(1, 41, (batch, n), generator=g)
    lengths = torch.tensor([n, n - 3, 5, 2, 1, n - 1][:batch])
    pad = torch.arange(n)[None, :] < (n - lengths)[:, None]
    return seq.masked_fill(pad, 0), pos.masked_fill(pad, 0)


def test_loss_routes_each_part_into_its_own_parameters():
    """The trainer's backward gives the calibrator parameters dL_cal and the maps A_q, A_k dL_att, each
    computed separately on the same forward (same dropout and noise), and nothing else."""
    model = _model().train()
    seq, pos = _batch()
    torch.manual_seed(5)
    out = model.loss(seq, pos)
    assert isinstance(out, RoutedLoss)
    (loss_cal, cal_params), (loss_att, adv_params) = out.routes
    adv = model.adversarial_parameters()
    assert len(adv) == 2 * len(model.blocks) and {id(p) for p in adv} == {id(p) for p in adv_params}
    assert {id(p) for p in cal_params} | {id(p) for p in adv_params} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in cal_params} & {id(p) for p in adv_params}
    want_cal = torch.autograd.grad(loss_cal, cal_params, retain_graph=True, allow_unused=True)
    want_att = torch.autograd.grad(loss_att, adv_params, retain_graph=True)
    leak_cal = torch.autograd.grad(loss_cal, adv_params, retain_graph=True)  # what the maps must not get
    leak_att = torch.autograd.grad(loss_att, cal_params, retain_graph=True, allow_unused=True)

    logged = backward(out, None)
    assert logged is out.value
    for p, g in zip(cal_params, want_cal):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
    for p, g, leak in zip(adv_params, want_att, leak_cal):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
        assert (g - leak).abs().max() > 1e-6 * g.abs().max()  # the routing is not a no-op
    assert any(g is not None and g.abs().max() > 0 for g in leak_att)  # L_att does reach them, unrouted


def test_trains_on_the_triton_kernels():
    """The Triton backend's forward and backward (row/column blocks, noise drawn in the kernels) inside the
    two routed losses: L_cal does not read the noise, so with dropout off its value and every gradient it
    routes match the reference backend; L_att reaches the maps with finite, nonzero gradients."""
    models = {}
    for backend in ("triton", "reference"):
        models[backend] = _model(dropout=0.0, attn_dropout=0.0, backend=backend).float().train()
    seq, pos = _batch()
    grads, values = {}, {}
    for backend, model in models.items():
        out = model.loss(seq, pos)
        (loss_cal, cal_params), (loss_att, adv_params) = out.routes
        values[backend] = loss_cal.item()
        grads[backend] = torch.autograd.grad(loss_cal, cal_params, retain_graph=True, allow_unused=True)
        att = torch.autograd.grad(loss_att, adv_params)
        assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in att), backend
    assert values["triton"] == pytest.approx(values["reference"], rel=1e-5)
    for g_triton, g_ref in zip(grads["triton"], grads["reference"]):
        if g_ref is None:
            assert g_triton is None
        else:
            torch.testing.assert_close(g_triton, g_ref, rtol=2e-3, atol=2e-5)


def test_adversary_step_increases_the_perturbed_ce():
    """With lambda = 0, a small step of A_q, A_k against dL_att raises CE(h_att) by what the gradient
    predicts (||g|| times the step): the maps attack, they do not help."""
    model = _model(mask_loss_weight=0.0, dropout=0.0, attn_dropout=0.0).train()
    seq, pos = _batch()

    def ce_att():
        torch.manual_seed(11)  # the same noise draw in every evaluation
        _, h_att, _ = model._encode(seq)
        return L.full_ce_loss(h_att, model.item_embeddings(), pos).item()

    before = ce_att()
    torch.manual_seed(11)
    backward(model.loss(seq, pos), None)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.adversarial_parameters())).item()
    assert norm > 0
    step = 1e-2
    with torch.no_grad():
        for p in model.adversarial_parameters():
            p -= step * p.grad / norm
    increase = ce_att() - before
    assert increase == pytest.approx(step * norm, rel=0.05)  # first order: +step ||g|| > 0


@pytest.mark.parametrize("attention", ["none", "simp", "value"])
def test_calibrated_output_is_causal(attention):
    model = _model(attention=attention).eval()
    seq, _ = _batch(seed=3)
    t = 6
    seq2 = seq.clone()
    seq2[:, t + 1 :] = torch.where(seq[:, t + 1 :] > 0, (seq[:, t + 1 :] % 40) + 1, 0)
    assert (seq2 != seq).any()
    torch.manual_seed(0)
    a = model(seq)
    torch.manual_seed(0)
    b = model(seq2)
    torch.testing.assert_close(b[:, : t + 1], a[:, : t + 1], rtol=0, atol=1e-12)
    assert (b[:, t + 1 :] - a[:, t + 1 :]).abs().max() > 1e-6


@pytest.mark.parametrize("attention", ["none", "add", "value"])
def test_narrow_batch_is_the_padded_batch(attention):
    """The trainer's column trimming: the last n positions give the same calibrated states, L_cal and mask
    penalty as the batch padded back to max_len (the noise only enters h_att); the refinement matrices
    are sliced to the window's absolute positions."""
    model = _model(attention=attention).eval()
    seq, pos = _batch(seed=4)
    seq, pos = seq[:3], pos[:3]  # lengths 12 (cut to 8 below), 9, 5
    seq[0, :4] = 0
    pos[0, :4] = 0
    n = 9
    assert (seq[:, :-n] == 0).all()
    h_full, _, masks_full = model._encode(seq)
    h_narrow, _, masks_narrow = model._encode(seq[:, -n:])
    torch.testing.assert_close(h_narrow, h_full[:, -n:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.mask_penalty(masks_narrow), model.mask_penalty(masks_full), rtol=1e-12, atol=1e-12)
    table = model.item_embeddings()
    torch.testing.assert_close(
        L.full_ce_loss(h_narrow, table, pos[:, -n:]), L.full_ce_loss(h_full, table, pos), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("attention", ["simp", "value"])
def test_refined_model_trains_its_refinement_with_the_calibrated_loss(attention):
    """AWRSR on top of P_fin: the refinement matrices belong to L_cal's parameters and get a gradient
    (only in the rows of the batch's positions); the maps still get only L_att's."""
    model = _model(attention=attention).train()
    seq, pos = _batch()
    out = model.loss(seq, pos)
    (_, cal_params), (_, adv_params) = out.routes
    refinement = dict(model.parameter_parts()["refinement"])
    assert len(refinement) == len(model.blocks) * (3 if attention == "value" else 2)
    assert {id(p) for p in refinement.values()} <= {id(p) for p in cal_params}
    assert not {id(p) for p in refinement.values()} & {id(p) for p in adv_params}
    backward(out, None)
    for name, p in refinement.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    maps = model.eval().attention_maps(seq)
    assert {"A", "B", "P", "P_sp"} <= set(maps)


def test_spatial_only_model_returns_a_plain_loss():
    model = _model(adversarial=False)
    seq, pos = _batch()
    out = model.loss(seq, pos)
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and not model.routes_gradients
    assert model.adversarial_parameters() == []
    maps = model.eval().attention_maps(seq)
    assert set(maps) == {"A", "P", "P_sp", "key_padding_mask"}


def test_attention_maps_are_distributions():
    model = _model().eval()
    seq, _ = _batch()
    maps = model.attention_maps(seq)
    assert {"A", "P", "M", "P_att", "P_cal"} <= set(maps)
    real = ~maps["key_padding_mask"]
    for name in ("A", "P", "M", "P_att", "P_cal"):
        rows = maps[name].sum(-1)  # (B, H, n)
        torch.testing.assert_close(
            rows[real[:, None, :].expand_as(rows)], torch.ones_like(rows[real[:, None].expand_as(rows)])
        )
        assert torch.triu(maps[name], diagonal=1).abs().max() == 0  # nothing above the diagonal


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attention: expected one of \\['none', 'simp', 'add', 'value'\\]"):
        build_model("acsasrec", num_items=10, max_len=5, attention="stoc")
    with pytest.raises(ValueError, match="refine_input: expected 'probs'"):
        build_model("acsasrec", num_items=10, max_len=5, attention="simp", refine_input="scores")
    with pytest.raises(ValueError, match="mask_loss_weight"):
        build_model("acsasrec", num_items=10, max_len=5, mask_loss_weight=-1.0)
    with pytest.raises(ValueError, match="inner_size"):
        build_model("acsasrec", num_items=10, max_len=5, inner_size=0)


def test_prefix_arrays():
    seqs = sequences_from_lists([[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [3, 4, 5, 6, 7, 8, 9, 10]])
    users, inp, pos = prefix_arrays(seqs, 4)
    # training sequences (leave-one-out): [1 2 3 4], [7 8], [9], [3 4 5 6 7 8]
    assert users.tolist() == [1, 1, 1, 2, 4, 4, 4, 4, 4]
    assert inp.tolist() == [
        [0, 0, 0, 1],
        [0, 0, 1, 2],
        [0, 1, 2, 3],
        [0, 0, 0, 7],
        [0, 0, 0, 3],
        [0, 0, 3, 4],
        [0, 3, 4, 5],
        [3, 4, 5, 6],
        [4, 5, 6, 7],
    ]
    assert (pos[:, :-1] == 0).all() and pos[:, -1].tolist() == [2, 3, 4, 8, 4, 5, 6, 7, 8]


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def crafted():
    return build_dataset(sequences_from_lists(crafted_sequences(num_users=200), 50), max_len=20, name="crafted")


def _tiny(**kw):
    base = dict(
        model="acsasrec",
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_len=20,
        dropout=0.1,
        attn_dropout=0.1,
        lr=5e-3,
        batch_size=64,
        epochs=3,
        quiet=True,
        num_threads=1,
        seed=3,
    )
    base.update(kw)
    return base


@pytest.mark.parametrize("attention", ["none", "simp"])
def test_trains_and_beats_popularity(tmp_path, crafted, attention):
    final = train(_tiny(attention=attention, out=str(tmp_path / "run")), seq_dataset=crafted)
    test, pop = final["test"], final["popularity"]["test"]
    assert test["ndcg@10"] > 2 * pop["ndcg@10"], (test, pop)
    assert final["protocol"]["exclude_history"] is True  # the released protocol is the model's default
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_prefixes"] is True and config["attention"] == attention


def test_resume_is_bitwise_exact(tmp_path, crafted):
    cfg = _tiny(epochs=3)
    straight = train(cfg, out=str(tmp_path / "straight"), seq_dataset=crafted)
    train({**cfg, "epochs": 1}, out=str(tmp_path / "split"), seq_dataset=crafted)
    resumed = train(cfg, resume=str(tmp_path / "split"), seq_dataset=crafted)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = [{k: v for k, v in r.items() if k not in ("epoch_s", "eval_s")} for r in read_metrics(tmp_path / "split")]
    assert strip == [
        {k: v for k, v in r.items() if k not in ("epoch_s", "eval_s")} for r in read_metrics(tmp_path / "straight")
    ]
    assert straight["test"] == resumed["test"]


def test_cli_defaults_are_the_released_configuration():
    cfg = config_from_args(["--model", "acsasrec"])
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.max_len) == (3, 4, 64, 50)
    assert (cfg.dropout, cfg.attn_dropout, cfg.lr, cfg.batch_size, cfg.mask_loss_weight) == (0.5, 0.5, 1e-4, 256, 0.03)
    assert cfg.train_prefixes and cfg.exclude_history and cfg.attention == "none"
    cfg = config_from_args(["--model", "acsasrec", "--n-layers", "2", "--no-train-prefixes", "--lr", "1e-3"])
    assert (cfg.n_layers, cfg.train_prefixes, cfg.lr, cfg.n_heads) == (2, False, 1e-3, 4)
    assert config_from_args([]).n_layers == 2  # other models keep TrainConfig's defaults
    model = build_model("acsasrec", **cfg.model_kwargs(30))
    assert isinstance(model, ACSASRec) and model.blocks[0].ffn.dense_1.out_features == 128
    with pytest.raises(SystemExit):
        config_from_args(["--model", "acsasrec", "--attention", "stoc"])
    assert config_from_args(["--model", "acsasrec", "--attention", "simp"]).attention == "simp"


def test_ddp_two_process_gloo(tmp_path):
    """Under torchrun the routed model trains without DDP's wrapper; the loop averages its gradients."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    data = tmp_path / "crafted.txt"
    data.write_text("".join(f"{u + 1} {i}\n" for u, s in enumerate(crafted_sequences(num_users=80)) for i in s))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "awr_fast.train"]
    cmd += ["--model", "acsasrec", "--epochs", "2", "--data", str(data), "--out", str(out), "--device", "cpu"]
    cmd += ["--quiet", "--kcore", "none", "--d-model", "16", "--n-layers", "1", "--max-len", "20", "--lr", "5e-3"]
    cmd += ["--batch-size", "64", "--num-threads", "1", "--eval-batch-size", "64"]
    res = subprocess.run(cmd, env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=300, check=False)
    check_subprocess(res, "torchrun")
    final = json.loads((out / "final.json").read_text())
    assert final["timing"]["world_size"] == 2 and [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert np.isfinite(read_metrics(out)[-1]["loss"])


def test_compile_trains_the_same_model(tmp_path):
    """--compile with the routed loss (two backward passes over one compiled graph): an epoch without
    dropout gives the eager run's loss and gradient norm."""
    small = build_dataset(sequences_from_lists(crafted_sequences(num_users=40), 50), max_len=20, name="crafted")
    kwargs = dict(dropout=0.0, attn_dropout=0.0, epochs=1, patience=0, trim_padding=False, d_model=16)
    records = {}
    for compiled in (False, True):
        out = tmp_path / f"compile{compiled}"
        train(_tiny(compile=compiled, out=str(out), **kwargs), seq_dataset=small)
        records[compiled] = read_metrics(out)[0]
    for key in ("loss", "grad_norm"):
        assert records[True][key] == pytest.approx(records[False][key], rel=1e-4), key
