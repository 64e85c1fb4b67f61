"""``Predictor(..., cuda_graph=True)``: the dense part replayed from CUDA graphs gives the eager results."""

import numpy as np
import pytest
import torch

from tiny import TINY_CONFIG, tiny_state_dict

from engine import Predictor


def _images(sizes):
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=s + (3,), dtype=np.uint8) for s in sizes]


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="cuda_graph=True captures CUDA graphs and needs device='cuda'"):
        Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, cuda_graph=True)


def test_cuda_graph_must_be_a_bool():
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, cuda_graph="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_matches_eager(precision):
    eager = Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cuda", precision=precision)
    graphed = Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cuda", precision=precision, cuda_graph=True)
    batches = [_images([(120, 90), (97, 131)]), _images([(150, 111)]), _images([(120, 90), (97, 131)])]
    for images in batches:
        want, got = eager.run(images), graphed.run(images)
        for w, g in zip(want, got):
            assert torch.equal(w.labels, g.labels)
            torch.testing.assert_close(g.boxes, w.boxes, rtol=0, atol=1e-4)
            torch.testing.assert_close(g.scores, w.scores, rtol=0, atol=1e-5)
            assert (w.masks != g.masks).float().mean() < 1e-3
    assert graphed._graphed.captures == 2 and graphed._graphed.replays == 3  # the third batch replays the first graph
