"""NMS reference against torchvision.ops.nms / batched_nms."""

import pytest
import torch
import torchvision

from kernels.nms import batched_nms_reference, nms_reference


def random_boxes(n, *, size=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("n", [0, 1, 2, 17, 300])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(n, threshold):
    boxes = random_boxes(n, seed=n)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n + 1))
    keep = nms_reference(boxes, scores, threshold)
    assert keep.dtype == torch.int64
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.parametrize("n,groups", [(0, 1), (50, 1), (200, 5), (400, 80)])
def test_batched_nms_matches_torchvision(n, groups):
    boxes = random_boxes(n, seed=n)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, groups, (n,), generator=g)
    keep = batched_nms_reference(boxes, scores, idxs, 0.5)
    assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


def test_degenerate_boxes_are_kept_and_never_suppress():
    boxes = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 5, 5], [1, 1, 5, 5]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert nms_reference(boxes, scores, 0.5).tolist() == torchvision.ops.nms(boxes, scores, 0.5).tolist()


def test_inputs_not_modified_and_errors():
    boxes = random_boxes(10)
    scores = torch.rand(10)
    b0, s0 = boxes.clone(), scores.clone()
    nms_reference(boxes, scores, 0.5)
    assert torch.equal(boxes, b0) and torch.equal(scores, s0)
    with pytest.raises(ValueError, match=r"boxes must be a float tensor \[N, 4\]"):
        nms_reference(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match="scores must be a tensor"):
        nms_reference(boxes, scores[:5], 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms_reference(boxes, scores, 1.5)
