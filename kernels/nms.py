"""Non-maximum suppression: plain-PyTorch reference.

Reproduces ``torchvision.ops.nms`` / ``batched_nms``: boxes are visited in
descending score order (stable for ties), and a kept box suppresses every later
box whose IoU with it is strictly greater than the threshold. IoU uses areas
``(x2 - x1) * (y2 - y1)`` without a +1, computed in float32 like the compiled
torchvision kernel. ``batched_nms_reference`` runs NMS independently per group
(class or FPN level), which is what torchvision's per-class path computes; its
coordinate-offset shortcut agrees except for float rounding of shifted boxes.

The Triton version (one launch per batch) belongs to the GPU-speed work; until
then :func:`batched_nms` runs this reference on every device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _check_nms_inputs(boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a float tensor [N, 4] (x1 y1 x2 y2); got {_describe(boxes)}")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must be a tensor [N] matching boxes [N, 4]; got {_describe(scores)} for boxes {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must be floating point; got {boxes.dtype}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1]; got {iou_threshold}")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _suppression_matrix(boxes: Tensor, iou_threshold: float) -> np.ndarray:
    """bool [N, N]: entry (i, j) is True when IoU(i, j) > iou_threshold (float32 arithmetic)."""
    b = boxes.to(torch.float32)
    x1, y1, x2, y2 = b.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :])).clamp(min=0)
    h = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :])).clamp(min=0)
    inter = w * h
    iou = inter / (areas[:, None] + areas[None, :] - inter)
    return (iou > iou_threshold).cpu().numpy()


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS.

    Args:
        boxes: float [N, 4], x1 y1 x2 y2 (any consistent frame).
        scores: float [N].
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box is > this.

    Returns:
        int64 [K] indices of the kept boxes, in descending score order, on boxes' device.
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    suppress = _suppression_matrix(boxes[order], float(iou_threshold))
    removed = np.zeros(n, dtype=bool)
    kept = []
    for i in range(n):
        if removed[i]:
            continue
        kept.append(i)
        removed[i + 1 :] |= suppress[i, i + 1 :]
    kept_t = torch.as_tensor(kept, dtype=torch.int64, device=boxes.device)
    return order[kept_t]


def batched_nms_reference(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently within each group (class id or level index).

    Args:
        boxes: float [N, 4], x1 y1 x2 y2.
        scores: float [N].
        groups: int [N]; boxes of different groups never suppress each other.
        iou_threshold: as in :func:`nms_reference`.

    Returns:
        int64 [K] kept indices, in descending score order across all groups (stable for ties).
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    if not isinstance(groups, Tensor) or groups.shape != scores.shape:
        raise ValueError(f"groups must be a tensor [N] matching scores; got {_describe(groups)}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    kept = []
    for g in torch.unique(groups):
        members = torch.nonzero(groups == g).flatten()
        kept.append(members[nms_reference(boxes[members], scores[members], iou_threshold)])
    keep = torch.sort(torch.cat(kept)).values  # index order, so ties fall back to input order
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Per-group NMS on any device (the reference until the Triton kernel lands)."""
    return batched_nms_reference(boxes, scores, groups, iou_threshold)
