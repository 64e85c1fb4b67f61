"""matterport Mask_RCNN's inference, re-implemented literally in numpy: the oracle of the parity tests.

This module mirrors ``MaskRCNN.detect`` of matterport/Mask_RCNN (``mrcnn/model.py``, ``mrcnn/utils.py``)
for ONE image, step by step, with matterport's semantics kept as they are (reference notes D.1-D.11 in
``shared/reference/checkpoint-families.md``), not as our engine does things:

- ``utils.resize_image`` (mode "square": python ``round``, skimage bilinear, uint8 truncation, centred
  zero padding) and ``mold_image`` (float32 image minus a float64 mean, fed to the network as float32);
- ``utils.generate_pyramid_anchors`` / ``generate_anchors`` (ratios are width/height, centres at
  ``arange * stride``) and ``utils.norm_boxes`` (float64 arithmetic, then float32);
- ``ProposalLayer`` with ``apply_box_deltas_graph`` / ``clip_boxes_graph`` and
  ``tf.image.non_max_suppression`` (one global top-k and one global NMS, zero padded);
- ``PyramidROIAlign`` (``4 + round_half_even(log2(...))`` level rule, ``tf.image.crop_and_resize``:
  corner-aligned, one bilinear sample per bin, extrapolation value 0);
- ``refine_detections_graph`` / ``DetectionLayer`` (argmax class, deltas x BBOX_STD_DEV, clip to the
  normalized window, score threshold, per-class NMS, top-k by score);
- ``MaskRCNN.unmold_detections`` with ``utils.denorm_boxes`` and ``utils.unmold_mask``.

Everything TF computed in float32 is computed here in float32, in the same order of operations (box
decoding, clipping, IoU, crop_and_resize interpolation, the level rule); what matterport computed in numpy
(anchors, ``norm_boxes``, ``denorm_boxes``, the molded image) follows numpy's dtype promotion as
matterport's own code does. Ties are broken as TF does: ``tf.nn.top_k`` and NMS prefer the lower index.
Transcendentals (``exp``, ``log``, ``sqrt``) are numpy's, so they can differ from TF's by an ulp.

The network parts with weights (backbone + FPN, RPN, classifier head, mask head) are NOT re-implemented
here: they are the Keras models of ``tests/matterport_keras.py`` (``matterport_models`` / ``randomise``),
passed in as ``models``.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

_F32 = np.float32


def _run(model, x):
    """Call a Keras model (torch backend) in inference mode; returns numpy arrays (a list for several outputs)."""
    import torch

    with torch.no_grad():
        out = model(np.ascontiguousarray(x, dtype=np.float32), training=False)
    if isinstance(out, (list, tuple)):
        return [np.asarray(t.detach().cpu()) for t in out]
    return np.asarray(out.detach().cpu())


# ---------------------------------------------------------------------------------------------------
# 1. Preprocessing
# ---------------------------------------------------------------------------------------------------


def resize_image_square(image: np.ndarray, min_dim: int, max_dim: int):
    """Mirror of ``mrcnn.utils.resize_image(mode="square", min_scale=0)``.

    scale = max(1, min_dim / min(h, w)); capped so that round(max(h, w) * scale) <= max_dim; skimage
    bilinear resize (no anti-aliasing, preserve_range) to (round(h*scale), round(w*scale)) only when
    scale != 1; centred zero padding to max_dim x max_dim; cast back to the input dtype (uint8,
    truncating). Returns (image, window (y1, x1, y2, x2), scale).
    """
    import skimage.transform

    image_dtype = image.dtype
    h, w = image.shape[:2]
    scale = 1
    if min_dim:
        scale = max(1, min_dim / min(h, w))
    image_max = max(h, w)
    if max_dim and round(image_max * scale) > max_dim:
        scale = max_dim / image_max
    if scale != 1:
        image = skimage.transform.resize(
            image, (round(h * scale), round(w * scale)), order=1, mode="constant", cval=0, clip=True,
            preserve_range=True, anti_aliasing=False)
    h, w = image.shape[:2]
    top = (max_dim - h) // 2
    left = (max_dim - w) // 2
    padding = [(top, max_dim - h - top), (left, max_dim - w - left), (0, 0)]
    image = np.pad(image, padding, mode="constant", constant_values=0)
    window = (top, left, top + h, left + w)
    return image.astype(image_dtype), window, scale


def mold_image(image: np.ndarray, mean_pixel) -> np.ndarray:
    """Mirror of ``mrcnn.model.mold_image``: ``image.astype(float32) - MEAN_PIXEL``.

    MEAN_PIXEL is a float64 array in matterport's config, so the subtraction happens in float64; Keras
    ``predict`` then feeds it to the float32 input layer, hence the final cast.
    """
    return (image.astype(np.float32) - np.array(mean_pixel, dtype=np.float64)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# 2. Anchors
# ---------------------------------------------------------------------------------------------------


def backbone_shapes(image_size: int, strides) -> list[tuple[int, int]]:
    """Mirror of ``mrcnn.model.compute_backbone_shapes``: ceil(image / stride) per level."""
    return [(int(math.ceil(image_size / s)), int(math.ceil(image_size / s))) for s in strides]


def generate_anchors(scale, ratios, shape, feature_stride, anchor_stride=1) -> np.ndarray:
    """Mirror of ``mrcnn.utils.generate_anchors``: one level, pixels, (y1, x1, y2, x2), order (y, x, ratio).

    Ratios are width / height: heights = scale / sqrt(ratio), widths = scale * sqrt(ratio).
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    heights = scale / np.sqrt(ratios)
    widths = scale * np.sqrt(ratios)
    ys = np.arange(0, shape[0], anchor_stride) * feature_stride
    xs = np.arange(0, shape[1], anchor_stride) * feature_stride
    cy = np.broadcast_to(ys[:, None, None], (len(ys), len(xs), len(ratios))).reshape(-1)
    cx = np.broadcast_to(xs[None, :, None], (len(ys), len(xs), len(ratios))).reshape(-1)
    hh = np.broadcast_to(heights[None, None, :], (len(ys), len(xs), len(ratios))).reshape(-1)
    ww = np.broadcast_to(widths[None, None, :], (len(ys), len(xs), len(ratios))).reshape(-1)
    return np.stack([cy - 0.5 * hh, cx - 0.5 * ww, cy + 0.5 * hh, cx + 0.5 * ww], axis=1)


def generate_pyramid_anchors(scales, ratios, shapes, strides, anchor_stride=1) -> np.ndarray:
    """Mirror of ``mrcnn.utils.generate_pyramid_anchors``: levels concatenated in order (float64 pixels)."""
    return np.concatenate([generate_anchors(scales[i], ratios, shapes[i], strides[i], anchor_stride)
                           for i in range(len(scales))], axis=0)


def norm_boxes(boxes, shape) -> np.ndarray:
    """Mirror of ``mrcnn.utils.norm_boxes``: (b - [0,0,1,1]) / [h-1, w-1, h-1, w-1], then float32."""
    h, w = shape
    scale = np.array([h - 1, w - 1, h - 1, w - 1])
    shift = np.array([0, 0, 1, 1])
    return np.divide(np.asarray(boxes) - shift, scale).astype(np.float32)


def denorm_boxes(boxes, shape) -> np.ndarray:
    """Mirror of ``mrcnn.utils.denorm_boxes``: around(b * [h-1, w-1, h-1, w-1] + [0,0,1,1]) as int32."""
    h, w = shape
    scale = np.array([h - 1, w - 1, h - 1, w - 1])
    shift = np.array([0, 0, 1, 1])
    return np.around(np.multiply(boxes, scale) + shift).astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# 4. Box arithmetic and NMS (TF semantics, float32)
# ---------------------------------------------------------------------------------------------------


def apply_box_deltas(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Mirror of ``mrcnn.model.apply_box_deltas_graph`` in float32, same operation order, no clamp."""
    boxes = boxes.astype(_F32)
    deltas = deltas.astype(_F32)
    height = boxes[:, 2] - boxes[:, 0]
    width = boxes[:, 3] - boxes[:, 1]
    center_y = boxes[:, 0] + _F32(0.5) * height
    center_x = boxes[:, 1] + _F32(0.5) * width
    center_y = center_y + deltas[:, 0] * height
    center_x = center_x + deltas[:, 1] * width
    height = height * np.exp(deltas[:, 2])
    width = width * np.exp(deltas[:, 3])
    y1 = center_y - _F32(0.5) * height
    x1 = center_x - _F32(0.5) * width
    y2 = y1 + height
    x2 = x1 + width
    return np.stack([y1, x1, y2, x2], axis=1).astype(_F32)


def clip_boxes(boxes: np.ndarray, window) -> np.ndarray:
    """Mirror of ``mrcnn.model.clip_boxes_graph``: each coordinate = max(min(c, w_hi), w_lo), float32."""
    wy1, wx1, wy2, wx2 = (_F32(v) for v in window)
    y1 = np.maximum(np.minimum(boxes[:, 0], wy2), wy1)
    x1 = np.maximum(np.minimum(boxes[:, 1], wx2), wx1)
    y2 = np.maximum(np.minimum(boxes[:, 2], wy2), wy1)
    x2 = np.maximum(np.minimum(boxes[:, 3], wx2), wx1)
    return np.stack([y1, x1, y2, x2], axis=1).astype(_F32)


def _iou_one_to_many(boxes: np.ndarray, areas: np.ndarray, i: int) -> np.ndarray:
    """IoU of box ``i`` with every box, as TF's NMS kernel computes it (float32; 0 if either area <= 0)."""
    ymin, xmin, ymax, xmax = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    iy1 = np.maximum(ymin[i], ymin)
    ix1 = np.maximum(xmin[i], xmin)
    iy2 = np.minimum(ymax[i], ymax)
    ix2 = np.minimum(xmax[i], xmax)
    inter = np.maximum(iy2 - iy1, _F32(0)) * np.maximum(ix2 - ix1, _F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (areas + areas[i] - inter)
    return np.where((areas <= 0) | (areas[i] <= 0), _F32(0), iou).astype(_F32)


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, max_output_size: int,
                        iou_threshold: float) -> np.ndarray:
    """Mirror of ``tf.image.non_max_suppression`` (CPU kernel): indices of the kept boxes, by score.

    Greedy in descending score order (ties: lower index first); a box is dropped when its IoU with an
    already kept box is > iou_threshold (float32); corners are taken as min/max of each coordinate pair;
    IoU with a zero-area box is 0; at most ``max_output_size`` boxes.
    """
    boxes = boxes.astype(_F32)
    scores = scores.astype(_F32)
    n = boxes.shape[0]
    if n == 0 or max_output_size <= 0:
        return np.zeros((0,), dtype=np.int64)
    canon = np.stack([np.minimum(boxes[:, 0], boxes[:, 2]), np.minimum(boxes[:, 1], boxes[:, 3]),
                      np.maximum(boxes[:, 0], boxes[:, 2]), np.maximum(boxes[:, 1], boxes[:, 3])], axis=1)
    areas = (canon[:, 2] - canon[:, 0]) * (canon[:, 3] - canon[:, 1])
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(n, dtype=bool)
    threshold = _F32(iou_threshold)
    selected = []
    for i in order:
        if suppressed[i]:
            continue
        selected.append(i)
        if len(selected) >= max_output_size:
            break
        suppressed |= _iou_one_to_many(canon, areas, i) > threshold
    return np.asarray(selected, dtype=np.int64)


def _top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """``tf.nn.top_k(values, k, sorted=True).indices``: descending, equal values by ascending index."""
    return np.argsort(-values.astype(_F32), kind="stable")[:k]


def proposal_layer(rpn_probs: np.ndarray, rpn_deltas: np.ndarray, anchors: np.ndarray, *, rpn_bbox_std,
                   pre_nms_limit: int, post_nms_rois: int, nms_threshold: float) -> np.ndarray:
    """Mirror of ``mrcnn.model.ProposalLayer.call`` for one image -> [post_nms_rois, 4] float32 (zero padded).

    fg score = probs[:, 1]; deltas * RPN_BBOX_STD_DEV; top min(pre_nms_limit, N) over all levels jointly;
    apply deltas to the anchors; clip to [0, 0, 1, 1]; one NMS; zero-pad.
    """
    scores = rpn_probs[:, 1].astype(_F32)
    deltas = rpn_deltas.astype(_F32) * np.asarray(rpn_bbox_std, dtype=_F32)
    ix = _top_k_indices(scores, min(pre_nms_limit, anchors.shape[0]))
    boxes = apply_box_deltas(anchors[ix], deltas[ix])
    boxes = clip_boxes(boxes, (0, 0, 1, 1))
    keep = non_max_suppression(boxes, scores[ix], post_nms_rois, nms_threshold)
    proposals = np.zeros((post_nms_rois, 4), dtype=_F32)
    proposals[: len(keep)] = boxes[keep]
    return proposals


# ---------------------------------------------------------------------------------------------------
# 5. RoI pooling
# ---------------------------------------------------------------------------------------------------


def crop_and_resize(feature: np.ndarray, boxes: np.ndarray, crop_size: int, chunk: int = 256) -> np.ndarray:
    """Mirror of ``tf.image.crop_and_resize(method="bilinear", extrapolation_value=0)`` (CPU kernel).

    feature [Hf, Wf, C] float32, boxes [n, 4] normalized (y1, x1, y2, x2) -> [n, P, P, C] float32.
    Sample i of a box lies at y1*(Hf-1) + i*(y2-y1)*(Hf-1)/(P-1) (P == 1: the box centre); samples
    outside [0, Hf-1] are 0; bilinear between floor and ceil neighbours, lerped along x then along y.
    """
    Hf, Wf, C = feature.shape
    n = boxes.shape[0]
    out = np.zeros((n, crop_size, crop_size, C), dtype=_F32)
    if n == 0:
        return out
    feature = feature.astype(_F32, copy=False)
    boxes = boxes.astype(_F32)
    hm1, wm1 = _F32(Hf - 1), _F32(Wf - 1)
    y1, x1, y2, x2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    if crop_size > 1:
        pm1 = _F32(crop_size - 1)
        height_scale = (y2 - y1) * hm1 / pm1
        width_scale = (x2 - x1) * wm1 / pm1
        grid = np.arange(crop_size, dtype=_F32)
        in_y = y1[:, None] * hm1 + grid[None, :] * height_scale[:, None]
        in_x = x1[:, None] * wm1 + grid[None, :] * width_scale[:, None]
    else:
        in_y = (_F32(0.5) * (y1 + y2) * hm1)[:, None]
        in_x = (_F32(0.5) * (x1 + x2) * wm1)[:, None]
    valid_y = (in_y >= 0) & (in_y <= hm1)
    valid_x = (in_x >= 0) & (in_x <= wm1)
    safe_y = np.where(valid_y, in_y, _F32(0))
    safe_x = np.where(valid_x, in_x, _F32(0))
    top = np.floor(safe_y).astype(np.int64)
    bottom = np.ceil(safe_y).astype(np.int64)
    left = np.floor(safe_x).astype(np.int64)
    right = np.ceil(safe_x).astype(np.int64)
    y_lerp = (safe_y - top.astype(_F32)).astype(_F32)
    x_lerp = (safe_x - left.astype(_F32)).astype(_F32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        t, b = top[s:e, :, None], bottom[s:e, :, None]
        lft, rgt = left[s:e, None, :], right[s:e, None, :]
        xl = x_lerp[s:e, None, :, None]
        yl = y_lerp[s:e, :, None, None]
        tl, tr = feature[t, lft], feature[t, rgt]
        bl, br = feature[b, lft], feature[b, rgt]
        top_v = tl + (tr - tl) * xl
        bottom_v = bl + (br - bl) * xl
        vals = top_v + (bottom_v - top_v) * yl
        mask = valid_y[s:e, :, None] & valid_x[s:e, None, :]
        out[s:e] = np.where(mask[..., None], vals, _F32(0))
    return out


def roi_levels(boxes: np.ndarray, image_size: int) -> np.ndarray:
    """The level rule of ``PyramidROIAlign``: min(5, max(2, 4 + round(log2(sqrt(h*w) / (224/sqrt(area)))))).

    float32 as in TF; ``tf.round`` is half-to-even (``np.round``). sqrt(0) gives log2 = -inf, whose int32
    cast on x86 is INT_MIN: zero-area boxes (the zero-padding rows) go to level 2, as any non-finite value.
    """
    boxes = boxes.astype(_F32)
    h = boxes[:, 2] - boxes[:, 0]
    w = boxes[:, 3] - boxes[:, 1]
    image_area = _F32(image_size * image_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        roi_level = np.log(np.sqrt(h * w) / (_F32(224.0) / np.sqrt(image_area))) / np.log(_F32(2.0))
    r = np.round(roi_level)
    level = np.where(np.isfinite(r), 4 + np.clip(np.nan_to_num(r), -100, 100), 2)
    return np.minimum(5, np.maximum(2, level)).astype(np.int64)


def pyramid_roi_align(boxes: np.ndarray, feature_maps: list[np.ndarray], pool_size: int,
                      image_size: int) -> np.ndarray:
    """Mirror of ``mrcnn.model.PyramidROIAlign.call`` for one image: [n, 4] -> [n, P, P, C] in box order.

    feature_maps are [P2, P3, P4, P5] (NHWC without the batch); each box is cropped on its level only.
    """
    levels = roi_levels(boxes, image_size)
    out = np.zeros((boxes.shape[0], pool_size, pool_size, feature_maps[0].shape[-1]), dtype=_F32)
    for i, level in enumerate(range(2, 6)):
        ix = np.where(levels == level)[0]
        if ix.size:
            out[ix] = crop_and_resize(feature_maps[i], boxes[ix], pool_size)
    return out


# ---------------------------------------------------------------------------------------------------
# 6. Detections
# ---------------------------------------------------------------------------------------------------


def refine_detections(rois: np.ndarray, probs: np.ndarray, deltas: np.ndarray, window_norm: np.ndarray, *,
                      bbox_std, min_confidence: float, nms_threshold: float, max_instances: int) -> np.ndarray:
    """Mirror of ``mrcnn.model.refine_detections_graph`` -> [n, 6] float32 (y1, x1, y2, x2, class, score).

    argmax class per RoI; that class's score and deltas (x BBOX_STD_DEV); decode; clip to the normalized
    window; keep class > 0 and (when DETECTION_MIN_CONFIDENCE is truthy, as matterport's ``if``) score >=
    it; per-class NMS (at most max_instances each); merge (sorted RoI indices, as ``tf.sets``); top
    max_instances by score (ties: lower RoI index). Without the zero-padding rows.
    """
    probs = probs.astype(_F32)
    n = probs.shape[0]
    class_ids = np.argmax(probs, axis=1)
    rows = np.arange(n)
    class_scores = probs[rows, class_ids]
    deltas_specific = deltas.astype(_F32)[rows, class_ids] * np.asarray(bbox_std, dtype=_F32)
    refined = apply_box_deltas(rois, deltas_specific)
    refined = clip_boxes(refined, window_norm)

    keep = np.where(class_ids > 0)[0]
    if min_confidence:
        keep = keep[class_scores[keep] >= _F32(min_confidence)]

    nms_keep = []
    pre_ids = class_ids[keep]
    for class_id in np.unique(pre_ids):
        ixs = np.where(pre_ids == class_id)[0]
        kept = non_max_suppression(refined[keep[ixs]], class_scores[keep[ixs]], max_instances, nms_threshold)
        nms_keep.append(keep[ixs[kept]])
    keep = np.sort(np.concatenate(nms_keep)) if nms_keep else np.zeros((0,), dtype=np.int64)

    top = _top_k_indices(class_scores[keep], min(len(keep), max_instances))
    keep = keep[top]
    return np.concatenate([refined[keep], class_ids[keep].astype(_F32)[:, None],
                           class_scores[keep][:, None]], axis=1).astype(_F32)


# ---------------------------------------------------------------------------------------------------
# 8. Unmolding
# ---------------------------------------------------------------------------------------------------


def unmold_mask(mask: np.ndarray, bbox, image_shape) -> np.ndarray:
    """Mirror of ``mrcnn.utils.unmold_mask``: skimage bilinear resize to the box, >= 0.5, paste into [H, W]."""
    import skimage.transform

    y1, x1, y2, x2 = bbox
    mask = skimage.transform.resize(mask, (y2 - y1, x2 - x1), order=1, mode="constant", cval=0, clip=True,
                                    preserve_range=False, anti_aliasing=False)
    full_mask = np.zeros(image_shape[:2], dtype=bool)
    full_mask[y1:y2, x1:x2] = mask >= 0.5
    return full_mask


def unmold_detections(detections: np.ndarray, mrcnn_mask: np.ndarray, original_shape, molded_shape, window):
    """Mirror of ``mrcnn.model.MaskRCNN.unmold_detections``.

    detections [n, 6] float32 normalized (no padding rows), mrcnn_mask [n, 28, 28, K]. Boxes are moved to
    the normalized window, then ``denorm_boxes`` with the ORIGINAL image shape; boxes of area <= 0 are
    dropped; masks are unmolded with ``unmold_mask``. Returns rois int32, class_ids int32, scores float32,
    masks bool [H, W, N].
    """
    zero_ix = np.where(detections[:, 4] == 0)[0]
    n = zero_ix[0] if zero_ix.shape[0] > 0 else detections.shape[0]
    boxes = detections[:n, :4]
    class_ids = detections[:n, 4].astype(np.int32)
    scores = detections[:n, 5]
    masks = mrcnn_mask[np.arange(n), :, :, class_ids]

    wy1, wx1, wy2, wx2 = norm_boxes(np.asarray(window), molded_shape[:2])
    shift = np.array([wy1, wx1, wy1, wx1])
    wh, ww = wy2 - wy1, wx2 - wx1
    scale = np.array([wh, ww, wh, ww])
    boxes = np.divide(boxes - shift, scale)
    boxes = denorm_boxes(boxes, original_shape[:2])

    exclude = np.where((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) <= 0)[0]
    if exclude.shape[0] > 0:
        boxes = np.delete(boxes, exclude, axis=0)
        class_ids = np.delete(class_ids, exclude, axis=0)
        scores = np.delete(scores, exclude, axis=0)
        masks = np.delete(masks, exclude, axis=0)
    full = [unmold_mask(masks[i], boxes[i], original_shape) for i in range(class_ids.shape[0])]
    full_masks = np.stack(full, axis=-1) if full else np.zeros(tuple(original_shape[:2]) + (0,), dtype=bool)
    return boxes.astype(np.int32), class_ids.astype(np.int32), scores.astype(np.float32), full_masks


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------


def matterport_detect(models, image, *, min_dim=800, max_dim=1024, mean_pixel=(123.7, 116.8, 103.9),
                      anchor_scales=(32, 64, 128, 256, 512), anchor_ratios=(0.5, 1, 2),
                      backbone_strides=(4, 8, 16, 32, 64), rpn_bbox_std=(0.1, 0.1, 0.2, 0.2),
                      bbox_std=(0.1, 0.1, 0.2, 0.2), pre_nms_limit=6000, post_nms_rois=1000,
                      rpn_nms_threshold=0.7, detection_min_confidence=0.7, detection_nms_threshold=0.3,
                      detection_max_instances=100, pool_size=7, mask_pool_size=14) -> dict:
    """Mirror of ``MaskRCNN.detect([image])[0]`` (mode "square", batch of one, inference).

    ``models``: the Keras models of ``matterport_keras.matterport_models`` ("backbone", "rpn",
    "classifier", "mask"). ``image``: uint8 RGB [H, W, 3]. Returns rois int32 [N, 4] (y1, x1, y2, x2 in
    original pixels), class_ids int32 [N], scores float32 [N], masks bool [H, W, N], plus for debugging:
    molded float32 [S, S, 3], window, scale, proposals float32 [post_nms_rois, 4] (normalized, zero
    padded) and detections float32 [n, 6] (normalized, before unmolding, no padding rows).
    """
    image = np.asarray(image)
    assert image.ndim == 3 and image.shape[2] == 3, "expected an RGB image [H, W, 3]"

    # 1. mold_inputs
    resized, window, scale = resize_image_square(image, min_dim, max_dim)
    molded = mold_image(resized, mean_pixel)
    size = molded.shape[0]

    # 2. get_anchors
    shapes = backbone_shapes(size, backbone_strides)
    anchors = norm_boxes(generate_pyramid_anchors(anchor_scales, anchor_ratios, shapes, backbone_strides),
                         molded.shape[:2])

    # 3. backbone + FPN, RPN on P2..P6
    feature_maps = [f[0] for f in _run(models["backbone"], molded[None])]
    rpn = [_run(models["rpn"], f[None]) for f in feature_maps]
    rpn_probs = np.concatenate([r[1][0] for r in rpn], axis=0)
    rpn_deltas = np.concatenate([r[2][0] for r in rpn], axis=0)
    assert rpn_probs.shape[0] == anchors.shape[0], (rpn_probs.shape, anchors.shape)

    # 4. ProposalLayer
    proposals = proposal_layer(rpn_probs, rpn_deltas, anchors, rpn_bbox_std=rpn_bbox_std,
                               pre_nms_limit=pre_nms_limit, post_nms_rois=post_nms_rois,
                               nms_threshold=rpn_nms_threshold)

    # 5-6. classifier head on all proposals (zero rows included), DetectionLayer
    heads_maps = feature_maps[:4]
    pooled = pyramid_roi_align(proposals, heads_maps, pool_size, size)
    probs, deltas = _run(models["classifier"], pooled)
    window_norm = norm_boxes(np.asarray(window), molded.shape[:2])
    detections = refine_detections(proposals, probs, deltas, window_norm, bbox_std=bbox_std,
                                   min_confidence=detection_min_confidence,
                                   nms_threshold=detection_nms_threshold,
                                   max_instances=detection_max_instances)

    # 7. mask head on the detection boxes
    num_classes = probs.shape[1]
    if detections.shape[0]:
        mask_pooled = pyramid_roi_align(detections[:, :4], heads_maps, mask_pool_size, size)
        mrcnn_mask = _run(models["mask"], mask_pooled)
    else:
        mrcnn_mask = np.zeros((0, 2 * mask_pool_size, 2 * mask_pool_size, num_classes), dtype=_F32)

    # 8. unmold_detections
    rois, class_ids, scores, masks = unmold_detections(detections, mrcnn_mask, image.shape, molded.shape,
                                                       window)
    return {
        "rois": rois,
        "class_ids": class_ids,
        "scores": scores,
        "masks": masks,
        "molded": molded,
        "window": tuple(int(v) for v in window),
        "scale": scale,
        "proposals": proposals,
        "detections": detections,
    }
