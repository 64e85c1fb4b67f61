"""Region proposal network: the shared head, and proposal selection per image.

Selection reproduces torchvision's ``RegionProposalNetwork.filter_proposals`` at test time:
per level, top-k on the raw objectness logits; sigmoid; clip to the resized image;
drop boxes with a side < ``rpn_min_size``; drop scores < ``rpn_score_threshold``;
NMS per level; keep the best ``rpn_post_nms_top_n`` of the image.

The whole batch is selected at once on fixed-size [B, N] tensors: the filters give a validity
mask, one NMS launch covers every (image, level) segment (:func:`kernels.nms.segmented_nms_keep`),
and :func:`engine.ragged.rank_kept` ranks the kept ones per image. The result stays fixed-size
(:class:`BatchProposals`, counts on the device): no host read.

With ``rpn_selection="global"`` it reproduces matterport's ``ProposalLayer`` instead: top-k of
the foreground probabilities over all levels at once (ties in anchor order, as TensorFlow's
``top_k``), decoding, clipping to the whole padded image ([0, 1] in the normalized frame), one
NMS, the best ``rpn_post_nms_top_n``, and with ``rpn_pad_proposals`` zero boxes up to that count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.boxes import clip_boxes, clip_boxes_per_row, decode_with_config, large_enough, offset_by_group
from engine.config import MaskRCNNConfig
from engine.ragged import filled_columns, pad_rows, rank_kept, take_rows, upload
from engine.tie_order import batched_nms_final_keys, batched_nms_visit_keys
from kernels.nms import segmented_nms_keep


@dataclass(frozen=True)
class BatchProposals:
    """RPN proposals of a batch in fixed-size form (no host read needed to hold them).

    Attributes:
        boxes: float32 [B, P, 4], x1 y1 x2 y2 in resized-image pixels (or matterport's
            normalized frame); row ``b`` holds image ``b``'s proposals by descending score in
            its first ``counts[b]`` columns, zero boxes after them.
        scores: float32 [B, P] objectness probabilities (zeros past the counts).
        counts: int64 [B] on the device.
    """

    boxes: Tensor
    scores: Tensor
    counts: Tensor

    @classmethod
    def from_lists(cls, boxes: list[Tensor], scores: list[Tensor] | None = None) -> "BatchProposals":
        """Per-image proposals [P_i, 4] (and scores [P_i]) -> the fixed-size form."""
        padded, counts = pad_rows(boxes)
        if scores is None:
            scores = [b.new_ones(len(b)) for b in boxes]
        return cls(boxes=padded, scores=pad_rows(scores)[0], counts=counts)

    def split(self, sizes: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Per-image lists, given the counts as host ints (``engine.ragged.read_counts(self.counts)``)."""
        return [b[:c] for b, c in zip(self.boxes, sizes)], [s[:c] for s, c in zip(self.scores, sizes)]

    def trimmed(self, width: int) -> "BatchProposals":
        """The first ``width`` columns (``width`` >= every count: nothing filled is lost)."""
        return BatchProposals(boxes=self.boxes[:, :width], scores=self.scores[:, :width], counts=self.counts)


class RPNHead(nn.Module):
    """3x3 conv + ReLU (``conv_depth`` times), then 1x1 objectness (A) and 1x1 deltas (4A), shared by all levels.

    The 3x3 convs are ``channels`` wide unless ``conv_channels`` says otherwise (matterport: 512 on a 256 FPN).
    """

    def __init__(self, *, channels: int, num_anchors: int, conv_depth: int = 1, conv_channels: int | None = None) -> None:
        super().__init__()
        width = channels if conv_channels is None else conv_channels
        self.conv = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(channels if i == 0 else width, width, 3, padding=1)) for i in range(conv_depth))
        )
        self.cls_logits = nn.Conv2d(width, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(width, num_anchors * 4, 1)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits [B, A, h, w] and deltas [B, 4A, h, w]."""
        logits, deltas = [], []
        for x in features:
            t = x
            for block in self.conv:
                t = F.relu_(block(t))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_levels(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
    """Head outputs in anchor order (level, y, x, anchor).

    Returns:
        objectness float32 [B, total], deltas float32 [B, total, 4], anchors per level.
    """
    flat_logits, flat_deltas, counts = [], [], []
    for lg, dl in zip(logits, deltas):
        b, a, h, w = lg.shape
        flat_logits.append(lg.permute(0, 2, 3, 1).reshape(b, -1))
        flat_deltas.append(dl.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        counts.append(h * w * a)
    return torch.cat(flat_logits, 1), torch.cat(flat_deltas, 1), counts


def select_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: list[Tensor],
    anchors_per_level: list[int],
    image_sizes: list[tuple[int, int]],
    *,
    config: MaskRCNNConfig,
    host_reads: bool = False,
) -> BatchProposals:
    """Decode, rank and suppress proposals for each image.

    Args:
        objectness: float32 [B, total] logits in anchor order.
        deltas: float32 [B, total, 4].
        anchors: per level float32 [n_l, 4] in padded-image pixels (the same for every image).
        anchors_per_level: n_l per level.
        image_sizes: resized (h, w) per image, used for clipping.
        host_reads: the selection may read device data on the host (the CPU path): only used by
            ``tie_order="torch_sort"``, to replay mmdetection's sorts on compacted arrays.

    Returns:
        :class:`BatchProposals`: per image at most ``rpn_post_nms_top_n`` proposals by descending
        score (exactly that many, zero boxes included, with ``rpn_pad_proposals``).
    """
    if config.rpn_selection == "global":
        return _select_global(objectness, deltas, torch.cat(anchors), image_sizes, config=config, host_reads=host_reads)
    num_images = objectness.shape[0]
    device = objectness.device
    all_anchors = torch.cat(anchors)

    # top-k per level: on the raw logits (torchvision, Detectron2), or, with tie_order="torch_sort",
    # mmdetection's torch.sort of the probabilities, only for levels with more anchors than k
    top_idx, group_sizes, offset = [], [], 0
    for count in anchors_per_level:
        k = min(config.rpn_pre_nms_top_n, count)
        level = objectness[:, offset : offset + count]
        if config.tie_order != "torch_sort":
            idx = level.topk(k, dim=1).indices
        elif k < count:
            idx = torch.sort(torch.sigmoid(level), dim=1, descending=True).indices[:, :k]
        else:
            idx = torch.arange(count, device=device).expand(num_images, count)
        top_idx.append(idx + offset)
        group_sizes.append(k)
        offset += count
    top_idx = torch.cat(top_idx, dim=1)
    rows = torch.arange(num_images, device=device)[:, None]
    scores = torch.sigmoid(objectness[rows, top_idx])
    # decoding is elementwise, so decoding only the selected anchors gives the same boxes
    boxes = decode_with_config(
        deltas[rows, top_idx].reshape(-1, 4),
        all_anchors[top_idx].reshape(-1, 4),
        config=config,
        weights=config.rpn_box_weights,
    ).view(num_images, -1, 4)
    boxes = clip_boxes_per_row(boxes, upload(image_sizes, dtype=torch.float32, device=device))
    # one NMS for the batch: a segment per (image, level)
    return _nms_and_rank(boxes, scores, group_sizes, config=config, host_reads=host_reads)


def _nms_and_rank(
    boxes: Tensor, scores: Tensor, group_sizes: list[int], *, config: MaskRCNNConfig, host_reads: bool = False
) -> BatchProposals:
    """Size and score filter, NMS within groups, the best ``rpn_post_nms_top_n`` per image.

    boxes [B, N, 4], scores [B, N]; each image's N columns are consecutive NMS groups of
    ``group_sizes`` (host ints summing to N). No host read.
    """
    num_images, n = scores.shape
    top_n = config.rpn_post_nms_top_n
    valid = large_enough(boxes.reshape(-1, 4), config.rpn_min_size, inclusive=config.rpn_min_size_inclusive)
    valid = valid.view(num_images, n) & (scores >= config.rpn_score_threshold)
    groups = torch.cat([torch.full((size,), g, dtype=torch.int64, device=scores.device) for g, size in enumerate(group_sizes)])
    groups = groups.expand(num_images, n)
    nms_boxes = offset_by_group(boxes, valid, groups) if config.nms_group_offsets else boxes
    visit = final = scores
    if config.tie_order == "torch_sort" and host_reads:
        visit = batched_nms_visit_keys(scores, valid, groups)
    keep = _keep_per_group(nms_boxes, visit, valid, group_sizes, config.rpn_nms_threshold)
    if visit is not scores:
        final = batched_nms_final_keys(scores, valid, keep, visit)
    order, counts = rank_kept(final, keep, top_n)
    filled = filled_columns(counts, order.shape[1])
    boxes, scores = take_rows(boxes, order, filled), take_rows(scores, order, filled)
    if config.rpn_pad_proposals:  # matterport: exactly top_n per image, zero boxes included
        if order.shape[1] < top_n:
            missing = top_n - order.shape[1]
            boxes = torch.cat([boxes, boxes.new_zeros((num_images, missing, 4))], dim=1)
            scores = torch.cat([scores, scores.new_zeros((num_images, missing))], dim=1)
        counts = torch.full_like(counts, top_n)
    return BatchProposals(boxes=boxes, scores=scores, counts=counts)


def _keep_per_group(boxes: Tensor, scores: Tensor, valid: Tensor, group_sizes: list[int], threshold: float) -> Tensor:
    """NMS keep mask bool [B, N], each image's columns split into groups of ``group_sizes``:
    the groups become zero-padded segments of one :func:`kernels.nms.segmented_nms_keep` launch."""
    num_images = scores.shape[0]
    if len(group_sizes) == 1:
        return segmented_nms_keep(boxes, scores, valid, threshold)
    width = max(group_sizes)
    segments = []
    for t in (boxes, scores, valid):
        parts = t.split(group_sizes, dim=1)
        pad = (0, 0) * (t.dim() - 2)
        segments.append(torch.stack([F.pad(p, pad + (0, width - p.shape[1])) for p in parts], dim=1).flatten(0, 1))
    keep = segmented_nms_keep(*segments, threshold).view(num_images, len(group_sizes), width)
    return torch.cat([keep[:, g, :size] for g, size in enumerate(group_sizes)], dim=1)


def _select_global(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    image_sizes: list[tuple[int, int]],
    *,
    config: MaskRCNNConfig,
    host_reads: bool = False,
) -> BatchProposals:
    """matterport's ``ProposalLayer`` (see the module docstring); boxes in the anchors' frame.

    In the normalized frame the clip is to [0, 1]; in pixels, to each image's resized size.
    """
    num_images, total = objectness.shape
    device = objectness.device
    k = min(config.rpn_pre_nms_top_n, total)
    scores = torch.sigmoid(objectness)  # = softmax over matterport's (bg, fg) pair
    # descending, ties in index order (TensorFlow's top_k), hence a stable sort rather than topk
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    rows = torch.arange(num_images, device=device)[:, None]
    s = scores[rows, order]
    b = decode_with_config(
        deltas[rows, order].reshape(-1, 4), anchors[order].reshape(-1, 4), config=config, weights=config.rpn_box_weights
    ).view(num_images, k, 4)
    if config.box_frame == "normalized":
        b = clip_boxes(b, (1.0, 1.0))
    else:
        b = clip_boxes_per_row(b, upload(image_sizes, dtype=torch.float32, device=device))
    return _nms_and_rank(b, s, [k], config=config, host_reads=host_reads)
