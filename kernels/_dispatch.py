"""Choosing between a Triton kernel and its PyTorch reference.

Every kernel in this package has two implementations with the same signature:
the Triton kernel (used for CUDA tensors) and a plain-PyTorch reference (used on
CPU, and the oracle in tests). Two environment switches, read at each call so
tests can flip them:

- ``ENGINE_FORCE_REFERENCE=1`` makes every dispatcher pick the reference, on any device;
- ``ENGINE_FORCE_TRITON=1`` makes every dispatcher pick the Triton kernel, on any device.
  For CPU tensors that needs Triton's interpreter (``TRITON_INTERPRET=1`` set before
  triton is imported); the tests use it to run the whole pipeline through the kernels.

The first wins when both are set.
"""

from __future__ import annotations

import os

import torch

FORCE_REFERENCE_ENV = "ENGINE_FORCE_REFERENCE"
FORCE_TRITON_ENV = "ENGINE_FORCE_TRITON"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def references_forced() -> bool:
    """True when ``ENGINE_FORCE_REFERENCE`` is set to a true value (1, true, yes, on)."""
    return _env_flag(FORCE_REFERENCE_ENV)


def triton_forced() -> bool:
    """True when ``ENGINE_FORCE_TRITON`` is set to a true value and references are not forced."""
    return _env_flag(FORCE_TRITON_ENV) and not references_forced()


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a dispatcher should run the Triton kernel for data on ``tensor``'s device."""
    if references_forced():
        return False
    return tensor.is_cuda or triton_forced()


def host_to_device(values, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host table (nested Python numbers, or a CPU tensor) on ``device``, without making
    the host wait for the device.

    On CUDA the table goes through pinned memory with ``non_blocking=True``: a plain
    ``torch.tensor(..., device="cuda")`` or ``.to("cuda")`` copies from pageable memory and
    then synchronises the stream. (Torch's caching host allocator keeps the pinned block
    until the copy is done.) Elsewhere the host tensor itself is returned.
    """
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
