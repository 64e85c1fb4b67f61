"""Box arithmetic shared by the RPN and the box head: delta decoding, clipping, size filter.

All boxes are float32 [..., 4], x1 y1 x2 y2, widths ``x2 - x1`` without a +1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def decode_deltas(
    deltas: Tensor,
    reference: Tensor,
    *,
    weights: tuple[float, float, float, float],
    clip: float,
    clamp: str = "upper",
    style: str = "torchvision",
) -> Tensor:
    """Apply (dx, dy, dw, dh) deltas to reference boxes (Faster R-CNN parametrisation).

    Args:
        deltas: float32 [N, 4 * K]: K deltas per reference box, (dx, dy, dw, dh) each.
        reference: float32 [N, 4] anchors or proposals.
        weights: (wx, wy, ww, wh); deltas are divided by them (torchvision, Detectron2), or
            multiplied by their inverse, mmdetection's ``stds`` (``style="mmdet"``).
        clip: bound on dw, dh before exp (log(1000/16)).
        clamp: "upper" (dw <= clip; torchvision, Detectron2), "symmetric" (|dw| <= clip; mmdet),
            "none" (matterport).
        style: the float32 operation order of "torchvision" (``BoxCoder.decode_single``: centre
            ``x1 + 0.5 * w``, deltas divided by the weights), "mmdet" (``delta2bbox``: centre
            ``(x1 + x2) * 0.5``, deltas times ``stds``, corners ``centre -/+ size * 0.5``) or
            "matterport" (``apply_box_deltas_graph``: deltas times the std devs, centre
            ``x1 + 0.5 * w``, ``x1 = centre - 0.5 * w'``, ``x2 = x1 + w'``).

    Returns:
        float32 [N, 4 * K] decoded boxes, in the reference boxes' frame.
    """
    if style not in ("torchvision", "mmdet", "matterport"):
        raise ValueError(f"unknown box coder style {style!r}; accepted: 'torchvision', 'mmdet', 'matterport'")
    if style == "matterport":
        return _decode_matterport(deltas, reference, weights=weights, clip=clip, clamp=clamp)
    reference = reference.to(deltas.dtype)
    widths = reference[:, 2] - reference[:, 0]
    heights = reference[:, 3] - reference[:, 1]
    if style == "torchvision":
        ctr_x = reference[:, 0] + 0.5 * widths
        ctr_y = reference[:, 1] + 0.5 * heights
        wx, wy, ww, wh = weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = deltas[:, 2::4] / ww
        dh = deltas[:, 3::4] / wh
    else:
        ctr_x = (reference[:, 0] + reference[:, 2]) * 0.5
        ctr_y = (reference[:, 1] + reference[:, 3]) * 0.5
        sx, sy, sw, sh = (1.0 / w for w in weights)
        dx = deltas[:, 0::4] * sx
        dy = deltas[:, 1::4] * sy
        dw = deltas[:, 2::4] * sw
        dh = deltas[:, 3::4] * sh
    if clamp == "upper":
        dw, dh = dw.clamp(max=clip), dh.clamp(max=clip)
    elif clamp == "symmetric":
        dw, dh = dw.clamp(min=-clip, max=clip), dh.clamp(min=-clip, max=clip)
    elif clamp != "none":
        raise ValueError(f"unknown delta clamp {clamp!r}")
    if style == "torchvision":
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    else:
        pred_ctr_x = ctr_x[:, None] + widths[:, None] * dx
        pred_ctr_y = ctr_y[:, None] + heights[:, None] * dy
    pred_w = torch.exp(dw) * widths[:, None] if style == "torchvision" else widths[:, None] * torch.exp(dw)
    pred_h = torch.exp(dh) * heights[:, None] if style == "torchvision" else heights[:, None] * torch.exp(dh)
    half = torch.full((), 0.5, dtype=deltas.dtype, device=deltas.device)  # a device fill, not an upload
    half_w, half_h = pred_w * half, pred_h * half
    out = torch.stack(
        (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2
    )
    return out.flatten(1)


def decode_with_config(deltas: Tensor, reference: Tensor, *, config, weights: tuple[float, float, float, float]) -> Tensor:
    """:func:`decode_deltas` with the clamp, clip and style of a :class:`engine.config.MaskRCNNConfig`;
    ``weights`` is the stage's coder weights (``config.rpn_box_weights`` or ``config.box_coder_weights``)."""
    return decode_deltas(
        deltas,
        reference,
        weights=weights,
        clip=config.box_delta_clip,
        clamp=config.box_delta_clamp,
        style=config.box_coder_style,
    )


def _decode_matterport(deltas: Tensor, reference: Tensor, *, weights, clip: float, clamp: str) -> Tensor:
    """matterport's ``apply_box_deltas_graph`` on x1 y1 x2 y2 boxes (its frame is y1 x1 y2 x2; the
    operations per axis are the same), deltas (dx, dy, dw, dh) times ``1 / weights`` (its std devs)."""
    if clamp != "none":
        raise ValueError("the matterport box coder has no delta clamp (box_delta_clamp='none')")
    reference = reference.to(deltas.dtype)
    widths = (reference[:, 2] - reference[:, 0])[:, None]
    heights = (reference[:, 3] - reference[:, 1])[:, None]
    ctr_x = reference[:, 0, None] + 0.5 * widths
    ctr_y = reference[:, 1, None] + 0.5 * heights
    sx, sy, sw, sh = (1.0 / w for w in weights)
    ctr_x = ctr_x + (deltas[:, 0::4] * sx) * widths
    ctr_y = ctr_y + (deltas[:, 1::4] * sy) * heights
    widths = widths * torch.exp(deltas[:, 2::4] * sw)
    heights = heights * torch.exp(deltas[:, 3::4] * sh)
    x1 = ctr_x - 0.5 * widths
    y1 = ctr_y - 0.5 * heights
    return torch.stack((x1, y1, x1 + widths, y1 + heights), dim=2).flatten(1)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp x to [0, w] and y to [0, h]; ``size`` is (h, w). Shape [..., 4] is kept."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)


def clip_boxes_per_row(boxes: Tensor, sizes: Tensor) -> Tensor:
    """:func:`clip_boxes` with one (h, w) per leading index: boxes [L, ..., 4], sizes float32 [L, 2]
    (a batch's images, or the image of each row); equal to clamping each row with its own size."""
    bound = (-1,) + (1,) * (boxes.dim() - 1)
    height, width = sizes[:, 0].reshape(bound), sizes[:, 1].reshape(bound)
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), width)
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), height)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)


def clip_to_window(boxes: Tensor, window: tuple[float, float, float, float]) -> Tensor:
    """Clamp x to [x1, x2] and y to [y1, y2] of ``window`` (x1, y1, x2, y2); matterport's ``clip_boxes_graph``."""
    x1, y1, x2, y2 = (float(v) for v in window)
    x = boxes[..., 0::2].clamp(min=x1, max=x2)
    y = boxes[..., 1::2].clamp(min=y1, max=y2)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)


def large_enough(boxes: Tensor, min_size: float, *, inclusive: bool = True) -> Tensor:
    """bool [N]: both sides >= min_size (torchvision), or > min_size when not ``inclusive``
    (Detectron2's ``nonempty``: w > 0 and h > 0)."""
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    if inclusive:
        return (ws >= min_size) & (hs >= min_size)
    return (ws > min_size) & (hs > min_size)


def box_area(boxes: Tensor) -> Tensor:
    """float [N]: (x2 - x1) * (y2 - y1)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def offset_by_group(boxes: Tensor, valid: Tensor, groups: Tensor) -> Tensor:
    """Boxes moved apart by group, as ``mmcv.ops.batched_nms`` does before one NMS over all groups.

    Per image: ``boxes + groups * (max + 1)`` in float32, with ``max`` the largest coordinate of
    the image's valid boxes (``mmcv/ops/nms.py``: ``offsets = idxs.to(boxes) * (boxes.max() + 1)``).
    Boxes of different groups then never overlap, and the IoU of two boxes of one group is
    computed on the moved coordinates, with their rounding, as mmcv computes it.

    boxes float32 [B, N, 4], valid bool [B, N], groups int64 [B, N] -> float32 [B, N, 4].
    """
    lowest = torch.full((), float("-inf"), dtype=boxes.dtype, device=boxes.device)
    largest = torch.where(valid[..., None], boxes, lowest).amax(dim=(1, 2))  # [B]; -inf without valid boxes
    step = largest + torch.ones((), dtype=boxes.dtype, device=boxes.device)
    offsets = groups.to(boxes.dtype) * step[:, None]
    return boxes + offsets[..., None]
