"""Ragged sets (proposals or detections per image) kept in batched, fixed-size device tensors.

The frameworks this engine reproduces select proposals and detections image by image, with
boolean-mask indexing at each step; on a GPU each such step makes the host wait for the
device. Here the steps of a whole batch work on fixed-size tensors with validity masks, and
a ragged result reaches the host only where a caller needs its sizes (:func:`read_counts`,
the documented host reads of a run).

Ranking rule shared by every stage: within an image, kept entries by descending score, ties
in input order, which is the order ``torchvision.ops.batched_nms`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels._dispatch import host_to_device

__all__ = [
    "filled_columns",
    "image_of_row",
    "pad_rows",
    "padded_rois",
    "rank_kept",
    "read_counts",
    "segment_rank_kept",
    "segment_sizes",
    "take_rows",
    "upload",
]


def upload(values: Sequence | Tensor, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host table (nested Python numbers, or a CPU tensor) as a device tensor, without a
    synchronising copy (:func:`kernels._dispatch.host_to_device`).

    On CUDA the table goes through pinned memory with ``non_blocking=True``: a plain
    ``torch.tensor(..., device="cuda")`` copies from pageable memory and waits for the device.
    """
    return host_to_device(values, dtype=dtype, device=device)


def read_counts(counts: Tensor) -> list[int]:
    """The host read of a ragged result's sizes: int [B] on the device -> list of B ints.

    Every call is one device-to-host synchronisation on CUDA; the pipeline calls it at the
    places its docstrings name, and the audit tests (``tests/test_host_sync_audit.py``) count them.
    """
    return [int(c) for c in counts.tolist()]


def rank_kept(scores: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row of a batch: the first ``k`` kept entries by descending score, ties in input order.

    Args:
        scores: float [B, N], not NaN, all > -1 (probabilities).
        keep: bool [B, N].
        k: how many to keep per row at most.

    Returns:
        ``(order, counts)``: int64 [B, min(k, N)] column indices (kept ones first, then
        unkept filler), and int64 [B] the number of kept entries per row, at most ``k``.
    """
    ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :k]
    counts = keep.sum(dim=1).clamp(max=k)
    return order, counts


def segment_rank_kept(
    scores: Tensor, keep: Tensor, segments: Tensor, num_segments: int, k: int
) -> tuple[Tensor, Tensor]:
    """:func:`rank_kept` for entries of several images in one flat list.

    Args:
        scores: float [N] (> -1), keep: bool [N], segments: int64 [N] image of each entry.
        num_segments: B.
        k: how many to keep per image at most.

    Returns:
        ``(order, counts)``: int64 [N] entry indices grouped by image (image 0 first), each
        image's kept entries first by descending score (ties in input order), and int64 [B]
        kept entries per image, at most ``k``: image ``i``'s selection is
        ``order[start_i : start_i + counts[i]]`` with ``start_i`` = entries of the images before it.
    """
    ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
    by_score = torch.sort(ranked, descending=True, stable=True).indices
    by_segment = torch.sort(segments[by_score], stable=True).indices
    order = by_score[by_segment]
    counts = torch.zeros(num_segments, dtype=torch.int64, device=scores.device)
    counts.scatter_add_(0, segments, keep.to(torch.int64))
    return order, counts.clamp(max=k)


def segment_sizes(segments: Tensor, num_segments: int) -> Tensor:
    """int64 [B]: how many entries of ``segments`` (int64 [N]) belong to each image."""
    sizes = torch.zeros(num_segments, dtype=torch.int64, device=segments.device)
    return sizes.scatter_add_(0, segments, torch.ones_like(segments))


def image_of_row(counts: list[int], device: torch.device) -> Tensor:
    """int64 [sum(counts)]: the image index of each row of a batch laid out image after image
    (``counts``: rows per image, host ints)."""
    image_counts = upload(counts, dtype=torch.int64, device=device)
    return torch.repeat_interleave(
        torch.arange(len(counts), device=device), image_counts, output_size=sum(counts)
    )


def filled_columns(counts: Tensor, width: int) -> Tensor:
    """bool [B, width]: column ``j`` of row ``b`` is filled when ``j < counts[b]`` (int [B])."""
    return torch.arange(width, device=counts.device)[None, :] < counts[:, None]


def take_rows(values: Tensor, order: Tensor, filled: Tensor) -> Tensor:
    """``values[b, order[b, j]]`` where ``filled[b, j]``, zeros elsewhere.

    values [B, N, ...], order int64 [B, K], filled bool [B, K] -> [B, K, ...]: the fixed-size
    rows of a ranked selection, with zero filler past each image's count (zero boxes are
    harmless to RoIAlign and the heads, whose outputs for them are never used).
    """
    rows = torch.arange(values.shape[0], device=values.device)[:, None]
    taken = values[rows, order]
    mask = filled.view(filled.shape + (1,) * (taken.dim() - 2))
    return torch.where(mask, taken, torch.zeros((), dtype=taken.dtype, device=taken.device))


def pad_rows(rows: Sequence[Tensor], *, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-image tensors [n_i, ...] -> zero-padded [B, max n_i, ...] and int64 counts [B] on
    their device (the sizes are host numbers here, so no read). ``like`` gives the dtype,
    device and trailing shape when ``rows`` is empty."""
    if not rows:
        if like is None:
            raise ValueError("pad_rows needs like= for an empty list")
        return like.new_zeros((0, 0) + tuple(like.shape[1:])), torch.zeros(0, dtype=torch.int64, device=like.device)
    sizes = [len(r) for r in rows]
    width = max(sizes)
    padded = rows[0].new_zeros((len(rows), width) + tuple(rows[0].shape[1:]))
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    return padded, upload(sizes, dtype=torch.int64, device=rows[0].device)


def padded_rois(boxes: Tensor) -> Tensor:
    """Boxes [B, P, 4] -> float32 [B * P, 5] RoI rows (image index, x1, y1, x2, y2), image after image."""
    num_images, width = boxes.shape[:2]
    index = torch.arange(num_images, device=boxes.device, dtype=boxes.dtype)
    return torch.cat([index.view(-1, 1, 1).expand(num_images, width, 1), boxes], dim=2).reshape(-1, 5)
