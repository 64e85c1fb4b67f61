"""Behaviours that differ between checkpoint families, each checked on its own against the
documented behaviour (reference notes, sections 0, B and F)."""

import math

import numpy as np
import torch

from engine.anchors import base_anchors, grid_anchors
from engine.boxes import large_enough
from engine.config import TORCHVISION_MASKRCNN_R50_FPN as TV
from engine.postprocess import to_original_frame
from engine.roi_heads import ImageDetections


def test_detectron2_unrounded_anchors_documented_values():
    # d2 generate_cell_anchors: w = sqrt(size^2 / ratio), h = ratio * w, in double precision
    anchors = base_anchors(32, (0.5, 1.0, 2.0), round_anchors=False)
    expected = torch.tensor(
        [[-22.627417, -11.313708, 22.627417, 11.313708], [-16, -16, 16, 16], [-11.313708, -22.627417, 11.313708, 22.627417]]
    )
    torch.testing.assert_close(anchors, expected, rtol=0, atol=1e-5)
    # cast once from double: the float32 nearest to the exact value
    assert anchors[0, 0].item() == np.float32(-math.sqrt(32 * 32 / 0.5) / 2)


def test_fixed_strides_ignore_padding():
    # Detectron2 and mmdet: stride 2**level whatever the padded size (torchvision: padded // feature)
    sizes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    fixed = grid_anchors((800, 1216), sizes, sizes=TV.anchor_sizes, aspect_ratios=(1.0,), round_anchors=False,
                         stride_mode="fixed", device=torch.device("cpu"))
    for level, a in enumerate(fixed):
        stride = 2 ** (level + 2)
        assert a[1, 0] - a[0, 0] == stride
    p6 = grid_anchors((800, 1216), sizes, sizes=TV.anchor_sizes, aspect_ratios=(1.0,), round_anchors=True,
                      stride_mode="padded_div_feature", device=torch.device("cpu"))[4]
    assert p6[19, 1] - p6[0, 1] == 800 // 13  # 61, the torchvision quirk


def test_min_size_rules():
    boxes = torch.tensor([[0.0, 0, 0, 5], [0, 0, 1e-3, 1e-3], [0, 0, 2, 2]])
    assert large_enough(boxes, 1e-3).tolist() == [False, True, True]  # torchvision: >= 1e-3
    assert large_enough(boxes, 0.0, inclusive=False).tolist() == [False, True, True]  # Detectron2: w > 0, h > 0
    assert large_enough(boxes, 0.0).tolist() == [True, True, True]


def _one_image(boxes):
    n = len(boxes)
    det = ImageDetections(boxes=torch.tensor(boxes), scores=torch.linspace(0.9, 0.5, n), labels=torch.arange(n))
    probs = torch.full((n, 28, 28), 0.9)
    return det, probs


def test_detectron2_clips_scaled_boxes_and_drops_empty_ones():
    # resized 100x100 -> original 50x50: scale 0.5; the third box lies right of the image
    det, probs = _one_image([[10.0, 10, 60, 60], [-20, -20, 40, 150], [120, 10, 140, 20]])
    common = dict(image_sizes=[(100, 100)], original_sizes=[(50, 50)])
    tv = to_original_frame([det], [probs], config=TV, **common)[0]
    assert len(tv) == 3 and tv.boxes[1].tolist() == [-10, -10, 20, 75]  # torchvision: no clipping
    d2 = to_original_frame([det], [probs], config=TV.replace(clip_boxes_to_original=True), **common)[0]
    assert len(d2) == 2
    assert d2.boxes.tolist() == [[5, 5, 30, 30], [0, 0, 20, 50]]
    assert d2.labels.tolist() == [0, 1] and d2.scores.tolist() == tv.scores[:2].tolist()
    assert d2.masks.shape == (2, 50, 50) and d2.masks[0, 15, 15] and not d2.masks[0, 45, 45]


def test_mmdet_delta2bbox_operation_order():
    # mmdet delta2bbox (notes C.6): denorm = deltas * stds; centre (x1 + x2) * 0.5; symmetric clamp
    from engine.boxes import decode_deltas

    g = torch.Generator().manual_seed(0)
    rois = torch.rand(200, 2, generator=g) * 500
    rois = torch.cat([rois, rois + 1 + torch.rand(200, 2, generator=g) * 300], 1)
    deltas = torch.randn(200, 4, generator=g) * 3
    stds = torch.tensor([0.1, 0.1, 0.2, 0.2])
    d = deltas * stds
    max_ratio = abs(math.log(16 / 1000))
    pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
    pwh = rois[:, 2:] - rois[:, :2]
    gxy = pxy + pwh * d[:, :2]
    gwh = pwh * d[:, 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    expected = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], 1)
    ours = decode_deltas(deltas, rois, weights=(10.0, 10.0, 5.0, 5.0), clip=max_ratio, clamp="symmetric", style="mmdet")
    assert torch.equal(ours, expected)


def test_rescale_divide_matches_mmdet_scale_factor():
    from engine.postprocess import rescale_boxes

    boxes = torch.tensor([[10.3, 20.7, 400.1, 333.3]])
    resized, original = (800, 1203), (300, 451)
    scale = torch.tensor([1203 / 451, 800 / 300, 1203 / 451, 800 / 300], dtype=torch.float32)  # (w, h, w, h)
    assert torch.equal(rescale_boxes(boxes, resized, original, style="divide"), boxes / scale)
    ratio = torch.tensor([451, 300, 451, 300], dtype=torch.float32) / torch.tensor([1203, 800, 1203, 800], dtype=torch.float32)
    assert torch.equal(rescale_boxes(boxes, resized, original), boxes * ratio)


def test_presets_validate():
    from engine.config import PRESETS

    assert set(PRESETS) == {
        "torchvision_maskrcnn_resnet50_fpn",
        "torchvision_maskrcnn_resnet50_fpn_v2",
        "detectron2_mask_rcnn_R_50_FPN",
        "mmdet_mask_rcnn_r50_fpn",
        "matterport_mask_rcnn_fpn",
    }
    mp = PRESETS["matterport_mask_rcnn_fpn"]
    assert mp.bn_eps == 1e-3 and mp.stem_pool == "tf_same" and mp.level_rule.rounding == "round"
    assert mp.anchor_aspect_ratios == (2.0, 1.0, 0.5) and mp.detection_rule == "argmax" and mp.score_threshold == 0.7
    mm = PRESETS["mmdet_mask_rcnn_r50_fpn"]
    assert mm.level_rule.canonical_size == 56 and mm.level_rule.canonical_level == 2 and mm.level_rule.eps_inside_log
