"""Second stage: box head, detection post-processing, mask head.

Detection post-processing reproduces torchvision's ``RoIHeads.postprocess_detections``:
class-specific decoding with weights (10, 10, 5, 5), softmax, clipping to the resized
image, dropping the background column, score > threshold, both sides >= min size,
per-class NMS, and the best ``detections_per_image``. The batch is processed at once: one
NMS launch over the candidates of every image (groups per image and class), and a per-image
ranking (:func:`engine.ragged.segment_rank_kept`); two host reads (candidate compaction,
detections per image) whatever the batch size.

With ``detection_rule="argmax"`` it reproduces matterport's ``refine_detections_graph``: each
proposal keeps only its most probable class (background included) and that class's box; boxes
are clipped to the image's window; background and scores below the threshold are dropped
(``>=`` keeps); per-class NMS; the best ``detections_per_image``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.backbone import ConvNorm
from engine.boxes import clip_boxes_per_row, decode_with_config, large_enough
from engine.config import MaskRCNNConfig
from engine.ragged import image_of_row, read_counts, segment_rank_kept, segment_sizes, upload
from kernels.nms import batched_nms_keep


class BoxHead(nn.Module):
    """Two fully connected layers with ReLU on flattened pooled features (torchvision ``TwoMLPHead``).

    Input float32 [R, C, 7, 7]; output float32 [R, representation_size].
    """

    def __init__(self, *, in_features: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class ConvFCBoxHead(nn.Sequential):
    """3x3 convs (+ batch norm) with ReLU, flatten, one fully connected layer with ReLU
    (torchvision v2 ``FastRCNNConvFCHead``; indices 0..n-1 convs, n Flatten, n+1 Linear, n+2 ReLU).

    Input float32 [R, C, P, P]; output float32 [R, representation_size].
    """

    def __init__(
        self, *, in_channels: int, pool_size: int, conv_channels: int, num_convs: int, norm: bool,
        representation_size: int, bn_eps: float,
    ) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_convs):
            layers.append(ConvNorm(channels, conv_channels, 3, norm=norm, relu=True, bn_eps=bn_eps))
            channels = conv_channels
        layers += [nn.Flatten(), nn.Linear(channels * pool_size**2, representation_size), nn.ReLU()]
        super().__init__(*layers)


class BoxPredictor(nn.Module):
    """Class logits [R, K] and class-specific deltas [R, 4 * K_box] (K_box = K with a background row, else K - 1)."""

    def __init__(self, *, representation_size: int, num_classes: int, num_box_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(representation_size, num_classes)
        self.bbox_pred = nn.Linear(representation_size, num_box_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Sequential):
    """``num_convs`` 3x3 convs with ReLU (torchvision ``MaskRCNNHeads``; with batch norm in v2):
    [R, C, 14, 14] -> [R, channels, 14, 14]. Parameters are named ``{i}.0.*`` (conv) and ``{i}.1.*`` (norm).
    """

    def __init__(self, *, in_channels: int, channels: int, num_convs: int, norm: bool = False, bn_eps: float = 0.0) -> None:
        super().__init__(
            *(
                ConvNorm(in_channels if i == 0 else channels, channels, 3, norm=norm, relu=True, bn_eps=bn_eps)
                for i in range(num_convs)
            )
        )


class MaskPredictor(nn.Module):
    """2x2 stride-2 transposed conv + ReLU, then 1x1 conv to per-class mask logits [R, K_mask, 28, 28]."""

    def __init__(self, *, in_channels: int, channels: int, num_mask_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, channels, 2, stride=2)
        self.mask_fcn_logits = nn.Conv2d(channels, num_mask_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))


@dataclass(frozen=True)
class ImageDetections:
    """Detections of one image in the resized-image frame (before paste-back).

    Attributes:
        boxes: float32 [N, 4], x1 y1 x2 y2, resized-image pixels.
        scores: float32 [N], descending.
        labels: int64 [N], the checkpoint's class indices.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def postprocess_detections(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    *,
    config: MaskRCNNConfig,
    windows: list[tuple[float, float, float, float]] | None = None,
) -> list[ImageDetections]:
    """Turn box-head outputs into final detections per image.

    Args:
        class_logits: float32 [R, K], R = sum of proposals over images, in image order.
        box_deltas: float32 [R, 4 * K_box].
        proposals: per image float32 [P_i, 4], resized-image pixels (or the normalized frame).
        image_sizes: resized (h, w) per image.
        windows: per image (x1, y1, x2, y2) region the boxes are clipped to with
            ``detection_rule="argmax"`` (the image inside the padding, in the boxes' frame).

    Returns:
        One :class:`ImageDetections` per image.
    """
    if config.detection_rule == "argmax":
        if windows is None:
            raise ValueError("detection_rule='argmax' clips to each image's window: pass windows=")
        return _argmax_detections(class_logits, box_deltas, proposals, windows, config=config)
    num_classes = class_logits.shape[1]
    num_box_classes = box_deltas.shape[1] // 4
    reference = torch.cat(proposals) if proposals else class_logits.new_zeros((0, 4))
    boxes_all = decode_with_config(box_deltas, reference, config=config, weights=config.box_coder_weights)
    boxes_all = boxes_all.reshape(-1, num_box_classes, 4)
    scores_all = F.softmax(class_logits, -1)

    if config.background_index == "first":
        fg = slice(1, num_classes)
        box_fg = slice(1, num_box_classes) if num_box_classes == num_classes else slice(0, num_box_classes)
        labels_fg = torch.arange(1, num_classes, device=class_logits.device)
    else:  # background is the last class
        fg = slice(0, num_classes - 1)
        box_fg = slice(0, num_classes - 1)
        labels_fg = torch.arange(0, num_classes - 1, device=class_logits.device)

    counts = [len(p) for p in proposals]
    device = class_logits.device
    row_image = image_of_row(counts, device)
    sizes = upload(image_sizes, dtype=torch.float32, device=device)[row_image]  # [R, 2] (h, w)
    boxes = clip_boxes_per_row(boxes_all, sizes)[:, box_fg].reshape(-1, 4)
    scores = scores_all[:, fg]
    labels = labels_fg.view(1, -1).expand_as(scores).reshape(-1)
    images = row_image[:, None].expand_as(scores).reshape(-1)
    scores = scores.reshape(-1)
    valid = (scores > config.score_threshold) & large_enough(boxes, config.detection_min_size)
    return _nms_and_select(boxes, scores, labels, images, valid, len(proposals), num_classes, config=config)


def _nms_and_select(boxes, scores, labels, images, valid, num_images: int, num_classes: int, *, config) -> list[ImageDetections]:
    """Candidates of the whole batch -> per-image detections: per-class NMS within each image,
    then each image's best ``detections_per_image``.

    boxes [N, 4], scores [N], labels int64 [N], images int64 [N] (non-decreasing), valid bool [N].
    Two host reads: the size of the candidate set that passed the filters (``nonzero``: the NMS
    works on those only, as the frameworks do), and the detections per image.
    """
    index = torch.nonzero(valid).squeeze(1)  # host read: the candidates that passed the filters
    boxes, scores, labels, images = boxes[index], scores[index], labels[index], images[index]
    keep = batched_nms_keep(boxes, scores, images * num_classes + labels, config.nms_threshold)
    order, counts = segment_rank_kept(scores, keep, images, num_images, config.detections_per_image)
    kept, sizes = _split_counts(read_counts(torch.cat([counts, segment_sizes(images, num_images)])), num_images)
    results, start = [], 0
    for count, size in zip(kept, sizes):
        idx = order[start : start + count]
        results.append(ImageDetections(boxes=boxes[idx], scores=scores[idx], labels=labels[idx]))
        start += size
    return results


def _split_counts(values: list[int], num_images: int) -> tuple[list[int], list[int]]:
    return values[:num_images], values[num_images:]


def _argmax_detections(class_logits, box_deltas, proposals, windows, *, config) -> list[ImageDetections]:
    """matterport's ``refine_detections_graph`` for the whole batch (see the module docstring)."""
    num_classes = class_logits.shape[1]
    if box_deltas.shape[1] // 4 != num_classes or config.background_index != "first":
        raise ValueError("detection_rule='argmax' needs class-specific boxes for every class, background first")
    scores = F.softmax(class_logits, -1)
    counts = [len(p) for p in proposals]
    device = class_logits.device
    row_image = image_of_row(counts, device)
    labels = scores.argmax(dim=1)  # first maximum on ties, as tf.argmax
    index = torch.arange(scores.shape[0], device=device)
    best = scores[index, labels]
    own = box_deltas.view(-1, num_classes, 4)[index, labels]
    rois = torch.cat(proposals) if proposals else class_logits.new_zeros((0, 4))
    boxes = decode_with_config(own, rois, config=config, weights=config.box_coder_weights)
    window = upload(windows, dtype=torch.float32, device=device)[row_image]  # [R, 4] x1 y1 x2 y2
    x = torch.minimum(torch.maximum(boxes[:, 0::2], window[:, 0:1]), window[:, 2:3])
    y = torch.minimum(torch.maximum(boxes[:, 1::2], window[:, 1:2]), window[:, 3:4])
    boxes = torch.stack((x, y), dim=2).reshape(boxes.shape)
    valid = (labels > 0) & (best >= config.score_threshold)
    return _nms_and_select(boxes, best, labels, row_image, valid, len(proposals), num_classes, config=config)


def select_mask_probabilities(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid of each detection's own class channel: [R, K_mask, M, M] logits -> float32 [R, M, M]."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0,) + tuple(mask_logits.shape[2:]))
    index = torch.arange(mask_logits.shape[0], device=mask_logits.device)
    return mask_logits[index, labels].sigmoid()
