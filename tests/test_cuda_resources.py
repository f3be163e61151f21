"""The CUDA extension's compiled resources, checked on every build (bench/cuda_resources.py): no spills,
launch bounds and shared memory within each architecture's limits. Needs no GPU: cuobjdump reads the
library's device code."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import cuda_resources  # noqa: E402

from awr_fast._ext import load_cuda_extension  # noqa: E402

built = pytest.mark.skipif(
    load_cuda_extension()[0] is None, reason=f"CUDA extension not built: {load_cuda_extension()[1]}"
)


@built
def test_the_built_library_passes_the_resource_check(tmp_path):
    lib = cuda_resources.library_path()
    rows = cuda_resources.read_resources(lib)
    for r in rows:
        r["dynamic_shared"] = cuda_resources.dynamic_shared(r["kernel"])
    archs = cuda_resources.expected_archs()
    assert archs, "the build recorded no architecture list"
    kernels = {r["kernel"] for r in rows}
    for name in (
        "refine.forward_kernel<dot_refined.Family, float>",
        "refine.backward_kernel<dot_refined.Family, __nv_bfloat16>",
        "refine.backward_kernel<w2_refined.Family, __half>",
        "w2_scores_kernel<float>",
        "w2_topk_kernel<__nv_bfloat16, 4>",
        "exclusion_bits_kernel",
    ):
        assert name in kernels, sorted(kernels)
    assert {r["arch"] for r in rows} >= set(archs)
    assert cuda_resources.check(rows, archs) == []
    assert cuda_resources.main(["--check", "--out", str(tmp_path / "report")]) == 0
    assert "Check: passed" in (tmp_path / "report.md").read_text()


def test_the_check_catches_spills_registers_shared_memory_and_missing_archs():
    clean = dict(arch=90, kernel="k", registers=64, stack=0, local=0, static_shared=1024, dynamic_shared={"n=64": 1000})
    assert cuda_resources.check([clean], [90]) == []
    spill = {**clean, "stack": 8}
    regs = {**clean, "registers": 300}
    smem = {**clean, "dynamic_shared": {"n=64 value": 232448}}
    problems = cuda_resources.check([spill, regs, smem], [80, 90])
    assert any("sm_80" in p and "no device code" in p for p in problems)
    assert any("spills" in p for p in problems)
    assert any("registers" in p for p in problems)
    assert any("shared memory" in p and "n=64 value" in p for p in problems)
