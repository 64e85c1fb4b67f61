"""The whole pipeline through the Triton kernels equals the pipeline through the references.

On CPU the kernels run under Triton's interpreter (forced with ``ENGINE_FORCE_TRITON=1``);
with CUDA the same comparison runs the compiled kernels on the GPU against the references
on the GPU. The tiny network and a small RPN budget keep the interpreter's grids small.
"""


import numpy as np
import pytest
import torch

from conftest import kernel_devices
from engine import Predictor
from kernels import FORCE_REFERENCE_ENV, FORCE_TRITON_ENV, use_triton
from tiny import TINY_CONFIG, tiny_state_dict


def test_dispatch_switches(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.delenv(FORCE_TRITON_ENV, raising=False)
    assert not use_triton(cpu)
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    assert use_triton(cpu)
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    assert not use_triton(cpu)


@pytest.mark.parametrize("device", kernel_devices())
def test_pipeline_triton_equals_reference(device, monkeypatch):
    config = TINY_CONFIG.replace(rpn_post_nms_top_n=24, detections_per_image=8)
    predictor = Predictor(tiny_state_dict(), config=config, device=device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=hw + (3,), dtype=np.uint8) for hw in ((60, 90), (47, 33))]

    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    reference = predictor.run(images)
    monkeypatch.delenv(FORCE_REFERENCE_ENV)
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    kernels = predictor.run(images)

    assert sum(len(r) for r in reference) > 0
    for ref, got in zip(reference, kernels):
        assert len(ref) == len(got)
        torch.testing.assert_close(got.boxes, ref.boxes, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.labels, ref.labels)
        differing = (got.masks != ref.masks).float().mean().item() if len(ref) else 0.0
        assert differing <= 1e-4
