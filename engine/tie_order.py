"""Order among equal scores, as mmdetection's own sort calls give it (``config.tie_order="torch_sort"``).

The engine's default ranking is stable: equal scores keep their candidate order. mmdetection
ranks with ``torch.sort(..., descending=True)``, which is not stable on the CPU, on arrays whose
length is data-dependent. Equal scores are common there: a float32 sigmoid is exactly 1.0 for
every logit above about 16.6. Which of the tied boxes survives NMS, and which make the top
1,000, then depends on that sort's arrangement. This module replays those sorts on the same
arrays, so that the result is the same. The ranks are returned as *keys*: positive floats,
larger first and never equal within an image, so that the stable NMS and ranking of the
engine follow them exactly.

Sorts replayed (mmdetection 3.3 and mmcv 2.1 on the CPU):

- RPN, per level (``mmdet/models/dense_heads/rpn_head.py _predict_by_feat_single``):
  ``scores.sort(descending=True)`` of the level's probabilities when it has more than ``nms_pre``
  anchors; see :func:`engine.rpn.select_proposals`;
- ``mmcv.ops.batched_nms`` (``mmcv/ops/nms.py``), which the RPN (groups: levels) and
  ``multiclass_nms`` (groups: classes, ``mmdet/models/layers/bbox_nms.py``) call on each image's
  *compacted* candidates (those passing the size or score filter): with fewer than ``split_thr``
  (10,000) candidates, one ``nms`` whose CPU kernel (``mmcv/ops/csrc/pytorch/cpu/nms.cpp``) visits
  them in the order of ``scores.sort(0, descending=True)`` and returns the kept ones in that order;
  with more, one ``nms`` per group (each sorting its own members), then the kept ones of all
  groups, in index order, sorted once more.

The compaction needs the number of candidates on the host, so the replay runs where host reads
are free (the CPU path). Row-wise sorts of a batch give the same arrangement as sorting each
row alone (the CPU kernel sorts each row independently), which the tests check.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MMCV_SPLIT_THRESHOLD", "batched_nms_final_keys", "batched_nms_visit_keys", "sort_keys"]

#: ``mmcv.ops.batched_nms``'s default ``split_thr``
MMCV_SPLIT_THRESHOLD = 10000


def sort_keys(values: Tensor) -> Tensor:
    """float32 [n] keys, larger first, giving the arrangement of ``torch.sort(values, descending=True)``."""
    n = values.shape[0]
    order = torch.sort(values, descending=True).indices  # not stable: the arrangement being replayed
    keys = torch.empty(n, dtype=torch.float32, device=values.device)
    keys[order] = torch.arange(n, 0, -1, dtype=torch.float32, device=values.device)
    return keys


def batched_nms_visit_keys(
    scores: Tensor, valid: Tensor, groups: Tensor, *, split_threshold: int = MMCV_SPLIT_THRESHOLD
) -> Tensor:
    """Per image, keys of the order in which ``mmcv.ops.batched_nms`` visits its candidates.

    Args:
        scores: float32 [B, N]; valid: bool [B, N] (the candidates passed to ``batched_nms``, in
            column order once compacted); groups: int64 [B, N] (level or class id).

    Returns:
        float32 [B, N]: within each group of an image, a larger key is visited first; 0 where
        not valid. Host reads (the compaction), so for the CPU path.
    """
    keys = torch.zeros_like(scores, dtype=torch.float32)
    for b in range(scores.shape[0]):
        index = torch.nonzero(valid[b]).squeeze(1)
        if index.numel() < split_threshold:
            keys[b, index] = sort_keys(scores[b, index])
            continue
        for g in torch.unique(groups[b, index]).tolist():
            members = index[groups[b, index] == g]
            keys[b, members] = sort_keys(scores[b, members])
    return keys


def batched_nms_final_keys(
    scores: Tensor, valid: Tensor, keep: Tensor, visit_keys: Tensor, *, split_threshold: int = MMCV_SPLIT_THRESHOLD
) -> Tensor:
    """Per image, keys of the order in which ``mmcv.ops.batched_nms`` returns the kept candidates.

    With fewer than ``split_threshold`` candidates that is the visiting order (``visit_keys``);
    with more, ``torch.sort`` of the kept ones' scores in index order. scores, visit_keys float32
    [B, N]; valid, keep bool [B, N]. Returns float32 [B, N] (0 where not kept). CPU path.
    """
    keys = torch.where(keep, visit_keys, torch.zeros_like(visit_keys))
    for b in range(scores.shape[0]):
        if int(valid[b].sum()) < split_threshold:
            continue
        kept = torch.nonzero(keep[b]).squeeze(1)
        keys[b] = 0.0
        keys[b, kept] = sort_keys(scores[b, kept])
    return keys
