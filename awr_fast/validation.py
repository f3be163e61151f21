"""Input checks for the public API: every error names the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")


def check_tensor(name: str, t, *, dim: int | tuple[int, ...], floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dims = (dim,) if isinstance(dim, int) else dim
    if t.dim() not in dims:
        raise ValueError(f"{name}: expected a {' or '.join(map(str, dims))}-d tensor, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape=True, dtype=True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(t.shape)}")


def check_heads_layout(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> tuple[int, int, int, int]:
    """All tensors (B, H, n, d_h) with identical shape, dtype and device; returns (B, H, n, d_h)."""
    first_name, first = names[0], tensors[0]
    check_tensor(first_name, first, dim=4)
    for name, t in zip(names[1:], tensors[1:]):
        check_tensor(name, t, dim=4)
        check_same(name, t, first_name, first)
    batch, heads, n, d_h = first.shape
    if n < 1 or d_h < 1 or batch < 1 or heads < 1:
        raise ValueError(f"{first_name}: expected non-empty (B, H, n, d_h), got {tuple(first.shape)}")
    return batch, heads, n, d_h


def check_key_padding_mask(mask, batch: int, n: int, device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"key_padding_mask: expected a bool torch.Tensor of shape ({batch}, {n}), got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != (batch, n):
        raise ValueError(f"key_padding_mask: expected shape (B, n) = ({batch}, {n}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask: expected device {device}, got {mask.device}")


def check_refine_weight(name: str, w, n: int, heads: int, device, *, square: bool = True) -> None:
    """An (n, r) weight shared by all heads, or (H, n, r) per head: one row per input position. r = n
    (square) unless square=False, where any r >= 1 is allowed (e.g. the rows of a longer model's
    (max_len, max_len) matrix for the window of its last n positions)."""
    cols = str(n) if square else "r"
    expected = f"({n}, {cols}) shared or ({heads}, {n}, {cols}) per head (n = sequence length of the inputs)"
    if w is None:
        raise ValueError(f"{name}: required by this mechanism, expected a tensor of shape {expected}")
    check_tensor(name, w, dim=(2, 3))
    if w.device != device:
        raise ValueError(f"{name}: expected device {device}, got {w.device}")
    if w.shape[-2] != n or (square and w.shape[-1] != n) or w.shape[-1] < 1 or (w.dim() == 3 and w.shape[0] != heads):
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(w.shape)}")


def check_same_columns(name: str, w, ref_name: str, ref) -> None:
    if w.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name}: expected {ref.shape[-1]} columns (those of {ref_name}, the inner dimension of "
            f"the projections), got shape {tuple(w.shape)}"
        )


def check_unused(mechanism: str, **weights) -> None:
    for name, w in weights.items():
        if w is not None:
            raise ValueError(
                f"{name}: expected None (mechanism={mechanism!r} does not use it), "
                f"got {type(w).__name__} {tuple(getattr(w, 'shape', ()))}"
            )


def check_probability(name: str, p: float) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {p!r}")


def check_scale(name: str, s) -> None:
    if s is not None and (not isinstance(s, (int, float)) or not s > 0):
        raise ValueError(f"{name}: expected None or a positive float, got {s!r}")


def lengths_to_padding_mask(lengths, key_padding_mask, batch: int, n: int, device):
    """`lengths` (B,) ints describe left-padded sequences; returns the equivalent key_padding_mask."""
    if lengths is None:
        return key_padding_mask
    if key_padding_mask is not None:
        raise ValueError(
            f"lengths: expected None when key_padding_mask is given (pass one of them), got {type(lengths).__name__}"
        )
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"lengths: expected an int32/int64 torch.Tensor of shape ({batch},), got "
            f"{getattr(lengths, 'dtype', type(lengths).__name__)}"
        )
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"lengths: expected device {device}, got {lengths.device}")
    if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(((lengths < 0) | (lengths > n)).any()):  # free here: the values are on the host
            raise ValueError(
                f"lengths: expected values in [0, n={n}], got min {int(lengths.min())}, max {int(lengths.max())}"
            )
        return torch.arange(n)[None, :] < (n - lengths)[:, None]
    # On a GPU, reading the values back would block the host on every call (and break CUDA-graph
    # capture): they are clamped to [0, n] instead, so -1 reads as 0 (fully padded) and n + 1 as n.
    return torch.arange(n, device=device)[None, :] < (n - lengths.clamp(0, n))[:, None]
