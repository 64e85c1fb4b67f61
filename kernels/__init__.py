"""Triton kernels for Mask R-CNN post-processing, each beside its PyTorch reference.

Each module holds a private ``@triton.jit`` kernel, a public launcher
(``*_triton``), the plain-PyTorch reference (``*_reference``) with the same
signature, and a dispatcher that picks the kernel for CUDA tensors and the
reference otherwise (see :mod:`kernels._dispatch` for the switches that force either).
"""

from kernels._dispatch import FORCE_REFERENCE_ENV, FORCE_TRITON_ENV, references_forced, triton_forced, use_triton

__all__ = ["FORCE_REFERENCE_ENV", "FORCE_TRITON_ENV", "references_forced", "triton_forced", "use_triton"]
