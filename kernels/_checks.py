"""Shared pieces of the kernels' input validation."""

from __future__ import annotations

from torch import Tensor


def describe(x) -> str:
    """What a caller passed, for error messages: a tensor's shape, dtype and device, else type and value."""
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__} {x!r}"[:200]
