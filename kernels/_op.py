"""Plumbing shared by the Triton families: one (forward, backward, fake forward) triple becomes

- two torch.library custom ops, ``awr_fast::<name>_fwd`` and ``awr_fast::<name>_bwd``, with fake kernels
  and an autograd rule, which torch.compile traces (fullgraph, no graph break), and
- an eager autograd.Function that calls the same forward and backward without the custom-op dispatch
  layers (at recommender sizes the host, not the GPU, sets the pace of an eager call).

A family supplies, for an op with ``outputs`` results (1: a tensor, else a tuple of them),
    forward(*tensors, *options) -> (*outs, *saved)                    saved entries may be None
    backward(*grads, *tensors, *outs, *saved, *options) -> one gradient (or None) per differentiable input
    fake_forward(*tensors, *options) -> what forward returns, with empty tensors for None
and calls ``op(*tensors, *options)``. In the custom ops a None among the saved tensors or gradients
travels as an empty tensor (a Tensor[] cannot hold None); the backward is written to accept either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_SCHEMA_TYPES = {"str": "str", "float": "float", "bool": "bool", "int": "int"}


def _empty_like_none(reference: torch.Tensor) -> torch.Tensor:
    return reference.new_empty(0, dtype=torch.float32)


class TritonOp:
    """A family's op: ``TritonOp(name, tensors, options, differentiable, forward, backward, fake_forward,
    outputs=1)``.

    tensors: the tensor inputs in call order, a trailing "?" on the optional ones (None allowed);
    options: (name, type) of the non-tensor inputs that follow them, type one of str, float, bool, int;
    differentiable: the tensor inputs that get a gradient, in the order backward returns them."""

    def __init__(
        self,
        name: str,
        tensors: Sequence[str],
        options: Sequence[tuple[str, str]],
        differentiable: Sequence[str],
        forward: Callable,
        backward: Callable,
        fake_forward: Callable,
        outputs: int = 1,
    ):
        self.name = name
        self.n_outputs = outputs
        self.tensor_names = [t.rstrip("?") for t in tensors]
        self.optional = [t.endswith("?") for t in tensors]
        self.options = list(options)
        unknown = set(differentiable) - set(self.tensor_names)
        if unknown:
            raise ValueError(f"differentiable: expected names among {self.tensor_names}, got {sorted(unknown)}")
        self.grad_index = [self.tensor_names.index(d) for d in differentiable]
        self.forward, self.backward, self.fake_forward = forward, backward, fake_forward
        self.n_tensors = len(self.tensor_names)
        decls = [f"Tensor{'?' if opt else ''} {t}" for t, opt in zip(self.tensor_names, self.optional)]
        decls += [f"{_SCHEMA_TYPES[kind]} {o}" for o, kind in self.options]
        self.fwd_op = torch.library.custom_op(
            f"awr_fast::{name}_fwd", self._fwd_impl, mutates_args=(), schema=f"({', '.join(decls)}) -> Tensor[]"
        )
        bwd_decls = ["Tensor[] grads", *decls[: self.n_tensors], "Tensor[] outputs", *decls[self.n_tensors :]]
        self.bwd_op = torch.library.custom_op(
            f"awr_fast::{name}_bwd", self._bwd_impl, mutates_args=(), schema=f"({', '.join(bwd_decls)}) -> Tensor[]"
        )
        self.fwd_op.register_fake(self._fwd_fake)
        self.bwd_op.register_fake(self._bwd_fake)
        self.fwd_op.register_autograd(self._backward_rule, setup_context=self._setup_context)

    # ---- custom ops (the torch.compile path)

    def _fwd_impl(self, *args):
        outputs = self.forward(*args)
        return [_empty_like_none(args[0]) if t is None else t for t in outputs]

    def _fwd_fake(self, *args):
        return list(self.fake_forward(*args))

    def _bwd_impl(self, grads_out, *args):
        tensors, saved, options = args[: self.n_tensors], args[self.n_tensors], args[self.n_tensors + 1 :]
        grads = self.backward(*grads_out, *tensors, *saved, *options)
        return [_empty_like_none(grads_out[0]) if g is None else g for g in grads]

    def _bwd_fake(self, grads_out, *args):
        tensors = args[: self.n_tensors]
        out = []
        for i in self.grad_index:
            out.append(_empty_like_none(grads_out[0]) if tensors[i] is None else torch.empty_like(tensors[i]))
        return out

    def _setup_context(self, ctx, inputs, output):
        ctx.save_for_backward(*inputs[: self.n_tensors], *output)
        ctx.options = tuple(inputs[self.n_tensors :])

    def _backward_rule(self, ctx, grads):
        saved = ctx.saved_tensors
        tensors, outputs = saved[: self.n_tensors], saved[self.n_tensors :]
        grads_in = self.bwd_op(list(grads[: self.n_outputs]), *tensors, list(outputs), *ctx.options)
        return self._per_input(tensors, grads_in)

    def _per_input(self, tensors, grads) -> tuple:
        """One entry per op input: the gradients of the differentiable tensors present, None elsewhere."""
        out: list = [None] * (self.n_tensors + len(self.options))
        for i, g in zip(self.grad_index, grads):
            if tensors[i] is not None:
                out[i] = g
        return tuple(out)

    # ---- the call

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            outs = self.fwd_op(*args)[: self.n_outputs]
        else:
            outs = _EagerFunction.apply(self, *args)
        if self.n_outputs == 1:
            return outs[0] if isinstance(outs, (list, tuple)) else outs
        return tuple(outs)


class _EagerFunction(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls."""

    @staticmethod
    def forward(ctx, op: TritonOp, *args):
        outputs = op.forward(*args)
        ctx.op = op
        ctx.save_for_backward(*args[: op.n_tensors], *outputs)
        ctx.options = args[op.n_tensors :]
        return outputs[0] if op.n_outputs == 1 else tuple(outputs[: op.n_outputs])

    @staticmethod
    def backward(ctx, *grads_out):
        op = ctx.op
        saved = ctx.saved_tensors
        tensors = saved[: op.n_tensors]
        grads = op.backward(*grads_out, *saved, *ctx.options)
        return (None, *op._per_input(tensors, grads))
