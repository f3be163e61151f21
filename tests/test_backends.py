"""Every (op, backend) the registry lists, against the float64 oracle: values and every gradient over the
shared grid (awr_fast.testing). A new backend gets these tests by being registered in its op's
CAPABILITIES; only what cannot run on this machine skips (and says why).

The reference itself runs in float32 here (in float64 it is the oracle); the Triton interpreter runs the
small grid (each case takes seconds on the CPU); on a GPU the kernel backends run the full grid.
"""

import pytest
import torch

from awr_fast import backends, testing
from awr_fast.ops import SPECS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(backend, row):
    if backend == "reference" or torch.float64 not in row.dtypes:
        return torch.float32
    return torch.float64


def _cases():
    out = []
    for op, spec in SPECS.items():
        for backend, row in backends.capabilities(op).items():
            small = backend in backends.DEVICE_BACKENDS and DEVICE == "cpu"
            mechanisms = [m for m in spec.MECHANISMS if row.mechanisms is None or m in row.mechanisms]
            for kwargs in testing.grid(op, mechanisms or None, small=small):
                if kwargs.get("mechanism", None) not in (None, *mechanisms) and op != "calibrated":
                    continue
                label = "-".join(str(v) for v in kwargs.values())
                out.append(pytest.param(op, backend, kwargs, id=f"{op}-{backend}-{label}"))
    return out


@pytest.mark.filterwarnings("ignore:mechanism='value_literal'")
@pytest.mark.parametrize("op,backend,kwargs", _cases())
def test_backend_matches_oracle(op, backend, kwargs):
    row = backends.capabilities(op)[backend]
    reasons = backends.device_reasons(backend, torch.device(DEVICE), row)  # the row: CUDA host emulation
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")
    case = testing.make_case(op, **kwargs, dtype=_dtype(backend, row), device=DEVICE)
    testing.assert_matches_oracle(case, backend, grad=row.grad)  # a forward-only backend: values only


def test_every_op_has_the_reference_and_auto_takes_every_valid_input(backend_log):
    for op in SPECS:
        assert "reference" in backends.capabilities(op), op
    case = testing.make_case("dot_refined", "value_literal", n=5)
    with pytest.warns(UserWarning, match="not causal"):
        testing.run(case, "auto")
    assert backend_log() == {"dot_refined": "reference"}


@pytest.mark.parametrize("op", ["dot_refined", "w2_refined"])
def test_auto_on_cpu_runs_eager(op, backend_log):
    mechanism = "simp"
    case = testing.make_case(op, mechanism, n=9, padding="left")
    inputs = SPECS[op].make_inputs(*case.tensors.values(), mechanism=mechanism, **case.weights, **case.options)
    # triton takes CPU tensors under the interpreter, but only when named: "auto" skips the kernel backends
    assert backends.select(op, "auto", inputs) == "eager"
    testing.run(case, "auto")
    assert backend_log() == {op: "eager"}


@pytest.mark.parametrize(
    "op,backend,mechanism,expected",
    [
        ("dot_refined", "eager", "none", "plain attention has nothing to factor"),
        ("dot_refined", "eager", "value_literal", "not causal"),
        ("dot_refined", "triton", "value_literal", "not causal"),
        ("w2_refined", "eager", "none", "plain W2 attention has nothing to factor"),
    ],
)
def test_refusals_say_why(op, backend, mechanism, expected):
    case = testing.make_case(op, mechanism, n=5)
    inputs = SPECS[op].make_inputs(*case.tensors.values(), mechanism=mechanism, **case.weights, **case.options)
    reasons = backends.capabilities(op)[backend].table_reasons(inputs)
    assert any(expected in r for r in reasons), reasons
    assert backends.select(op, "auto", inputs) == "reference"


def test_table_refusals_cover_every_column():
    row = backends.capabilities("dot_refined")["triton"]
    case = testing.make_case("dot_refined", "simp", n=5, dtype=torch.float64)
    inputs = SPECS["dot_refined"].make_inputs(
        *case.tensors.values(), mechanism="simp", **case.weights, dropout_p=0.1, return_weights=True
    )
    text = " | ".join(row.table_reasons(inputs))
    assert "dtype torch.float64 is not supported" in text
    assert "return_weights=True is not supported" in text
    big = testing.make_case(
        "dot_refined", "none", n=row.max_n + 1, d_h=row.max_d_h + 1, batch=1, heads=1, dtype=torch.float32
    )
    text = " | ".join(row.table_reasons(SPECS["dot_refined"].make_inputs(*big.tensors.values(), mechanism="none")))
    assert f"n={row.max_n + 1} exceeds" in text and f"d_h={row.max_d_h + 1} exceeds" in text
