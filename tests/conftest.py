"""Test set-up shared by every test module.

Triton's interpreter must be switched on before triton is first imported, so it
is set here, at collection time, whenever the machine has no NVIDIA GPU: the
kernel tests then run the Triton programs on CPU tensors.
"""

import os

if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def seed():
    """Seeds every random generator so that each test is repeatable."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield 0


def kernel_devices():
    """Devices on which the Triton kernels can run in this session.

    CPU under the interpreter when it is on, CUDA when a GPU is present.
    """
    devices = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        devices.append("cpu")
    if HAS_CUDA:
        devices.append("cuda")
    return devices
