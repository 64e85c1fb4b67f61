"""Multi-level RoIAlign with FPN level assignment: Triton kernel and PyTorch reference.

Reproduces what torchvision's ``MultiScaleRoIAlign`` computes (its ``LevelMapper``
followed by the compiled CPU ``roi_align`` on each level), and the level-assignment
variants of Detectron2, mmdetection and matterport through :class:`LevelRule`; with
``mode="crop_and_resize"``, matterport's ``PyramidROIAlign`` (TensorFlow's
``crop_and_resize`` per level, see below).

Frames and layouts
------------------
* ``features``: a sequence of L float32 maps ``[B, C, H_l, W_l]`` (any memory
  format), map i being FPN level ``level_rule.min_level + i``.
* ``rois``: float32 ``[R, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in padded
  input-image pixels (the frame of ``torchvision.ops.roi_align``); a RoI is mapped
  onto level l's map by multiplying by ``spatial_scales[l]``. (In
  ``mode="crop_and_resize"``: normalized coordinates, see that section.)
* result: float32 ``[R, C, output_size, output_size]``, contiguous NCHW, row r
  pooled from the level that :func:`assign_levels` gives RoI r.

Arithmetic reproduced in the default ``mode="roi_align"`` (torchvision ``csrc/ops/cpu/roi_align_kernel.cpp`` and
``roi_align_common.h``), all in float32 with the same operation order:
``start = x1 * scale - offset`` (offset 0.5 when ``aligned``), ``roi = end - start``
(at least 1 when not aligned), ``bin = roi / out``, grid ``= sampling_ratio`` or
``ceil(roi / out)``, sample ``y = (start_h + ph * bin_h) + ((iy + 0.5) * bin_h) / grid_h``,
samples with ``y < -1 or y > H`` (likewise x) contribute 0, the others are
bilinear with the corner clamping of torchvision, summed in (iy, ix) order as
``acc += ((w1 v1 + w2 v2) + w3 v3) + w4 v4`` and divided by ``max(grid_h grid_w, 1)``.

The kernel runs with floating-point contraction (FMA fusion) off and uses IEEE
division, so the sample positions, hence which samples fall inside the map, are
the same as the reference's.

Mode ``"crop_and_resize"`` (matterport ``PyramidROIAlign``)
---------------------------------------------------------
With ``mode="crop_and_resize"`` every function here reproduces matterport
Mask_RCNN's ``PyramidROIAlign``: TensorFlow's
``tf.image.crop_and_resize(map, boxes, box_indices, [P, P], method="bilinear",
extrapolation_value=0)`` applied to the RoIs of each FPN level (TensorFlow's CPU
kernel ``tensorflow/core/kernels/image/crop_and_resize_op.cc``).

* ``rois`` rows are ``(batch_index, x1, y1, x2, y2)`` in *normalized* coordinates of
  the padded image (matterport's frame, ``normalized = pixel / (size - 1)``);
  values outside ``[0, 1]`` and flipped boxes (``x2 < x1``) are allowed.
* ``spatial_scales``, ``sampling_ratio`` and ``aligned`` are validated but ignored.
* The level is :func:`assign_levels` of the normalized boxes, so the rule is given
  in that frame: matterport is ``LevelRule(canonical_size=224 / sqrt(image_area),
  canonical_level=4, rounding="round")``, e.g. ``224 / 1024`` for 1024 x 1024 inputs.
* On an ``H x W`` map, output cell ``(i, j)`` is, in float32 in this order::

      height_scale = (y2 - y1) * (H - 1) / (P - 1)             (0 when P == 1)
      in_y = y1 * (H - 1) + i * height_scale                   (P > 1)
      in_y = 0.5 * (y1 + y2) * (H - 1)                         (P == 1)
      (in_x likewise with x1, x2, W and j)
      0 (every channel) if in_y < 0 or in_y > H - 1 or in_x < 0 or in_x > W - 1, else
      top, bottom, left, right = floor(in_y), ceil(in_y), floor(in_x), ceil(in_x)
      y_lerp, x_lerp = in_y - top, in_x - left
      top_v = tl + (tr - tl) * x_lerp;  bottom_v = bl + (br - bl) * x_lerp
      out = top_v + (bottom_v - top_v) * y_lerp

  (TensorFlow evaluates the ``P == 1`` centre in double, then rounds to float; the
  product is exact in double, so this is the same float32 value.) Non-finite
  sample positions give 0 as well.

Level assignment in the kernel
------------------------------
The level of a RoI is a non-decreasing function of its float32 area
``(x2 - x1) * (y2 - y1)``. For each rule, the smallest float32 area reaching each
level above ``min_level`` is found once on the host (bisection over float32 bit
patterns through the very torch code of :func:`assign_levels`, cached per rule
and device type), and the kernel computes each RoI's area and counts the
thresholds it reaches. This gives :func:`assign_levels`' level on the same device
bit for bit, which an in-kernel ``sqrt`` / ``log2`` would not guarantee on GPUs
(Triton's ``sqrt`` / ``log2`` are the fast approximate instructions there). The rule's
variants (eps placement, floor or round) therefore need no kernel specialisation.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from kernels._checks import describe as _describe
from kernels._dispatch import host_to_device, use_triton

try:  # triton is an optional dependency (Linux only); the reference needs only torch
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = [
    "LevelRule",
    "assign_levels",
    "multilevel_roi_align",
    "multilevel_roi_align_reference",
    "multilevel_roi_align_triton",
]

_ROUNDINGS = ("floor", "round")
_MODES = ("roi_align", "crop_and_resize")


@dataclass(frozen=True)
class LevelRule:
    """FPN level assignment (FPN paper eq. 1) and the variants of each framework.

    With ``s = sqrt((x2 - x1) * (y2 - y1))`` (no +1), in float32 in this order:

    * ``rounding="floor"``, ``eps_inside_log=False`` (torchvision ``LevelMapper``):
      ``floor(k0 + log2(s / s0) + eps)``;
    * ``rounding="floor"``, ``eps_inside_log=True``: ``floor(k0 + log2(s / s0 + eps))``
      (Detectron2: eps=1e-8, k0=4, s0=224; mmdetection: eps=1e-6, k0=2, s0=56);
    * ``rounding="round"`` (matterport): ``k0 + round_half_to_even(log2(s / s0))``,
      eps unused;

    then clamped to ``[min_level, max_level]``. ``k0`` is ``canonical_level`` and
    ``s0`` is ``canonical_size``.
    """

    canonical_size: float = 224.0
    canonical_level: int = 4
    eps: float = 1e-6
    eps_inside_log: bool = False
    rounding: str = "floor"
    min_level: int = 2
    max_level: int = 5

    def __post_init__(self):
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"LevelRule.rounding must be one of {_ROUNDINGS}; got {self.rounding!r}")
        if not (isinstance(self.min_level, int) and isinstance(self.max_level, int)) or self.min_level > self.max_level:
            raise ValueError(
                f"LevelRule needs integer min_level <= max_level; got min_level={self.min_level!r}, max_level={self.max_level!r}"
            )
        if not isinstance(self.canonical_level, int):
            raise ValueError(f"LevelRule.canonical_level must be an int; got {self.canonical_level!r}")
        if not (math.isfinite(float(self.canonical_size)) and float(self.canonical_size) > 0):
            raise ValueError(f"LevelRule.canonical_size must be a finite positive number; got {self.canonical_size!r}")
        if not math.isfinite(float(self.eps)):
            raise ValueError(f"LevelRule.eps must be finite; got {self.eps!r}")

    @property
    def num_levels(self) -> int:
        """Number of feature maps the rule addresses: ``max_level - min_level + 1``."""
        return self.max_level - self.min_level + 1


# --------------------------------------------------------------------------------------
# Level assignment
# --------------------------------------------------------------------------------------


def _levels_of_area(area: Tensor, rule: LevelRule) -> Tensor:
    """float32 absolute FPN level (already clamped) of float32 RoI areas, any shape."""
    s = torch.sqrt(area)
    ratio = s / torch.tensor(float(rule.canonical_size), dtype=torch.float32, device=area.device)
    eps = torch.tensor(float(rule.eps), dtype=torch.float32, device=area.device)
    if rule.rounding == "round":
        lvl = rule.canonical_level + torch.round(torch.log2(ratio))
    elif rule.eps_inside_log:
        lvl = torch.floor(rule.canonical_level + torch.log2(ratio + eps))
    else:
        lvl = torch.floor(rule.canonical_level + torch.log2(ratio) + eps)
    lvl = torch.clamp(lvl, min=rule.min_level, max=rule.max_level)
    # malformed boxes (negative area -> NaN) go to the finest level, as in the kernel
    return torch.where(torch.isnan(lvl), torch.full_like(lvl, float(rule.min_level)), lvl)


def _roi_areas(rois: Tensor) -> Tensor:
    return (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])


def assign_levels(rois: Tensor, level_rule: LevelRule) -> Tensor:
    """FPN level index of each RoI.

    Args:
        rois: float32 ``[R, 5]`` ``(batch_index, x1, y1, x2, y2)``, input-image pixels
            (or normalized coordinates, with a rule expressed in that frame, for
            ``mode="crop_and_resize"``); the level depends on ``(x2 - x1) * (y2 - y1)`` only.
        level_rule: the assignment rule (see :class:`LevelRule`).

    Returns:
        int64 ``[R]`` on ``rois``' device: ``level - level_rule.min_level``, i.e. the
        index into the features list. Boxes with negative area get index 0.
    """
    _check_level_rule(level_rule)
    _check_rois(rois)
    lvl = _levels_of_area(_roi_areas(rois), level_rule)
    return lvl.to(torch.int64) - level_rule.min_level


@functools.lru_cache(maxsize=64)
def _level_area_thresholds(rule: LevelRule, device_type: str = "cpu") -> tuple:
    """Smallest float32 area reaching each level ``min_level + 1 .. max_level`` under ``rule``.

    A RoI's level is ``min_level + #{k : area >= thresholds[k]}``, identical to
    :func:`_levels_of_area` on a ``device_type`` device because that function is
    non-decreasing in the area. Found by bisection over the bit patterns of
    non-negative float32 values, with torch's own ops on that device type (CPU and
    CUDA ``log2`` may differ in the last bit, as torchvision's level mapper does).
    """
    dev = torch.device(device_type)
    targets = torch.arange(rule.min_level + 1, rule.max_level + 1, dtype=torch.float32, device=dev)
    k = targets.numel()
    if k == 0:
        return ()
    lo = torch.zeros(k, dtype=torch.int64, device=dev)  # bits of 0.0
    hi = torch.full((k,), 0x7F800000, dtype=torch.int64, device=dev)  # bits of +inf (always max_level)

    def reaches(bits: Tensor) -> Tensor:
        area = bits.to(torch.int32).view(torch.float32)
        return _levels_of_area(area, rule) >= targets

    at_zero = reaches(lo)
    for _ in range(32):  # the bracket halves each time: 2**31 patterns at most
        mid = (lo + hi) // 2
        ok = reaches(mid)
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    thr = torch.where(at_zero, lo, hi).to(torch.int32).view(torch.float32)
    return tuple(float(v) for v in thr.cpu().tolist())


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------




def _check_mode(mode) -> None:
    if not (isinstance(mode, str) and mode in _MODES):
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")


def _check_level_rule(level_rule) -> None:
    if not isinstance(level_rule, LevelRule):
        raise TypeError(f"level_rule must be a kernels.roi_align.LevelRule; got {type(level_rule).__name__}")


def _check_rois(rois) -> None:
    if not isinstance(rois, Tensor):
        raise TypeError(f"rois must be a torch.Tensor [R, 5] (batch_index, x1, y1, x2, y2); got {_describe(rois)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape [R, 5] (batch_index, x1, y1, x2, y2); got {_describe(rois)}")
    if rois.dtype != torch.float32:
        raise TypeError(f"rois must be float32; got {rois.dtype}")


def _check_inputs(features, rois, output_size, spatial_scales, sampling_ratio, aligned, level_rule):
    """Validates the common arguments; returns ``(features list, scales list of floats)``."""
    _check_level_rule(level_rule)
    _check_rois(rois)
    if isinstance(features, Tensor) or not isinstance(features, Sequence):
        raise TypeError(f"features must be a list/tuple of tensors [B, C, H, W]; got {_describe(features)}")
    features = list(features)
    n_levels = level_rule.num_levels
    if len(features) != n_levels:
        raise ValueError(
            f"features must hold one map per level {level_rule.min_level}..{level_rule.max_level} "
            f"({n_levels} maps); got {len(features)}"
        )
    if isinstance(spatial_scales, (str, bytes, Tensor)) or not isinstance(spatial_scales, Sequence):
        raise TypeError(f"spatial_scales must be a list/tuple of floats; got {_describe(spatial_scales)}")
    if len(spatial_scales) != n_levels:
        raise ValueError(f"spatial_scales must hold {n_levels} values (one per level); got {len(spatial_scales)}")
    scales = []
    for i, s in enumerate(spatial_scales):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"spatial_scales[{i}] must be a float; got {_describe(s)}")
        if not (math.isfinite(float(s)) and float(s) > 0):
            raise ValueError(f"spatial_scales[{i}] must be finite and > 0; got {s!r}")
        scales.append(float(s))
    for i, f in enumerate(features):
        if not isinstance(f, Tensor):
            raise TypeError(f"features[{i}] must be a tensor [B, C, H, W]; got {_describe(f)}")
        if f.dim() != 4:
            raise ValueError(f"features[{i}] must have shape [B, C, H, W]; got {_describe(f)}")
        if f.dtype != torch.float32:
            raise TypeError(f"features[{i}] must be float32; got {f.dtype}")
        if f.device != rois.device:
            raise ValueError(f"features[{i}] is on {f.device} but rois are on {rois.device}; they must share a device")
        if f.shape[2] < 1 or f.shape[3] < 1:
            raise ValueError(f"features[{i}] must have H >= 1 and W >= 1; got {_describe(f)}")
        if f.shape[:2] != features[0].shape[:2]:
            raise ValueError(
                f"every level must have the same batch size and channels; features[0] is "
                f"{tuple(features[0].shape)}, features[{i}] is {tuple(f.shape)}"
            )
    if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
        raise ValueError(f"output_size must be an int >= 1; got {output_size!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int) or sampling_ratio < 0:
        raise ValueError(f"sampling_ratio must be an int >= 0 (0 = adaptive); got {sampling_ratio!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool; got {_describe(aligned)}")
    return features, scales


def _empty_output(features, rois, output_size) -> Tensor:
    c = features[0].shape[1]
    return torch.zeros((rois.shape[0], c, output_size, output_size), dtype=torch.float32, device=rois.device)


# --------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------

# Elements of one [rows, C] gather buffer; bounds the reference's working memory
# (about 8 such buffers live at once).
_REFERENCE_CHUNK_ELEMENTS = 1 << 20
#: bins (sample step x RoI x output cell) whose corner tables the RoIAlign reference builds at once (48 bytes each)
_SAMPLE_BLOCK_BINS = 1 << 18


def _axis_corners(coord: Tensor, size: int):
    """Bilinear corners along one axis, torchvision's clamping; returns (valid, low, high, l, h)."""
    valid = ~((coord < -1.0) | (coord > size))
    c = torch.where(valid, coord.clamp_min(0.0), torch.zeros_like(coord))
    low = c.to(torch.int64)
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    c = torch.where(edge, low.to(torch.float32), c)
    l = c - low.to(torch.float32)
    h = 1.0 - l
    return valid, low, high, l, h


def _roi_geometry(rois: Tensor, scale: float, out: int, sampling_ratio: int, aligned: bool):
    """Per-RoI start, bin size and sampling grid on one level (torchvision's float32 arithmetic).

    Returns ``(start_h, start_w, bin_h, bin_w, grid_h, grid_w)``: float32 [n] x 4, int64 [n] x 2.
    """
    f32 = torch.float32
    dev = rois.device
    offset = 0.5 if aligned else 0.0
    sc = torch.tensor(scale, dtype=f32, device=dev)
    start_w = rois[:, 1] * sc - offset
    start_h = rois[:, 2] * sc - offset
    roi_w = (rois[:, 3] * sc - offset) - start_w
    roi_h = (rois[:, 4] * sc - offset) - start_h
    if not aligned:
        roi_w = roi_w.clamp_min(1.0)
        roi_h = roi_h.clamp_min(1.0)
    out_f = torch.tensor(float(out), dtype=f32, device=dev)
    bin_w = roi_w / out_f
    bin_h = roi_h / out_f
    if sampling_ratio > 0:
        grid_h = torch.full((rois.shape[0],), sampling_ratio, dtype=torch.int64, device=dev)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(bin_h).to(torch.int64)
        grid_w = torch.ceil(bin_w).to(torch.int64)
    return start_h, start_w, bin_h, bin_w, grid_h, grid_w


def _sample_corners(step_of: Tensor, roi_of: Tensor, rois: Tensor, geometry: tuple, hw: tuple, out: int) -> list:
    """The four bilinear corners of every bin of the (sample step, RoI) pairs ``(step_of[i], roi_of[i])``:
    per corner ``(weight, row)``, float32 ``[pairs * out * out, 1]`` and int64 ``[pairs * out * out]``
    (rows of the ``[B*H*W, C]`` map; weight 0 for samples off the map), with torchvision's float32
    arithmetic for the sample positions."""
    H, W = hw
    f32 = torch.float32
    dev = rois.device
    start_h, start_w, bin_h, bin_w, grid_h, grid_w = geometry
    gw_div = grid_w.clamp_min(1)[roi_of]
    iy = torch.div(step_of, gw_div, rounding_mode="floor")
    ix = step_of - iy * gw_div
    bh, bw = bin_h[roi_of], bin_w[roi_of]
    pos = torch.arange(out, dtype=f32, device=dev)
    base_y = start_h[roi_of, None] + pos[None, :] * bh[:, None]  # [pairs, out]
    base_x = start_w[roi_of, None] + pos[None, :] * bw[:, None]
    y = base_y + (((iy.to(f32) + 0.5) * bh) / grid_h[roi_of].to(f32))[:, None]
    x = base_x + (((ix.to(f32) + 0.5) * bw) / grid_w[roi_of].to(f32))[:, None]
    vy, ylo, yhi, ly, hy = _axis_corners(y, H)
    vx, xlo, xhi, lx, hx = _axis_corners(x, W)
    ok = vy[:, :, None] & vx[:, None, :]  # [pairs, out, out]
    row0 = (rois[roi_of, 0].to(torch.int64) * (H * W))[:, None, None]  # first row of the RoI's image
    zero = torch.zeros((), dtype=f32, device=dev)
    corners = []
    for wy, wx, ry, rx in ((hy, hx, ylo, xlo), (hy, lx, ylo, xhi), (ly, hx, yhi, xlo), (ly, lx, yhi, xhi)):
        weight = torch.where(ok, wy[:, :, None] * wx[:, None, :], zero).reshape(-1, 1)
        row = torch.where(ok, row0 + ry[:, :, None] * W + rx[:, None, :], row0).reshape(-1)
        corners.append((weight, row))
    return corners


def _roi_align_one_level(flat: Tensor, hw: tuple, rois: Tensor, geometry: tuple, out: int) -> Tensor:
    """torchvision roi_align of ``rois`` [n, 5] on one level; ``flat`` is the map as [B*H*W, C].

    ``geometry`` comes from :func:`_roi_geometry` and the RoIs must be sorted by
    decreasing ``grid_h * grid_w``: sample step j (row-major over the grid) then
    concerns a prefix of the RoIs, so no work is spent on absent samples.
    Returns float32 [n, C, out, out].

    The corners and weights of a block of sample steps are computed at once
    (:func:`_sample_corners`, at most :data:`_SAMPLE_BLOCK_BINS` bins a block); the loop over the
    steps then only gathers, weighs and adds: per step and bin ``((w1 v1 + w2 v2) + w3 v3) + w4 v4``
    added to the bin's sum, the float order of torchvision's and mmcv's CPU kernels.
    """
    C = flat.shape[1]
    n = rois.shape[0]
    dev = rois.device
    steps = (geometry[4] * geometry[5]).clamp_min(0)
    count = steps.clamp_min(1).to(torch.float32)
    oo = out * out
    acc = torch.zeros((n * oo, C), dtype=torch.float32, device=dev)
    n_steps = int(steps[0]) if n else 0
    # step j concerns RoIs 0 .. k_j - 1 (those with more than j steps), the first k_j * oo rows of acc
    rois_per_step = (steps[None, :] > torch.arange(n_steps, device=dev)[:, None]).sum(1).tolist()
    first = 0
    while first < n_steps:
        last, bins = first, 0
        while last < n_steps and (last == first or bins + rois_per_step[last] * oo <= _SAMPLE_BLOCK_BINS):
            bins += rois_per_step[last] * oo
            last += 1
        # the (step, RoI) pairs of steps first .. last - 1, ordered by step then RoI
        step_of, roi_of = torch.nonzero(torch.arange(first, last, device=dev)[:, None] < steps[None, :], as_tuple=True)
        corners = _sample_corners(step_of + first, roi_of, rois, geometry, hw, out)
        begin = 0
        for k in rois_per_step[first:last]:
            end = begin + k * oo
            terms = None
            for weight, row in corners:
                v = flat.index_select(0, row[begin:end])
                v.mul_(weight[begin:end])
                terms = v if terms is None else terms.add_(v)
            acc[: k * oo].add_(terms)
            begin = end
        first = last
    acc = acc.view(n, oo, C) / count[:, None, None]
    return acc.permute(0, 2, 1).reshape(n, C, out, out)


def _crop_and_resize_axis(lo: Tensor, hi: Tensor, size: int, out: int):
    """TensorFlow ``crop_and_resize`` sample positions along one axis of an ``size``-long map.

    ``lo`` / ``hi``: float32 [n] normalized box edges (y1, y2 or x1, x2). Returns
    ``(valid, low, high, lerp)``: bool [n, out], int64 [n, out] x 2, float32 [n, out];
    ``low`` / ``high`` are ``floor`` / ``ceil`` of the position (0 where not valid).
    """
    f32 = torch.float32
    dev = lo.device
    m1 = torch.tensor(float(size - 1), dtype=f32, device=dev)
    if out > 1:
        pos = torch.arange(out, dtype=f32, device=dev)
        # a device tensor divisor: a CPU-scalar divisor becomes a multiplication by its reciprocal on CUDA
        step = ((hi - lo) * m1) / torch.tensor(float(out - 1), dtype=f32, device=dev)
        coord = (lo * m1)[:, None] + pos[None, :] * step[:, None]
    else:
        coord = ((0.5 * (lo + hi)) * m1)[:, None]
    valid = (coord >= 0.0) & (coord <= m1)  # False for NaN, as for the extrapolated cells
    coord = torch.where(valid, coord, torch.zeros_like(coord))
    low_f = torch.floor(coord)
    low = low_f.to(torch.int64)
    high = torch.ceil(coord).to(torch.int64)
    return valid, low, high, coord - low_f


def _crop_and_resize_one_level(flat: Tensor, hw: tuple, rois: Tensor, out: int) -> Tensor:
    """TensorFlow ``crop_and_resize`` (bilinear, extrapolation 0) of n RoIs on one level.

    ``flat`` is the level's map as rows ``[B*H*W, C]``; ``rois`` float32 [n, 5] in
    normalized coordinates. Returns float32 [n, C, out, out].
    """
    H, W = hw
    C = flat.shape[1]
    n = rois.shape[0]
    vy, top, bottom, ly = _crop_and_resize_axis(rois[:, 2], rois[:, 4], H, out)
    vx, left, right, lx = _crop_and_resize_axis(rois[:, 1], rois[:, 3], W, out)
    ok = (vy[:, :, None] & vx[:, None, :]).reshape(-1, 1)  # [n*out*out, 1]
    row0 = (rois[:, 0].to(torch.int64) * (H * W))[:, None, None]

    def corner(ry: Tensor, rx: Tensor) -> Tensor:
        idx = row0 + ry[:, :, None] * W + rx[:, None, :]
        return flat.index_select(0, idx.reshape(-1))

    x_lerp = lx[:, None, :].expand(n, out, out).reshape(-1, 1)
    y_lerp = ly[:, :, None].expand(n, out, out).reshape(-1, 1)
    tl_v = corner(top, left)
    bl_v = corner(bottom, left)
    top_v = tl_v + (corner(top, right) - tl_v) * x_lerp
    bottom_v = bl_v + (corner(bottom, right) - bl_v) * x_lerp
    res = top_v + (bottom_v - top_v) * y_lerp
    res = torch.where(ok, res, torch.zeros((), dtype=res.dtype, device=res.device))
    return res.view(n, out * out, C).permute(0, 2, 1).reshape(n, C, out, out)


def multilevel_roi_align_reference(
    features: Sequence[Tensor],
    rois: Tensor,
    *,
    output_size: int,
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    level_rule: LevelRule,
    mode: str = "roi_align",
) -> Tensor:
    """Multi-level RoIAlign in plain PyTorch (the CPU path, and the tests' oracle).

    Args:
        features: L float32 maps ``[B, C, H_l, W_l]`` (NCHW or channels_last), map i
            for level ``level_rule.min_level + i``; L == ``level_rule.num_levels``.
        rois: float32 ``[R, 5]`` ``(batch_index, x1, y1, x2, y2)``, input-image pixels
            (``mode="roi_align"``) or normalized padded-image coordinates
            (``mode="crop_and_resize"``, where flipped and out-of-[0, 1] boxes are allowed).
        output_size: bins per side (7 box head, 14 mask head).
        spatial_scales: L floats, map pixels per input pixel (1/4 .. 1/32 in FPN).
        sampling_ratio: samples per bin per axis, or 0 for ``ceil(roi_size / output_size)``.
        aligned: torchvision's ``aligned`` (half-pixel offset, no 1-pixel minimum size).
        level_rule: how RoIs are assigned to levels (:class:`LevelRule`).
        mode: ``"roi_align"`` (torchvision's RoIAlign, the default) or
            ``"crop_and_resize"`` (matterport's ``PyramidROIAlign``, i.e. TensorFlow's
            bilinear ``crop_and_resize`` with extrapolation value 0; see the module
            docstring). In the latter, ``spatial_scales``, ``sampling_ratio`` and
            ``aligned`` are validated but ignored.

    Returns:
        float32 ``[R, C, output_size, output_size]`` contiguous. In ``"roi_align"``
        mode equal (to float rounding, in practice bit for bit) to
        ``torchvision.ops.roi_align`` of each RoI on its level's map; in
        ``"crop_and_resize"`` mode to TensorFlow's CPU ``crop_and_resize`` of each RoI
        on its level's map (same float32 operation order).

    Raises:
        TypeError / ValueError for malformed arguments (ValueError for an unknown
        ``mode``), and ValueError for a batch index outside ``[0, B)``.

    Vectorised over RoIs (grouped by level, chunked to bound memory): the maps are
    read as channels-last rows ``[B*H*W, C]``; in ``"roi_align"`` mode each bin
    accumulates its samples one grid position at a time, as torchvision does, and in
    ``"crop_and_resize"`` mode each output cell gathers its four corners at once.
    """
    _check_mode(mode)
    features, scales = _check_inputs(features, rois, output_size, spatial_scales, sampling_ratio, aligned, level_rule)
    result = _empty_output(features, rois, output_size)
    R = rois.shape[0]
    if R == 0:
        return result
    B, C = features[0].shape[:2]
    bidx = rois[:, 0].to(torch.int64)
    if bool(((bidx < 0) | (bidx >= B)).any()):
        bad = rois[:, 0][(bidx < 0) | (bidx >= B)][0].item()
        raise ValueError(f"rois[:, 0] must hold batch indices in [0, {B}); got {bad}")
    levels = assign_levels(rois, level_rule)
    rows_per_chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, C * output_size * output_size))
    for li, (feat, scale) in enumerate(zip(features, scales)):
        sel = torch.nonzero(levels == li).squeeze(1)
        if sel.numel() == 0:
            continue
        H, W = int(feat.shape[2]), int(feat.shape[3])
        # one copy of an NCHW map into channels-last rows (a no-op for channels_last maps):
        # gathering rows of a strided view reads C scattered floats per row, about 3x slower
        flat = feat.permute(0, 2, 3, 1).contiguous().reshape(B * H * W, C)
        sub = rois.index_select(0, sel)
        if mode == "crop_and_resize":
            for start in range(0, sel.numel(), rows_per_chunk):
                stop = start + rows_per_chunk
                pooled = _crop_and_resize_one_level(flat, (H, W), sub[start:stop], output_size)
                result.index_copy_(0, sel[start:stop], pooled)
            continue
        geometry = _roi_geometry(sub, scale, output_size, sampling_ratio, aligned)
        if sampling_ratio == 0:
            # decreasing number of samples, so that each sample step works on a prefix
            order = torch.argsort(geometry[4] * geometry[5], descending=True, stable=True)
            sel, sub = sel[order], sub[order]
            geometry = tuple(g[order] for g in geometry)
        for start in range(0, sel.numel(), rows_per_chunk):
            stop = start + rows_per_chunk
            pooled = _roi_align_one_level(
                flat, (H, W), sub[start:stop], tuple(g[start:stop] for g in geometry), output_size
            )
            result.index_copy_(0, sel[start:stop], pooled)
    return result


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _axis_taps(coord, size, size_f):
        """Bilinear taps along one axis, as torchvision's compiled kernel computes them.

        Returns (in_range, lo, hi, l, h): samples outside [-1, size] contribute nothing;
        others are clamped at 0, and at size - 1 where both taps collapse onto the last cell.
        """
        ok = (coord >= -1.0) & (coord <= size_f)
        c = tl.where(ok, tl.maximum(coord, 0.0), 0.0)
        lo = c.to(tl.int32)
        edge = lo >= size - 1
        lo = tl.where(edge, size - 1, lo)
        hi = tl.where(edge, size - 1, lo + 1)
        c = tl.where(edge, lo.to(tl.float32), c)
        l = c - lo.to(tl.float32)
        return ok, lo, hi, l, 1.0 - l

    @triton.jit
    def _crop_axis(lo, hi, pos, size, OUT: tl.constexpr):
        """TensorFlow ``crop_and_resize`` positions along one axis (see the module docstring).

        ``lo`` / ``hi``: normalized box edges; ``pos``: float32 output row/column index
        per bin. Returns (in_range, floor, ceil, lerp); out-of-range or NaN positions
        are replaced by 0 so that their (masked) taps stay inside the map.
        """
        m1 = (size - 1).to(tl.float32)
        if OUT > 1:
            step = tl.div_rn((hi - lo) * m1, OUT - 1.0)
            coord = lo * m1 + pos * step
        else:
            coord = tl.zeros_like(pos) + (0.5 * (lo + hi)) * m1  # only the sign of a zero can change
        ok = (coord >= 0.0) & (coord <= m1)
        coord = tl.where(ok, coord, 0.0)
        low = tl.floor(coord)
        return ok, low.to(tl.int32), tl.ceil(coord).to(tl.int32), coord - low

    @triton.jit
    def _crop_and_resize_tile(img, x1, y1, x2, y2, H, W, C, ph, pw, col, bin_ok, chan_ok, OUT: tl.constexpr):
        """A [BLOCK_BINS, BLOCK_C] tile of TensorFlow's bilinear ``crop_and_resize`` (extrapolation 0)."""
        y_ok, top, bottom, y_lerp = _crop_axis(y1, y2, ph, H, OUT)
        x_ok, left, right, x_lerp = _crop_axis(x1, x2, pw, W, OUT)
        ok = y_ok & x_ok & bin_ok
        m = ok[:, None] & chan_ok[None, :]
        r_top = top * W
        r_bottom = bottom * W
        tl_v = tl.load(img + (r_top + left).to(tl.int64)[:, None] * C + col, mask=m, other=0.0)
        tr_v = tl.load(img + (r_top + right).to(tl.int64)[:, None] * C + col, mask=m, other=0.0)
        bl_v = tl.load(img + (r_bottom + left).to(tl.int64)[:, None] * C + col, mask=m, other=0.0)
        br_v = tl.load(img + (r_bottom + right).to(tl.int64)[:, None] * C + col, mask=m, other=0.0)
        xl = x_lerp[:, None]
        top_v = tl_v + (tr_v - tl_v) * xl
        bottom_v = bl_v + (br_v - bl_v) * xl
        res = top_v + (bottom_v - top_v) * y_lerp[:, None]
        return tl.where(ok[:, None], res, 0.0)

    @triton.jit
    def _multilevel_roi_align_kernel(
        feat_ptr,  # float32, levels packed back to back, each [B, H_l, W_l, C] contiguous
        level_meta_ptr,  # int64 [L, 3]: element offset of the level, H_l, W_l
        level_f32_ptr,  # float32 [2L - 1]: scales[0..L), then area thresholds of levels 1..L-1
        rois_ptr,  # float32 [R, 5]
        out_ptr,  # float32 [R, C, OUT, OUT]
        C,
        B,
        NUM_LEVELS: tl.constexpr,
        OUT: tl.constexpr,
        SAMPLING_RATIO: tl.constexpr,  # > 0 fixed grid, 0 adaptive
        ALIGNED: tl.constexpr,
        CROP_AND_RESIZE: tl.constexpr,  # TensorFlow crop_and_resize on normalized boxes (scales unused)
        BLOCK_BINS: tl.constexpr,  # next power of two >= OUT * OUT
        BLOCK_C: tl.constexpr,
    ):
        """One program: one RoI x BLOCK_C channels, a [BLOCK_BINS, BLOCK_C] tile of bins."""
        r = tl.program_id(0).to(tl.int64)
        c0 = tl.program_id(1) * BLOCK_C

        roi = rois_ptr + r * 5
        batch = tl.load(roi).to(tl.int32)  # truncation, as C++ `int roi_batch_ind = roi[0]`
        x1 = tl.load(roi + 1)
        y1 = tl.load(roi + 2)
        x2 = tl.load(roi + 3)
        y2 = tl.load(roi + 4)

        # level: number of per-level area thresholds reached (see module docstring)
        area = (x2 - x1) * (y2 - y1)
        level = 0
        for k in tl.static_range(NUM_LEVELS - 1):
            thr = tl.load(level_f32_ptr + NUM_LEVELS + k)
            level += (area >= thr).to(tl.int32)
        lvl_off = tl.load(level_meta_ptr + level * 3)
        H = tl.load(level_meta_ptr + level * 3 + 1).to(tl.int32)
        W = tl.load(level_meta_ptr + level * 3 + 2).to(tl.int32)
        bins = tl.arange(0, BLOCK_BINS)
        bin_ok = bins < OUT * OUT
        ph = (bins // OUT).to(tl.float32)
        pw = (bins % OUT).to(tl.float32)
        chans = c0 + tl.arange(0, BLOCK_C)
        chan_ok = (chans < C) & (batch >= 0) & (batch < B)  # a bad batch index reads nothing
        img = feat_ptr + lvl_off + batch.to(tl.int64) * H * W * C
        col = chans[None, :].to(tl.int64)

        if CROP_AND_RESIZE:
            res = _crop_and_resize_tile(img, x1, y1, x2, y2, H, W, C, ph, pw, col, bin_ok, chan_ok, OUT)
        else:
            scale = tl.load(level_f32_ptr + level)
            if ALIGNED:
                offset = 0.5
            else:
                offset = 0.0
            start_w = x1 * scale - offset
            start_h = y1 * scale - offset
            roi_w = (x2 * scale - offset) - start_w
            roi_h = (y2 * scale - offset) - start_h
            if not ALIGNED:
                roi_w = tl.maximum(roi_w, 1.0)
                roi_h = tl.maximum(roi_h, 1.0)
            out_f = OUT * 1.0
            bin_w = tl.div_rn(roi_w, out_f)
            bin_h = tl.div_rn(roi_h, out_f)
            if SAMPLING_RATIO > 0:
                grid_h = SAMPLING_RATIO
                grid_w = SAMPLING_RATIO
                gh_f = SAMPLING_RATIO * 1.0
                gw_f = SAMPLING_RATIO * 1.0
                count = SAMPLING_RATIO * SAMPLING_RATIO * 1.0
            else:
                grid_h = tl.ceil(bin_h).to(tl.int32)
                grid_w = tl.ceil(bin_w).to(tl.int32)
                gh_f = grid_h.to(tl.float32)
                gw_f = grid_w.to(tl.float32)
                count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)

            base_y = start_h + ph * bin_h
            base_x = start_w + pw * bin_w
            H_f = H.to(tl.float32)
            W_f = W.to(tl.float32)

            acc = tl.zeros((BLOCK_BINS, BLOCK_C), dtype=tl.float32)
            for iy in range(0, grid_h):
                y = base_y + tl.div_rn((iy + 0.5) * bin_h, gh_f)
                y_ok, y_lo, y_hi, ly, hy = _axis_taps(y, H, H_f)
                for ix in range(0, grid_w):
                    x = base_x + tl.div_rn((ix + 0.5) * bin_w, gw_f)
                    x_ok, x_lo, x_hi, lx, hx = _axis_taps(x, W, W_f)

                    ok = y_ok & x_ok & bin_ok
                    w1 = tl.where(ok, hy * hx, 0.0)[:, None]
                    w2 = tl.where(ok, hy * lx, 0.0)[:, None]
                    w3 = tl.where(ok, ly * hx, 0.0)[:, None]
                    w4 = tl.where(ok, ly * lx, 0.0)[:, None]
                    m = ok[:, None] & chan_ok[None, :]
                    r_lo = y_lo * W
                    r_hi = y_hi * W
                    v1 = tl.load(img + (r_lo + x_lo).to(tl.int64)[:, None] * C + col, mask=m, other=0.0)
                    v2 = tl.load(img + (r_lo + x_hi).to(tl.int64)[:, None] * C + col, mask=m, other=0.0)
                    v3 = tl.load(img + (r_hi + x_lo).to(tl.int64)[:, None] * C + col, mask=m, other=0.0)
                    v4 = tl.load(img + (r_hi + x_hi).to(tl.int64)[:, None] * C + col, mask=m, other=0.0)
                    acc += ((w1 * v1 + w2 * v2) + w3 * v3) + w4 * v4

            res = tl.div_rn(acc, tl.zeros((BLOCK_BINS, BLOCK_C), dtype=tl.float32) + count)

        dst = out_ptr + r * C * (OUT * OUT) + col * (OUT * OUT) + bins[:, None]
        tl.store(dst, res, mask=bin_ok[:, None] & (chans < C)[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# CUDA launch: a [bins, channels] tile of at most 2048 elements over 8 warps, i.e. at most
# 8 tile elements per thread. Each element holds its accumulator and the four corner values
# and 64-bit addresses of the current sample, so the register need grows with the elements
# per thread: 8192-element tiles (32 per thread) needed 255 registers and spilled (issue 11);
# 2048-element tiles compile to 92-111 registers (roi_align) and 71-79 (crop_and_resize),
# no spill, 2 blocks of 8 warps per SM (25% theoretical occupancy) on sm_80 and sm_90.
_CUDA_TILE_ELEMENTS = 2048
_CUDA_NUM_WARPS = 8
# Interpreter (TRITON_INTERPRET=1): each program instance costs about 10 ms whatever its
# size, so the tiles are large (at most 8192 elements, >= 16 channels) to keep the grid small.
_INTERPRETER_TILE_ELEMENTS = 8192
_INTERPRETER_MIN_BLOCK_C = 16


def _tile(output_size: int, channels: int) -> tuple:
    """CUDA launch (BLOCK_BINS, BLOCK_C, num_warps): a [bins, channels] tile of at most 2048 elements.

    ``BLOCK_C`` is ``2048 // BLOCK_BINS`` channels (fewer when ``channels`` is smaller; at
    least 1, so only ``output_size > 45`` exceeds the 2048 elements): 32 for 7 x 7 bins,
    8 for 14 x 14; 8 warps for a full tile, 4 for a smaller one.
    """
    block_bins = _next_pow2(output_size * output_size)
    block_c = min(_next_pow2(channels), max(1, _CUDA_TILE_ELEMENTS // block_bins))
    num_warps = _CUDA_NUM_WARPS if block_bins * block_c >= _CUDA_TILE_ELEMENTS else 4
    return block_bins, block_c, num_warps


def _interpreter_tile(output_size: int, channels: int) -> tuple:
    """(BLOCK_BINS, BLOCK_C, num_warps) under the interpreter: tiles of at most 8192 elements."""
    block_bins = _next_pow2(output_size * output_size)
    block_c = min(_next_pow2(channels), max(_INTERPRETER_MIN_BLOCK_C, _INTERPRETER_TILE_ELEMENTS // block_bins))
    num_warps = 8 if block_bins * block_c >= _INTERPRETER_TILE_ELEMENTS else 4
    return block_bins, block_c, num_warps


def multilevel_roi_align_triton(
    features: Sequence[Tensor],
    rois: Tensor,
    *,
    output_size: int,
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    level_rule: LevelRule,
    mode: str = "roi_align",
) -> Tensor:
    """Multi-level RoIAlign in one Triton launch; same contract as :func:`multilevel_roi_align_reference`.

    The maps are packed into one channels-last float32 buffer (per-level element
    offset, H, W, scale and level area thresholds in two small device tensors);
    the grid is ``(R, ceil(C / BLOCK_C))``, one program per RoI and channel block,
    each computing its RoI's level and pooling a ``[bins, BLOCK_C]`` tile. Runs on
    CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. A batch index
    outside ``[0, B)`` yields zeros (checking it on the host would synchronise).
    ``mode="crop_and_resize"`` selects the kernel's ``CROP_AND_RESIZE`` variant
    (TensorFlow's ``crop_and_resize`` on normalized boxes; scales, sampling ratio and
    ``aligned`` ignored).
    """
    _check_mode(mode)
    features, scales = _check_inputs(features, rois, output_size, spatial_scales, sampling_ratio, aligned, level_rule)
    if not _HAS_TRITON:
        raise RuntimeError("multilevel_roi_align_triton needs the `triton` package; use multilevel_roi_align_reference")
    if rois.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"multilevel_roi_align_triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); got tensors on {rois.device}"
        )
    R = rois.shape[0]
    B, C = (int(v) for v in features[0].shape[:2])
    out = torch.empty((R, C, output_size, output_size), dtype=torch.float32, device=rois.device)
    if R == 0 or C == 0:
        return out.zero_()

    dev = rois.device
    sizes = [B * int(f.shape[2]) * int(f.shape[3]) * C for f in features]
    packed = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
    meta = []
    off = 0
    for f, n in zip(features, sizes):
        H, W = int(f.shape[2]), int(f.shape[3])
        packed[off : off + n].view(B, H, W, C).copy_(f.permute(0, 2, 3, 1))
        meta.extend((off, H, W))
        off += n
    level_meta = host_to_device(meta, dtype=torch.int64, device=dev)
    thresholds = _level_area_thresholds(level_rule, dev.type)  # cached per rule: computed on the first call only
    level_f32 = host_to_device(list(scales) + list(thresholds), dtype=torch.float32, device=dev)
    rois_c = rois.contiguous()

    tile = _tile if dev.type == "cuda" else _interpreter_tile  # see the constants above _tile
    block_bins, block_c, num_warps = tile(output_size, C)
    grid = (R, triton.cdiv(C, block_c))
    crop = mode == "crop_and_resize"
    _multilevel_roi_align_kernel[grid](
        packed,
        level_meta,
        level_f32,
        rois_c,
        out,
        C,
        B,
        NUM_LEVELS=level_rule.num_levels,
        OUT=output_size,
        SAMPLING_RATIO=0 if crop else sampling_ratio,  # unused when crop: one specialisation
        ALIGNED=False if crop else aligned,
        CROP_AND_RESIZE=crop,
        BLOCK_BINS=block_bins,
        BLOCK_C=block_c,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out


def multilevel_roi_align(
    features: Sequence[Tensor],
    rois: Tensor,
    *,
    output_size: int,
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    level_rule: LevelRule,
    mode: str = "roi_align",
) -> Tensor:
    """Multi-level RoIAlign: the Triton kernel for CUDA tensors, the reference otherwise.

    See :func:`multilevel_roi_align_reference` for the contract (including ``mode``:
    ``"roi_align"`` or ``"crop_and_resize"``) and :mod:`kernels._dispatch` for the
    choice (``ENGINE_FORCE_REFERENCE=1`` forces the reference).
    """
    _check_mode(mode)
    _check_rois(rois)
    fn = multilevel_roi_align_triton if (_HAS_TRITON and use_triton(rois)) else multilevel_roi_align_reference
    return fn(
        features,
        rois,
        output_size=output_size,
        spatial_scales=spatial_scales,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        level_rule=level_rule,
        mode=mode,
    )
