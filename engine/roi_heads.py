"""Second stage: box head, detection post-processing, mask head.

Detection post-processing reproduces torchvision's ``RoIHeads.postprocess_detections``:
class-specific decoding with weights (10, 10, 5, 5), softmax, clipping to the resized
image, dropping the background column, score > threshold, both sides >= min size,
per-class NMS, and the best ``detections_per_image``. The batch is processed at once, in
fixed-size form: every (proposal, class) pair of a padded batch is a candidate with a validity
mask, one NMS launch covers every (image, class) segment (:func:`kernels.nms.segmented_nms_keep`),
and :func:`engine.ragged.rank_kept` ranks each image's kept candidates in the frameworks'
candidate order (proposal-major, class-minor). No host read: the result is a
:class:`BatchDetections` with its counts on the device.

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
from engine.boxes import clip_boxes_per_row, decode_with_config, large_enough, offset_by_group
from engine.config import MaskRCNNConfig
from engine.ragged import filled_columns, pad_rows, rank_kept, take_rows, upload
from engine.rpn import BatchProposals
from engine.tie_order import batched_nms_final_keys, batched_nms_visit_keys
from kernels.nms import segmented_nms_keep


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
        return F.relu_(self.fc7(F.relu_(self.fc6(x))))


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
        return self.mask_fcn_logits(F.relu_(self.conv5_mask(x)))

    def selected_logits(self, x: Tensor, labels: Tensor) -> Tensor:
        """Each RoI's own class channel of :meth:`forward`: x [R, C, H, W], labels int64 [R] ->
        logits [R, 2H, 2W], equal to ``forward(x)[arange(R), labels]`` up to float32 rounding.

        The 2x2 stride-2 transposed convolution has no overlapping outputs, so it is one matrix
        product: every input pixel times a [C, 4 * C_out] matrix gives its 2x2 output block
        (oneDNN's CPU deconvolution ran this shape 2.3x slower, BENCHMARKS.md). The 1x1 logits
        convolution is computed for the RoI's label only, instead of for all K classes.
        """
        rois, channels, height, width = x.shape
        weight, bias = self.conv5_mask.weight, self.conv5_mask.bias  # [C, C_out, 2, 2], [C_out]
        out_channels = weight.shape[1]
        # columns ordered (row offset, column offset, output channel): channels last in the result
        block_weight = weight.permute(0, 2, 3, 1).reshape(channels, 4 * out_channels)
        pixels = x.permute(0, 2, 3, 1).reshape(rois * height * width, channels)
        upsampled = torch.addmm(bias.repeat(4), pixels, block_weight).relu_()
        upsampled = upsampled.view(rois, height * width * 4, out_channels)
        class_weight = self.mask_fcn_logits.weight.flatten(1)[labels]  # [R, C_out]
        class_bias = self.mask_fcn_logits.bias[labels]
        logits = torch.baddbmm(class_bias.view(rois, 1, 1), upsampled, class_weight.unsqueeze(2))
        # (h, w, row offset, column offset) -> output pixel (2h + row offset, 2w + column offset)
        logits = logits.view(rois, height, width, 2, 2).permute(0, 1, 3, 2, 4)
        return logits.reshape(rois, 2 * height, 2 * width)


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


@dataclass(frozen=True)
class BatchDetections:
    """Detections of a batch in fixed-size form, resized-image frame (before paste-back).

    Attributes:
        boxes: float32 [B, D, 4], x1 y1 x2 y2; image ``b``'s detections are the first
            ``counts[b]`` columns, by descending score (zero boxes after them).
        scores: float32 [B, D] (zeros past the counts).
        labels: int64 [B, D], the checkpoint's class indices (zeros past the counts).
        counts: int64 [B] on the device.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    counts: Tensor

    @classmethod
    def from_list(cls, detections: list[ImageDetections]) -> "BatchDetections":
        boxes, counts = pad_rows([d.boxes for d in detections])
        return cls(
            boxes=boxes,
            scores=pad_rows([d.scores for d in detections])[0],
            labels=pad_rows([d.labels for d in detections])[0],
            counts=counts,
        )

    def split(self, sizes: list[int]) -> list[ImageDetections]:
        """Per-image detections, given the counts as host ints (``engine.ragged.read_counts(self.counts)``)."""
        return [
            ImageDetections(boxes=self.boxes[i, :c], scores=self.scores[i, :c], labels=self.labels[i, :c])
            for i, c in enumerate(sizes)
        ]

    def trimmed(self, width: int) -> "BatchDetections":
        """The first ``width`` columns (``width`` >= every count: nothing filled is lost)."""
        return BatchDetections(
            boxes=self.boxes[:, :width], scores=self.scores[:, :width], labels=self.labels[:, :width], counts=self.counts
        )


def postprocess_detections(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: BatchProposals,
    image_sizes: list[tuple[int, int]],
    *,
    config: MaskRCNNConfig,
    windows: list[tuple[float, float, float, float]] | None = None,
    host_reads: bool = False,
) -> BatchDetections:
    """Turn box-head outputs into final detections per image, without a host read.

    Args:
        class_logits: float32 [B * P, K], the box head on every row of ``proposals`` (image after image).
        box_deltas: float32 [B * P, 4 * K_box].
        proposals: the padded proposals (resized-image pixels, or the normalized frame); rows
            past each image's count are never detections.
        image_sizes: resized (h, w) per image.
        windows: per image (x1, y1, x2, y2) region the boxes are clipped to with
            ``detection_rule="argmax"`` (the image inside the padding, in the boxes' frame).
        host_reads: may read device data on the host (the CPU path); only
            ``tie_order="torch_sort"`` uses it (see :mod:`engine.tie_order`).

    Returns:
        :class:`BatchDetections`, at most ``detections_per_image`` per image.
    """
    if config.detection_rule == "argmax":
        if windows is None:
            raise ValueError("detection_rule='argmax' clips to each image's window: pass windows=")
        return _argmax_detections(class_logits, box_deltas, proposals, windows, config=config)
    num_images, width = proposals.scores.shape
    num_classes = class_logits.shape[1]
    num_box_classes = box_deltas.shape[1] // 4
    device = class_logits.device
    boxes_all = decode_with_config(box_deltas, proposals.boxes.reshape(-1, 4), config=config, weights=config.box_coder_weights)
    boxes_all = boxes_all.reshape(num_images, width * num_box_classes, 4)
    sizes = upload(image_sizes, dtype=torch.float32, device=device)  # [B, 2] (h, w)
    boxes_all = clip_boxes_per_row(boxes_all, sizes).view(num_images, width, num_box_classes, 4)
    scores_all = F.softmax(class_logits, -1).view(num_images, width, num_classes)

    if config.background_index == "first":
        fg = slice(1, num_classes)
        box_fg = slice(1, num_box_classes) if num_box_classes == num_classes else slice(0, num_box_classes)
        labels_fg = torch.arange(1, num_classes, device=device)
    else:  # background is the last class
        fg = slice(0, num_classes - 1)
        box_fg = slice(0, num_classes - 1)
        labels_fg = torch.arange(0, num_classes - 1, device=device)

    boxes = boxes_all[:, :, box_fg]  # [B, P, C', 4]
    scores = scores_all[:, :, fg]  # [B, P, C']
    classes = scores.shape[2]
    valid = (scores > config.score_threshold) & large_enough(boxes.reshape(-1, 4), config.detection_min_size).view(
        scores.shape
    )
    valid &= filled_columns(proposals.counts, width)[:, :, None]
    flat_boxes, flat_scores, flat_valid = boxes.reshape(num_images, -1, 4), scores.reshape(num_images, -1), valid.reshape(num_images, -1)
    classes_of = torch.arange(classes, device=device).view(1, 1, -1).expand(num_images, width, classes).reshape(num_images, -1)
    nms_boxes = offset_by_group(flat_boxes, flat_valid, classes_of) if config.nms_group_offsets else flat_boxes
    visit = final = flat_scores
    if config.tie_order == "torch_sort" and host_reads:
        visit = batched_nms_visit_keys(flat_scores, flat_valid, classes_of)

    def per_class(t: Tensor) -> Tensor:  # [B, P * C', ...] -> segments [B * C', P, ...], one per (image, class)
        t = t.view((num_images, width, classes) + tuple(t.shape[2:]))
        return t.transpose(1, 2).reshape((num_images * classes, width) + tuple(t.shape[3:]))

    keep = segmented_nms_keep(per_class(nms_boxes), per_class(visit), per_class(flat_valid), config.nms_threshold)
    keep = keep.view(num_images, classes, width).transpose(1, 2).reshape(num_images, -1)
    if visit is not flat_scores:
        final = batched_nms_final_keys(flat_scores, flat_valid, keep, visit)
    labels = labels_fg[classes_of]
    return _rank_detections(flat_boxes, flat_scores, labels, keep, config.detections_per_image, keys=final)


def _rank_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, keep: Tensor, k: int, *, keys: Tensor | None = None
) -> BatchDetections:
    """Each image's best ``k`` kept candidates (boxes [B, N, 4], scores [B, N], labels [B, N],
    keep [B, N]), by descending score (or ``keys``), ties in candidate order (as
    ``torchvision.ops.batched_nms``)."""
    order, counts = rank_kept(scores if keys is None else keys, keep, k)
    filled = filled_columns(counts, order.shape[1])
    return BatchDetections(
        boxes=take_rows(boxes, order, filled),
        scores=take_rows(scores, order, filled),
        labels=take_rows(labels, order, filled),
        counts=counts,
    )


def _argmax_detections(class_logits, box_deltas, proposals: BatchProposals, windows, *, config) -> BatchDetections:
    """matterport's ``refine_detections_graph`` for the whole batch (see the module docstring)."""
    num_classes = class_logits.shape[1]
    if box_deltas.shape[1] // 4 != num_classes or config.background_index != "first":
        raise ValueError("detection_rule='argmax' needs class-specific boxes for every class, background first")
    num_images, width = proposals.scores.shape
    device = class_logits.device
    scores = F.softmax(class_logits, -1)
    labels = scores.argmax(dim=1)  # first maximum on ties, as tf.argmax
    index = torch.arange(scores.shape[0], device=device)
    best = scores[index, labels].view(num_images, width)
    own = box_deltas.view(-1, num_classes, 4)[index, labels]
    boxes = decode_with_config(own, proposals.boxes.reshape(-1, 4), config=config, weights=config.box_coder_weights)
    boxes = boxes.view(num_images, width, 4)
    window = upload(windows, dtype=torch.float32, device=device)[:, None, :]  # [B, 1, 4] x1 y1 x2 y2
    x = torch.minimum(torch.maximum(boxes[..., 0::2], window[..., 0:1]), window[..., 2:3])
    y = torch.minimum(torch.maximum(boxes[..., 1::2], window[..., 1:2]), window[..., 3:4])
    boxes = torch.stack((x, y), dim=3).reshape(boxes.shape)
    labels = labels.view(num_images, width)
    valid = (labels > 0) & (best >= config.score_threshold) & filled_columns(proposals.counts, width)
    # a segment per (image, foreground class) over the image's P candidates; each candidate is
    # valid in its own class's segment only
    classes = torch.arange(1, num_classes, device=device).view(1, -1, 1)
    in_class = valid[:, None, :] & (labels[:, None, :] == classes)  # [B, C - 1, P]
    segments = num_images * (num_classes - 1)
    keep = segmented_nms_keep(
        boxes[:, None].expand(num_images, num_classes - 1, width, 4).reshape(segments, width, 4),
        best[:, None].expand(num_images, num_classes - 1, width).reshape(segments, width),
        in_class.reshape(segments, width),
        config.nms_threshold,
    )
    keep = keep.view(num_images, num_classes - 1, width).any(dim=1)
    return _rank_detections(boxes, best, labels, keep, config.detections_per_image)
