"""Multi-level RoIAlign: reference vs torchvision, Triton kernel vs reference, FPN level rules.

The Triton launcher runs on every device of ``kernel_devices()`` (CPU under the
interpreter, CUDA when present); shapes stay small because the interpreter costs
about 10 ms per program instance (one program per RoI here, channels <= 16).
"""

import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from conftest import HAS_CUDA, kernel_devices

from kernels.roi_align import (
    LevelRule,
    _level_area_thresholds,
    assign_levels,
    multilevel_roi_align,
    multilevel_roi_align_reference,
    multilevel_roi_align_triton,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
STRIDES = (4, 8, 16, 32)
DEVICES = kernel_devices()

TORCHVISION = LevelRule()
DETECTRON2 = LevelRule(canonical_size=224.0, canonical_level=4, eps=1e-8, eps_inside_log=True)
MMDET = LevelRule(canonical_size=56.0, canonical_level=2, eps=1e-6, eps_inside_log=True)
MATTERPORT = LevelRule(rounding="round")
RULES = {"torchvision": TORCHVISION, "detectron2": DETECTRON2, "mmdet": MMDET, "matterport": MATTERPORT}


def assert_close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **TOL[expected.dtype])


def fpn_features(batch, channels, image_hw, *, channels_last=False, device="cpu"):
    """One map per level 2..5, sized image / stride (rounded up, as a ResNet-FPN makes them)."""
    feats = []
    for stride in STRIDES:
        h, w = math.ceil(image_hw[0] / stride), math.ceil(image_hw[1] / stride)
        f = torch.randn(batch, channels, h, w, device=device)
        feats.append(f.to(memory_format=torch.channels_last) if channels_last else f)
    return feats


def random_boxes(n, image_hw, *, min_side=6.0, max_side=600.0):
    """Boxes of log-uniform sides (so they span every level) centred anywhere in the image."""
    h, w = image_hw
    sides = torch.exp(torch.empty(n, 2).uniform_(math.log(min_side), math.log(max_side)))
    centres = torch.rand(n, 2) * torch.tensor([w, h], dtype=torch.float32)
    return torch.cat([centres - sides / 2, centres + sides / 2], dim=1)


def to_rois(boxes_per_image):
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes_per_image)])


def run(fn, features, rois, *, output_size=7, sampling_ratio=2, aligned=False, level_rule=TORCHVISION, scales=SCALES):
    return fn(
        features,
        rois,
        output_size=output_size,
        spatial_scales=scales,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        level_rule=level_rule,
    )


def per_level_torchvision(features, rois, *, output_size, sampling_ratio, aligned, level_rule=TORCHVISION, scales=SCALES):
    """torchvision.ops.roi_align of each RoI on the level given by assign_levels."""
    levels = assign_levels(rois, level_rule)
    out = torch.zeros(rois.shape[0], features[0].shape[1], output_size, output_size)
    for i, (f, s) in enumerate(zip(features, scales)):
        m = levels == i
        if m.any():
            out[m] = torchvision.ops.roi_align(f, rois[m], output_size, s, sampling_ratio, aligned)
    return out


def to_device(features, rois, device):
    return [f.to(device) for f in features], rois.to(device)


def triton_and_reference(features, rois, device, **kw):
    """(Triton result, reference result), both computed on ``device``.

    The reference runs on the same device so that the level of each RoI comes from
    the same torch ``log2`` (CPU and CUDA may differ in the last bit).
    """
    f_dev, r_dev = to_device(features, rois, device)
    return run(multilevel_roi_align_triton, f_dev, r_dev, **kw), run(multilevel_roi_align_reference, f_dev, r_dev, **kw)


# --------------------------------------------------------------------------------------
# Reference vs torchvision
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", [7, 14])
def test_reference_matches_multiscale_roialign(output_size):
    image_hw = (480, 640)
    feats = fpn_features(2, 4, image_hw)
    boxes = [random_boxes(40, image_hw, max_side=900.0), random_boxes(25, image_hw, max_side=900.0)]
    pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size, 2)
    x = OrderedDict((f"p{i + 2}", f) for i, f in enumerate(feats))
    expected = pooler(x, boxes, [(470, 630), image_hw])  # scales inferred from the largest image
    rois = to_rois(boxes)
    assert set(assign_levels(rois, TORCHVISION).tolist()) == {0, 1, 2, 3}
    actual = run(multilevel_roi_align_reference, feats, rois, output_size=output_size)
    assert_close(actual, expected)
    assert actual.is_contiguous()


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_matches_roi_align_per_level(aligned, sampling_ratio, channels_last):
    image_hw = (200, 260)
    feats = fpn_features(3, 5, image_hw, channels_last=channels_last)
    boxes = [random_boxes(30, image_hw, max_side=700.0) for _ in range(3)]
    rois = to_rois(boxes)
    expected = per_level_torchvision(feats, rois, output_size=7, sampling_ratio=sampling_ratio, aligned=aligned)
    actual = run(multilevel_roi_align_reference, feats, rois, sampling_ratio=sampling_ratio, aligned=aligned)
    assert_close(actual, expected)


def test_reference_matches_roi_align_on_odd_maps_and_awkward_boxes():
    # maps of arbitrary sizes and scales, boxes outside / on the border / empty / inverted
    feats = [torch.randn(2, 3, h, w) for h, w in [(13, 17), (7, 9), (5, 3), (1, 2)]]
    scales = (0.25, 0.125, 0.0625, 0.03125)
    rois = edge_case_rois(batch=2)
    for aligned in (False, True):
        for sr in (0, 1, 3):
            expected = per_level_torchvision(feats, rois, output_size=5, sampling_ratio=sr, aligned=aligned, scales=scales)
            actual = run(multilevel_roi_align_reference, feats, rois, output_size=5, sampling_ratio=sr, aligned=aligned, scales=scales)
            assert_close(actual, expected)


@pytest.mark.parametrize("block_bins", [1, 49 * 3 + 1, 1 << 30])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_reference_sample_blocks_do_not_change_a_bit(monkeypatch, block_bins, sampling_ratio):
    # the sample steps' corner tables are built a block at a time: one step per block, blocks cut
    # mid-way through the steps, or all steps at once must give the same floats
    import kernels.roi_align as roi_align_module

    image_hw = (120, 150)
    feats = fpn_features(2, 4, image_hw)
    rois = torch.cat([to_rois([random_boxes(25, image_hw, max_side=400.0) for _ in range(2)]), edge_case_rois(batch=2)])
    kw = dict(output_size=7, sampling_ratio=sampling_ratio, aligned=True, level_rule=MMDET)
    expected = run(multilevel_roi_align_reference, feats, rois, **kw)
    monkeypatch.setattr(roi_align_module, "_SAMPLE_BLOCK_BINS", block_bins)
    assert torch.equal(run(multilevel_roi_align_reference, feats, rois, **kw), expected)
    assert_close(expected, per_level_torchvision(feats, rois, output_size=7, sampling_ratio=sampling_ratio, aligned=True, level_rule=MMDET))


# --------------------------------------------------------------------------------------
# Triton vs reference
# --------------------------------------------------------------------------------------


def edge_case_rois(batch):
    b = float(batch - 1)
    return torch.tensor(
        [
            [0, -30.0, -20.0, 25.0, 30.0],  # partly outside, top-left
            [b, 40.0, 30.0, 90.0, 75.0],  # partly outside, bottom-right of a small map
            [0, -500.0, -400.0, -380.0, -300.0],  # wholly outside (above-left)
            [b, 900.0, 10.0, 1100.0, 60.0],  # wholly outside (right)
            [0, 10.0, 10.0, 10.0, 10.0],  # zero area, a point
            [b, 12.0, 3.0, 12.0, 40.0],  # zero width
            [0, 20.0, 15.0, 14.0, 9.0],  # inverted (x2 < x1, y2 < y1)
            [b, 0.0, 0.0, 68.0, 52.0],  # the whole image of the 13x17 map at scale 1/4
            [0, 3.3, 7.9, 3.4, 8.05],  # sub-pixel
            [b, -2.0, -1.0, 600.0, 500.0],  # large, top level
            # bins of exactly 1 map pixel on the 13x17 map: with one sample per bin the samples
            # land exactly on x = W = 17 and y = H = 13 (still inside), or on x = y = -1 (inside)
            [0, 58.0, 42.0, 78.0, 62.0],  # not aligned
            [b, 60.0, 44.0, 80.0, 64.0],  # aligned
            [0, -6.0, -6.0, 14.0, 14.0],  # not aligned
            [b, -4.0, -4.0, 16.0, 16.0],  # aligned
        ]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_triton_matches_reference(device, output_size, aligned, sampling_ratio):
    image_hw = (160, 224)
    feats = fpn_features(3, 5, image_hw)
    boxes = [random_boxes(4, image_hw, max_side=500.0) for _ in range(3)]
    rois = to_rois(boxes)
    actual, expected = triton_and_reference(feats, rois, device, output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned)
    assert actual.device.type == device and actual.is_contiguous()
    assert_close(actual.cpu(), expected.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_multiscale_roialign(device):
    image_hw = (256, 320)
    feats = fpn_features(2, 3, image_hw)
    boxes = [random_boxes(6, image_hw, max_side=800.0), random_boxes(6, image_hw, max_side=800.0)]
    x = OrderedDict((str(i), f) for i, f in enumerate(feats))
    expected = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(x, boxes, [image_hw, image_hw])
    f_dev, r_dev = to_device(feats, to_rois(boxes), device)
    assert_close(run(multilevel_roi_align_triton, f_dev, r_dev).cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_triton_edge_cases_odd_maps_channels_last(device, aligned, sampling_ratio):
    feats = [torch.randn(2, 3, h, w) for h, w in [(13, 17), (7, 9), (5, 3), (1, 2)]]
    if aligned:  # one layout per parametrisation keeps the test short
        feats = [f.to(memory_format=torch.channels_last) for f in feats]
    scales = (0.25, 0.125, 0.0625, 0.03125)
    rois = edge_case_rois(batch=2)
    actual, expected = triton_and_reference(feats, rois, device, output_size=5, sampling_ratio=sampling_ratio, aligned=aligned, scales=scales)
    assert_close(actual.cpu(), expected.cpu())
    # wholly outside boxes pool nothing; an empty box with adaptive sampling pools nothing
    assert actual[2].abs().max() == 0 and actual[3].abs().max() == 0
    if aligned and sampling_ratio == 0:
        assert actual[4].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 20])
def test_triton_channel_blocks_and_many_images(device, channels):
    # 20 channels -> two channel blocks per RoI; 4 images in the batch
    image_hw = (96, 128)
    feats = fpn_features(4, channels, image_hw, channels_last=(channels == 20))
    rois = to_rois([random_boxes(2, image_hw, max_side=400.0) for _ in range(4)])
    actual, expected = triton_and_reference(feats, rois, device, output_size=3, sampling_ratio=0)
    assert_close(actual.cpu(), expected.cpu())


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs the Triton interpreter")
@pytest.mark.parametrize(
    "output_size, mode, sampling_ratio, aligned",
    [
        (7, "roi_align", 2, False),
        (14, "roi_align", 2, False),
        (7, "roi_align", 0, True),
        (14, "roi_align", 0, True),
        (7, "crop_and_resize", 0, False),
        (14, "crop_and_resize", 0, False),
    ],
)
def test_cuda_tile_under_interpreter(monkeypatch, output_size, mode, sampling_ratio, aligned):
    """The CUDA launch tile (``_tile``, smaller than the interpreter's) gives bit-identical results."""
    from kernels import roi_align as ra

    bins, block_c, _ = ra._tile(output_size, 256)
    channels = block_c + block_c // 2 + 1  # two CUDA channel blocks, the second one partial
    image_hw = (96, 128)
    feats = fpn_features(2, channels, image_hw)
    boxes = [random_boxes(2, image_hw, max_side=300.0) for _ in range(2)]
    rule = TORCHVISION
    if mode == "crop_and_resize":  # normalized boxes, matterport's rule in that frame
        boxes = [b / torch.tensor([image_hw[1] - 1, image_hw[0] - 1] * 2, dtype=torch.float32) for b in boxes]
        rule = LevelRule(canonical_size=224.0 / math.sqrt(image_hw[0] * image_hw[1]), rounding="round")
    rois = to_rois(boxes)
    kw = dict(output_size=output_size, spatial_scales=SCALES, sampling_ratio=sampling_ratio, aligned=aligned,
              level_rule=rule, mode=mode)
    with_interpreter_tile = multilevel_roi_align_triton(feats, rois, **kw)
    assert ra._interpreter_tile(output_size, channels)[1] >= channels  # one channel block there
    monkeypatch.setattr(ra, "_interpreter_tile", ra._tile)
    with_cuda_tile = multilevel_roi_align_triton(feats, rois, **kw)
    assert torch.equal(with_cuda_tile, with_interpreter_tile)
    assert_close(with_cuda_tile, multilevel_roi_align_reference(feats, rois, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [multilevel_roi_align_triton, multilevel_roi_align_reference, multilevel_roi_align])
def test_empty_rois(device, fn):
    feats = fpn_features(2, 6, (64, 64), device=device)
    rois = torch.zeros(0, 5, device=device)
    out = run(fn, feats, rois, output_size=14)
    assert out.shape == (0, 6, 14, 14) and out.dtype == torch.float32 and out.device.type == device


# --------------------------------------------------------------------------------------
# Level assignment
# --------------------------------------------------------------------------------------


def level_float64(rule, box):
    """The rule in float64 Python, as the frameworks write it."""
    x1, y1, x2, y2 = box
    s = math.sqrt(max((x2 - x1) * (y2 - y1), 0.0))
    k0, s0 = rule.canonical_level, rule.canonical_size
    if s == 0.0 and not (rule.eps_inside_log and rule.rounding == "floor"):
        return rule.min_level
    if rule.rounding == "round":
        lvl = k0 + round(math.log2(s / s0))  # Python's round is half to even
    elif rule.eps_inside_log:
        lvl = math.floor(k0 + math.log2(s / s0 + rule.eps))
    else:
        lvl = math.floor(k0 + math.log2(s / s0) + rule.eps)
    return min(max(lvl, rule.min_level), rule.max_level)


def boundary_sides(rule):
    """Square sides at, and relatively 1e-3 around, every boundary of the rule, plus far values."""
    sides = [0.0, 0.5, 3.0, 2000.0]
    if rule.rounding == "round":  # boundaries s0 * 2 ** (k + 1/2) are irrational: only around them
        for k in range(-3, 3):
            b = rule.canonical_size * 2.0 ** (k + 0.5)
            sides += [b * (1 - 1e-3), b * (1 + 1e-3)]
    else:  # boundaries s0 * 2 ** k: exactly at them too
        for k in range(-3, 4):
            b = rule.canonical_size * 2.0**k
            sides += [b * (1 - 1e-3), b, b * (1 + 1e-3)]
    return sides


@pytest.mark.parametrize("name", list(RULES))
def test_assign_levels_matches_float64(name):
    rule = RULES[name]
    boxes = []
    for s in boundary_sides(rule):
        boxes.append((10.0, 20.0, 10.0 + s, 20.0 + s))  # square
        boxes.append((0.0, 0.0, 2 * s, s / 2))  # same area, elongated
    rois = torch.tensor([(1.0,) + b for b in boxes], dtype=torch.float32)
    got = assign_levels(rois, rule)
    assert got.dtype == torch.int64 and got.shape == (len(boxes),)
    # float64 on the float32 coordinates that the tensor actually holds
    want = [level_float64(rule, tuple(float(v) for v in r[1:])) - rule.min_level for r in rois]
    assert got.tolist() == want


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("name", list(RULES))
def test_kernel_area_thresholds_agree_with_assign_levels(name, device):
    # every float32 area within 2000 ulps of each threshold: the threshold count equals assign_levels
    rule = RULES[name]
    thr = torch.tensor(_level_area_thresholds(rule, device), dtype=torch.float32)
    assert thr.numel() == rule.num_levels - 1 and bool((thr[1:] > thr[:-1]).all())
    bits = thr.view(torch.int32).to(torch.int64)
    window = torch.arange(-2000, 2001)
    areas = (bits[:, None] + window[None, :]).reshape(-1).to(torch.int32).view(torch.float32)
    rois = torch.stack([torch.zeros_like(areas), torch.zeros_like(areas), torch.zeros_like(areas), areas, torch.ones_like(areas)], 1)
    by_threshold = (areas[:, None] >= thr[None, :]).sum(1)
    assert torch.equal(assign_levels(rois.to(device), rule).cpu(), by_threshold)


def boundary_rois(rule):
    """Boxes inside a 1024x1024 image with areas exactly at, and 1 float32 ulp around, each level boundary."""
    rows = []
    for t in _level_area_thresholds(rule):
        tb = torch.tensor([t], dtype=torch.float32)
        below = torch.nextafter(tb, torch.tensor([0.0])).item()
        for area in (t, below):
            h = 512.0 if area > 150000 else 256.0  # a power of two: area / h is exact, w * h == area
            w = torch.tensor([area], dtype=torch.float32).div(h).item()
            assert torch.tensor([w], dtype=torch.float32).mul(h).item() == area
            rows.append((0.0, 5.0, 7.0, 5.0 + w, 7.0 + h))
    for side in (112.0, 224.0, 448.0):
        st = torch.tensor([side], dtype=torch.float32)
        for s in (side, torch.nextafter(st, st + 1).item(), torch.nextafter(st, st - 1).item(), side * 1.001, side * 0.999):
            rows.append((0.0, 3.0, 2.0, 3.0 + s, 2.0 + s))
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(RULES))
def test_triton_levels_at_boundaries(device, name):
    rule = RULES[name]
    # level i is the constant i + 1 (plus a little texture), so the output reveals the level used
    feats = [torch.full((1, 2, 1024 // s, 1024 // s), float(i + 1)) + 1e-3 * torch.rand(1, 2, 1024 // s, 1024 // s) for i, s in enumerate(STRIDES)]
    rois = boundary_rois(rule)
    levels = assign_levels(rois.to(device), rule).cpu()
    assert len(set(levels.tolist())) >= 2
    actual, expected = triton_and_reference(feats, rois, device, level_rule=rule)
    actual = actual.cpu()
    assert_close(actual, expected.cpu())
    used = actual.mean(dim=(1, 2, 3)).round() - 1
    assert used.to(torch.int64).tolist() == levels.tolist()


def test_level_rule_validation():
    with pytest.raises(ValueError, match="rounding"):
        LevelRule(rounding="ceil")
    with pytest.raises(ValueError, match="min_level"):
        LevelRule(min_level=5, max_level=2)
    with pytest.raises(ValueError, match="canonical_size"):
        LevelRule(canonical_size=0.0)
    assert LevelRule().num_levels == 4


# --------------------------------------------------------------------------------------
# Validation, dispatch, inputs untouched
# --------------------------------------------------------------------------------------


def good_args():
    feats = fpn_features(2, 3, (64, 64))
    rois = torch.tensor([[0.0, 1.0, 2.0, 30.0, 40.0], [1.0, 5.0, 5.0, 60.0, 50.0]])
    kw = dict(output_size=7, spatial_scales=list(SCALES), sampling_ratio=2, aligned=False, level_rule=TORCHVISION)
    return feats, rois, kw


BAD_CASES = {
    "rois_shape": (lambda f, r, kw: (f, r[:, :4], kw), ValueError, r"rois must have shape \[R, 5\]"),
    "rois_dtype": (lambda f, r, kw: (f, r.double(), kw), TypeError, "rois must be float32"),
    "rois_type": (lambda f, r, kw: (f, r.tolist(), kw), TypeError, "rois must be a torch.Tensor"),
    "features_dtype": (lambda f, r, kw: ([x.half() for x in f], r, kw), TypeError, r"features\[0\] must be float32"),
    "features_count": (lambda f, r, kw: (f[:3], r, kw), ValueError, "one map per level"),
    "features_dims": (lambda f, r, kw: ([f[0][0]] + f[1:], r, kw), ValueError, r"features\[0\] must have shape \[B, C, H, W\]"),
    "features_tensor": (lambda f, r, kw: (f[0], r, kw), TypeError, "features must be a list/tuple"),
    "channels_mismatch": (lambda f, r, kw: (f[:3] + [f[3][:, :2]], r, kw), ValueError, "same batch size and channels"),
    "scales_count": (lambda f, r, kw: (f, r, {**kw, "spatial_scales": [0.25]}), ValueError, "spatial_scales must hold 4"),
    "scale_value": (lambda f, r, kw: (f, r, {**kw, "spatial_scales": [0.25, 0.125, -1.0, 0.03125]}), ValueError, "finite and > 0"),
    "output_size": (lambda f, r, kw: (f, r, {**kw, "output_size": 0}), ValueError, "output_size must be an int >= 1"),
    "sampling_ratio": (lambda f, r, kw: (f, r, {**kw, "sampling_ratio": -1}), ValueError, "sampling_ratio must be an int >= 0"),
    "aligned": (lambda f, r, kw: (f, r, {**kw, "aligned": 1}), TypeError, "aligned must be a bool"),
    "level_rule": (lambda f, r, kw: (f, r, {**kw, "level_rule": None}), TypeError, "level_rule must be"),
}


@pytest.mark.parametrize("fn", [multilevel_roi_align_triton, multilevel_roi_align_reference, multilevel_roi_align])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_input_validation(fn, case):
    make, exc, match = BAD_CASES[case]
    feats, rois, kw = make(*good_args())
    with pytest.raises(exc, match=match):
        fn(feats, rois, **kw)


def test_bad_batch_index():
    feats, rois, kw = good_args()
    rois[1, 0] = 2.0  # batch size is 2
    with pytest.raises(ValueError, match=r"batch indices in \[0, 2\)"):
        multilevel_roi_align_reference(feats, rois, **kw)
    if DEVICES:  # the kernel reads nothing for such a RoI instead of synchronising to check
        f_dev, r_dev = to_device(feats, rois, DEVICES[0])
        out = multilevel_roi_align_triton(f_dev, r_dev, **kw).cpu()
        assert out[1].abs().max() == 0 and out[0].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_not_modified_and_dispatch(device):
    feats, rois, kw = good_args()
    feats = [feats[0].to(memory_format=torch.channels_last)] + feats[1:]
    f_dev, r_dev = to_device(feats, rois, device)
    r_dev = r_dev.t().contiguous().t()  # non-contiguous rois
    before = [f.clone() for f in f_dev], r_dev.clone()
    tri = multilevel_roi_align_triton(f_dev, r_dev, **kw)
    ref = multilevel_roi_align_reference(f_dev, r_dev, **kw)
    disp = multilevel_roi_align(f_dev, r_dev, **kw)
    for f, f0 in zip(f_dev, before[0]):
        assert torch.equal(f, f0)
    assert torch.equal(r_dev, before[1]) and not r_dev.is_contiguous()
    assert f_dev[0].is_contiguous(memory_format=torch.channels_last)
    assert_close(tri.cpu(), ref.cpu())
    assert_close(disp.cpu(), ref.cpu())
    if device == "cpu":  # the dispatcher keeps CPU tensors on the reference
        assert torch.equal(disp, ref)
