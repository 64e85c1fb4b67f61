"""Shared checks that two runs of the engine (or the engine and a framework) give the same boxes."""

from __future__ import annotations

import torch


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] (x1 y1 x2 y2) -> [N, M]."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def assert_runs_agree(reference_results, results, *, what: str, mask_agreement_min: float | None = None) -> int:
    """Per image: as many detections; each reference detection has one of the same label with box
    IoU > 0.99; scores within 1e-4 in order; where ``mask_agreement_min`` is given, that share of
    mask pixels equal. Returns the number of detections compared (callers check it is not 0)."""
    total = 0
    for a, b in zip(reference_results, results, strict=True):
        assert len(a) == len(b)
        total += len(a)
        if len(a):
            same = (a.labels[:, None] == b.labels[None, :]) & (box_iou(a.boxes, b.boxes) > 0.99)
            assert same.any(1).all(), f"a detection of the {what} has no counterpart"
            torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-4)
            if mask_agreement_min is not None:
                agree = (a.masks == b.masks).float().mean().item()
                assert agree > mask_agreement_min, agree
    return total
