"""Backend capabilities as data (xformers' AttentionOpBase is the model): what one backend can run of one
op, and the one generic function that turns a row and an inputs record into refusal reasons, in words."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Every backend, in the order "auto" tries them (the first that takes the inputs runs them).
BACKENDS = ("cuda", "triton", "eager", "reference")
#: Backends that compile kernels for a GPU: "auto" picks them only for CUDA tensors (on CPU tensors the
#: Triton interpreter is correct but slow, so it runs only when named).
DEVICE_BACKENDS = ("cuda", "triton")

ALL_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


class InputsRecord:
    """What every ops.<op>.Inputs record shows the capability rows: `lead` is its first (B, H, n, d_h)
    tensor, `leaves()` the tensors a gradient may flow to."""

    __slots__ = ()

    @property
    def dtype(self) -> torch.dtype:
        return self.lead.dtype

    @property
    def device(self) -> torch.device:
        return self.lead.device

    @property
    def n(self) -> int:
        return self.lead.shape[2]

    @property
    def d_h(self) -> int:
        return self.lead.shape[3]

    @property
    def grid(self) -> int:
        return self.lead.shape[0] * self.lead.shape[1]

    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.leaves())


@dataclass(frozen=True)
class Capability:
    """What `backend` supports of one op. `module` holds the op under the op's own name, with the
    reference's signature; `reasons` names an optional function of that module, (inputs) -> [str], for
    what does not fit the table (its module is imported only when every table check passes)."""

    backend: str
    module: str
    dtypes: tuple = ALL_FLOAT
    mechanisms: tuple | None = None  # None: every mechanism of the op
    max_n: int | None = None
    max_d_h: int | None = None
    max_grid: int | None = None  # batch * heads, one program each
    dropout: bool = True
    grad: bool = True
    weights: bool = False  # return_weights=True (the attention maps)
    reasons: str | None = None
    #: the CUDA backend's op also runs its block code on CPU tensors under AWR_FAST_CUDA_EMULATE=1
    host_emulation: bool = False
    #: why "auto" does not pick this row (None: it does); a named backend still runs it
    not_auto: str | None = None
    why_not: dict | None = None  # mechanism -> why the backend lacks it (said in the refusal)

    def table_reasons(self, inputs) -> list[str]:
        """The reasons this row refuses `inputs` (an ops.<op>.Inputs record); [] if it takes them."""
        out = []
        if inputs.dtype not in self.dtypes:
            out.append(f"dtype {inputs.dtype} is not supported (expected {dtype_names(self.dtypes)})")
        mechanism = inputs.mechanism
        if self.mechanisms is not None and mechanism not in self.mechanisms:
            why = (self.why_not or {}).get(mechanism)
            out.append(
                f"mechanism={mechanism!r} is not implemented here"
                + (f" ({why})" if why else f" (it has {', '.join(self.mechanisms)})")
            )
        if self.max_n is not None and inputs.n > self.max_n:
            out.append(f"n={inputs.n} exceeds this backend's limit of {self.max_n}")
        if self.max_d_h is not None and inputs.d_h > self.max_d_h:
            out.append(f"d_h={inputs.d_h} exceeds this backend's limit of {self.max_d_h}")
        if self.max_grid is not None and inputs.grid > self.max_grid:
            out.append(f"batch*heads={inputs.grid} exceeds the launch grid limit of {self.max_grid}")
        if not self.dropout and inputs.dropout_p > 0:
            out.append(f"dropout_p={inputs.dropout_p} is not supported (only 0)")
        if not self.grad and inputs.requires_grad():
            out.append("inputs require grad and this backend has no backward")
        if not self.weights and inputs.return_weights:
            out.append("return_weights=True is not supported (the fused kernels never store the n x n weights)")
        return out
