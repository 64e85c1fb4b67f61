"""Pre-processing: uint8 RGB images of mixed sizes -> one normalised, zero-padded batch.

Output size: ``scale = min(min_size / short, max_size / long)`` (Python float), each side
``floor(side * scale)`` (torchvision) or ``int(side * scale + 0.5)`` (Detectron2, mmdet), at
least 1 pixel. Then, by ``MaskRCNNConfig.resize_method``:

``"torch_bilinear"`` (torchvision's ``GeneralizedRCNNTransform``)
    ``x = image.float() / input_scale``, channels reordered if the network wants BGR,
    ``(x - mean) / std`` per channel, then ``F.interpolate`` bilinear on the normalised float
    image, ``align_corners=False``, no antialias (``normalize_before_resize=True``).

``"antialias_uint8"`` (Detectron2's ``DefaultPredictor``: ``ResizeShortestEdge``, which calls
    ``PIL.Image.resize(BILINEAR)`` on the uint8 array)
    Pillow's convolution resampler, reproduced bit for bit in torch integer arithmetic (so it
    runs on the GPU too): a triangle filter widened by the downscale factor (antialiased when
    shrinking), 22-bit fixed-point weights, two separable passes with a uint8 result after
    each. Pillow 13 runs the vertical pass first when the height shrinks much more than the
    width; Pillow <= 12.1 always runs the horizontal pass first (``resize_uint8(...,
    pillow_version=...)``, :func:`pil_vertical_pass_first`), which changes some pixels of such
    images by 1. Float ``F.interpolate(antialias=True)`` + rounding is not exact: it differs by 1
    on 10-20 % of the pixels.

``"cv2_linear"`` (mmdetection's ``Resize`` -> ``mmcv.imrescale`` -> ``cv2.resize(INTER_LINEAR)``)
    ``cv2.resize`` itself, called on the host array before the transfer (OpenCV is a runtime
    dependency); cv2's fixed-point SIMD arithmetic is not re-derived.

``"skimage_uint8"`` (matterport's ``utils.resize_image``: ``skimage.transform.resize(order=1,
    mode="constant", cval=0, clip=True, preserve_range=True, anti_aliasing=False)`` and
    ``.astype(uint8)``)
    ``scipy.ndimage.zoom`` order 1 with ``grid_mode=True``, ``mode="grid-constant"`` (pixels
    outside the image count as 0), reproduced in float64 with scipy's order of operations,
    clipped to the input's value range and truncated to uint8.

For the three uint8 methods the resized uint8 image is then converted and normalised like the
first (``normalize_before_resize=False``): one function, :func:`_normalize`, serves both. Finally the batch is zero-padded bottom/right to a
common size, a multiple of ``size_divisibility``.

``resize_mode="square"`` (matterport's ``resize_image(mode="square")``, :func:`square_resized_size`)
changes the size rule and the padding: the short side is scaled up to ``min_size`` (never down),
unless the long side would then exceed ``max_size``; sides are rounded with Python's ``round``;
an image already at that size is not resampled; each image is centred in a ``max_size`` x
``max_size`` canvas of raw 0 pixels (``-mean / std`` once normalised), its offset recorded in
:attr:`ImageBatch.offsets`.

The batch also carries each image's window, the region of the padded batch its pixels occupy
in the box frame (:func:`image_windows`), computed once here: the detection post-processing
clips to it and the paste-back crops by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import MaskRCNNConfig
from engine.ragged import upload


@dataclass(frozen=True)
class ImageBatch:
    """A batch ready for the backbone.

    Attributes:
        tensor: float32 [B, 3, Hp, Wp], normalised, zero-padded; the network's channel order.
        image_sizes: per image (h, w) after resizing, before padding (the frame of proposals and boxes).
        original_sizes: per image (H, W) as given by the caller (the frame of the results).
        offsets: per image (top, left) of the resized image inside the padded one ((0, 0) except
            with ``resize_mode="square"``, which centres it).
        windows: per image (x1, y1, x2, y2), the region of the padded batch its pixels occupy, in
            the configuration's box frame (:func:`image_windows`); :func:`preprocess` fills it in.
            None for a batch built by hand (:class:`engine.model.MaskRCNN` then computes it).
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    offsets: list[tuple[int, int]] | None = None
    windows: list[tuple[float, float, float, float]] | None = None

    def __post_init__(self) -> None:
        if self.offsets is None:
            object.__setattr__(self, "offsets", [(0, 0)] * len(self.image_sizes))

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


def square_resized_size(height: int, width: int, *, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) of matterport's ``resize_image(mode="square")`` (before its padding to max_size x max_size).

    ``scale = max(1, min_size / min(h, w))``; if ``round(max(h, w) * scale) > max_size`` then
    ``scale = max_size / max(h, w)``; sides ``round(side * scale)`` with Python's round (half to even).
    """
    scale = max(1.0, min_size / min(height, width))
    if round(max(height, width) * scale) > max_size:
        scale = max_size / max(height, width)
    return max(round(height * scale), 1), max(round(width * scale), 1)


def output_size(height: int, width: int, config: MaskRCNNConfig) -> tuple[int, int]:
    """Resized (h, w) of an input of (height, width) under ``config``'s size rule."""
    if config.resize_mode == "square":
        return square_resized_size(height, width, min_size=config.min_size, max_size=config.max_size)
    return resized_size(height, width, min_size=config.min_size, max_size=config.max_size, rounding=config.resize_rounding)


def resized_canvas(size: tuple[int, int], config: MaskRCNNConfig) -> tuple[int, int]:
    """The padded (H, W) an input of ``size`` (h, w) occupies alone in a batch: its resized size
    rounded up to ``size_divisibility`` (matterport's square mode: ``max_size`` x ``max_size``)."""
    if config.resize_mode == "square":
        return (config.max_size, config.max_size)
    h, w = output_size(size[0], size[1], config)
    div = config.size_divisibility
    return (int(math.ceil(h / div) * div), int(math.ceil(w / div) * div))


#: resize methods that resize the uint8 image, before normalisation.
UINT8_RESIZE_METHODS = ("antialias_uint8", "cv2_linear", "skimage_uint8")
#: uint8 methods that run on the host numpy array (before the transfer to the device).
_HOST_METHODS = ("cv2_linear",)

_PIL_PRECISION_BITS = 22  # Pillow Resample.c: 32 - 8 - 2
#: Pillow release whose pass order "antialias_uint8" follows by default (see pil_vertical_pass_first).
PILLOW_VERSION = (13, 0)


def normalize_and_resize(image: Tensor, *, config: MaskRCNNConfig) -> Tensor:
    """One image: uint8 [H, W, 3] RGB on the target device -> float32 [3, h, w], normalised and resized."""
    height, width = image.shape[:2]
    out = output_size(height, width, config)
    if config.resize_method not in UINT8_RESIZE_METHODS:
        return _normalize(image, config, float_resize=out)
    if not (config.resize_mode == "square" and out == (height, width)):  # matterport does not resample at scale 1
        image = resize_uint8(image, *out, method=config.resize_method)
    return _normalize(image, config)


def _normalize(image: Tensor, config: MaskRCNNConfig, *, float_resize: tuple[int, int] | None = None) -> Tensor:
    """uint8 [h, w, 3] RGB -> float32 [3, h, w] in the network's channel order, ``(x / scale - mean) / std``.

    The one normalisation of every resize method. ``float_resize`` (out_h, out_w): resize the float
    image with ``F.interpolate`` ("torch_bilinear"), after the normalisation with
    ``normalize_before_resize`` (torchvision), before it otherwise; None for an image already
    resized as uint8 (or not resized). With ``normalize_precision="float64"`` (uint8 methods only)
    the arithmetic runs in float64 and is rounded to float32 once, at the end.
    """
    wide = config.normalize_precision == "float64"
    x = image.permute(2, 0, 1)
    if config.channel_order == "BGR":
        x = x.flip(0)  # on the uint8 pixels: the same values, a quarter of the bytes of a float copy
    # one float copy of the image, then in place: an 8000x6000 image is 576 MB in float32, and
    # torchvision's order (normalise, then resize) needs it whole; in-place ops round the same
    x = x.to(torch.float64 if wide else torch.float32, copy=True).div_(config.input_scale)  # never the caller's
    if float_resize is not None and not config.normalize_before_resize:
        x = _resize(x, *float_resize)
    mean = upload(list(config.pixel_mean), dtype=x.dtype, device=x.device)
    std = upload(list(config.pixel_std), dtype=x.dtype, device=x.device)
    x = x.sub_(mean[:, None, None]).div_(std[:, None, None])
    if float_resize is not None and config.normalize_before_resize:
        x = _resize(x, *float_resize)
    return x.to(torch.float32)


def _resize(x: Tensor, out_h: int, out_w: int) -> Tensor:
    return F.interpolate(x[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]


def resize_uint8(
    image: Tensor | np.ndarray,
    out_h: int,
    out_w: int,
    *,
    method: str,
    pillow_version: tuple[int, int] = PILLOW_VERSION,
) -> Tensor:
    """Resize a uint8 [H, W, C] image as one framework does; uint8 [out_h, out_w, C] on the same device.

    ``method`` is one of :data:`UINT8_RESIZE_METHODS` (see the module docstring for what each one
    reproduces). A numpy input gives a CPU tensor. The input is never modified.
    ``pillow_version`` (``"antialias_uint8"`` only): the (major, minor) Pillow release whose pass
    order to follow (:func:`pil_vertical_pass_first`).
    """
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be at least 1x1; got {out_h}x{out_w}")
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"expected a uint8 [H, W, C] image; got {image.dtype} {tuple(image.shape)}")
    if method == "antialias_uint8":
        return _pil_bilinear(image, out_h, out_w, pillow_version=pillow_version)
    if method == "cv2_linear":
        return _cv2_linear(image, out_h, out_w)
    if method == "skimage_uint8":
        return _skimage_linear(image, out_h, out_w)
    raise ValueError(f"unknown uint8 resize method {method!r}; accepted: {', '.join(UINT8_RESIZE_METHODS)}")


# --- Pillow BILINEAR (Detectron2) ------------------------------------------------------------


def _pil_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear taps for one axis: input indices [out, k] (int64) and 22-bit fixed-point weights.

    Follows Pillow's coefficient computation operation by operation in float64 (the same IEEE
    double arithmetic as its C code): support ``max(in/out, 1)``, tap centre ``(i + 0.5) * in/out``,
    first tap ``trunc(centre - support + 0.5)``, weights normalised by their sequential sum and
    rounded half up to ``2**22``. Unused taps get weight 0 (and a valid index).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear filter support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C (int) casts truncate toward zero; the values clamped to 0 below are the only negative ones
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    index = xmin[:, None] + taps[None, :]
    used = taps[None, :] < count[:, None]
    t = np.abs((index - center[:, None] + 0.5) * inv)
    w = np.where(used & (t < 1.0), 1.0 - t, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(ksize):  # left-to-right sum, as Pillow does (np.sum would pair terms differently)
        total = total + w[:, j]
    w = np.divide(w, total[:, None], out=w.copy(), where=total[:, None] != 0.0)
    fixed = np.trunc(0.5 + w * float(1 << _PIL_PRECISION_BITS)).astype(np.int32)  # weights are >= 0
    return np.minimum(index, in_size - 1), fixed


def _upload_array(array: np.ndarray, device: torch.device) -> Tensor:
    """A host numpy table on ``device``, without a synchronising copy (:func:`engine.ragged.upload`)."""
    host = torch.from_numpy(array)
    return upload(host, dtype=host.dtype, device=device)


def _pil_pass(x: Tensor, dim: int, in_size: int, out_size: int) -> Tensor:
    """One Pillow 8-bit pass along ``dim`` of a uint8 tensor: 2**21 + sum of taps, >> 22, clipped to uint8.

    Integer arithmetic, so the order of the sum does not matter; int32 does not overflow since the
    weights are >= 0 and sum to about 2**22 (255 * 2**22 < 2**31).
    """
    index, weight = _pil_taps(in_size, out_size)
    index, weight = _upload_array(index, x.device), _upload_array(weight, x.device)
    shape = [1] * x.dim()
    shape[dim] = out_size
    acc = None
    for j in range(index.shape[1]):
        term = x.index_select(dim, index[:, j]).to(torch.int32).mul_(weight[:, j].view(shape))
        acc = term.add_(1 << (_PIL_PRECISION_BITS - 1)) if acc is None else acc.add_(term)
    return acc.bitwise_right_shift_(_PIL_PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def pil_vertical_pass_first(
    in_h: int, in_w: int, out_h: int, out_w: int, pillow_version: tuple[int, int] = PILLOW_VERSION
) -> bool:
    """Whether ``Image.resize`` of this Pillow release runs the vertical pass before the horizontal one.

    The passes round to uint8 in between, so the order changes some pixels by 1.

    - Pillow <= 12.1: never (horizontal pass first).
    - Pillow 12.2, 12.3: when the height shrinks and the image is more than 100 times taller
      than wide (done in ``Image.resize`` as two calls).
    - Pillow >= 13 (python-pillow/Pillow#9549): when the height loses more than twice as many
      rows as the width loses columns (derived by testing against Pillow 13.0 on ~1,500 random
      size pairs, none off; ties go horizontal first).
    """
    if out_h >= in_h:
        return False
    if tuple(pillow_version) >= (13, 0):
        return (in_h - out_h) > 2 * (in_w - out_w)
    if tuple(pillow_version) >= (12, 2):
        return in_h > in_w * 100
    return False


def _pil_bilinear(
    image: Tensor, out_h: int, out_w: int, *, pillow_version: tuple[int, int] = PILLOW_VERSION
) -> Tensor:
    """``PIL.Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR)``, bit-exact, on any device."""
    height, width = image.shape[:2]
    passes = [(1, width, out_w), (0, height, out_h)]  # (dim, in, out): horizontal, then vertical
    if pil_vertical_pass_first(height, width, out_h, out_w, pillow_version):
        passes.reverse()
    x = image
    for dim, in_size, out_size in passes:
        if out_size != in_size:  # Pillow skips a pass whose size does not change (it would be the identity)
            x = _pil_pass(x, dim, in_size, out_size)
    return x if x is not image else image.clone()


# --- OpenCV INTER_LINEAR (mmdetection) -------------------------------------------------------


def _cv2_linear(image: Tensor, out_h: int, out_w: int) -> Tensor:
    """``cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)`` on the host, back on ``image``'s device."""
    return torch.from_numpy(_cv2_resize_array(image.cpu().numpy(), out_h, out_w)).to(image.device)


def _cv2_resize_array(array: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``cv2.resize(INTER_LINEAR)`` of a uint8 [H, W, C] host array, the channel axis kept."""
    import cv2

    out = cv2.resize(np.ascontiguousarray(array), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out  # cv2 drops a single channel axis


# --- scikit-image resize, order 1 (matterport) -----------------------------------------------


def _skimage_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scipy ``zoom(order=1, grid_mode=True)`` taps for one axis.

    Returns the first of two input indices shifted by +1 (into an image zero-padded by one pixel
    on each side, so that outside pixels read the constant 0) and the two float64 weights, computed
    as scipy does: ``c = (i + 0.5) * (in / out) - 0.5``, ``w0 = 1 - (c - floor(c))``, ``w1 = 1 - w0``.
    """
    zoom = in_size / out_size
    c = (np.arange(out_size, dtype=np.float64) + 0.5) * zoom - 0.5
    start = np.floor(c)
    w0 = 1.0 - (c - start)
    w1 = 1.0 - w0
    return start.astype(np.int64) + 1, w0, w1


def _skimage_linear(image: Tensor, out_h: int, out_w: int) -> Tensor:
    """``skimage.transform.resize(image, (out_h, out_w), order=1, preserve_range=True, anti_aliasing=False)
    .astype(np.uint8)``, bit-exact, on any device with float64 support.

    scipy sums, for each output pixel, ``(p * wy) * wx`` over the corners (y0, x0), (y0, x1),
    (y1, x0), (y1, x1) in that order, starting from 0.0 (outside corners contribute 0); the
    same sequence of roundings is done here. skimage then clips to [min, max] of the whole input.
    """
    height, width = image.shape[:2]
    device = image.device
    y0, wy0, wy1 = (_upload_array(a, device) for a in _skimage_taps(height, out_h))
    x0, wx0, wx1 = (_upload_array(a, device) for a in _skimage_taps(width, out_w))
    padded = F.pad(image.permute(2, 0, 1), (1, 1, 1, 1))  # uint8 [C, H + 2, W + 2], zero border
    rows = (padded.index_select(1, y0), padded.index_select(1, y0 + 1))
    wy = (wy0[:, None], wy1[:, None])
    wx = (wx0, wx1)
    out = None
    for r in range(2):
        for c in range(2):
            corner = rows[r].index_select(2, x0 + c).to(torch.float64)
            term = corner * wy[r] * wx[c]  # evaluated left to right: (p * wy) * wx
            out = term if out is None else out + term
    lo, hi = image.min().to(torch.float64), image.max().to(torch.float64)  # tensors: no host read
    return out.clamp_(lo, hi).to(torch.uint8).permute(1, 2, 0).contiguous()  # float -> uint8 truncates


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
        if config.resize_method in _HOST_METHODS:
            # resize the host array before the transfer (cv2 runs on the host only)
            out_h, out_w = output_size(*image.shape[:2], config)
            if config.resize_method == "cv2_linear":  # straight from the caller's array: no tensor round trip
                small = torch.from_numpy(_cv2_resize_array(image, out_h, out_w))
            else:
                small = resize_uint8(host, out_h, out_w, method=config.resize_method)
            resized.append(_normalize(small.to(device, non_blocking=True), config))
        else:
            resized.append(normalize_and_resize(host.to(device, non_blocking=True), config=config))
    if config.resize_mode == "square":
        side = config.max_size
        # matterport pads the uint8 image with 0 before subtracting the mean
        blank = _normalize(torch.zeros((1, 1, 3), dtype=torch.uint8, device=resized[0].device), config)
        batch = blank.expand(len(resized), 3, side, side).contiguous()
        offsets = [((side - r.shape[1]) // 2, (side - r.shape[2]) // 2) for r in resized]
    else:
        div = config.size_divisibility
        pad_h = int(math.ceil(max(r.shape[1] for r in resized) / div) * div)
        pad_w = int(math.ceil(max(r.shape[2] for r in resized) / div) * div)
        batch = resized[0].new_zeros((len(resized), 3, pad_h, pad_w))
        offsets = [(0, 0)] * len(resized)
    for i, (r, (top, left)) in enumerate(zip(resized, offsets)):
        batch[i, :, top : top + r.shape[1], left : left + r.shape[2]].copy_(r)
    image_sizes = [(int(r.shape[1]), int(r.shape[2])) for r in resized]
    return ImageBatch(
        tensor=batch,
        image_sizes=image_sizes,
        original_sizes=[(int(im.shape[0]), int(im.shape[1])) for im in images],
        offsets=offsets,
        windows=_windows(tuple(batch.shape[-2:]), image_sizes, offsets, box_frame=config.box_frame),
    )


def image_windows(batch: ImageBatch, config: MaskRCNNConfig) -> list[tuple[float, float, float, float]]:
    """Per image, the region of the padded batch its pixels occupy, (x1, y1, x2, y2) in the box frame.

    Pixels: ``(left, top, left + w, top + h)``; normalized: that box through matterport's ``norm_boxes``.
    :func:`preprocess` stores them in :attr:`ImageBatch.windows`; this computes them for any batch.
    """
    return _windows(tuple(batch.tensor.shape[-2:]), batch.image_sizes, batch.offsets, box_frame=config.box_frame)


def _windows(
    padded: tuple[int, int], image_sizes: list[tuple[int, int]], offsets: list[tuple[int, int]], *, box_frame: str
) -> list[tuple[float, float, float, float]]:
    height, width = padded
    windows = []
    for (h, w), (top, left) in zip(image_sizes, offsets):
        box = np.array([left, top, left + w, top + h], dtype=np.float64)
        if box_frame == "normalized":
            # normalize_boxes' float64 arithmetic on the host: these are host numbers, no device read
            scale = np.array([width - 1, height - 1, width - 1, height - 1], dtype=np.float64)
            box = ((box - np.array([0.0, 0.0, 1.0, 1.0])) / scale).astype(np.float32)
        windows.append(tuple(float(v) for v in box))
    return windows
