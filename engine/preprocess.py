"""Pre-processing: uint8 RGB images of mixed sizes -> one normalised, zero-padded batch.

Reproduces torchvision's ``GeneralizedRCNNTransform`` (normalise, resize, batch):

1. ``x = image.float() / input_scale`` (torchvision: ``/ 255``), channels reordered if the
   network wants BGR;
2. ``(x - mean) / std`` per channel (before the resize, as torchvision does);
3. resize with ``scale = min(min_size / short, max_size / long)`` (Python float) and output
   size ``floor(side * scale)`` (or round-half-up), by ``F.interpolate`` bilinear,
   ``align_corners=False``, no antialias;
4. zero-pad bottom/right to a common size, a multiple of ``size_divisibility``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import MaskRCNNConfig


@dataclass(frozen=True)
class ImageBatch:
    """A batch ready for the backbone.

    Attributes:
        tensor: float32 [B, 3, Hp, Wp], normalised, zero-padded; the network's channel order.
        image_sizes: per image (h, w) after resizing, before padding (the frame of proposals and boxes).
        original_sizes: per image (H, W) as given by the caller (the frame of the results).
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return self.tensor.shape[0]


def resized_size(height: int, width: int, *, min_size: int, max_size: int, rounding: str) -> tuple[int, int]:
    """Output (h, w) of the short-side resize, as torchvision (floor) or Detectron2/mmdet (round half up) compute it.

    Each side is at least 1 pixel: for images longer than ``max_size / min_size``-to-1 whose
    short side would round to 0, torchvision fails inside ``F.interpolate``; we keep one row.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    if rounding == "floor":
        out_h, out_w = int(math.floor(height * scale)), int(math.floor(width * scale))
    elif rounding == "round_half_up":
        out_h, out_w = int(height * scale + 0.5), int(width * scale + 0.5)
    else:
        raise ValueError(f"unknown resize rounding {rounding!r}")
    return max(out_h, 1), max(out_w, 1)


def normalize_and_resize(image: Tensor, *, config: MaskRCNNConfig) -> Tensor:
    """One image: uint8 [H, W, 3] RGB on the target device -> float32 [3, h, w], normalised and resized."""
    x = image.permute(2, 0, 1).float() / config.input_scale
    if config.channel_order == "BGR":
        x = x.flip(0)
    mean = torch.as_tensor(config.pixel_mean, dtype=x.dtype, device=x.device)
    std = torch.as_tensor(config.pixel_std, dtype=x.dtype, device=x.device)
    height, width = x.shape[-2:]
    out_h, out_w = resized_size(
        height, width, min_size=config.min_size, max_size=config.max_size, rounding=config.resize_rounding
    )
    if not config.normalize_before_resize:
        x = _resize(x, out_h, out_w)
    x = (x - mean[:, None, None]) / std[:, None, None]
    if config.normalize_before_resize:
        x = _resize(x, out_h, out_w)
    return x


def _resize(x: Tensor, out_h: int, out_w: int) -> Tensor:
    return F.interpolate(x[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]


def preprocess(images: list[np.ndarray], *, config: MaskRCNNConfig, device: torch.device) -> ImageBatch:
    """Normalise, resize and pad a list of images into one batch.

    Args:
        images: non-empty list of uint8 [H, W, 3] RGB numpy arrays (already validated), any mix of sizes.
        config: the pre-processing fields of the configuration are used.
        device: where the batch is built.

    Returns:
        :class:`ImageBatch` with the padded tensor and both frames' sizes.
    """
    resized = []
    for image in images:
        host = torch.from_numpy(np.ascontiguousarray(image))
        resized.append(normalize_and_resize(host.to(device, non_blocking=True), config=config))
    div = config.size_divisibility
    pad_h = int(math.ceil(max(r.shape[1] for r in resized) / div) * div)
    pad_w = int(math.ceil(max(r.shape[2] for r in resized) / div) * div)
    batch = resized[0].new_zeros((len(resized), 3, pad_h, pad_w))
    for i, r in enumerate(resized):
        batch[i, :, : r.shape[1], : r.shape[2]].copy_(r)
    return ImageBatch(
        tensor=batch,
        image_sizes=[(int(r.shape[1]), int(r.shape[2])) for r in resized],
        original_sizes=[(int(im.shape[0]), int(im.shape[1])) for im in images],
    )
