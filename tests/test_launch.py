"""kernels/_launch.py's direct launch against Triton's own path, on the sm_90 stand-in driver of
bench/kernel_resources.py (kernels compiled for the GPU, each launch a recorded no-op): the direct path
must hand the compiled launcher exactly the arguments Triton's ``JITFunction.run`` hands it, and must
actually be taken once a specialization is cached."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, "bench")
import kernel_resources
kernel_resources.install_stand_in(90)
import torch
import triton
from kernel_resources import _Launcher
from awr_fast.kernels import _launch, dot_refined, w2_refined

g = torch.Generator().manual_seed(3)
b, h, n, d = 2, 2, 9, 16

def leaf(*shape):
    return torch.randn(*shape, generator=g).requires_grad_(True)

q, k, v = leaf(b, h, n, d), leaf(b, h, n, d), leaf(b, h, n, d)
mask = torch.zeros(b, n, dtype=torch.bool)
mask[1, :4] = True
w = {"w_rq": leaf(n, 3), "w_rk": leaf(n, 3)}
wv = {"w_rv": leaf(n, n)}
mu = [leaf(b, h, n, d) for _ in range(3)]
sig = [torch.rand(b, h, n, d, generator=g).add(0.1).requires_grad_(True) for _ in range(3)]

CASES = {
    "dot none": lambda: dot_refined.dot_refined(q, k, v, mechanism="none", key_padding_mask=mask),
    "dot simp": lambda: dot_refined.dot_refined(q, k, v, mechanism="simp", key_padding_mask=mask, **w),
    "dot value dropout": lambda: dot_refined.dot_refined(
        q, k, v, mechanism="value", key_padding_mask=mask, dropout_p=0.2, **w, **wv),
    "w2 add": lambda: sum(w2_refined.w2_refined(
        mu[0], sig[0], mu[1], sig[1], mu[2], sig[2], mechanism="add", key_padding_mask=mask, **w)),
}

INPUTS = {"q": q, "k": k, "v": v, "mask": mask, **w, **wv, "mu_q": mu[0], "mu_k": mu[1], "mu_v": mu[2],
          "sig_q": sig[0], "sig_k": sig[1], "sig_v": sig[2]}
NAMES = {t.data_ptr(): name for name, t in INPUTS.items()}  # inputs by name: a swapped argument shows

def describe(a):
    if isinstance(a, torch.Tensor):
        return ["tensor", NAMES.get(a.data_ptr(), "internal"), str(a.dtype), list(a.shape), list(a.stride())]
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    return type(a).__name__

def hook_state(x):  # None, or (type, registered calls of a HookChain; -1 for anything else)
    if x is None:
        return None
    return (type(x).__name__, len(x.calls) if type(x).__name__ == "HookChain" else -1)

def one_call(fn):
    _Launcher.calls.clear()
    torch.manual_seed(5)  # the same dropout seed in every call
    fn().sum().backward()
    out = []
    for metadata, args in _Launcher.calls:
        grid_stream_function = [describe(a) for a in args[:5]]
        packed = args[5]
        hooks = args[6:9]
        out.append({
            "kernel": metadata.name,
            "head": grid_stream_function,
            "packed_is_kernels": packed is not None,
            "hooks": [hook_state(x) for x in hooks],
            "params": [describe(a) for a in args[9:]],
        })
    return out

_Launcher.record = True
report = {}
for name, fn in CASES.items():
    runs = [one_call(fn) for _ in range(3)]
    memo = {f.__name__: len(m.kernels) for f, m in _launch._MEMOS.items()}
    report[name] = {"runs": runs, "memo": memo}
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def launches():
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("AWR_FAST_DIRECT_LAUNCH", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


CASES = ("dot none", "dot simp", "dot value dropout", "w2 add")


@pytest.mark.parametrize("case", CASES)
def test_direct_launch_passes_what_triton_passes(launches, case):
    first, *later = launches[case]["runs"]  # the first call goes through Triton (compile and cache)
    assert first, "no launch recorded"
    for run in later:
        assert [x["kernel"] for x in run] == [x["kernel"] for x in first]
        for via_triton, direct in zip(first, run):
            assert direct["head"] == via_triton["head"] and direct["params"] == via_triton["params"]
            assert direct["packed_is_kernels"] == via_triton["packed_is_kernels"]
            # Triton passes its (empty) hook chains and their metadata; the direct path passes None
            assert direct["hooks"] == [None, None, None]
            assert via_triton["hooks"][1:] in ([["HookChain", 0], ["HookChain", 0]], [None, None])


@pytest.mark.parametrize("case", CASES)
def test_direct_launch_is_taken_after_the_first_call(launches, case):
    first = launches[case]["runs"][0]
    memo = launches[case]["memo"]
    for launch in first:
        assert memo.get(launch["kernel"], 0) >= 1, f"{launch['kernel']} was never remembered: {memo}"
