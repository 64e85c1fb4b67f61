"""Mask paste-back: per-detection MxM mask probabilities -> full-image masks.

Two paste methods share every function here (``method=``):

- ``"torchvision"`` (the default): torchvision's ``paste_masks_in_image``;
- ``"grid_sample"``: Detectron2's and mmdetection's paste (``_do_paste_mask`` in
  ``detectron2/layers/mask_ops.py`` and mmdet's ``fcn_mask_head.py``).

Method "torchvision"
--------------------
Reproduces torchvision's ``paste_masks_in_image(masks[:, None], boxes, (H, W),
padding=1)`` (``torchvision.models.detection.roi_heads``), optionally followed
by the ``> threshold`` that callers apply to its output. For every detection:

1. the MxM mask is zero-padded by ``padding`` on each side (``P = M + 2p``);
2. its box is expanded about its centre by ``scale = P / M`` in float32
   (``w_half = (x2 - x1) * 0.5 * scale``, ``x_c = (x2 + x1) * 0.5``, ...) and the
   expanded corners are truncated toward zero to int64 (``.to(torch.int64)``);
3. the padded mask is resized to ``(h, w)`` with ``h = max(y2 - y1 + 1, 1)``,
   ``w = max(x2 - x1 + 1, 1)`` exactly as ``F.interpolate(mode="bilinear",
   align_corners=False)`` does (float32 ``scale = P / out``, source index
   ``max(scale * (dst + 0.5) - 0.5, 0)``, floor, +1 neighbour unless on the last
   row/column, linear weights);
4. the resized mask is written into a zero ``(H, W)`` plane at rows
   ``[y1, y2 + 1)`` and columns ``[x1, x2 + 1)`` clipped to the image.

Coordinates are original-image pixels (x to the right, y down). Boxes whose
expanded integer box misses the image contribute nothing (an all-zero plane);
torchvision raises a shape error for most of those instead. The threshold is
``prob > threshold``; ``padding`` defaults to 1.

Method "grid_sample" (Detectron2 / mmdetection)
-----------------------------------------------
No padding (``padding`` must be None or 0) and no box expansion. Every image pixel
``(r, c)`` gets the value of ``F.grid_sample(mask[None, None], grid,
mode="bilinear", padding_mode="zeros", align_corners=False)`` at its centre,
with the grid built exactly as Detectron2 builds it, in float32, one rounding per
operation: ``gx = (c + 0.5 - x1) / (x2 - x1) * 2 - 1`` and ``gy = (r + 0.5 - y1)
/ (y2 - y1) * 2 - 1`` (the float box ``[x1, x2]`` maps to ``[-1, 1]``). grid_sample
unnormalises ``ix = ((gx + 1) * M - 1) / 2`` (CUDA; the CPU kernel computes
``(gx + 1) * (M / 2) - 0.5``; both compile to one fused multiply-add and agree
bit for bit), takes the four taps around ``(iy, ix)`` with zeros outside the MxM
mask and weights ``1 - frac`` and ``frac`` per axis, and sums ``nw, ne, sw, se`` in
that order. The threshold is ``prob >= threshold`` (Detectron2 and mmdet binarise
with ``>= 0.5``), so exactly-0.5 probabilities are foreground.

These are the values grid_sample gives over the *whole* image (what Detectron2
and mmdet compute on a GPU). They are nonzero only where a tap lands inside the
mask, i.e. for pixel centres less than half a mask cell (``(x2 - x1) / (2M)``
pixels) outside the float box: bilinear interpolation against the zero padding
fades the border cells out over that distance, which exceeds one pixel for boxes
wider than 2M pixels. Each detection is therefore computed only on its *paste
region*: columns ``[floor(x1 - hx) - 1, ceil(x2 + hx) + 1)`` with ``hx = (x2 - x1) /
(2M)`` (float32), rows likewise, clipped to the image: the float box widened by
half a mask cell, its integer hull grown by one pixel of slack. Every pixel
outside it is exactly 0 in grid_sample's output (proof: the region leaves at
least 0.5 px beyond the half cell, so ``ix <= -1`` or ``ix >= M`` there, which
puts every tap with nonzero weight outside the mask). Detectron2 on the CPU
pastes only within ``[floor(x1) - 1, ceil(x2) + 1)``; for probabilities in
``[0, 1]`` and thresholds >= 0.5 the binary masks are the same, because outside
the float box the value is below half the mask's largest probability.
Boxes with ``x2 <= x1``, ``y2 <= y1`` or a non-finite coordinate paste nothing
(Detectron2 drops empty boxes before pasting; grid_sample would give NaN or a
mirrored mask).

Crop mode
---------
Crop mode (``crop=True``): instead of full ``(H, W)`` planes, each detection gets
only its *paste region* (method "torchvision": the expanded integer box of step 2
clipped to the image; method "grid_sample": the region defined above). Outside it
the full plane holds the outside value: 0, thresholded ``0 > threshold``
("torchvision") or ``0 >= threshold`` ("grid_sample"), i.e. all False for any
threshold > 0. Per image the result is a pair ``(data, table)``:

- ``data``: 1-D tensor (torch.bool when thresholded, else float32) on masks'
  device, the row-major crops of the image's detections back to back;
- ``table``: int64 ``[n, 5]`` on the CPU, one row ``(offset, y0, x0, h, w)`` per
  detection: its crop is ``data[offset : offset + h * w].view(h, w)`` and covers
  rows ``[y0, y0 + h)`` and columns ``[x0, x0 + w)`` of the image (image pixels).
  A region that misses the image has ``h = w = 0`` (an empty crop; ``y0, x0``
  are then the clamped corner and carry no meaning).

Crop mode copies the boxes to the host (``N x 4`` numbers, one sync) to size
the buffer; :func:`crop_tables` gives the same tables without pasting.

Three functions share one signature: :func:`paste_masks_reference` (plain
PyTorch, the CPU path and the test oracle), :func:`paste_masks_triton` (one
Triton launch for all detections of a batch; one kernel for both methods, the
method a compile-time flag) and the dispatcher :func:`paste_masks`.

Exactness, "torchvision": the reference calls ``F.interpolate`` itself, so it is bit-identical
to torchvision on every device. The Triton kernel computes the integer boxes
with torch's float32 operations (no FMA contraction, IEEE division), so it
places every detection identically, and reproduces torch's bilinear
arithmetic: the source index ``scale * (dst + 0.5) - 0.5`` rounded once (torch's
kernels are compiled with FMA contraction) and ``wy0 * (wx0 * a + wx1 * b) +
wy1 * (wx0 * c + wx1 * d)`` with each ``p * q + r`` fused. Under the interpreter
(CPU tensors) it also mimics torch's CPU kernel for small outputs (``h + w <=
128``: four taps with product weights, summed in order) and is bit-identical to
torchvision on CPU. On CUDA the fused nested form is what torch's CUDA kernel
compiles to as far as we know; this has not been checked bit for bit on a GPU,
and any difference is a few float32 ulps (a thresholded pixel can then only flip
where the probability is within ulps of the threshold).

Exactness, "grid_sample": the reference builds Detectron2's grid for the paste
region and calls ``F.grid_sample``, so it equals grid_sample over the whole image
bit for bit on every device. The Triton kernel computes the grid with IEEE
float32 operations (``div_rn``, no contraction), ``ix = fma(gx + 1, M / 2, -0.5)``
and ``fma(v_se, se, fma(v_sw, sw, fma(v_ne, ne, v_nw * nw)))``: checked bit for
bit against torch's CPU kernel (AVX512 build; its AVX2 build is compiled with the
same flags) and, from the source, what torch's CUDA kernel (``out_acc += v * w``
per in-bounds tap) compiles to; the CUDA equality has not been checked on a GPU.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._checks import describe as _describe
from kernels._dispatch import host_to_device, use_triton

try:  # Triton is a Linux-only dependency; the reference works without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["METHODS", "crop_tables", "paste_masks", "paste_masks_reference", "paste_masks_triton"]

# Paste methods: torchvision's paste_masks_in_image, and Detectron2's / mmdetection's grid_sample paste.
METHODS = ("torchvision", "grid_sample")

# Tile of image pixels handled per program / loop iteration of the kernel: BLOCK_H rows of
# one detection's region per program, BLOCK_W columns per iteration of its column loop.
# CUDA launch (read by kernels/aot.py): 16 x 64 pixels over 8 warps, 4 pixels per thread.
# Each pixel holds its four taps, their weights and 64-bit addresses, so the register need
# grows with the pixels per thread: 32 x 64 over 4 warps (16 per thread) compiled to
# 191-226 registers, 2 blocks of 4 warps per SM (12.5% theoretical occupancy; issue 11);
# 16 x 64 over 8 warps compiles to 73-80 registers, no spill, 3 blocks of 8 warps per SM
# (37.5%) on sm_80 and sm_90 (triton 3.8.0).
_BLOCK_H = 16
_BLOCK_W = 64
_NUM_WARPS = 8
# Interpreter (TRITON_INTERPRET=1): each program instance costs about 10 ms whatever its
# size, so its tiles are taller (32 rows) to keep the grid small. The tile shape does not
# change any pixel's arithmetic: results are bit-identical with either tile.
_INTERPRETER_BLOCK_H = 32
_INTERPRETER_BLOCK_W = 64
_INTERPRETER_NUM_WARPS = 4


def _tile() -> tuple:
    """CUDA launch (BLOCK_H, BLOCK_W, num_warps); see the constants above."""
    return _BLOCK_H, _BLOCK_W, _NUM_WARPS


def _interpreter_tile() -> tuple:
    """(BLOCK_H, BLOCK_W, num_warps) under the interpreter: 32 x 64 tiles."""
    return _INTERPRETER_BLOCK_H, _INTERPRETER_BLOCK_W, _INTERPRETER_NUM_WARPS


# --------------------------------------------------------------------------------------
# Input checking (shared by every implementation)
# --------------------------------------------------------------------------------------




def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{what} must be an int; got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int; got {_describe(value)}") from None


def _check_crop(crop) -> bool:
    if not isinstance(crop, (bool, np.bool_)):
        raise TypeError(f"crop must be a bool; got {_describe(crop)}")
    return bool(crop)


def _check_method(method) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {', '.join(map(repr, METHODS))}; got {_describe(method)}")
    if method not in METHODS:
        raise ValueError(
            f"unknown paste method {method!r}; expected one of {', '.join(map(repr, METHODS))} "
            "('torchvision': torchvision's paste_masks_in_image; 'grid_sample': Detectron2 / mmdetection)"
        )
    return method


def _check_inputs(masks, boxes, counts, image_sizes, threshold, padding, method="torchvision"):
    """Validates the arguments; returns (counts, sizes, threshold as float32-rounded float or None, padding).

    ``padding=None`` means the method's own: 1 for "torchvision", 0 for "grid_sample"
    (which pastes without padding and accepts only None or 0).
    """
    method = _check_method(method)
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a torch.Tensor float32 [N, M, M]; got {_describe(masks)}")
    if not isinstance(boxes, Tensor):
        raise TypeError(f"boxes must be a torch.Tensor float32 [N, 4]; got {_describe(boxes)}")
    if masks.dim() != 3 or masks.shape[1] != masks.shape[2] or masks.shape[1] < 1:
        raise ValueError(
            f"masks must have shape [N, M, M] with M >= 1 (squeeze a channel dim first); got {_describe(masks)}"
        )
    if masks.dtype != torch.float32:
        raise TypeError(f"masks must be float32; got {masks.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] (x1 y1 x2 y2); got {_describe(boxes)}")
    if boxes.dtype != torch.float32:
        raise TypeError(f"boxes must be float32; got {boxes.dtype}")
    if boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"boxes [N, 4] and masks [N, M, M] must have the same N; got {boxes.shape[0]} and {masks.shape[0]}")
    if boxes.device != masks.device:
        raise ValueError(f"masks and boxes must be on the same device; got {masks.device} and {boxes.device}")

    if isinstance(counts, (str, bytes)) or not isinstance(counts, (Sequence, Tensor)):
        raise TypeError(f"counts must be a sequence of ints (detections per image); got {_describe(counts)}")
    counts = [_as_int(c, "each entry of counts") for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be non-negative; got {counts}")
    if sum(counts) != masks.shape[0]:
        raise ValueError(f"sum(counts) must equal N = {masks.shape[0]} (rows of masks/boxes); got counts {counts}")

    if isinstance(image_sizes, (str, bytes)) or not isinstance(image_sizes, (Sequence, Tensor)):
        raise TypeError(f"image_sizes must be a sequence of (H, W) int pairs; got {_describe(image_sizes)}")
    sizes = []
    for s in image_sizes:
        if isinstance(s, (str, bytes)) or not isinstance(s, (Sequence, Tensor)) or len(s) != 2:
            raise ValueError(f"each entry of image_sizes must be an (H, W) pair; got {_describe(s)}")
        h, w = (_as_int(v, "image height/width") for v in s)
        if h <= 0 or w <= 0:
            raise ValueError(f"image sizes must be positive; got (H, W) = ({h}, {w})")
        sizes.append((h, w))
    if len(sizes) != len(counts):
        raise ValueError(f"counts and image_sizes must have one entry per image; got {len(counts)} and {len(sizes)}")

    if threshold is not None:
        if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.integer, np.floating)):
            raise TypeError(f"threshold must be a float or None; got {_describe(threshold)}")
        # torch compares float32 tensors with a Python scalar in float32.
        threshold = float(np.float32(threshold))
    if padding is None:
        padding = 1 if method == "torchvision" else 0
    padding = _as_int(padding, "padding")
    if padding < 0:
        raise ValueError(f"padding must be >= 0; got {padding}")
    if method == "grid_sample" and padding != 0:
        raise ValueError(
            f"padding applies only to method='torchvision'; method='grid_sample' pastes without padding "
            f"(pass padding=None or 0); got padding={padding}"
        )
    return counts, sizes, threshold, padding


def _box_scale(mask_size: int, padding: int) -> float:
    """torchvision's expansion factor (M + 2p) / M, rounded to float32 as torch does for `tensor *= float`."""
    return float(np.float32(float(mask_size + 2 * padding) / mask_size))


def _outside_value(threshold, method="torchvision") -> bool:
    """Thresholded value of pixels outside every box: they are 0, so ``0 > threshold``
    ("torchvision") or ``0 >= threshold`` ("grid_sample")."""
    if threshold is None:
        return False
    return 0.0 >= threshold if method == "grid_sample" else 0.0 > threshold


def _apply_threshold(values: Tensor, threshold: float, method: str) -> Tensor:
    """The method's binarisation: ``>`` for "torchvision", ``>=`` for "grid_sample" (Detectron2, mmdet)."""
    return values >= threshold if method == "grid_sample" else values > threshold


# --------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# --------------------------------------------------------------------------------------


def _expanded_int_boxes(boxes: Tensor, scale: float) -> Tensor:
    """int64 [N, 4]: boxes expanded about their centres by `scale` (float32), truncated toward zero."""
    x1, y1, x2, y2 = boxes.unbind(1)
    half_w = (x2 - x1) * 0.5 * scale
    half_h = (y2 - y1) * 0.5 * scale
    cx = (x2 + x1) * 0.5
    cy = (y2 + y1) * 0.5
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=1).to(torch.int64)


def _paste_regions(int_boxes: Tensor, counts: list[int], sizes: list[tuple[int, int]]) -> Tensor:
    """int64 [N, 4] on the CPU: (y0, x0, h, w) of each detection's paste region.

    The region is the expanded integer box ``[x1, x2] x [y1, y2]`` (inclusive, as
    :func:`_expanded_int_boxes` gives it) clipped to its image ``[0, W) x [0, H)``.
    A region that misses the image is reported as ``h = w = 0`` with the corner
    clamped into ``[0, H] x [0, W]``.
    """
    ib = int_boxes.cpu()
    im_h, im_w = _image_extents(counts, sizes)
    y0 = torch.minimum(ib[:, 1].clamp(min=0), im_h)
    x0 = torch.minimum(ib[:, 0].clamp(min=0), im_w)
    h = (torch.minimum(ib[:, 3] + 1, im_h) - y0).clamp(min=0)
    w = (torch.minimum(ib[:, 2] + 1, im_w) - x0).clamp(min=0)
    empty = (h == 0) | (w == 0)
    h = h.masked_fill(empty, 0)
    w = w.masked_fill(empty, 0)
    return torch.stack((y0, x0, h, w), dim=1)


def _image_extents(counts: list[int], sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """int64 [N] image height and width of each detection."""
    reps = torch.tensor(counts, dtype=torch.int64)
    im_h = torch.tensor([h for h, _ in sizes], dtype=torch.int64).repeat_interleave(reps)
    im_w = torch.tensor([w for _, w in sizes], dtype=torch.int64).repeat_interleave(reps)
    return im_h, im_w


def _grid_sample_regions(boxes: Tensor, counts: list[int], sizes: list[tuple[int, int]], m: int) -> Tensor:
    """int64 [N, 4] on the CPU: (y0, x0, h, w) of each detection's "grid_sample" paste region.

    Columns ``[floor(x1 - hx) - 1, ceil(x2 + hx) + 1)`` with ``hx = (x2 - x1) / (2M)``, rows
    likewise, clipped to the image; float32 arithmetic (IEEE, as the kernel computes it),
    clamped before the conversion to integers. Regions that miss the image are ``h = w = 0``
    with the corner clamped into ``[0, H] x [0, W]``; boxes with ``x2 <= x1``, ``y2 <= y1`` or a
    non-finite coordinate paste nothing: ``(0, 0, 0, 0)``.
    """
    b = boxes.detach().cpu().numpy().astype(np.float32, copy=False)  # the one device -> host copy
    x1, y1, x2, y2 = (b[:, i] for i in range(4))
    im_h, im_w = (t.numpy().astype(np.float32) for t in _image_extents(counts, sizes))
    two_m = np.float32(2 * m)
    one = np.float32(1)
    with np.errstate(all="ignore"):  # inf / nan boxes are masked out below
        valid = np.isfinite(b).all(axis=1) & (x2 > x1) & (y2 > y1)
        hx = (x2 - x1) / two_m
        hy = (y2 - y1) / two_m
        x_lo = np.minimum(np.maximum(np.floor(x1 - hx) - one, np.float32(0)), im_w)
        x_hi = np.minimum(np.maximum(np.ceil(x2 + hx) + one, np.float32(0)), im_w)
        y_lo = np.minimum(np.maximum(np.floor(y1 - hy) - one, np.float32(0)), im_h)
        y_hi = np.minimum(np.maximum(np.ceil(y2 + hy) + one, np.float32(0)), im_h)
    x_lo, x_hi, y_lo, y_hi = (np.where(valid, v, np.float32(0)).astype(np.int64) for v in (x_lo, x_hi, y_lo, y_hi))
    h = np.maximum(y_hi - y_lo, 0)
    w = np.maximum(x_hi - x_lo, 0)
    empty = (h == 0) | (w == 0)
    h[empty] = 0
    w[empty] = 0
    return torch.from_numpy(np.stack((y_lo, x_lo, h, w), axis=1)).to(torch.int64).reshape(-1, 4)


def _regions(boxes: Tensor, counts: list[int], sizes: list[tuple[int, int]], m: int, padding: int, method: str):
    """(int boxes int64 [N, 4] CPU or None, paste regions int64 [N, 4] CPU (y0, x0, h, w)).

    "torchvision": the expanded integer boxes (needed for the resize) and their clipped
    regions; "grid_sample": None and the regions of :func:`_grid_sample_regions`.
    Copies the boxes to the host.
    """
    if method == "grid_sample":
        return None, _grid_sample_regions(boxes, counts, sizes, m)
    int_boxes = _expanded_int_boxes(boxes, _box_scale(m, padding)).cpu()  # the one device -> host copy
    return int_boxes, _paste_regions(int_boxes, counts, sizes)


def _crop_tables(
    boxes: Tensor, counts: list[int], sizes: list[tuple[int, int]], m: int, padding: int, method: str = "torchvision"
):
    """(int boxes int64 [N, 4] CPU or None, per-image int64 [n_i, 5] CPU tables (offset, y0, x0, h, w)).

    Offsets are relative to each image's crop buffer: crops are laid out row-major,
    back to back, in detection order. The int boxes are None for "grid_sample".
    """
    int_boxes, regions = _regions(boxes, counts, sizes, m, padding, method)
    tables, start = [], 0
    for n in counts:
        reg = regions[start : start + n]
        area = reg[:, 2] * reg[:, 3]
        offsets = torch.cumsum(area, 0) - area
        tables.append(torch.cat((offsets[:, None], reg), dim=1))
        start += n
    return int_boxes, tables


def crop_tables(
    boxes, counts, image_sizes, *, mask_size: int = 28, padding: int | None = None, method: str = "torchvision"
) -> list[Tensor]:
    """The crop layout that ``paste_masks*(..., crop=True)`` produces, without pasting.

    Args:
        boxes: float32 [N, 4] x1 y1 x2 y2 in each detection's original-image pixels.
        counts, image_sizes: as for :func:`paste_masks_reference`.
        mask_size: M, the side of the masks that will be pasted; padding, method: as for the paste.

    Returns:
        Per image int64 [n_i, 5] on the CPU, rows ``(offset, y0, x0, h, w)`` (see the
        module docstring); ``table[:, 3] * table[:, 4]`` summed is the image's crop buffer
        length. Copies the boxes to the host.
    """
    mask_size = _as_int(mask_size, "mask_size")
    if mask_size < 1:
        raise ValueError(f"mask_size must be >= 1; got {mask_size}")
    if not isinstance(boxes, Tensor):
        raise TypeError(f"boxes must be a torch.Tensor float32 [N, 4]; got {_describe(boxes)}")
    n = boxes.shape[0] if boxes.dim() >= 1 else 0
    masks = torch.zeros((1, mask_size, mask_size), device=boxes.device).expand(n, mask_size, mask_size)
    counts, sizes, _, padding = _check_inputs(masks, boxes, counts, image_sizes, None, padding, method)
    return _crop_tables(boxes, counts, sizes, mask_size, padding, method)[1]


def _grid_sample_crop(mask: Tensor, box: Tensor, y0: int, x0: int, h: int, w: int) -> Tensor:
    """float32 [h, w]: grid_sample of one MxM mask at the centres of image rows ``[y0, y0 + h)``
    and columns ``[x0, x0 + w)``, with Detectron2's grid (``box``: float32 [1, 4]).

    Each output pixel depends only on its own grid entry, so these equal the same pixels of
    a whole-image grid_sample bit for bit.
    """
    bx1, by1, bx2, by2 = box.split(1, dim=1)  # each [1, 1], on the mask's device, as Detectron2 splits
    img_x = torch.arange(x0, x0 + w, device=mask.device, dtype=torch.float32) + 0.5
    img_y = torch.arange(y0, y0 + h, device=mask.device, dtype=torch.float32) + 0.5
    gx = (img_x - bx1) / (bx2 - bx1) * 2 - 1  # [1, w]
    gy = (img_y - by1) / (by2 - by1) * 2 - 1  # [1, h]
    grid = torch.stack((gx[:, None, :].expand(1, h, w), gy[:, :, None].expand(1, h, w)), dim=3)
    return F.grid_sample(mask[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]


def paste_masks_reference(
    masks, boxes, counts, image_sizes, *, threshold=0.5, padding=None, crop=False, method="torchvision"
) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
    """Pastes per-detection masks into their images (plain PyTorch; CPU path and test oracle).

    Args:
        masks: float32 [N, M, M] mask probabilities (M >= 1), detections of all
            images concatenated image after image.
        boxes: float32 [N, 4] x1 y1 x2 y2 in each detection's original-image pixels.
        counts: host ints, detections per image; sum(counts) == N.
        image_sizes: host (H, W) int pairs, one per image.
        threshold: float -> torch.bool masks, ``prob > threshold`` ("torchvision") or
            ``prob >= threshold`` ("grid_sample"); None -> float32 probabilities (what
            torchvision's ``paste_masks_in_image`` / grid_sample return).
        padding: zero border added to each mask before resizing; None (default): 1 for
            "torchvision" (torchvision's), 0 for "grid_sample" (which accepts only 0).
        crop: False -> full planes; True -> only each detection's paste region.
        method: "torchvision" (default; torchvision's ``paste_masks_in_image``) or
            "grid_sample" (Detectron2's / mmdetection's ``_do_paste_mask``); see the
            module docstring.

    Returns:
        ``crop=False``: one tensor per image, [n_i, H_i, W_i], torch.bool
        (thresholded) or float32, on masks' device.
        ``crop=True``: one ``(data, table)`` pair per image (module docstring):
        ``data`` 1-D torch.bool or float32 on masks' device, ``table`` int64
        [n_i, 5] ``(offset, y0, x0, h, w)`` on the CPU; each crop equals the full
        plane's ``[y0:y0 + h, x0:x0 + w]``.
        Inputs are not modified.

    Each detection resizes (samples) its mask only on its own paste region and writes the
    part inside the image; no full-image float temporaries are made.
    """
    counts, sizes, thr, padding = _check_inputs(masks, boxes, counts, image_sizes, threshold, padding, method)
    crop = _check_crop(crop)
    thresholded = thr is not None
    dtype = torch.bool if thresholded else torch.float32
    fill = _outside_value(thr, method)
    n_total, m = masks.shape[0], masks.shape[-1]
    if crop:
        int_boxes, tables = _crop_tables(boxes, counts, sizes, m, padding, method)
        datas = [
            torch.full((int((t[:, 3] * t[:, 4]).sum()),), fill, dtype=dtype, device=masks.device) for t in tables
        ]
        planes = [
            data[off : off + h * w].view(h, w)
            for data, t in zip(datas, tables)
            for off, _, _, h, w in t.tolist()
        ]
        regions = torch.cat(tables)[:, 1:].tolist() if tables else []
        outs = list(zip(datas, tables))
    else:
        outs = [torch.full((n, h, w), fill, dtype=dtype, device=masks.device) for n, (h, w) in zip(counts, sizes)]
        if n_total == 0:
            return outs
        int_boxes, regions = _regions(boxes, counts, sizes, m, padding, method)
        regions = regions.tolist()
        planes = [out[j] for out in outs for j in range(out.shape[0])]
    int_boxes = int_boxes.tolist() if int_boxes is not None else None
    for det, (plane, (y0, x0, h, w)) in enumerate(zip(planes, regions)):
        if h == 0:
            continue
        if method == "grid_sample":
            region = _grid_sample_crop(masks[det], boxes[det : det + 1], y0, x0, h, w)
        else:
            bx1, by1, bx2, by2 = int_boxes[det]
            box_w = max(bx2 - bx1 + 1, 1)
            box_h = max(by2 - by1 + 1, 1)
            padded = F.pad(masks[det][None, None], (padding,) * 4)
            resized = F.interpolate(padded, size=(box_h, box_w), mode="bilinear", align_corners=False)[0, 0]
            region = resized[y0 - by1 : y0 + h - by1, x0 - bx1 : x0 + w - bx1]
        region = _apply_threshold(region, thr, method) if thresholded else region
        if crop:
            plane.copy_(region)
        else:
            plane[y0 : y0 + h, x0 : x0 + w] = region
    return outs


# --------------------------------------------------------------------------------------
# Triton kernel and launcher
# --------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _fma(a, b, c, EMULATE_FMA: tl.constexpr):
        """a * b + c rounded once, for float32 tensors of one shape (what torch's compiled
        kernels get from FMA contraction)."""
        if EMULATE_FMA:
            # Triton's interpreter rounds its fma twice; a float32 product is exact in float64.
            return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
        else:
            return tl.math.fma(a, b, c)

    @triton.jit
    def _linear_taps(dst, scale, in_size, EMULATE_FMA: tl.constexpr):
        """Taps of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis.

        dst: int tensor of destination indices (relative to the box); scale: float32 in / out;
        in_size: input length. Returns (i0, i1, lambda0, lambda1) with
        src = max(scale * (dst + 0.5) - 0.5, 0), i0 = floor(src), i1 = i0 + 1 except on the
        last input index, lambda1 = src - i0, lambda0 = 1 - lambda1.
        """
        dst_f = dst.to(tl.float32) + 0.5
        src = _fma(tl.zeros_like(dst_f) + scale, dst_f, tl.zeros_like(dst_f) - 0.5, EMULATE_FMA)
        src = tl.maximum(src, 0.0)
        i0 = src.to(tl.int32)  # floor: src >= 0
        lam1 = src - i0.to(tl.float32)
        lam0 = 1.0 - lam1
        i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
        return i0, i1, lam0, lam1

    @triton.jit
    def _grid_taps(coord, lo, extent, half_m, M, EMULATE_FMA: tl.constexpr):
        """grid_sample's taps along one axis at image pixels ``coord`` (int tensor), for a box
        ``[lo, lo + extent]``: Detectron2's grid ``g = (coord + 0.5 - lo) / extent * 2 - 1``
        (float32, each step rounded), ``i = fma(g + 1, M / 2, -0.5)``, then
        ``i0 = floor(i)``, ``frac = i - i0``, ``1 - frac``. Returns (idx0, ok0, idx1, ok1,
        one_minus_frac, frac) with ok* the taps inside ``[0, M)`` (idx* are 0 elsewhere)."""
        centre = coord.to(tl.float32) + 0.5
        g = tl.math.div_rn(centre - lo, tl.zeros_like(centre) + extent) * 2.0 - 1.0
        src = _fma(g + 1.0, tl.zeros_like(g) + half_m, tl.zeros_like(g) - 0.5, EMULATE_FMA)
        f0 = tl.floor(src)
        frac = src - f0
        one_minus = 1.0 - frac
        ok0 = (f0 >= 0.0) & (f0 <= (M - 1).to(tl.float32))
        ok1 = (f0 >= -1.0) & (f0 <= (M - 2).to(tl.float32))
        idx0 = tl.where(ok0, f0, 0.0).to(tl.int32)
        idx1 = tl.where(ok1, f0 + 1.0, 0.0).to(tl.int32)
        return idx0, ok0, idx1, ok1, one_minus, frac

    # M and PAD stay runtime ints: Triton would otherwise turn a value of 1 into a constexpr.
    @triton.jit(do_not_specialize=["M", "PAD"])
    def _paste_masks_kernel(
        masks_ptr,  # float32 [N, M, M], contiguous
        boxes_ptr,  # float32 [N, 4], contiguous
        meta_ptr,  # int64 [N, 6]: (base, oy, ox, row_stride, lim_y, lim_x), see below
        out_ptr,  # uint8 (thresholded) or float32 flat buffer, pre-filled with the outside value
        M,  # mask side
        PAD,  # zero padding per side ("torchvision" only)
        box_scale,  # float32 (M + 2 * PAD) / M ("torchvision" only)
        THRESHOLD: tl.constexpr,  # float32-representable threshold (used when APPLY_THRESHOLD)
        APPLY_THRESHOLD: tl.constexpr,
        GRID_SAMPLE: tl.constexpr,  # method: False "torchvision", True "grid_sample" (Detectron2 / mmdet)
        EMULATE_FMA: tl.constexpr,  # True under the interpreter (no true fma there)
        TORCH_CPU_SMALL_PATH: tl.constexpr,  # "torchvision": mimic torch's CPU kernel for h + w <= 128 outputs
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        # Output layout of detection d (one kernel for full planes and crops): image pixel
        # (r, c) is stored at out[base + (r - oy) * row_stride + (c - ox)], and only pixels with
        # oy <= r < lim_y, ox <= c < lim_x are written. Full planes: (plane offset, 0, 0, W, H, W);
        # crops: (crop offset, y0, x0, w, y0 + h, x0 + w).
        # Program (d, band): detection d, rows [row_lo + band * BLOCK_H, ... + BLOCK_H) of its
        # paste region clipped to the limits (row_lo: the region's first row).
        d = tl.program_id(0).to(tl.int64)
        band = tl.program_id(1)

        x1f = tl.load(boxes_ptr + d * 4 + 0)
        y1f = tl.load(boxes_ptr + d * 4 + 1)
        x2f = tl.load(boxes_ptr + d * 4 + 2)
        y2f = tl.load(boxes_ptr + d * 4 + 3)

        base = tl.load(meta_ptr + d * 6 + 0)
        oy = tl.load(meta_ptr + d * 6 + 1)
        ox = tl.load(meta_ptr + d * 6 + 2)
        row_stride = tl.load(meta_ptr + d * 6 + 3)
        lim_y = tl.load(meta_ptr + d * 6 + 4)
        lim_x = tl.load(meta_ptr + d * 6 + 5)

        if GRID_SAMPLE:
            # Paste region (module docstring): the float box widened by half a mask cell, its
            # integer hull grown by one pixel, clipped to the limits; float32 as on the host,
            # clamped before the conversion to integers. Empty for x2 <= x1, y2 <= y1 or a
            # non-finite coordinate (NaN fails every comparison).
            m_f = M.to(tl.float32)
            half_m = m_f * 0.5
            finite = (tl.abs(x1f) <= 3.4028234663852886e38) & (tl.abs(y1f) <= 3.4028234663852886e38)
            finite = finite & (tl.abs(x2f) <= 3.4028234663852886e38) & (tl.abs(y2f) <= 3.4028234663852886e38)
            valid = finite & (x2f > x1f) & (y2f > y1f)
            box_wf = x2f - x1f
            box_hf = y2f - y1f
            hx = tl.math.div_rn(box_wf, m_f * 2.0)
            hy = tl.math.div_rn(box_hf, m_f * 2.0)
            ox_f = ox.to(tl.float32)
            oy_f = oy.to(tl.float32)
            lim_x_f = lim_x.to(tl.float32)
            lim_y_f = lim_y.to(tl.float32)
            col_lo_f = tl.minimum(tl.maximum(tl.floor(x1f - hx) - 1.0, ox_f), lim_x_f)
            col_hi_f = tl.minimum(tl.maximum(tl.ceil(x2f + hx) + 1.0, ox_f), lim_x_f)
            row_lo_f = tl.minimum(tl.maximum(tl.floor(y1f - hy) - 1.0, oy_f), lim_y_f)
            row_hi_f = tl.minimum(tl.maximum(tl.ceil(y2f + hy) + 1.0, oy_f), lim_y_f)
            # Boxes that paste nothing sample a harmless unit box (no inf / NaN arithmetic).
            x1f = tl.where(valid, x1f, 0.0)
            y1f = tl.where(valid, y1f, 0.0)
            box_wf = tl.where(valid, box_wf, 1.0)
            box_hf = tl.where(valid, box_hf, 1.0)
            col_lo = tl.where(valid, col_lo_f, ox_f).to(tl.int64)
            col_hi = tl.where(valid, col_hi_f, ox_f).to(tl.int64)
            row_lo = tl.where(valid, row_lo_f, oy_f).to(tl.int64)
            row_hi = tl.where(valid, row_hi_f, oy_f).to(tl.int64)
        else:
            # Expanded integer box: torchvision's expand_boxes steps, float32, unfused.
            w_half = (x2f - x1f) * 0.5
            h_half = (y2f - y1f) * 0.5
            x_c = (x2f + x1f) * 0.5
            y_c = (y2f + y1f) * 0.5
            w_half = w_half * box_scale
            h_half = h_half * box_scale
            bx1 = (x_c - w_half).to(tl.int64)  # truncation toward zero
            by1 = (y_c - h_half).to(tl.int64)
            bx2 = (x_c + w_half).to(tl.int64)
            by2 = (y_c + h_half).to(tl.int64)
            box_w = tl.maximum(bx2 - bx1 + 1, 1)
            box_h = tl.maximum(by2 - by1 + 1, 1)
            # Paste region clipped to the limits.
            col_lo = tl.maximum(bx1, ox)
            col_hi = tl.minimum(bx2 + 1, lim_x)
            row_lo = tl.maximum(by1, oy)
            row_hi = tl.minimum(by2 + 1, lim_y)

        # This band of the region's rows.
        band_start = row_lo + band * BLOCK_H
        row_lo = band_start
        row_hi = tl.minimum(row_hi, band_start + BLOCK_H)
        # Empty column loop when the band misses the region.
        col_end = tl.where(row_lo < row_hi, col_hi, col_lo)

        rows = band_start + tl.arange(0, BLOCK_H)
        row_ok = (rows >= row_lo) & (rows < row_hi)
        mask_base = masks_ptr + d * M * M
        out_rows = out_ptr + base + ((rows.to(tl.int64) - oy) * row_stride - ox)[:, None]
        cols_in_tile = tl.arange(0, BLOCK_W)

        if GRID_SAMPLE:
            # Per-row taps (north: floor(iy), south: +1) and weights n = frac, s = 1 - frac.
            iy_n, n_ok, iy_s, s_ok, wt_s, wt_n = _grid_taps(rows, y1f, box_hf, half_m, M, EMULATE_FMA)
            n_ok = (row_ok & n_ok)[:, None]
            s_ok = (row_ok & s_ok)[:, None]
            wt_s = tl.broadcast_to(wt_s[:, None], (BLOCK_H, BLOCK_W))
            wt_n = tl.broadcast_to(wt_n[:, None], (BLOCK_H, BLOCK_W))
            north_ptr = mask_base + (iy_n * M)[:, None]
            south_ptr = mask_base + (iy_s * M)[:, None]
        else:
            p_in = M + 2 * PAD  # side of the padded mask
            p_in_f = p_in.to(tl.float32)
            scale_y = tl.math.div_rn(p_in_f, box_h.to(tl.float32))
            scale_x = tl.math.div_rn(p_in_f, box_w.to(tl.float32))
            small_box = (box_h + box_w) <= 128

            # Per-row taps; padded row -> mask row, rows in the padding read as 0.
            iy0, iy1, ly0, ly1 = _linear_taps(rows - by1, scale_y, p_in, EMULATE_FMA)
            my0 = iy0 - PAD
            my1 = iy1 - PAD
            my0_ok = (row_ok & (my0 >= 0) & (my0 < M))[:, None]
            my1_ok = (row_ok & (my1 >= 0) & (my1 < M))[:, None]
            wy0 = tl.broadcast_to(ly0[:, None], (BLOCK_H, BLOCK_W))
            wy1 = tl.broadcast_to(ly1[:, None], (BLOCK_H, BLOCK_W))
            row0_ptr = mask_base + (my0 * M)[:, None]
            row1_ptr = mask_base + (my1 * M)[:, None]
        row_ok = row_ok[:, None]

        for col_start in range(col_lo, col_end, BLOCK_W):
            cols = col_start + cols_in_tile
            col_ok = cols < col_hi
            if GRID_SAMPLE:
                ix_w, w_ok, ix_e, e_ok, wt_e, wt_w = _grid_taps(cols, x1f, box_wf, half_m, M, EMULATE_FMA)
                w_ok = (col_ok & w_ok)[None, :]
                e_ok = (col_ok & e_ok)[None, :]
                wt_e = tl.broadcast_to(wt_e[None, :], (BLOCK_H, BLOCK_W))
                wt_w = tl.broadcast_to(wt_w[None, :], (BLOCK_H, BLOCK_W))
                v_nw = tl.load(north_ptr + ix_w[None, :], mask=n_ok & w_ok, other=0.0)
                v_ne = tl.load(north_ptr + ix_e[None, :], mask=n_ok & e_ok, other=0.0)
                v_sw = tl.load(south_ptr + ix_w[None, :], mask=s_ok & w_ok, other=0.0)
                v_se = tl.load(south_ptr + ix_e[None, :], mask=s_ok & e_ok, other=0.0)
                # Weights as torch computes them (nw = s * e, ...); taps outside the mask are 0, and
                # 0 * w + acc == acc, so skipping them (CUDA) or adding them (CPU) is the same.
                # Sum: fma(v_se, se, fma(v_sw, sw, fma(v_ne, ne, v_nw * nw))): torch's CPU kernel
                # as compiled (checked bit for bit) and its CUDA kernel's `out_acc += v * w`.
                acc = v_nw * (wt_s * wt_e)
                acc = _fma(v_ne, wt_s * wt_w, acc, EMULATE_FMA)
                acc = _fma(v_sw, wt_n * wt_e, acc, EMULATE_FMA)
                val = _fma(v_se, wt_n * wt_w, acc, EMULATE_FMA)
            else:
                ix0, ix1, lx0, lx1 = _linear_taps(cols - bx1, scale_x, p_in, EMULATE_FMA)
                mx0 = ix0 - PAD
                mx1 = ix1 - PAD
                mx0_ok = (col_ok & (mx0 >= 0) & (mx0 < M))[None, :]
                mx1_ok = (col_ok & (mx1 >= 0) & (mx1 < M))[None, :]
                wx0 = tl.broadcast_to(lx0[None, :], (BLOCK_H, BLOCK_W))
                wx1 = tl.broadcast_to(lx1[None, :], (BLOCK_H, BLOCK_W))

                v00 = tl.load(row0_ptr + mx0[None, :], mask=my0_ok & mx0_ok, other=0.0)
                v01 = tl.load(row0_ptr + mx1[None, :], mask=my0_ok & mx1_ok, other=0.0)
                v10 = tl.load(row1_ptr + mx0[None, :], mask=my1_ok & mx0_ok, other=0.0)
                v11 = tl.load(row1_ptr + mx1[None, :], mask=my1_ok & mx1_ok, other=0.0)
                # wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11), each "a * b + c"
                # fused as in torch's generic CPU kernel (and, as compiled, its CUDA kernel).
                top = _fma(wx0, v00, wx1 * v01, EMULATE_FMA)
                bottom = _fma(wx0, v10, wx1 * v11, EMULATE_FMA)
                val = _fma(wy0, top, wy1 * bottom, EMULATE_FMA)
                if TORCH_CPU_SMALL_PATH:
                    # torch's CPU kernel for h + w <= 128 sums the four taps with product weights.
                    acc = _fma(v00, wy0 * wx0, v01 * (wy0 * wx1), EMULATE_FMA)
                    acc = _fma(v10, wy1 * wx0, acc, EMULATE_FMA)
                    acc = _fma(v11, wy1 * wx1, acc, EMULATE_FMA)
                    val = tl.where(small_box, acc, val)

            store_ok = row_ok & col_ok[None, :]
            dst = out_rows + cols[None, :]
            if APPLY_THRESHOLD:
                if GRID_SAMPLE:
                    hit = val >= THRESHOLD  # Detectron2 / mmdet binarise with >=
                else:
                    hit = val > THRESHOLD
                tl.store(dst, hit.to(tl.uint8), mask=store_ok)
            else:
                tl.store(dst, val, mask=store_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


def paste_masks_triton(
    masks, boxes, counts, image_sizes, *, threshold=0.5, padding=None, crop=False, method="torchvision"
) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
    """Pastes per-detection masks into their images with one Triton launch for the whole batch.

    Same arguments, results and semantics as :func:`paste_masks_reference`
    (``method="torchvision"``: torchvision's ``paste_masks_in_image``, then ``> threshold``
    when given; ``method="grid_sample"``: Detectron2's / mmdet's grid_sample paste, then
    ``>= threshold``; ``crop=True`` for paste regions only). Both methods run the same
    kernel, the method a compile-time flag. Needs CUDA tensors, or CPU tensors with
    ``TRITON_INTERPRET=1``.

    Layout: one flat buffer (uint8 viewed as bool, or float32) holds every
    detection's output back to back, pre-filled with the value of pixels outside
    every box: full image planes, or (crop mode) the row-major crops of their
    paste regions. The kernel writes only inside each clipped paste region;
    per-detection metadata (base offset, origin, row stride, clip limits) tells it
    where, so both layouts share one kernel. The returned per-image tensors are
    views of that buffer. Grid: ``(N, cdiv(R, BLOCK_H))`` with R the largest image
    height (full mode) or crop height (crop mode); a program handles BLOCK_H rows
    of one detection's region and loops over the region's columns in BLOCK_W
    chunks. Peak memory is the outputs plus O(N) metadata. Full mode does not
    synchronise with the host (the kernel computes each paste region from the
    boxes, as the host does); crop mode copies the N x 4 boxes to the host to size
    the buffer. The threshold and the method are compile-time constants: each
    distinct pair compiles the kernel once.
    """
    if not _HAS_TRITON:
        raise RuntimeError("paste_masks_triton needs the triton package; use paste_masks_reference")
    counts, sizes, thr, padding = _check_inputs(masks, boxes, counts, image_sizes, threshold, padding, method)
    crop = _check_crop(crop)
    device = masks.device
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"paste_masks_triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); got tensors on {device}"
        )
    thresholded = thr is not None
    n_total, m = masks.shape[0], masks.shape[-1]

    # Flat output buffer and per-detection metadata (base, oy, ox, row_stride, lim_y, lim_x).
    if crop:
        _, tables = _crop_tables(boxes, counts, sizes, m, padding, method)
        lengths = [int((t[:, 3] * t[:, 4]).sum()) for t in tables]
    else:
        lengths = [n * h * w for n, (h, w) in zip(counts, sizes)]
    image_starts, total = [], 0
    for length in lengths:
        image_starts.append(total)
        total += length
    outside = int(_outside_value(thr, method))
    buf_dtype = torch.uint8 if thresholded else torch.float32
    flat = torch.full((total,), outside, dtype=buf_dtype, device=device)

    if crop:
        rows = []
        for start, t in zip(image_starts, tables):
            off, y0, x0, h, w = t.unbind(1)
            rows.append(torch.stack((off + start, y0, x0, w, y0 + h, x0 + w), dim=1))
        meta = torch.cat(rows) if rows else torch.zeros((0, 6), dtype=torch.int64)
        max_rows = int(meta[:, 4].sub(meta[:, 1]).max()) if n_total else 0
    else:
        rows = []
        for start, n, (h, w) in zip(image_starts, counts, sizes):
            if n:
                base = torch.arange(n, dtype=torch.int64) * (h * w) + start
                zero = torch.zeros_like(base)
                rows.append(torch.stack((base, zero, zero, zero + w, zero + h, zero + w), dim=1))
        meta = torch.cat(rows) if rows else torch.zeros((0, 6), dtype=torch.int64)
        max_rows = max((h for (h, _), n in zip(sizes, counts) if n), default=0)

    if n_total > 0 and max_rows > 0:
        on_cpu = device.type != "cuda"  # the interpreter: match torch's CPU kernels
        block_h, block_w, num_warps = _interpreter_tile() if on_cpu else _tile()  # see the constants above _tile
        grid = (n_total, triton.cdiv(max_rows, block_h))
        _paste_masks_kernel[grid](
            masks.contiguous(),
            boxes.contiguous(),
            host_to_device(meta, dtype=torch.int64, device=device),
            flat,
            m,
            padding,
            _box_scale(m, padding),
            THRESHOLD=thr if thresholded else 0.0,
            APPLY_THRESHOLD=thresholded,
            GRID_SAMPLE=method == "grid_sample",
            EMULATE_FMA=on_cpu,
            TORCH_CPU_SMALL_PATH=on_cpu,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            num_warps=num_warps,
            enable_fp_fusion=False,  # only the explicit fmas are fused: box arithmetic stays as torch's
        )

    if thresholded:
        flat = flat.view(torch.bool)
    if crop:
        return [(flat[start : start + length], t) for start, length, t in zip(image_starts, lengths, tables)]
    return [
        flat[start : start + n * h * w].view(n, h, w) for start, n, (h, w) in zip(image_starts, counts, sizes)
    ]


def paste_masks(
    masks, boxes, counts, image_sizes, *, threshold=0.5, padding=None, crop=False, method="torchvision"
) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
    """Dispatcher: :func:`paste_masks_triton` for CUDA tensors, else :func:`paste_masks_reference`.

    See :func:`paste_masks_reference` for arguments and results (``crop=True``: per image
    ``(data, table)`` of paste-region crops; ``method``: "torchvision" or "grid_sample");
    ``ENGINE_FORCE_REFERENCE=1`` forces the reference (:mod:`kernels._dispatch`).
    """
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a torch.Tensor float32 [N, M, M]; got {_describe(masks)}")
    _check_method(method)  # a bad name fails the same way on every path
    kwargs = dict(threshold=threshold, padding=padding, crop=crop, method=method)
    if use_triton(masks) and _HAS_TRITON:
        return paste_masks_triton(masks, boxes, counts, image_sizes, **kwargs)
    return paste_masks_reference(masks, boxes, counts, image_sizes, **kwargs)
