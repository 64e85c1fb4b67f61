"""Choosing between a Triton kernel and its PyTorch reference.

Every kernel in this package has two implementations with the same signature:
the Triton kernel (used for CUDA tensors) and a plain-PyTorch reference (used on
CPU, and the oracle in tests). Setting the environment variable
``ENGINE_FORCE_REFERENCE=1`` makes every dispatcher pick the reference, on any
device; it is read at each call so tests can flip it.
"""

from __future__ import annotations

import os

import torch

FORCE_REFERENCE_ENV = "ENGINE_FORCE_REFERENCE"


def references_forced() -> bool:
    """True when ``ENGINE_FORCE_REFERENCE`` is set to a true value (1, true, yes)."""
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a dispatcher should run the Triton kernel for data on ``tensor``'s device."""
    return tensor.is_cuda and not references_forced()
