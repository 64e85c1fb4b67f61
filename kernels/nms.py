"""Non-maximum suppression: plain-PyTorch reference and a Triton kernel.

Reproduces ``torchvision.ops.nms`` / ``batched_nms``: boxes are visited in
descending score order (stable for ties), and a kept box suppresses every later
box whose IoU with it is strictly greater than the threshold. IoU uses areas
``(x2 - x1) * (y2 - y1)`` without a +1, computed in float32 like the compiled
torchvision kernel, as ``inter / ((area_i + area_j) - inter)``; the threshold is
compared in float32 too (as torchvision's CUDA kernel does; its CPU kernel
compares in double, which differs only when an IoU equals ``float32(threshold)``
for a threshold that float32 rounds upwards, e.g. 0.3). Boxes of zero or
negative area never suppress anything (their IoU is 0 or NaN).
``batched_nms_reference`` runs NMS independently per group (class or FPN level),
which is what torchvision's per-class path computes; its coordinate-offset
shortcut agrees except for float rounding of shifted boxes.

Triton version (:func:`batched_nms_triton`), the usual GPU NMS in two launches
for a whole batch, all on the device:

1. host-side torch ops (no synchronisation): a stable sort by descending score
   then a stable sort by group puts every group in a contiguous *segment*, by
   descending score, ties in input order; segment ids and boundaries come from a
   cumulative sum and a ``searchsorted``;
2. ``_nms_suppression_mask_kernel`` computes the suppression bitmask: bit ``b``
   of word ``w`` of row ``i`` is set when box ``j = 64 w + b`` (positions in the
   sorted order) is in ``i``'s segment, ``j > i`` and ``IoU(i, j) > threshold``.
   Programs tile ``[BLOCK_ROWS, BLOCK_WORDS x 64]`` pairs; tiles lying past the
   segments of their rows do nothing;
3. ``_nms_greedy_kernel`` runs the greedy pass, one program per segment (or a
   few): 64 boxes at a time, a scalar chain decides each box from the current
   word of the segment's ``removed`` bits, then the rows of the kept boxes are
   OR-ed into the segment's later ``removed`` words (a per-segment scratch in
   global memory). Keep flags are written by score rank;
4. ``nonzero`` of the flags (the one synchronisation, to size the result) gives
   the kept indices already in the reference's order (descending score across
   groups, ties in input order), so no final sort is needed.

The bitmask takes ``N * ceil(N / 64)`` int64 words (8 bytes each), like
torchvision's CUDA ``nms`` for one call: 12.5 MB for N = 10,000, 1.25 GB for N = 100,000.

Segmented form (:func:`segmented_nms_keep`), what the engine runs: the candidates of a batch
come as G fixed-size segments ``[G, S]`` (an image's FPN level, or an image's class) with a
validity mask, and the result is a keep mask of the same shape. Each segment is sorted on
the device (valid entries first, by descending score, ties in column order), and the bitmask
is relative to the segment: ``G * S * ceil(S / 64)`` words, so a batch of 8 images with 80
classes x 1,000 proposals needs 82 MB where one flat launch over the same 640,000 boxes would
need 51 GB. No count reaches the host: the kernels read each segment's number of valid
entries on the device and skip the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels._checks import describe as _describe
from kernels._dispatch import references_forced, use_triton

try:  # triton is an optional dependency (Linux only); the reference needs only torch
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = [
    "batched_nms",
    "batched_nms_keep",
    "batched_nms_keep_reference",
    "batched_nms_keep_triton",
    "batched_nms_reference",
    "batched_nms_triton",
    "nms_reference",
    "nms_triton",
    "segmented_nms_keep",
    "segmented_nms_keep_cpu",
    "segmented_nms_keep_reference",
    "segmented_nms_keep_triton",
]


def _check_nms_inputs(boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a float tensor [N, 4] (x1 y1 x2 y2); got {_describe(boxes)}")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must be a tensor [N] matching boxes [N, 4]; got {_describe(scores)} for boxes {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must be floating point; got {boxes.dtype}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1]; got {iou_threshold}")


def _check_groups(groups: Tensor, scores: Tensor) -> None:
    if not isinstance(groups, Tensor) or groups.shape != scores.shape:
        raise ValueError(f"groups must be a tensor [N] matching scores; got {_describe(groups)}")




# --------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------


def _suppression_matrix(boxes: Tensor, iou_threshold: float) -> np.ndarray:
    """bool [N, N]: entry (i, j) is True when IoU(i, j) > iou_threshold (float32 arithmetic)."""
    b = boxes.to(torch.float32)
    x1, y1, x2, y2 = b.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :])).clamp(min=0)
    h = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :])).clamp(min=0)
    inter = w * h
    iou = inter / (areas[:, None] + areas[None, :] - inter)
    return (iou > iou_threshold).cpu().numpy()


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS.

    Args:
        boxes: float [N, 4], x1 y1 x2 y2 (any consistent frame).
        scores: float [N].
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box is > this.

    Returns:
        int64 [K] indices of the kept boxes, in descending score order, on boxes' device.
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    suppress = _suppression_matrix(boxes[order], float(iou_threshold))
    removed = np.zeros(n, dtype=bool)
    kept = []
    for i in range(n):
        if removed[i]:
            continue
        kept.append(i)
        removed[i + 1 :] |= suppress[i, i + 1 :]
    kept_t = torch.as_tensor(kept, dtype=torch.int64, device=boxes.device)
    return order[kept_t]


def batched_nms_reference(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently within each group (class id or level index).

    Args:
        boxes: float [N, 4], x1 y1 x2 y2.
        scores: float [N].
        groups: int [N]; boxes of different groups never suppress each other.
        iou_threshold: as in :func:`nms_reference`.

    Returns:
        int64 [K] kept indices, in descending score order across all groups (stable for ties).
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    _check_groups(groups, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    kept = []
    for g in torch.unique(groups):
        members = torch.nonzero(groups == g).flatten()
        kept.append(members[nms_reference(boxes[members], scores[members], iou_threshold)])
    keep = torch.sort(torch.cat(kept)).values  # index order, so ties fall back to input order
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def batched_nms_keep_reference(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Per-group NMS as a keep mask: bool [N], True for the boxes :func:`batched_nms_reference` keeps.

    The fixed-size form of the result: it has the input's length whatever survives, so a
    caller can rank, cut and batch it without reading a count on the host.
    """
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep[batched_nms_reference(boxes, scores, groups, iou_threshold)] = True
    return keep


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

_BITS_PER_WORD = 64  # suppression bitmask words are int64

if _HAS_TRITON:

    @triton.jit
    def _suppression_words(row_x1, row_y1, row_x2, row_y2, col_x1, col_y1, col_x2, col_y2, pair_ok, iou_threshold):
        """int64 [BLOCK_ROWS, BLOCK_WORDS] bitmask words of one tile, for both mask kernels.

        Rows are [BLOCK_ROWS] boxes, columns [BLOCK_WORDS, 64] boxes; bit b of a word is set when
        ``pair_ok`` and IoU > ``iou_threshold``, the IoU in float32 as torchvision computes it.
        """
        row_area = (row_x2 - row_x1) * (row_y2 - row_y1)
        col_area = (col_x2 - col_x1) * (col_y2 - col_y1)
        # [BLOCK_ROWS, BLOCK_WORDS, 64] pairs; NaN/inf coordinates make the union NaN,
        # so min/max NaN conventions cannot change the comparison below
        inter_w = tl.minimum(row_x2[:, None, None], col_x2[None, :, :]) - tl.maximum(
            row_x1[:, None, None], col_x1[None, :, :]
        )
        inter_h = tl.minimum(row_y2[:, None, None], col_y2[None, :, :]) - tl.maximum(
            row_y1[:, None, None], col_y1[None, :, :]
        )
        inter = tl.maximum(inter_w, 0.0) * tl.maximum(inter_h, 0.0)
        union = (row_area[:, None, None] + col_area[None, :, :]) - inter
        iou = tl.math.div_rn(inter, union)
        suppresses = (iou > iou_threshold) & pair_ok
        bit = tl.arange(0, 64)
        bit_value = tl.full([64], 1, tl.int64) << bit.to(tl.int64)  # bit 63 is the sign bit
        # distinct powers of two: their sum is their bitwise OR (no carries, no overflow)
        return tl.sum(tl.where(suppresses, bit_value[None, None, :], 0), axis=2)

    @triton.jit
    def _nms_suppression_mask_kernel(
        boxes_ptr,  # float32 [N, 4] x1 y1 x2 y2, sorted: segments by group, descending score inside
        segment_ids_ptr,  # int32 [N], the segment of each sorted box (non-decreasing)
        mask_ptr,  # int64 [N, num_words] (out): bit b of word w of row i <=> i suppresses box 64 w + b
        N,
        num_words,  # ceil(N / 64)
        iou_threshold,  # float32
        BLOCK_ROWS: tl.constexpr,
        BLOCK_WORDS: tl.constexpr,
    ):
        """One program: rows ``[BLOCK_ROWS]`` x columns ``[BLOCK_WORDS, 64]`` of the bitmask.

        The word range starts at the word holding the block's first row (columns before
        it can only hold boxes j < i), so program_id(1) counts words from the diagonal.
        A tile whose first column is past the segment of the block's last row (or past
        N) has no pair to compare and writes nothing: the greedy pass never reads
        words past a row's segment.
        """
        first_row = tl.program_id(0) * BLOCK_ROWS
        first_word = first_row // 64 + tl.program_id(1) * BLOCK_WORDS
        first_col = first_word * 64
        last_row = tl.minimum(first_row + BLOCK_ROWS, N) - 1
        last_row_segment = tl.load(segment_ids_ptr + last_row)
        first_col_segment = tl.load(segment_ids_ptr + first_col, mask=first_col < N, other=0)
        if (first_col < N) & (first_col_segment <= last_row_segment):
            rows = first_row + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < N
            words = first_word + tl.arange(0, BLOCK_WORDS)
            bit = tl.arange(0, 64)
            cols = words[:, None] * 64 + bit[None, :]  # [BLOCK_WORDS, 64]
            col_ok = cols < N

            # lanes past N read the unit box [0, 0, 1, 1] (no 0 / 0); their bits are masked below
            row_x1 = tl.load(boxes_ptr + rows * 4 + 0, mask=row_ok, other=0.0)
            row_y1 = tl.load(boxes_ptr + rows * 4 + 1, mask=row_ok, other=0.0)
            row_x2 = tl.load(boxes_ptr + rows * 4 + 2, mask=row_ok, other=1.0)
            row_y2 = tl.load(boxes_ptr + rows * 4 + 3, mask=row_ok, other=1.0)
            col_x1 = tl.load(boxes_ptr + cols * 4 + 0, mask=col_ok, other=0.0)
            col_y1 = tl.load(boxes_ptr + cols * 4 + 1, mask=col_ok, other=0.0)
            col_x2 = tl.load(boxes_ptr + cols * 4 + 2, mask=col_ok, other=1.0)
            col_y2 = tl.load(boxes_ptr + cols * 4 + 3, mask=col_ok, other=1.0)
            row_segment = tl.load(segment_ids_ptr + rows, mask=row_ok, other=-1)
            col_segment = tl.load(segment_ids_ptr + cols, mask=col_ok, other=-2)

            pair_ok = (cols[None, :, :] > rows[:, None, None]) & (col_segment[None, :, :] == row_segment[:, None, None])
            word_bits = _suppression_words(
                row_x1, row_y1, row_x2, row_y2, col_x1, col_y1, col_x2, col_y2, pair_ok, iou_threshold
            )
            dst = mask_ptr + rows[:, None].to(tl.int64) * num_words + words[None, :]
            tl.store(dst, word_bits, mask=row_ok[:, None] & (words < num_words)[None, :])

    @triton.jit
    def _nms_greedy_kernel(
        mask_ptr,  # int64 [N, num_words] from _nms_suppression_mask_kernel
        segment_ids_ptr,  # int32 [N]; segment_ids[N - 1] + 1 segments
        segment_bounds_ptr,  # int64 [N + 1]: segment s is sorted positions [bounds[s], bounds[s + 1])
        score_rank_ptr,  # int64 [N]: rank in the descending-score order of each sorted box
        removed_ptr,  # int64 [N] zeros (scratch): segment s's removed words at [bounds[s], ...)
        keep_ptr,  # int8 [N] (out), indexed by score rank
        N,
        num_words,
        SEGMENTS_PER_PROGRAM: tl.constexpr,
        PROPAGATE_WORDS: tl.constexpr,
    ):
        """Greedy NMS over segments ``[pid * SEGMENTS_PER_PROGRAM, ...)``, one after another.

        For each 64-box word of a segment: the scalar chain visits the boxes in order; a
        box not yet removed is kept and its row's bits for this word are OR-ed into the
        current removed word (later boxes of the word then see it). The rows of the kept
        boxes are then OR-ed into the segment's later removed words, PROPAGATE_WORDS at a
        time. A segment of L boxes spans at most L words, so its scratch words
        ``[start, start + words)`` stay inside its own positions.
        """
        num_segments = tl.load(segment_ids_ptr + N - 1) + 1
        first_segment = tl.program_id(0) * SEGMENTS_PER_PROGRAM
        end_segment = tl.minimum(first_segment + SEGMENTS_PER_PROGRAM, num_segments)
        bit = tl.arange(0, 64)
        one = tl.full([], 1, tl.int64)
        for segment in range(first_segment, end_segment):
            start = tl.load(segment_bounds_ptr + segment)
            end = tl.load(segment_bounds_ptr + segment + 1)
            start_word = start // 64
            end_word = (end - 1) // 64 + 1
            for word in range(start_word, end_word):
                removed_word = tl.load(removed_ptr + start + (word - start_word))
                kept_bits = tl.zeros_like(removed_word)
                for b in tl.static_range(64):
                    box = word * 64 + b
                    in_segment = (box >= start) & (box < end)
                    # independent of the chain, so these loads can all be issued up front
                    row_word = tl.load(mask_ptr + box * num_words + word, mask=in_segment, other=0)
                    kept = in_segment & (((removed_word >> b) & 1) == 0)
                    removed_word = removed_word | tl.where(kept, row_word, 0)
                    kept_bits = kept_bits | tl.where(kept, one << b, 0)

                word_boxes = word * 64 + bit
                word_in_segment = (word_boxes >= start) & (word_boxes < end)
                rank = tl.load(score_rank_ptr + word_boxes, mask=word_in_segment, other=0)
                tl.store(keep_ptr + rank, ((kept_bits >> bit) & 1).to(tl.int8), mask=word_in_segment)

                for later_word in range(word + 1, end_word, PROPAGATE_WORDS):
                    later = later_word + tl.arange(0, PROPAGATE_WORDS)
                    later_ok = later < end_word
                    suppressed = tl.zeros([PROPAGATE_WORDS], tl.int64)
                    for b in tl.static_range(64):
                        row_kept = ((kept_bits >> b) & 1) != 0
                        row = mask_ptr + (word * 64 + b) * num_words + later
                        suppressed = suppressed | tl.load(row, mask=later_ok & row_kept, other=0)
                    scratch = removed_ptr + start + (later - start_word)
                    previous = tl.load(scratch, mask=later_ok, other=0)
                    tl.store(scratch, previous | suppressed, mask=later_ok)
                # the next word's removed bits were stored by other threads of this program
                tl.debug_barrier()


@dataclass(frozen=True)
class _NmsTiles:
    """Launch shapes (powers of two): mask tile rows and words, segments per greedy
    program, words OR-ed per step of the greedy pass's propagation."""

    block_rows: int
    block_words: int
    segments_per_program: int
    propagate_words: int
    mask_warps: int = 4
    greedy_warps: int = 1


# GPU: small tiles, one program per segment (idle programs exit at once).
_CUDA_TILES = _NmsTiles(block_rows=64, block_words=1, segments_per_program=1, propagate_words=32, mask_warps=8)
# Interpreter (~10 ms per program instance, vector ops nearly free): few, large programs.
_INTERPRETER_TILES = _NmsTiles(block_rows=128, block_words=8, segments_per_program=64, propagate_words=32)


def _check_triton_inputs(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, name: str) -> None:
    _check_nms_inputs(boxes, scores, iou_threshold)
    _check_groups(groups, scores)
    if not _HAS_TRITON:
        raise RuntimeError(f"{name} needs the `triton` package; use batched_nms_reference")
    for label, t in (("scores", scores), ("groups", groups)):
        if t.device != boxes.device:
            raise ValueError(f"{label} is on {t.device} but boxes are on {boxes.device}; they must share a device")
    if boxes.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{name} runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); got tensors on {boxes.device}"
        )


def _keep_flags_by_score_rank(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, tiles: _NmsTiles
) -> tuple[Tensor, Tensor]:
    """Runs both kernels; returns ``(keep, by_score)`` for N >= 1, no host synchronisation.

    ``by_score``: int64 [N], the indices by descending score, ties in input order
    (the reference's final order); ``keep``: int8 [N], ``keep[r]`` is 1 when box
    ``by_score[r]`` survives NMS within its group.
    """
    n = boxes.shape[0]
    dev = boxes.device
    by_score = torch.sort(scores, descending=True, stable=True).indices
    by_group = torch.sort(groups[by_score], stable=True)  # stable: descending score inside a group
    score_rank = by_group.indices  # sorted position -> rank in by_score
    sorted_boxes = boxes.index_select(0, by_score[score_rank]).to(torch.float32).contiguous()
    sorted_groups = by_group.values
    segment_starts = torch.ones(n, dtype=torch.bool, device=dev)
    segment_starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    segment_ids = torch.cumsum(segment_starts, 0, dtype=torch.int32) - 1
    # bounds[s] = first position of segment s (N for s >= number of segments)
    segment_bounds = torch.searchsorted(segment_ids, torch.arange(n + 1, dtype=torch.int32, device=dev))

    num_words = triton.cdiv(n, _BITS_PER_WORD)
    mask = torch.empty((n, num_words), dtype=torch.int64, device=dev)
    removed = torch.zeros(n, dtype=torch.int64, device=dev)
    keep = torch.zeros(n, dtype=torch.int8, device=dev)

    grid = (triton.cdiv(n, tiles.block_rows), triton.cdiv(num_words, tiles.block_words))
    _nms_suppression_mask_kernel[grid](
        sorted_boxes,
        segment_ids,
        mask,
        n,
        num_words,
        float(iou_threshold),
        BLOCK_ROWS=tiles.block_rows,
        BLOCK_WORDS=tiles.block_words,
        num_warps=tiles.mask_warps,
        enable_fp_fusion=False,
    )
    _nms_greedy_kernel[(triton.cdiv(n, tiles.segments_per_program),)](
        mask,
        segment_ids,
        segment_bounds,
        score_rank,
        removed,
        keep,
        n,
        num_words,
        SEGMENTS_PER_PROGRAM=tiles.segments_per_program,
        PROPAGATE_WORDS=tiles.propagate_words,
        num_warps=tiles.greedy_warps,
    )
    return keep, by_score


def _default_tiles(device: torch.device) -> _NmsTiles:
    return _CUDA_TILES if device.type == "cuda" else _INTERPRETER_TILES


def batched_nms_triton(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Per-group NMS in two Triton launches for the whole batch; same contract as
    :func:`batched_nms_reference`.

    Args:
        boxes: float [N, 4] (any float dtype; compared in float32), x1 y1 x2 y2.
        scores: [N], same device; only their order matters.
        groups: [N] ids, same device (callers combine image and class/level into one id).
        iou_threshold: float in [0, 1], compared in float32.

    Returns:
        int64 [K] kept indices on boxes' device, by descending score across groups,
        ties in input order, equal to :func:`batched_nms_reference`'s.

    Everything up to the keep flags runs on the device without synchronising (sorts,
    cumsum, searchsorted, the two kernels); the final ``nonzero`` synchronises once to
    size the result. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    Inputs are not modified; N == 0 launches nothing.
    """
    _check_triton_inputs(boxes, scores, groups, iou_threshold, "batched_nms_triton")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    keep, by_score = _keep_flags_by_score_rank(boxes, scores, groups, iou_threshold, _default_tiles(boxes.device))
    return by_score[torch.nonzero(keep).squeeze(1)]


def batched_nms_keep_triton(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Per-group NMS as a keep mask (bool [N] in input order), in two Triton launches and no
    host synchronisation at all; same contract as :func:`batched_nms_keep_reference`."""
    _check_triton_inputs(boxes, scores, groups, iou_threshold, "batched_nms_keep_triton")
    keep_mask = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if boxes.shape[0] == 0:
        return keep_mask
    keep, by_score = _keep_flags_by_score_rank(boxes, scores, groups, iou_threshold, _default_tiles(boxes.device))
    return keep_mask.index_put_((by_score,), keep.bool())


def nms_triton(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """NMS of one group in Triton; same contract as :func:`nms_reference` (see :func:`batched_nms_triton`)."""
    _check_nms_inputs(boxes, scores, iou_threshold)
    groups = torch.zeros(boxes.shape[0], dtype=torch.int32, device=boxes.device)
    return batched_nms_triton(boxes, scores, groups, iou_threshold)


# --------------------------------------------------------------------------------------
# Segmented NMS: fixed-size segments, bitmask relative to each segment
# --------------------------------------------------------------------------------------


def _check_segmented_inputs(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 3 or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be a float tensor [G, S, 4] (x1 y1 x2 y2 per segment); got {_describe(boxes)}")
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must be floating point; got {boxes.dtype}")
    for label, t in (("scores", scores), ("valid", valid)):
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(boxes.shape[:2]):
            raise ValueError(f"{label} must be a tensor [G, S] matching boxes {tuple(boxes.shape)}; got {_describe(t)}")
        if t.device != boxes.device:
            raise ValueError(f"{label} is on {t.device} but boxes are on {boxes.device}; they must share a device")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor; got {valid.dtype}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1]; got {iou_threshold}")


def segmented_nms_keep_reference(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each row (segment) of a fixed-size batch, over its valid entries only.

    Args:
        boxes: float [G, S, 4], x1 y1 x2 y2; segment ``g`` holds ``boxes[g]``.
        scores: float [G, S]; valid entries must not be NaN or -inf.
        valid: bool [G, S]; invalid entries are never kept and never suppress.
        iou_threshold: as in :func:`nms_reference`.

    Returns:
        bool [G, S]: True for the kept entries. Equal to :func:`batched_nms_keep_reference`
        over the valid entries with the segment index as group (within a segment: descending
        score, ties in column order).
    """
    _check_segmented_inputs(boxes, scores, valid, iou_threshold)
    num_segments, size = scores.shape
    keep = torch.zeros(num_segments * size, dtype=torch.bool, device=boxes.device)
    index = torch.nonzero(valid.reshape(-1)).squeeze(1)
    if index.numel():
        kept = batched_nms_reference(
            boxes.reshape(-1, 4)[index], scores.reshape(-1)[index], torch.div(index, size, rounding_mode="floor"),
            iou_threshold,
        )
        keep[index[kept]] = True
    return keep.view(num_segments, size)


def segmented_nms_keep_cpu(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """The CPU path of :func:`segmented_nms_keep`: the reference's keep mask, bit for bit, without
    its ``[S, S]`` IoU matrix.

    Same arguments and result as :func:`segmented_nms_keep_reference`. Each segment's valid boxes
    are visited in the reference's order (descending score, ties in column order); only a box that
    is kept has its IoU with the boxes after it computed, in float32 with the reference's operation
    order (``inter / ((area_i + area_j) - inter)``, compared with ``float32(iou_threshold)``). So
    the work is (kept boxes) x (segment size) instead of (segment size)^2: for matterport's 6,000
    proposals per image the reference builds a 36 M-entry matrix and its temporaries.
    """
    _check_segmented_inputs(boxes, scores, valid, iou_threshold)
    num_segments, size = scores.shape
    keep = np.zeros((num_segments, size), dtype=bool)
    if keep.size:
        # valid entries first, each segment by descending score with ties in column order: a stable
        # sort by score, then a stable sort of that order by validity
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        by_validity = torch.sort(torch.gather(valid, 1, order).to(torch.uint8), dim=1, descending=True, stable=True)
        order = torch.gather(order, 1, by_validity.indices).cpu().numpy()
        counts = by_validity.values.sum(1).tolist()
        all_boxes = boxes.detach().to(device="cpu", dtype=torch.float32).numpy()
        threshold = np.float32(iou_threshold)
        for segment, count in enumerate(counts):
            if count:
                visited = order[segment, :count]
                kept = _greedy_keep(all_boxes[segment, visited], threshold)
                keep[segment, visited[kept]] = True
    return torch.from_numpy(keep).to(boxes.device)


def _greedy_keep(boxes: np.ndarray, threshold: np.float32) -> np.ndarray:
    """Positions kept by greedy NMS over float32 [N, 4] boxes already in visiting order."""
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    n = len(areas)
    removed = np.zeros(n, dtype=bool)
    kept = []
    with np.errstate(divide="ignore", invalid="ignore"):  # zero-area pairs give NaN: never suppressed
        for i in range(n):
            if removed[i]:
                continue
            kept.append(i)
            if i + 1 == n:
                break
            rest = slice(i + 1, n)
            w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
            h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
            inter = w * h
            removed[rest] |= inter / ((areas[i] + areas[rest]) - inter) > threshold
    return np.asarray(kept, dtype=np.int64)


if _HAS_TRITON:

    @triton.jit
    def _segmented_nms_mask_kernel(
        boxes_ptr,  # float32 [G, S, 4]: each segment's live boxes first, by descending score
        counts_ptr,  # int32 [G]: live boxes per segment
        mask_ptr,  # int64 [G, S, num_words] (out): bit b of word w of row i <=> i suppresses box 64 w + b
        S,
        num_words,  # ceil(S / 64)
        iou_threshold,  # float32
        BLOCK_ROWS: tl.constexpr,
        BLOCK_WORDS: tl.constexpr,
    ):
        """One program: segment ``program_id(0)``, rows ``[BLOCK_ROWS]`` x columns ``[BLOCK_WORDS, 64]``.

        Positions are relative to the segment, so the bitmask is ``S / 64`` words per box
        whatever the number of segments. Words start at the diagonal of the block's first
        row (columns before it hold only boxes j < i); tiles past the segment's live boxes
        write nothing, and the greedy pass never reads them.
        """
        segment = tl.program_id(0)
        first_row = tl.program_id(1) * BLOCK_ROWS
        first_word = first_row // 64 + tl.program_id(2) * BLOCK_WORDS
        first_col = first_word * 64
        count = tl.load(counts_ptr + segment)
        if (first_row < count) & (first_col < count):
            base = segment.to(tl.int64) * S
            rows = first_row + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < count
            words = first_word + tl.arange(0, BLOCK_WORDS)
            bit = tl.arange(0, 64)
            cols = words[:, None] * 64 + bit[None, :]  # [BLOCK_WORDS, 64]
            col_ok = cols < count

            row_ptr = boxes_ptr + (base + rows) * 4
            col_ptr = boxes_ptr + (base + cols) * 4
            # lanes past the live boxes read the unit box [0, 0, 1, 1] (no 0 / 0); masked below
            row_x1 = tl.load(row_ptr + 0, mask=row_ok, other=0.0)
            row_y1 = tl.load(row_ptr + 1, mask=row_ok, other=0.0)
            row_x2 = tl.load(row_ptr + 2, mask=row_ok, other=1.0)
            row_y2 = tl.load(row_ptr + 3, mask=row_ok, other=1.0)
            col_x1 = tl.load(col_ptr + 0, mask=col_ok, other=0.0)
            col_y1 = tl.load(col_ptr + 1, mask=col_ok, other=0.0)
            col_x2 = tl.load(col_ptr + 2, mask=col_ok, other=1.0)
            col_y2 = tl.load(col_ptr + 3, mask=col_ok, other=1.0)

            pair_ok = (cols[None, :, :] > rows[:, None, None]) & col_ok[None, :, :]
            word_bits = _suppression_words(
                row_x1, row_y1, row_x2, row_y2, col_x1, col_y1, col_x2, col_y2, pair_ok, iou_threshold
            )
            dst = mask_ptr + (base + rows)[:, None] * num_words + words[None, :]
            tl.store(dst, word_bits, mask=row_ok[:, None] & (words < num_words)[None, :])

    @triton.jit
    def _segmented_nms_greedy_kernel(
        mask_ptr,  # int64 [G, S, num_words] from _segmented_nms_mask_kernel
        counts_ptr,  # int32 [G]
        removed_ptr,  # int64 [G, num_words] zeros (scratch)
        keep_ptr,  # int8 [G, S] zeros (out), by sorted position
        G,
        S,
        num_words,
        SEGMENTS_PER_PROGRAM: tl.constexpr,
        PROPAGATE_WORDS: tl.constexpr,
    ):
        """Greedy NMS over segments ``[pid * SEGMENTS_PER_PROGRAM, ...)``, as in
        ``_nms_greedy_kernel``: a scalar chain per 64-box word, then the kept rows OR-ed into
        the segment's later removed words. Only the segment's live words are visited."""
        first_segment = tl.program_id(0) * SEGMENTS_PER_PROGRAM
        end_segment = tl.minimum(first_segment + SEGMENTS_PER_PROGRAM, G)
        bit = tl.arange(0, 64)
        one = tl.full([], 1, tl.int64)
        for segment in range(first_segment, end_segment):
            count = tl.load(counts_ptr + segment)
            segment_64 = tl.full([], 0, tl.int64) + segment  # the loop index is a plain int in the interpreter
            base = segment_64 * S
            scratch_base = segment_64 * num_words
            end_word = (count + 63) // 64
            for word in range(0, end_word):
                removed_word = tl.load(removed_ptr + scratch_base + word)
                kept_bits = tl.zeros_like(removed_word)
                for b in tl.static_range(64):
                    box = word * 64 + b
                    live = box < count
                    row_word = tl.load(mask_ptr + (base + box) * num_words + word, mask=live, other=0)
                    kept = live & (((removed_word >> b) & 1) == 0)
                    removed_word = removed_word | tl.where(kept, row_word, 0)
                    kept_bits = kept_bits | tl.where(kept, one << b, 0)

                word_boxes = word * 64 + bit
                tl.store(keep_ptr + base + word_boxes, ((kept_bits >> bit) & 1).to(tl.int8), mask=word_boxes < count)

                for later_word in range(word + 1, end_word, PROPAGATE_WORDS):
                    later = later_word + tl.arange(0, PROPAGATE_WORDS)
                    later_ok = later < end_word
                    suppressed = tl.zeros([PROPAGATE_WORDS], tl.int64)
                    for b in tl.static_range(64):
                        row_kept = ((kept_bits >> b) & 1) != 0
                        row = mask_ptr + (base + word * 64 + b) * num_words + later
                        suppressed = suppressed | tl.load(row, mask=later_ok & row_kept, other=0)
                    scratch = removed_ptr + scratch_base + later
                    previous = tl.load(scratch, mask=later_ok, other=0)
                    tl.store(scratch, previous | suppressed, mask=later_ok)
                tl.debug_barrier()


def segmented_nms_keep_triton(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """:func:`segmented_nms_keep_reference` in two Triton launches, with no host synchronisation.

    Each segment is sorted on the device (valid entries first, by descending score, ties in
    column order); the bitmask is ``G * S * ceil(S / 64)`` int64 words: 10 MB for 80 classes
    x 1,000 proposals of one image, against 800 MB for the same boxes in one flat
    :func:`batched_nms_keep_triton`. Runs on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``.
    """
    _check_segmented_inputs(boxes, scores, valid, iou_threshold)
    if not _HAS_TRITON:
        raise RuntimeError("segmented_nms_keep_triton needs the `triton` package; use segmented_nms_keep_reference")
    if boxes.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"segmented_nms_keep_triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); got {boxes.device}"
        )
    return _segmented_keep(boxes, scores, valid, iou_threshold, _default_tiles(boxes.device))


def _segmented_keep(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float, tiles: _NmsTiles) -> Tensor:
    """The sort and both launches of :func:`segmented_nms_keep_triton`, with explicit tiles."""
    num_segments, size = scores.shape
    dev = boxes.device
    if num_segments * size == 0:
        return torch.zeros((num_segments, size), dtype=torch.bool, device=dev)
    # valid scores are finite or +inf, so -inf puts the invalid ones last; stable: ties in column order
    ranked = torch.where(valid, scores.to(torch.float32), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    sorted_boxes = torch.gather(boxes.to(torch.float32), 1, order[..., None].expand(num_segments, size, 4)).contiguous()
    counts = valid.sum(dim=1, dtype=torch.int32)
    num_words = triton.cdiv(size, _BITS_PER_WORD)
    mask = torch.empty((num_segments, size, num_words), dtype=torch.int64, device=dev)
    removed = torch.zeros((num_segments, num_words), dtype=torch.int64, device=dev)
    keep_sorted = torch.zeros((num_segments, size), dtype=torch.int8, device=dev)
    grid = (num_segments, triton.cdiv(size, tiles.block_rows), triton.cdiv(num_words, tiles.block_words))
    _segmented_nms_mask_kernel[grid](
        sorted_boxes,
        counts,
        mask,
        size,
        num_words,
        float(iou_threshold),
        BLOCK_ROWS=tiles.block_rows,
        BLOCK_WORDS=tiles.block_words,
        num_warps=tiles.mask_warps,
        enable_fp_fusion=False,
    )
    _segmented_nms_greedy_kernel[(triton.cdiv(num_segments, tiles.segments_per_program),)](
        mask,
        counts,
        removed,
        keep_sorted,
        num_segments,
        size,
        num_words,
        SEGMENTS_PER_PROGRAM=tiles.segments_per_program,
        PROPAGATE_WORDS=tiles.propagate_words,
        num_warps=tiles.greedy_warps,
    )
    keep = torch.zeros((num_segments, size), dtype=torch.bool, device=dev)
    return keep.scatter_(1, order, keep_sorted.bool())


# --------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Per-group NMS: the Triton kernels for CUDA tensors, the reference otherwise.

    See :func:`batched_nms_reference` for the contract and :mod:`kernels._dispatch` for
    the choice (``ENGINE_FORCE_REFERENCE=1`` / ``ENGINE_FORCE_TRITON=1`` force either).
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    fn = batched_nms_triton if (_HAS_TRITON and use_triton(boxes)) else batched_nms_reference
    return fn(boxes, scores, groups, iou_threshold)


def batched_nms_keep(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Per-group NMS as a keep mask, bool [N] in input order: the Triton kernels for CUDA
    tensors (no host synchronisation), the reference otherwise (see :func:`batched_nms`)."""
    _check_nms_inputs(boxes, scores, iou_threshold)
    fn = batched_nms_keep_triton if (_HAS_TRITON and use_triton(boxes)) else batched_nms_keep_reference
    return fn(boxes, scores, groups, iou_threshold)


def segmented_nms_keep(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each fixed-size segment, bool [G, S] keep mask: the Triton kernels for CUDA
    tensors (no host synchronisation), :func:`segmented_nms_keep_cpu` for CPU tensors, the
    reference where ``ENGINE_FORCE_REFERENCE=1`` (see :func:`batched_nms`).
    Contract: :func:`segmented_nms_keep_reference`."""
    _check_segmented_inputs(boxes, scores, valid, iou_threshold)
    if _HAS_TRITON and use_triton(boxes):
        return segmented_nms_keep_triton(boxes, scores, valid, iou_threshold)
    if boxes.device.type == "cpu" and not references_forced():
        return segmented_nms_keep_cpu(boxes, scores, valid, iou_threshold)
    return segmented_nms_keep_reference(boxes, scores, valid, iou_threshold)
