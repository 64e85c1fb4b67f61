"""The result of one image, a small typed structure (like Detectron2's ``Instances``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Detections:
    """Instances found in one image, in that image's own pixel frame.

    Attributes:
        boxes: float32 [N, 4], x1 y1 x2 y2 in input-image pixels (not re-clipped after scaling, as torchvision).
        scores: float32 [N], descending.
        labels: int64 [N], the checkpoint's own class indices (torchvision: COCO category ids 1..90).
        masks: bool [N, H, W] at the input image's size.
        image_size: (H, W) of the input image.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: torch.device | str) -> "Detections":
        """A copy with every tensor on ``device``."""
        return Detections(
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            labels=self.labels.to(device),
            masks=self.masks.to(device),
            image_size=self.image_size,
        )
