"""Anchor grids for the FPN levels, as torchvision's ``AnchorGenerator`` makes them.

Base anchors per level: for each aspect ratio r = h/w (outer loop) and size s,
``w = s / sqrt(r)``, ``h = s * sqrt(r)``, box ``[-w, -h, w, h] / 2``, rounded
half-to-even when ``anchor_round`` (torchvision; Detectron2 and mmdet do not round).
They are placed at ``(x * stride_w, y * stride_h)`` for every feature cell (offset 0),
in (y, x, anchor) order. The stride is ``padded_size // feature_size`` (torchvision,
so P6 of an 800-row batch has stride 61) or ``2 ** level`` ("fixed").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from engine.ragged import upload


def base_anchors(
    size: float, aspect_ratios: tuple[float, ...], *, round_anchors: bool, dtype: torch.dtype = torch.float32
) -> Tensor:
    """float32 [A, 4] anchors centred on 0, x1 y1 x2 y2, ratio-major order (``dtype``: unrounded ones only).

    Rounded anchors are computed in float32 as torchvision does; unrounded ones in double
    precision, then cast, as Detectron2's ``generate_cell_anchors`` does
    (``w = sqrt(size**2 / ratio)``, ``h = ratio * w``).
    """
    if not round_anchors:
        rows = []
        for ratio in aspect_ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(rows, dtype=dtype)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    scales = torch.as_tensor([size], dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def level_strides(
    padded_size: tuple[int, int], feature_sizes: list[tuple[int, int]], *, mode: str, first_level: int = 2
) -> list[tuple[int, int]]:
    """(stride_h, stride_w) per level."""
    if mode == "padded_div_feature":
        return [(padded_size[0] // h, padded_size[1] // w) for h, w in feature_sizes]
    if mode == "fixed":
        return [(2 ** (first_level + i), 2 ** (first_level + i)) for i in range(len(feature_sizes))]
    raise ValueError(f"unknown anchor stride mode {mode!r}")


def grid_anchors(
    padded_size: tuple[int, int],
    feature_sizes: list[tuple[int, int]],
    *,
    sizes: tuple[float, ...],
    aspect_ratios: tuple[float, ...],
    round_anchors: bool,
    stride_mode: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Anchors of every level for a padded batch.

    Args:
        padded_size: (Hp, Wp) of the padded image batch.
        feature_sizes: (h, w) of each level's feature map, P2 first.

    Returns:
        One float32 [h * w * A, 4] tensor per level, x1 y1 x2 y2 in padded-image pixels,
        ordered (y, x, anchor).
    """
    strides = level_strides(padded_size, feature_sizes, mode=stride_mode)
    out = []
    for (fh, fw), (sh, sw), size in zip(feature_sizes, strides, sizes):
        base = upload(base_anchors(size, aspect_ratios, round_anchors=round_anchors, dtype=dtype), dtype=dtype, device=device)
        shift_x = torch.arange(fw, dtype=torch.int32, device=device) * sw
        shift_y = torch.arange(fh, dtype=torch.int32, device=device) * sh
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack((xx, yy, xx, yy), dim=1)
        out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
    return out


def normalize_boxes(boxes: Tensor, padded_size: tuple[int, int]) -> Tensor:
    """Pixel boxes x1 y1 x2 y2 -> matterport's normalized frame (``utils.norm_boxes``).

    ``(x1 / (W - 1), y1 / (H - 1), (x2 - 1) / (W - 1), (y2 - 1) / (H - 1))`` of the padded (H, W)
    image, computed in float64 (as numpy does there) and returned as float32.
    """
    height, width = padded_size
    b = boxes.to(torch.float64)
    scale = upload([width - 1, height - 1, width - 1, height - 1], dtype=torch.float64, device=b.device)
    shift = upload([0.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=b.device)
    return ((b - shift) / scale).to(torch.float32)
