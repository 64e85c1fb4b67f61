"""Post-processing: detections in the resized frame -> boxes and masks in each input image's frame.

Reproduces torchvision's ``GeneralizedRCNNTransform.postprocess``: boxes are scaled per axis
by ``original / resized`` (float32 ratios, no re-clipping), then the 28x28 mask probabilities
are pasted into the full image (:mod:`kernels.paste_masks`) and thresholded. With
``config.clip_boxes_to_original`` (Detectron2's ``detector_postprocess``) the scaled boxes are
clipped to the input image and empty ones dropped before the paste.

With ``config.box_output="integer"`` (matterport's ``unmold_detections``) the boxes come in the
normalized frame of the padded image and are mapped through each image's window instead: made
window-relative (float32), scaled by the input's ``(W - 1, H - 1)``, +1 on x2 and y2, rounded half
to even (float64, as numpy does there); boxes of area <= 0 are dropped, and masks are pasted into the
integer boxes with the "grid_sample" paste, which then equals matterport's skimage resize of the
28x28 mask to the box size followed by ``>= 0.5``.

Mask formats (``to_original_frame(..., mask_format=...)``):

- ``"full"``: torch.bool [N, H, W] per image (N * H * W bytes);
- ``"box"``: :class:`engine.results.BoxMasks`, each detection's crop of its paste region only.

Chunking: the paste runs over at most K detections per launch, K chosen so that one chunk's
output fits a byte budget: on CUDA 80 % of free device memory (``torch.cuda.mem_get_info``
plus what torch's caching allocator holds unused); on CPU no budget, as the results are in host
memory anyway and a chunk would only add its own copy of them (an 8000x6000 image with 23
detections pasted in two chunks peaked at twice its 1 GiB of masks); ``max_chunk_bytes`` caps
it. When everything fits one chunk (the usual case) the kernel writes the results directly,
with no copy. Otherwise each chunk is pasted and copied into the
results, which are allocated up front: on the device when they fit beside a chunk, else
(CUDA only) in pinned host memory, each chunk's masks being copied there as it is produced.
In that case the returned :class:`Detections` live on the CPU (all their tensors), and the
host must have room for them; ``mask_format="box"`` is the way to keep large results small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from engine.boxes import clip_boxes_per_row, large_enough
from engine.config import MaskRCNNConfig
from engine.ragged import filled_columns, pad_rows, rank_kept, read_counts, take_rows, upload
from engine.results import BoxMasks, Detections
from engine.roi_heads import BatchDetections, ImageDetections
from kernels.paste_masks import crop_tables, paste_masks

__all__ = [
    "MASK_FORMATS",
    "padded_to_original_frame",
    "plan_paste_chunks",
    "rescale_boxes",
    "to_original_frame",
]

MASK_FORMATS = ("full", "box")
CUDA_FREE_FRACTION = 0.8  # share of free GPU memory the paste may use (results + one chunk)


def rescale_boxes(boxes: Tensor, resized: tuple[int, int], original: tuple[int, int], *, style: str = "multiply") -> Tensor:
    """float32 [N, 4] boxes from resized-image pixels to original-image pixels.

    "multiply": by float32 ``original / resized`` per axis (torchvision's ``resize_boxes``;
    Detectron2's ``scale`` gives the same float32 factors); "divide": by float32
    ``resized / original`` (mmdetection's ``bboxes / scale_factor``).
    """
    if style == "multiply":
        num, den = original, resized
    elif style == "divide":
        num, den = resized, original
    else:
        raise ValueError(f"unknown rescale style {style!r}; accepted: 'multiply', 'divide'")
    as_f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=boxes.device)  # noqa: E731
    ratio_h, ratio_w = as_f32(num[0]) / as_f32(den[0]), as_f32(num[1]) / as_f32(den[1])
    x1, y1, x2, y2 = boxes.unbind(1)
    if style == "divide":
        return torch.stack((x1 / ratio_w, y1 / ratio_h, x2 / ratio_w, y2 / ratio_h), dim=1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def _cuda_free_bytes(device: torch.device) -> int:
    """Bytes a new CUDA allocation can get: free device memory plus the caching allocator's unused reserve."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def plan_paste_chunks(
    det_bytes: Sequence[int],
    *,
    device_type: str,
    free_bytes: int | None = None,
    max_chunk_bytes: int | None = None,
) -> tuple[list[tuple[int, int]], bool]:
    """Splits detections into paste chunks (a pure function: no device is queried).

    Args:
        det_bytes: output bytes of each detection, in order (full: H * W; box: h * w).
        device_type: "cuda" or "cpu", where the paste runs.
        free_bytes: CUDA only, the memory available for new allocations.
        max_chunk_bytes: optional cap on a chunk's output bytes.

    Returns:
        ``(chunks, to_host)``: ``chunks`` are ``[start, end)`` detection ranges covering all
        detections in order, each holding at most the chunk budget of bytes (or a single
        detection larger than it); ``[(0, N)]`` when all fit one chunk (then the paste writes
        the results directly). ``to_host``: the results do not fit in device memory beside a
        chunk and go to pinned host memory (only ever True for "cuda").
    """
    det_bytes = [int(b) for b in det_bytes]
    n, total = len(det_bytes), sum(det_bytes)
    if device_type == "cuda":
        if free_bytes is None:
            raise ValueError("free_bytes is needed for device_type='cuda'")
        budget = int(free_bytes * CUDA_FREE_FRACTION)
    else:
        budget = total  # CPU: the results are host memory already; chunks would only copy them
    cap = budget if max_chunk_bytes is None else min(budget, max_chunk_bytes)
    if total <= cap:
        return [(0, n)], False
    to_host = False
    chunk = cap
    if device_type == "cuda":
        room = budget - total  # what is left for one chunk once the results are on the device
        if room >= max(det_bytes):
            chunk = min(cap, room)
        else:
            to_host = True
    chunks, start, acc = [], 0, 0
    for i, b in enumerate(det_bytes):
        if i > start and acc + b > chunk:
            chunks.append((start, i))
            start, acc = i, 0
        acc += b
    chunks.append((start, n))
    return chunks, to_host


def _paste_in_chunks(probs, boxes, counts, sizes, *, threshold, crop, max_chunk_bytes, method):
    """paste_masks over all detections, chunked; returns (per-image outputs, results_on_host)."""
    device = probs.device
    elem = 1 if threshold is not None else 4
    tables = None
    if crop:
        tables = crop_tables(boxes, counts, sizes, mask_size=probs.shape[-1], method=method)
        det_bytes = [h * w * elem for t in tables for h, w in t[:, 3:].tolist()]
    else:
        det_bytes = [h * w * elem for n, (h, w) in zip(counts, sizes) for _ in range(n)]
    free = _cuda_free_bytes(device) if device.type == "cuda" else None
    chunks, to_host = plan_paste_chunks(
        det_bytes, device_type=device.type, free_bytes=free, max_chunk_bytes=max_chunk_bytes
    )
    if len(chunks) == 1 and not to_host:
        return paste_masks(probs, boxes, counts, sizes, threshold=threshold, crop=crop, method=method), False

    out_device = torch.device("cpu") if to_host else device
    pin = to_host and device.type == "cuda"
    dtype = torch.bool if threshold is not None else torch.float32
    if crop:
        lengths = [int((t[:, 3] * t[:, 4]).sum()) for t in tables]
        outs = [torch.empty((length,), dtype=dtype, device=out_device, pin_memory=pin) for length in lengths]
    else:
        outs = [torch.empty((n, h, w), dtype=dtype, device=out_device, pin_memory=pin) for n, (h, w) in zip(counts, sizes)]
    image_starts = [sum(counts[:i]) for i in range(len(counts))]
    for a, b in chunks:
        lo = [max(a, s) for s in image_starts]
        hi = [min(b, s + n) for s, n in zip(image_starts, counts)]
        chunk_counts = [max(h - l, 0) for l, h in zip(lo, hi)]
        res = paste_masks(probs[a:b], boxes[a:b], chunk_counts, sizes, threshold=threshold, crop=crop, method=method)
        for i, (c, s, r) in enumerate(zip(chunk_counts, image_starts, res)):
            if not c:
                continue
            j0 = lo[i] - s
            if crop:
                data = r[0]
                off = int(tables[i][j0, 0])
                outs[i][off : off + data.shape[0]].copy_(data, non_blocking=pin)
            else:
                outs[i][j0 : j0 + c].copy_(r, non_blocking=pin)
        del res
    if pin:
        torch.cuda.current_stream(device).synchronize()  # the copies to pinned memory are asynchronous
    if crop:
        outs = list(zip(outs, tables))
    return outs, to_host


def window_relative_integer_boxes(
    boxes: Tensor, window: tuple[float, float, float, float], original_size: tuple[int, int]
) -> Tensor:
    """matterport's ``unmold_detections`` box arithmetic: normalized boxes (x1 y1 x2 y2) of the padded
    image -> integer-valued float32 boxes in the input image, x2 and y2 exclusive.

    ``window``: the image's region in the padded frame, normalized (x1, y1, x2, y2), float32 values.
    As numpy computes it there: ``b = (b - [wx1, wy1, wx1, wy1]) / [ww, wh, ww, wh]`` in float32
    (the window is float32), then ``round(b * [W-1, H-1, W-1, H-1] + [0, 0, 1, 1])`` in float64.
    """
    height, width = original_size
    f32 = dict(dtype=torch.float32, device=boxes.device)
    f64 = dict(dtype=torch.float64, device=boxes.device)
    wx1, wy1, wx2, wy2 = torch.tensor(window, **f32).unbind()
    shift = torch.stack([wx1, wy1, wx1, wy1])
    scale = torch.stack([wx2 - wx1, wy2 - wy1, wx2 - wx1, wy2 - wy1])
    b = ((boxes.to(torch.float32) - shift) / scale).to(torch.float64)
    b = torch.round(b * torch.tensor([width - 1, height - 1, width - 1, height - 1], **f64) + torch.tensor([0.0, 0.0, 1.0, 1.0], **f64))
    return b.to(torch.float32)


def _frame_ratios(image_sizes, original_sizes, style: str) -> list[tuple[float, float]]:
    """Per image the float32 (ratio_w, ratio_h) of :func:`rescale_boxes`, computed on the host
    (IEEE float32 division, so equal to the device's)."""
    if style == "multiply":
        pairs = [(o, s) for s, o in zip(image_sizes, original_sizes)]
    elif style == "divide":
        pairs = [(s, o) for s, o in zip(image_sizes, original_sizes)]
    else:
        raise ValueError(f"unknown rescale style {style!r}; accepted: 'multiply', 'divide'")
    f32 = np.float32
    return [(float(f32(num[1]) / f32(den[1])), float(f32(num[0]) / f32(den[0]))) for num, den in pairs]


def _rescale_rows(boxes: Tensor, ratios: Tensor, style: str) -> Tensor:
    """:func:`rescale_boxes` with one float32 (ratio_w, ratio_h) row per box: boxes [N, 4], ratios [N, 2]."""
    ratio = ratios[:, [0, 1, 0, 1]]
    return boxes / ratio if style == "divide" else boxes * ratio


def _integer_rows(boxes: Tensor, windows: Tensor, sizes: Tensor) -> Tensor:
    """:func:`window_relative_integer_boxes` with one window (float32 [N, 4]) and one input (H, W)
    (float64 [N, 2]) per box."""
    wx1, wy1, wx2, wy2 = windows.unbind(1)
    shift = torch.stack([wx1, wy1, wx1, wy1], dim=1)
    scale = torch.stack([wx2 - wx1, wy2 - wy1, wx2 - wx1, wy2 - wy1], dim=1)
    b = ((boxes.to(torch.float32) - shift) / scale).to(torch.float64)
    height, width = sizes.unbind(1)
    span = torch.stack([width - 1, height - 1, width - 1, height - 1], dim=1)
    end = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).to(boxes.device, non_blocking=True)
    return torch.round(b * span + end).to(torch.float32)


def _boxes_in_input_frame(
    detections: BatchDetections, mask_probs: Tensor, *, image_sizes, original_sizes, windows, config
) -> tuple[BatchDetections, Tensor, Tensor]:
    """Every image's boxes in its input frame, for the whole padded batch at once, no host read.

    Returns ``(detections, mask_probs, boxes)``, still fixed-size: the detections, their mask
    probabilities [B, D, M, M] and their float32 boxes [B, D, 4] in the input frame, after
    Detectron2's empty-box filter or matterport's area filter where the family has one (the
    kept ones first in each row, in their order, and the counts updated).
    """
    num_images, width = detections.scores.shape
    device = detections.boxes.device
    flat = detections.boxes.reshape(-1, 4)

    def per_row(table, dtype):  # one row of a per-image host table for every detection
        values = upload(table, dtype=dtype, device=device)
        return values[:, None, :].expand(num_images, width, values.shape[1]).reshape(-1, values.shape[1])

    keep = None
    if config.box_output == "integer":
        if windows is None:
            raise ValueError("box_output='integer' maps boxes through each image's window: pass windows=")
        boxes = _integer_rows(flat, per_row(windows, torch.float32), per_row(original_sizes, torch.float64))
        keep = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0
    else:
        ratios = per_row(_frame_ratios(image_sizes, original_sizes, config.rescale_style), torch.float32)
        boxes = _rescale_rows(flat, ratios, config.rescale_style)
        if config.clip_boxes_to_original:  # Detectron2's detector_postprocess
            boxes = clip_boxes_per_row(boxes, per_row(original_sizes, torch.float32))
            keep = large_enough(boxes, 0.0, inclusive=False)
    boxes = boxes.view(num_images, width, 4)
    if keep is None:
        return detections, mask_probs, boxes
    keep = keep.view(num_images, width) & filled_columns(detections.counts, width)
    # kept ones first within each image, in their order (equal scores: a stable sort keeps it)
    order, counts = rank_kept(torch.zeros_like(detections.scores), keep, width)
    filled = filled_columns(counts, width)
    kept = BatchDetections(
        boxes=take_rows(detections.boxes, order, filled),
        scores=take_rows(detections.scores, order, filled),
        labels=take_rows(detections.labels, order, filled),
        counts=counts,
    )
    return kept, take_rows(mask_probs, order, filled), take_rows(boxes, order, filled)


def _check_output_options(*, mask_format, max_chunk_bytes, config, windows) -> None:
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}; got {mask_format!r}")
    if max_chunk_bytes is not None:
        if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be a positive int or None; got {max_chunk_bytes!r}")
    threshold = config.mask_threshold
    if mask_format == "box" and (threshold is None or threshold < 0):
        raise ValueError(f"mask_format='box' needs a mask threshold >= 0; got {threshold!r}")
    if config.box_output == "integer" and windows is None:
        raise ValueError("box_output='integer' maps boxes through each image's window: pass windows=")


def to_original_frame(
    detections: list[ImageDetections],
    mask_probs: list[Tensor],
    *,
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
    config: MaskRCNNConfig,
    mask_format: str = "full",
    max_chunk_bytes: int | None = None,
    windows: list[tuple[float, float, float, float]] | None = None,
) -> list[Detections]:
    """Scale boxes, paste and threshold masks; one :class:`Detections` per image.

    Args:
        detections: per image, in resized-image pixels.
        mask_probs: per image float32 [N_i, M, M] mask probabilities.
        image_sizes: resized (h, w) per image.
        original_sizes: input (H, W) per image.
        config: ``mask_threshold`` is used.
        mask_format: "full" -> masks torch.bool [N_i, H, W]; "box" -> :class:`BoxMasks`
            (box-local crops; the same masks, far smaller for large images).
        max_chunk_bytes: cap on the mask bytes pasted per launch (None: chosen from free
            memory, see the module docstring).
        windows: with ``config.box_output="integer"``, each image's normalized window in the
            padded frame (:attr:`engine.preprocess.ImageBatch.windows`).

    Returns:
        One :class:`Detections` per image, boxes float32 [N_i, 4] in input-image pixels. On
        the masks' device, except when the results did not fit in free GPU memory: then
        every tensor is on the CPU (masks in pinned memory).

    The lists are padded and go through :func:`padded_to_original_frame`.
    """
    _check_output_options(mask_format=mask_format, max_chunk_bytes=max_chunk_bytes, config=config, windows=windows)
    if not detections:
        return []
    like = mask_probs[0] if mask_probs else torch.zeros((0, 28, 28), device=detections[0].boxes.device)
    return padded_to_original_frame(
        BatchDetections.from_list(detections),
        pad_rows(list(mask_probs), like=like)[0] if mask_probs else like.new_zeros((len(detections), 0, 28, 28)),
        image_sizes=image_sizes,
        original_sizes=original_sizes,
        config=config,
        mask_format=mask_format,
        max_chunk_bytes=max_chunk_bytes,
        windows=windows,
    )


def padded_to_original_frame(
    detections: BatchDetections,
    mask_probs: Tensor,
    *,
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
    config: MaskRCNNConfig,
    mask_format: str = "full",
    max_chunk_bytes: int | None = None,
    windows: list[tuple[float, float, float, float]] | None = None,
) -> list[Detections]:
    """:func:`to_original_frame` for the padded detections of a batch (``mask_probs`` float32
    [B, D, M, M], one per column of ``detections``).

    The one host read of a ``Predictor.run``: the detections per image, after the family's
    input-frame filter, read once here so that the masks are allocated at their real size.
    """
    _check_output_options(mask_format=mask_format, max_chunk_bytes=max_chunk_bytes, config=config, windows=windows)
    if detections.scores.shape[0] == 0:
        return []
    crop = mask_format == "box"
    threshold = config.mask_threshold
    detections, mask_probs, boxes = _boxes_in_input_frame(
        detections, mask_probs, image_sizes=image_sizes, original_sizes=original_sizes, windows=windows, config=config
    )
    counts = read_counts(detections.counts)  # the run's one host read: detections per image
    per_image = detections.split(counts)
    boxes = [b[:c] for b, c in zip(boxes, counts)]
    all_boxes = torch.cat(boxes)
    all_probs = torch.cat([p[:c] for p, c in zip(mask_probs, counts)])
    sizes = [tuple(int(v) for v in o) for o in original_sizes]
    masks, on_host = _paste_in_chunks(
        all_probs,
        all_boxes,
        counts,
        sizes,
        threshold=threshold,
        crop=crop,
        max_chunk_bytes=max_chunk_bytes,
        method=config.paste_method,
    )
    if crop:
        masks = [BoxMasks(data, table, size) for (data, table), size in zip(masks, sizes)]
    results = []
    for b, d, m, size in zip(boxes, per_image, masks, sizes):
        scores, labels = d.scores, d.labels
        if on_host:
            b, scores, labels = b.cpu(), scores.cpu(), labels.cpu()
        results.append(Detections(boxes=b, scores=scores, labels=labels, masks=m, image_size=size))
    return results
