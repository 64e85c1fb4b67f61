"""Single stages against torchvision: resize sizes and pixels, anchors, box decoding."""

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from engine.anchors import base_anchors, grid_anchors
from engine.boxes import clip_boxes, decode_deltas
from engine.config import TORCHVISION_MASKRCNN_R50_FPN as TV
from engine.preprocess import preprocess, resized_size


@pytest.mark.parametrize("hw", [(480, 640), (300, 451), (512, 512), (20, 4000), (1, 1), (799, 1201), (1000, 300)])
def test_preprocess_matches_torchvision_transform(hw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=hw + (3,), dtype=np.uint8)
    tv = GeneralizedRCNNTransform(800, 1333, list(TV.pixel_mean), list(TV.pixel_std))
    tv.eval()
    with torch.no_grad():
        ref, _ = tv([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
    ours = preprocess([image], config=TV, device=torch.device("cpu"))
    assert ours.image_sizes == [tuple(s) for s in ref.image_sizes]
    assert ours.original_sizes == [hw]
    torch.testing.assert_close(ours.tensor, ref.tensors, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "hw,floor,half_up",
    [((300, 451), (800, 1202), (800, 1203)), ((20, 4000), (6, 1333), (7, 1333)), ((480, 640), (800, 1066), (800, 1067))],
)
def test_resize_rounding(hw, floor, half_up):
    assert resized_size(*hw, min_size=800, max_size=1333, rounding="floor") == floor
    assert resized_size(*hw, min_size=800, max_size=1333, rounding="round_half_up") == half_up


def test_base_anchors_documented_values():
    expected = torch.tensor([[-23.0, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])
    assert torch.equal(base_anchors(32, (0.5, 1.0, 2.0), round_anchors=True), expected)


@pytest.mark.parametrize("padded", [(800, 1216), (832, 1344), (64, 96)])
def test_anchors_match_torchvision(padded):
    feature_sizes = [(math.ceil(padded[0] / 2**k), math.ceil(padded[1] / 2**k)) for k in range(2, 7)]
    gen = AnchorGenerator(tuple((s,) for s in TV.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(1, 3, *padded), [padded])
    ref = gen(images, [torch.zeros(1, 1, *fs) for fs in feature_sizes])[0]
    ours = grid_anchors(
        padded,
        feature_sizes,
        sizes=TV.anchor_sizes,
        aspect_ratios=TV.anchor_aspect_ratios,
        round_anchors=True,
        stride_mode="padded_div_feature",
        device=torch.device("cpu"),
    )
    assert torch.equal(torch.cat(ours), ref)


def test_p6_stride_quirk():
    # 800 rows: P6 has ceil(800 / 64) = 13 rows, so torchvision's stride is 800 // 13 = 61
    anchors = grid_anchors((800, 800), [(13, 13)], sizes=(512.0,), aspect_ratios=(1.0,), round_anchors=True,
                           stride_mode="padded_div_feature", device=torch.device("cpu"))[0]
    assert anchors[1, 0] - anchors[0, 0] == 61


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
@pytest.mark.parametrize("k", [1, 5])
def test_decode_matches_torchvision_box_coder(weights, k):
    g = torch.Generator().manual_seed(0)
    ref_boxes = torch.rand(50, 2, generator=g) * 500
    ref_boxes = torch.cat([ref_boxes, ref_boxes + 1 + torch.rand(50, 2, generator=g) * 200], 1)
    deltas = torch.randn(50, 4 * k, generator=g) * 3  # large dw/dh exercise the clamp
    expected = BoxCoder(weights).decode_single(deltas, ref_boxes)
    ours = decode_deltas(deltas, ref_boxes, weights=weights, clip=TV.box_delta_clip, clamp="upper")
    assert torch.equal(ours, expected)


def test_decode_clamp_modes():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor([[0.0, 0.0, -10.0, 10.0]])
    clip = math.log(1000 / 16)
    upper = decode_deltas(deltas, ref, weights=(1, 1, 1, 1), clip=clip, clamp="upper")
    sym = decode_deltas(deltas, ref, weights=(1, 1, 1, 1), clip=clip, clamp="symmetric")
    none = decode_deltas(deltas, ref, weights=(1, 1, 1, 1), clip=clip, clamp="none")
    w = lambda b: (b[0, 2] - b[0, 0]).item()
    h = lambda b: (b[0, 3] - b[0, 1]).item()
    assert w(upper) == pytest.approx(10 * math.exp(-10), rel=1e-3)  # x2 - x1 around 5 loses digits
    assert w(sym) == pytest.approx(10 * math.exp(-clip), rel=1e-5)
    assert h(upper) == pytest.approx(h(sym)) and h(sym) == pytest.approx(10 * math.exp(clip), rel=1e-5)
    assert h(none) == pytest.approx(10 * math.exp(10), rel=1e-4)


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -1, 700, 30], [10, 20, 30, 40]])
    assert clip_boxes(boxes, (25, 600)).tolist() == [[0, 0, 600, 25], [10, 20, 30, 25]]


@pytest.mark.parametrize("rounding", ["floor", "round_half_up"])
def test_resize_keeps_at_least_one_pixel(rounding):
    # 20 * 160 / 4000 = 0.8 rows: torchvision would ask F.interpolate for 0 rows and fail
    assert resized_size(20, 4000, min_size=96, max_size=160, rounding=rounding) == (1, 160)
    assert resized_size(4000, 20, min_size=96, max_size=160, rounding=rounding) == (160, 1)
