"""Post-processing: detections in the resized frame -> boxes and masks in each input image's frame.

Reproduces torchvision's ``GeneralizedRCNNTransform.postprocess``: boxes are scaled per axis
by ``original / resized`` (float32 ratios, no re-clipping), then the 28x28 mask probabilities
are pasted into the full image (:mod:`kernels.paste_masks`) and thresholded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.config import MaskRCNNConfig
from engine.results import Detections
from engine.roi_heads import ImageDetections
from kernels.paste_masks import paste_masks


def rescale_boxes(boxes: Tensor, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
    """float32 [N, 4] boxes from resized-image pixels to original-image pixels."""
    ratio_h = torch.tensor(original[0], dtype=torch.float32, device=boxes.device) / torch.tensor(
        resized[0], dtype=torch.float32, device=boxes.device
    )
    ratio_w = torch.tensor(original[1], dtype=torch.float32, device=boxes.device) / torch.tensor(
        resized[1], dtype=torch.float32, device=boxes.device
    )
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def to_original_frame(
    detections: list[ImageDetections],
    mask_probs: list[Tensor],
    *,
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
    config: MaskRCNNConfig,
) -> list[Detections]:
    """Scale boxes, paste and threshold masks; one :class:`Detections` per image.

    Args:
        detections: per image, in resized-image pixels.
        mask_probs: per image float32 [N_i, M, M] mask probabilities.
        image_sizes: resized (h, w) per image.
        original_sizes: input (H, W) per image.
    """
    boxes = [rescale_boxes(d.boxes, s, o) for d, s, o in zip(detections, image_sizes, original_sizes)]
    all_probs = torch.cat(mask_probs) if mask_probs else torch.zeros((0, 28, 28))
    masks = paste_masks(
        all_probs,
        torch.cat(boxes),
        [len(b) for b in boxes],
        original_sizes,
        threshold=config.mask_threshold,
    )
    return [
        Detections(boxes=b, scores=d.scores, labels=d.labels, masks=m, image_size=tuple(o))
        for b, d, m, o in zip(boxes, detections, masks, original_sizes)
    ]
