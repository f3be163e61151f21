"""The install itself: package layout, the info command, the CUDA extension (built or explained).

These tests need the package installed (``pip install -e ".[test]"``, the README's install command):
they check what a user gets, so several run in a subprocess outside the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("reference", "triton", "cuda")


def run_python(args, cwd, timeout=300):
    """Run the test's interpreter in `cwd` (outside the repo, so only the installed package is seen)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_kernels_install_as_subpackage(tmp_path):
    code = (
        "import importlib.util, json\n"
        "import awr_fast, awr_fast.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'awr_fast': awr_fast.__file__, 'kernels_pkg': awr_fast.kernels.__file__,\n"
        "                  'top_kernels': spec.origin if spec else None}))\n"
    )
    proc = run_python(["-c", code], cwd=tmp_path)
    assert proc.returncode == 0, (
        "awr_fast.kernels is not importable from the installed package; run the README's install command "
        f'(pip install -e ".[test]") first.\n{proc.stderr}'
    )
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels_dir = Path(found["kernels_pkg"]).resolve().parent
    assert kernels_dir.name == "kernels" and (kernels_dir == REPO / "kernels" or kernels_dir.parent.name == "awr_fast")
    top = found["top_kernels"]
    if top is not None:  # some unrelated `kernels` module may exist, but never ours nor in site-packages
        top_path = Path(top).resolve()
        assert "site-packages" not in top_path.parts, f"a top-level `kernels` module is installed: {top}"
        assert REPO not in top_path.parents, f"the project's kernels/ leaks as a top-level module: {top}"


def test_distribution_declares_only_awr_fast():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("awr_fast")
    except PackageNotFoundError:
        pytest.fail('awr_fast is not installed; run pip install -e ".[test]" first')
    top_level = (dist.read_text("top_level.txt") or "awr_fast").split()
    assert top_level == ["awr_fast"]


def test_info_command_lists_every_backend(tmp_path):
    proc = run_python(["-m", "awr_fast.info"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("awr_fast", "torch", "triton", "numpy", "TRITON_INTERPRET", "CUDA extension", *BACKENDS):
        assert word in out, f"{word!r} missing from python -m awr_fast.info:\n{out}"


def test_info_json(tmp_path):
    proc = run_python(["-m", "awr_fast.info", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert set(BACKENDS) <= set(info["backends"])
    for name in BACKENDS:
        entry = info["backends"][name]
        assert isinstance(entry["usable"], bool) and entry["reason"]
    assert info["backends"]["reference"]["usable"] is True
    assert isinstance(info["cuda_extension"]["loaded"], bool) and info["cuda_extension"]["reason"]


def test_info_in_process_matches_cuda_status():
    from awr_fast import info
    from awr_fast._ext import cuda_status

    report = info.collect()
    assert report["backends"]["cuda"]["usable"] == cuda_status()[0]
    assert "backends (" in info.render(report)
    assert report["backends"]["eager"]["ops"] == ["dot_refined", "w2_refined"]


# ------------------------------------------------------------------------------------- CUDA extension


def _extension():
    from awr_fast._ext import load_cuda_extension

    return load_cuda_extension()


def test_cuda_status_is_explained():
    from awr_fast._ext import cuda_status

    usable, reason = cuda_status()
    assert isinstance(usable, bool)
    assert isinstance(reason, str) and len(reason) > 10
    if usable and not torch.cuda.is_available():  # only the emulation makes it usable without a device
        from awr_fast.cuda import emulate

        assert emulate() and "AWR_FAST_CUDA_EMULATE=1" in reason


def test_missing_extension_is_a_reason_not_a_crash():
    module, reason = _extension()
    if module is not None:
        pytest.skip(f"the CUDA extension is built ({reason})")
    assert "awr_fast._C" in reason or "CUDA" in reason
    from awr_fast._ext import w2_scores_cuda

    x = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="w2_scores_cuda"):
        w2_scores_cuda(x, x, x, x)


def test_extension_registers_op_and_rejects_cpu_tensors():
    module, reason = _extension()
    if module is None:
        pytest.skip(f"the CUDA extension is not available: {reason}")
    ops = ["w2_scores_cuda", "w2_topk_cuda"]
    ops += [f"{op}_cuda_{part}" for op in ("dot_refined", "w2_refined") for part in ("fwd", "bwd")]
    for op in ops + ["dot_refined_cuda_smem_bytes", "w2_refined_cuda_smem_bytes", "w2_topk_cuda_smem_bytes"]:
        assert hasattr(torch.ops.awr_fast, op), op
    # the top-k keeps 64 rows x k_pad int64 keys in shared memory, k_pad in {32, 64, 128}
    assert [torch.ops.awr_fast.w2_topk_cuda_smem_bytes(k) for k in (1, 32, 33, 64, 65, 128)] == [
        64 * 32 * 8,
        64 * 32 * 8,
        64 * 64 * 8,
        64 * 64 * 8,
        64 * 128 * 8,
        64 * 128 * 8,
    ]
    with pytest.raises(RuntimeError, match=r"w2_topk_cuda_smem_bytes: k must be in \[1, 128\], got 129"):
        torch.ops.awr_fast.w2_topk_cuda_smem_bytes(129)
    mu, sig = torch.randn(4, 8), torch.rand(4, 8) + 0.5
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.ops.awr_fast.w2_scores_cuda(mu, sig, mu, sig)


def test_extension_fake_kernel_traces():
    """The fake (meta) kernel gives shape and dtype without running anything: what torch.compile needs."""
    module, reason = _extension()
    if module is None:
        pytest.skip(f"the CUDA extension is not available: {reason}")
    mu = torch.empty(5, 7, device="meta", dtype=torch.bfloat16)
    items = torch.empty(11, 7, device="meta", dtype=torch.bfloat16)
    out = torch.ops.awr_fast.w2_scores_cuda(mu, mu, items, items)
    assert out.shape == (5, 11) and out.dtype == torch.float32 and out.device.type == "meta"
    import awr_fast.cuda.w2_scores  # noqa: F401  registers the top-k's fake kernel

    values, indices = torch.ops.awr_fast.w2_topk_cuda(mu, mu, items, items, 3, None, False)
    assert values.shape == indices.shape == (5, 3) and (values.dtype, indices.dtype) == (torch.float32, torch.int64)


# ------------------------------------------------------------------------------- GPU: numerical check


def w2_scores_float64(mu, sig, item_mu, item_sig):
    """SPEC §4 in float64, written as the distance itself (no expansion)."""
    mu, sig, item_mu, item_sig = (t.double() for t in (mu, sig, item_mu, item_sig))
    mean = ((mu[:, None, :] - item_mu[None, :, :]) ** 2).sum(-1)
    root_q, root_i = sig.clamp_min(1e-24).sqrt(), item_sig.clamp_min(1e-24).sqrt()
    cov = (sig[:, None, :] + item_sig[None, :, :] - 2 * root_q[:, None, :] * root_i[None, :, :]).sum(-1)
    return mean + cov


def _gpu_ready():
    if not torch.cuda.is_available():
        return "no CUDA device"
    from awr_fast._ext import cuda_status

    usable, reason = cuda_status()
    return None if usable else reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 1001, 50), (1, 1, 1), (64, 64, 16), (130, 257, 64), (3, 70, 17)])
def test_w2_scores_cuda_matches_float64(dtype, shape):
    why = _gpu_ready()
    if why:
        pytest.skip(why)
    from awr_fast._ext import w2_scores_cuda

    batch, items, d = shape
    gen = torch.Generator(device="cuda").manual_seed(batch * 7919 + items + d)
    mu = torch.randn(batch, d, device="cuda", generator=gen).to(dtype)
    sig = (torch.nn.functional.elu(torch.randn(batch, d, device="cuda", generator=gen)) + 1).to(dtype)
    item_mu = torch.randn(items, d, device="cuda", generator=gen).to(dtype)
    item_sig = (torch.nn.functional.elu(torch.randn(items, d, device="cuda", generator=gen)) + 1).to(dtype)
    out = w2_scores_cuda(mu, sig, item_mu, item_sig)
    assert out.shape == (batch, items) and out.dtype == torch.float32
    # The oracle sees the same (rounded) inputs; the kernel accumulates in float32, so its error is a
    # float32 rounding error of the expanded form, relative to the norms that cancel.
    ref = w2_scores_float64(mu, sig, item_mu, item_sig)
    norms = (mu.double() ** 2 + sig.double()).sum(-1)[:, None] + (item_mu.double() ** 2 + item_sig.double()).sum(-1)[
        None, :
    ]
    err = (out.double() - ref).abs()
    bound = 1e-6 + 8 * d * torch.finfo(torch.float32).eps * norms
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e}, worst ratio {(err / bound).max().item():.2f}"


def test_w2_scores_cuda_noncontiguous_and_compile():
    why = _gpu_ready()
    if why:
        pytest.skip(why)
    from awr_fast._ext import w2_scores_cuda

    mu = torch.randn(50, 9, device="cuda").t()  # (9, 50), not contiguous
    sig = torch.rand(50, 9, device="cuda").t() + 0.1
    item_mu, item_sig = torch.randn(33, 50, device="cuda"), torch.rand(33, 50, device="cuda") + 0.1
    expected = w2_scores_float64(mu, sig, item_mu, item_sig)
    torch.testing.assert_close(w2_scores_cuda(mu, sig, item_mu, item_sig).double(), expected, rtol=1e-4, atol=1e-3)
    compiled = torch.compile(lambda a, b, c, e: torch.ops.awr_fast.w2_scores_cuda(a, b, c, e), fullgraph=True)
    args = (mu.contiguous(), sig.contiguous(), item_mu, item_sig)
    torch.testing.assert_close(compiled(*args).double(), expected, rtol=1e-4, atol=1e-3)
    torch.library.opcheck(
        torch.ops.awr_fast.w2_scores_cuda.default, args, test_utils=("test_schema", "test_faketensor")
    )


# Every C++ check of the CUDA ops, fired on purpose: (op, argument-building code, the words the error
# must contain). On CPU tensors they run here (the host emulation for the fused ops); on a GPU on device.
_BAD_CALLS = [
    ("w2_scores_cuda", "mu, sig, mu, sig.half()", "item_sig must have the dtype of mu"),
    ("w2_scores_cuda", "mu, sig, torch.randn(4, 7, device=dev), torch.rand(4, 7, device=dev)", "item_mu must have 8"),
    ("w2_scores_cuda", "mu, sig[:, ::2], mu, sig", "sig must be"),
    ("w2_scores_cuda", "mu.double(), sig.double(), mu.double(), sig.double()", "mu must be float32"),
    ("dot_refined_cuda_fwd", "q, q.half(), q, None, None, None, None, None, 'none', 0.5, 0.5, False, 0.0", "k must"),
    ("dot_refined_cuda_fwd", "q, q, q, w, None, None, None, None, 'simp', 0.5, 0.5, False, 0.0", "needs w_rk"),
    ("dot_refined_cuda_fwd", "q, q, q, None, None, None, None, None, 'none', 0.5, 0.5, False, 0.3", "needs seed"),
    ("w2_refined_cuda_fwd", "q, q, q, q, q, q[..., :2], *[None] * 7, 'none', 0.5, 0.5, False, 0.0", "sig_v must"),
    ("w2_topk_cuda", "mu, sig, mu, sig, 5, None, False", "k must be in [1, 4]"),
    ("w2_topk_cuda", "mu, sig, mu, sig, 2, torch.zeros(3, 4, dtype=torch.bool, device=dev), False", "(B, V) = (4, 4)"),
    ("w2_topk_cuda", "mu, sig, mu, sig, 2, torch.zeros(4, 2, device=dev), False", "exclude must be a bool"),
    ("w2_topk_cuda", "mu, sig, mu[:, :3].contiguous(), sig[:, :3].contiguous(), 2, None, False", "item_mu must have 8"),
]

_BAD_CALL_SCRIPT = """
import sys, torch
import awr_fast._ext as ext
assert ext.load_cuda_extension()[0] is not None
dev = sys.argv[1]
mu, sig = torch.randn(4, 8, device=dev), torch.rand(4, 8, device=dev)
q, w = torch.randn(2, 2, 6, 4, device=dev), torch.randn(6, 6, device=dev)
for op, args, words in {calls!r}:
    if dev == "cpu" and op == "w2_scores_cuda":
        words = "mu must be a CUDA tensor"  # on CPU tensors its first check is the device's
    try:
        eval(f"torch.ops.awr_fast.{{op}}({{args}})")
    except RuntimeError as exc:
        assert words in str(exc), (op, args, str(exc)[:300])
        print("raised:", str(exc).splitlines()[0][:160], flush=True)
    else:
        raise AssertionError(f"no error from {{op}}({{args}})")
print("all raised")
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_op_checks_raise_python_errors_never_crash(device):
    """Each C++ TORCH_CHECK of the CUDA ops raises a RuntimeError naming the argument. Run in a child
    process, so that a crash (the H100 run of 2026-11-22 segfaulted in w2_scores_cuda's dtype check on
    torch 2.11) fails this test with its signal instead of killing the test session. On CPU the same
    checks raise on torch 2.14 here and on torch 2.11 + triton 3.6 (the GPU image's versions, checked
    2026-12-03 in a venv on the CPU machine)."""
    module, reason = _extension()
    if module is None:
        pytest.skip(f"the CUDA extension is not available: {reason}")
    if device == "cuda":
        why = _gpu_ready()
        if why:
            pytest.skip(why)
    script = _BAD_CALL_SCRIPT.format(calls=_BAD_CALLS)
    env = {**os.environ, "AWR_FAST_CUDA_EMULATE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, device], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (
        f"exit {proc.returncode} (negative: killed by that signal)\n{proc.stdout}\n{proc.stderr}"
    )
    assert proc.stdout.count("raised:") == len(_BAD_CALLS)
    assert "all raised" in proc.stdout


def test_cuda_w2_scores_row_takes_gradients_and_refuses_float64():
    """The CUDA backend has a backward (w2_scores_cuda_bwd), so grad-requiring inputs are taken; float64 is
    not a kernel dtype. Its capability row says so in words."""
    from awr_fast.backends import capabilities
    from awr_fast.ops import w2_scores as spec

    row = capabilities("w2_scores")["cuda"]
    mu, sig = torch.randn(3, 8, requires_grad=True), torch.rand(3, 8) + 0.1
    items = {"item_mu": torch.randn(5, 8), "item_sig": torch.rand(5, 8) + 0.1}
    assert row.table_reasons(spec.make_inputs(mu, sig, **items)) == []
    doubles = spec.make_inputs(mu.detach().double(), sig.double(), **{k: v.double() for k, v in items.items()})
    assert any("float64" in r for r in row.table_reasons(doubles))


def test_w2_scores_backward_op_matches_autograd_of_the_reference():
    """The backward is ATen code in the C++ op, so it runs on CPU tensors too: float64 against autograd
    of the float64 reference, with a clamped covariance entry (its square root's gradient is zero)."""
    module, reason = _extension()
    if module is None:
        pytest.skip(f"the CUDA extension is not available: {reason}")
    from awr_fast.reference.w2_scores import w2_scores as reference

    g = torch.Generator().manual_seed(3)
    f64 = dict(generator=g, dtype=torch.float64)
    mu, item_mu = torch.randn(6, 5, **f64), torch.randn(9, 5, **f64)
    sig, item_sig = torch.rand(6, 5, **f64) + 0.2, torch.rand(9, 5, **f64) + 0.2
    sig[0, 0] = 0.0  # below the clamp
    grad = torch.randn(6, 9, **f64)
    leaves = [t.clone().requires_grad_(True) for t in (mu, sig, item_mu, item_sig)]
    expected = torch.autograd.grad(reference(*leaves), leaves, grad)
    got = torch.ops.awr_fast.w2_scores_cuda_bwd(grad, mu, sig, item_mu, item_sig)
    for name, a, b in zip(("dmu", "dsig", "ditem_mu", "ditem_sig"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    with pytest.raises(RuntimeError, match=r"grad must be \(B, V\)"):
        torch.ops.awr_fast.w2_scores_cuda_bwd(grad[:, :4], mu, sig, item_mu, item_sig)


def test_w2_scores_cuda_gradients_on_the_gpu():
    why = _gpu_ready()
    if why:
        pytest.skip(why)
    from awr_fast.testing import assert_matches_oracle, make_case

    for batch, d in ((1, 1), (5, 16), (33, 64)):
        assert_matches_oracle(make_case("w2_scores", batch=batch, d_h=d, dtype=torch.float32, device="cuda"), "cuda")
