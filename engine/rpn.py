"""Region proposal network: the shared head, and proposal selection per image.

Selection reproduces torchvision's ``RegionProposalNetwork.filter_proposals`` at test time:
per level, top-k on the raw objectness logits; sigmoid; clip to the resized image;
drop boxes with a side < ``rpn_min_size``; drop scores < ``rpn_score_threshold``;
NMS per level; keep the best ``rpn_post_nms_top_n`` of the image.

The whole batch is selected at once on fixed-size [B, N] tensors: the filters give a validity
mask, one NMS launch covers every (image, level) group (:func:`kernels.nms.batched_nms_keep`),
and :func:`engine.ragged.rank_kept` ranks the kept ones per image; the lists per image are cut
after one host read of their lengths.

With ``rpn_selection="global"`` it reproduces matterport's ``ProposalLayer`` instead: top-k of
the foreground probabilities over all levels at once (ties in anchor order, as TensorFlow's
``top_k``), decoding, clipping to the whole padded image ([0, 1] in the normalized frame), one
NMS, the best ``rpn_post_nms_top_n``, and with ``rpn_pad_proposals`` zero boxes up to that count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.boxes import clip_boxes, clip_boxes_per_row, decode_with_config, large_enough
from engine.config import MaskRCNNConfig
from engine.ragged import rank_kept, read_counts, upload
from kernels.nms import batched_nms_keep


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
                t = F.relu(block(t))
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
) -> tuple[list[Tensor], list[Tensor]]:
    """Decode, rank and suppress proposals for each image.

    Args:
        objectness: float32 [B, total] logits in anchor order.
        deltas: float32 [B, total, 4].
        anchors: per level float32 [n_l, 4] in padded-image pixels (the same for every image).
        anchors_per_level: n_l per level.
        image_sizes: resized (h, w) per image, used for clipping.

    Returns:
        proposals: per image float32 [P_i, 4], x1 y1 x2 y2 in resized-image pixels, by descending score;
        scores: per image float32 [P_i] objectness probabilities.
    """
    if config.rpn_selection == "global":
        return _select_global(objectness, deltas, torch.cat(anchors), image_sizes, config=config)
    num_images = objectness.shape[0]
    device = objectness.device
    all_anchors = torch.cat(anchors)

    # top-k per level on the raw logits
    top_idx, top_levels, offset = [], [], 0
    for level, count in enumerate(anchors_per_level):
        k = min(config.rpn_pre_nms_top_n, count)
        _, idx = objectness[:, offset : offset + count].topk(k, dim=1)
        top_idx.append(idx + offset)
        top_levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
        offset += count
    top_idx = torch.cat(top_idx, dim=1)
    levels = torch.cat(top_levels)
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
    # one NMS for the batch: a group per (image, level); entries filtered out share a spare group
    groups = rows * len(anchors_per_level) + levels[None, :]
    return _nms_and_rank(boxes, scores, groups, config=config)


def _nms_and_rank(boxes: Tensor, scores: Tensor, groups: Tensor, *, config: MaskRCNNConfig):
    """Size and score filter, NMS within ``groups``, the best ``rpn_post_nms_top_n`` per image.

    boxes [B, N, 4], scores [B, N], groups int64 [B, N] (disjoint between images). Returns the
    per-image lists of :func:`select_proposals`, after one host read of their lengths (or none,
    with ``rpn_pad_proposals``: every image then has exactly ``rpn_post_nms_top_n``).
    """
    num_images, n = scores.shape
    top_n = config.rpn_post_nms_top_n
    valid = large_enough(boxes.reshape(-1, 4), config.rpn_min_size, inclusive=config.rpn_min_size_inclusive)
    valid = valid.view(num_images, n) & (scores >= config.rpn_score_threshold)
    spare = groups.max() + 1  # a tensor: no host read
    groups = torch.where(valid, groups, spare)
    keep = batched_nms_keep(boxes.reshape(-1, 4), scores.reshape(-1), groups.reshape(-1), config.rpn_nms_threshold)
    keep = keep.view(num_images, n) & valid
    order, counts = rank_kept(scores, keep, top_n)
    rows = torch.arange(num_images, device=scores.device)[:, None]
    boxes, scores = boxes[rows, order], scores[rows, order]
    if config.rpn_pad_proposals:
        filled = torch.arange(order.shape[1], device=scores.device)[None, :] < counts[:, None]
        boxes = torch.where(filled[..., None], boxes, torch.zeros_like(boxes))
        scores = torch.where(filled, scores, torch.zeros_like(scores))
        if order.shape[1] < top_n:
            missing = top_n - order.shape[1]
            boxes = torch.cat([boxes, boxes.new_zeros((num_images, missing, 4))], dim=1)
            scores = torch.cat([scores, scores.new_zeros((num_images, missing))], dim=1)
        return list(boxes.unbind(0)), list(scores.unbind(0))
    sizes = read_counts(counts)  # the RPN's host read: proposals per image
    return [b[:c] for b, c in zip(boxes, sizes)], [s[:c] for s, c in zip(scores, sizes)]


def _select_global(
    objectness: Tensor, deltas: Tensor, anchors: Tensor, image_sizes: list[tuple[int, int]], *, config: MaskRCNNConfig
) -> tuple[list[Tensor], list[Tensor]]:
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
    return _nms_and_rank(b, s, rows.expand(num_images, k), config=config)
