"""``mode="crop_and_resize"`` of the multi-level RoIAlign: matterport's ``PyramidROIAlign``.

The oracle below is TensorFlow's CPU ``crop_and_resize`` (bilinear, extrapolation
value 0; ``tensorflow/core/kernels/image/crop_and_resize_op.cc``) written literally
in numpy, with matterport's level assignment in float64. The reference is compared
to it, and the Triton kernel (every device of ``kernel_devices()``; CPU under the
interpreter) to the reference. Shapes stay tiny: the interpreter costs about 10 ms
per program instance (one per RoI here).
"""

import math

import numpy as np
import pytest
import torch
from conftest import kernel_devices

from kernels.roi_align import (
    LevelRule,
    assign_levels,
    multilevel_roi_align,
    multilevel_roi_align_reference,
    multilevel_roi_align_triton,
)

DEVICES = kernel_devices()
FNS = [multilevel_roi_align_triton, multilevel_roi_align_reference, multilevel_roi_align]
MATTERPORT_1024 = LevelRule(canonical_size=224 / 1024, canonical_level=4, rounding="round")
MAP_SIZES = [(13, 9), (7, 5), (4, 3), (2, 2)]  # levels 2..5, odd and non-square
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)  # validated, ignored by this mode
OUTPUT_SIZES = [7, 14, 1]


# --------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------


def tf_crop_and_resize(image, box, size, geometry=np.float64):
    """TensorFlow's bilinear ``crop_and_resize`` of one box, extrapolation value 0.

    ``image``: float64 [C, H, W]; ``box``: normalized ``(x1, y1, x2, y2)``. Sample
    positions are computed in ``geometry`` (float64, or float32 to reproduce
    TensorFlow's own rounding at the map edges); interpolation is in float64.
    Returns float64 [C, size, size].
    """
    C, H, W = image.shape
    g = geometry
    x1, y1, x2, y2 = (g(v) for v in box)
    out = np.zeros((C, size, size))
    height_scale = (y2 - y1) * g(H - 1) / g(size - 1) if size > 1 else g(0)
    width_scale = (x2 - x1) * g(W - 1) / g(size - 1) if size > 1 else g(0)
    for i in range(size):
        in_y = y1 * g(H - 1) + g(i) * height_scale if size > 1 else g(0.5) * (y1 + y2) * g(H - 1)
        if in_y < 0 or in_y > H - 1:
            continue  # extrapolation value 0
        top, bottom = math.floor(in_y), math.ceil(in_y)
        y_lerp = float(in_y) - top
        for j in range(size):
            in_x = x1 * g(W - 1) + g(j) * width_scale if size > 1 else g(0.5) * (x1 + x2) * g(W - 1)
            if in_x < 0 or in_x > W - 1:
                continue
            left, right = math.floor(in_x), math.ceil(in_x)
            x_lerp = float(in_x) - left
            top_left, top_right = image[:, top, left], image[:, top, right]
            bottom_left, bottom_right = image[:, bottom, left], image[:, bottom, right]
            top_v = top_left + (top_right - top_left) * x_lerp
            bottom_v = bottom_left + (bottom_right - bottom_left) * x_lerp
            out[:, i, j] = top_v + (bottom_v - top_v) * y_lerp
    return out


def matterport_level(box):
    """matterport's level, float64: ``4 + round_half_even(log2(sqrt(area) / (224 / 1024)))`` in 2..5."""
    x1, y1, x2, y2 = (float(v) for v in box)
    area = (x2 - x1) * (y2 - y1)
    if not area > 0:  # zero area (log2(0) = -inf), or negative (NaN): finest level
        return 2
    k = 4 + np.round(np.log2(np.sqrt(area) / (224 / 1024)))  # numpy rounds half to even
    return int(min(max(k, 2), 5))


def pyramid_oracle(features, rois, size, geometry=np.float64):
    """float64 [R, C, size, size]: each RoI cropped from its matterport level's map."""
    maps = [f.double().numpy() for f in features]
    out = np.zeros((rois.shape[0], maps[0].shape[1], size, size))
    for r, row in enumerate(rois.tolist()):
        level = matterport_level(row[1:])
        out[r] = tf_crop_and_resize(maps[level - 2][int(row[0])], row[1:], size, geometry)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def make_features(batch=2, channels=3, sizes=MAP_SIZES):
    return [torch.randn(batch, channels, h, w) for h, w in sizes]


# (x1, y1, x2, y2) normalized, and the matterport level each must land on
BOXES = [
    ((0.10, 0.20, 0.15, 0.26), 2),  # inside
    ((0.31, 0.42, 0.43, 0.53), 3),
    ((0.22, 0.13, 0.47, 0.41), 4),
    ((0.05, 0.11, 0.83, 0.94), 5),
    ((0.97, 0.96, 1.03, 1.02), 2),  # partly outside [0, 1]
    ((-0.05, 0.40, 0.07, 0.52), 3),
    ((0.85, -0.15, 1.10, 0.12), 4),
    ((-0.20, 0.10, 0.50, 0.90), 5),
    ((1.20, 1.30, 1.50, 1.60), 4),  # wholly outside
    ((0.45, 0.55, 0.33, 0.41), 3),  # flipped (x2 < x1 and y2 < y1): positive area
    ((0.70, 0.60, 0.30, 0.20), 5),
    ((0.60, 0.20, 0.40, 0.50), 2),  # flipped in x only: negative area -> finest level
    ((0.40, 0.40, 0.40, 0.40), 2),  # zero size (a point)
    ((0.30, 0.10, 0.30, 0.70), 2),  # zero width
    ((0.00, 0.37, 0.21, 0.37), 2),  # zero height, starting on the left edge
]

# Edges exactly on the map borders, where TensorFlow's float32 positions decide
EDGE_BOXES = [
    (0.50, 0.15, 0.505, 1.00),  # level 2 (13 rows): the last row lands on 12.000001 > H - 1 -> 0
    (0.20, 0.40, 1.00, 0.405),  # level 2 (9 columns), right edge on x = 1
    (0.00, 0.00, 1.00, 1.00),  # the whole image, level 5
    (0.00, 0.25, 0.50, 1.00),  # level 5
    (1.00, 0.00, 0.00, 0.30),  # flipped x from the right edge, level 2 (negative area)
]


def box_rois(boxes, batch=2):
    """float32 [R, 5] rows, images alternating 0, 1, ..."""
    return torch.tensor([(float(i % batch),) + tuple(b) for i, b in enumerate(boxes)], dtype=torch.float32)


def random_boxes(n):
    """Boxes of log-uniform sides (every level) with centres in [-0.1, 1.1]; some flipped."""
    sides = torch.exp(torch.empty(n, 2).uniform_(math.log(0.02), math.log(1.0)))
    centres = torch.rand(n, 2) * 1.2 - 0.1
    b = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    flip = torch.rand(n) < 0.25
    b[flip] = b[flip][:, [2, 3, 0, 1]]
    return [tuple(r) for r in b.tolist()]


def all_rois():
    return box_rois([b for b, _ in BOXES] + random_boxes(6))


def run(fn, features, rois, output_size, mode="crop_and_resize", **overrides):
    kw = dict(output_size=output_size, spatial_scales=SCALES, sampling_ratio=2, aligned=False, level_rule=MATTERPORT_1024, mode=mode)
    kw.update(overrides)
    return fn(features, rois, **kw)


def assert_triton_equals_reference(features, rois, output_size, device, **overrides):
    f_dev, r_dev = [f.to(device) for f in features], rois.to(device)
    actual = run(multilevel_roi_align_triton, f_dev, r_dev, output_size, **overrides)
    expected = run(multilevel_roi_align_reference, f_dev, r_dev, output_size, **overrides)
    assert actual.shape == expected.shape and actual.dtype == torch.float32 and actual.device.type == device
    assert actual.is_contiguous()
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=1e-6, rtol=0)
    return actual.cpu()


# --------------------------------------------------------------------------------------
# Oracle sanity, and the oracle tells the two modes apart
# --------------------------------------------------------------------------------------


def test_oracle_is_exact_on_linear_maps():
    # bilinear interpolation reproduces a map linear in (row, column) exactly
    H, W, P = 13, 9, 7
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    image = np.stack([0.5 * yy - 0.25 * xx + 1.0, 2.0 * xx])
    box = (0.1, 0.2, 0.7, 0.9)
    out = tf_crop_and_resize(image, box, P)
    ys = 0.2 * (H - 1) + np.arange(P) * (0.9 - 0.2) * (H - 1) / (P - 1)
    xs = 0.1 * (W - 1) + np.arange(P) * (0.7 - 0.1) * (W - 1) / (P - 1)
    np.testing.assert_allclose(out[0], 0.5 * ys[:, None] - 0.25 * xs[None, :] + 1.0, atol=1e-12)
    np.testing.assert_allclose(out[1], 2.0 * np.broadcast_to(xs[None, :], (P, P)), atol=1e-12)
    # P == 1 samples the centre
    np.testing.assert_allclose(tf_crop_and_resize(image, box, 1)[:, 0, 0], [0.5 * 0.55 * 12 - 0.25 * 0.4 * 8 + 1.0, 2.0 * 0.4 * 8])


def test_levels_match_matterport():
    rois = all_rois()
    got = assign_levels(rois, MATTERPORT_1024) + 2
    assert got.tolist() == [matterport_level(r[1:]) for r in rois.tolist()]
    assert got[: len(BOXES)].tolist() == [lvl for _, lvl in BOXES]
    assert set(got.tolist()) == {2, 3, 4, 5}


def test_crop_and_resize_differs_from_roi_align():
    feats = make_features()
    rois = box_rois([b for b, _ in BOXES[:4]])
    expected = pyramid_oracle(feats, rois, 7).float()
    crop = run(multilevel_roi_align_reference, feats, rois, 7)
    roi_align = run(multilevel_roi_align_reference, feats, rois, 7, mode="roi_align")
    torch.testing.assert_close(crop, expected, atol=1e-5, rtol=0)
    assert (roi_align - expected).abs().max() > 0.1


# --------------------------------------------------------------------------------------
# Reference vs oracle
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
def test_reference_matches_tf_oracle(output_size):
    feats = make_features()
    rois = all_rois()
    actual = run(multilevel_roi_align_reference, feats, rois, output_size)
    assert actual.shape == (rois.shape[0], 3, output_size, output_size) and actual.dtype == torch.float32
    assert actual.is_contiguous()
    torch.testing.assert_close(actual.double(), pyramid_oracle(feats, rois, output_size), atol=1e-5, rtol=0)
    assert actual[8].abs().max() == 0  # wholly outside
    if output_size > 1:  # partly outside: some cells extrapolate to 0, the others do not
        for r in (4, 5, 6, 7):
            zero = (actual[r] == 0).all(dim=0)
            assert zero.any() and not zero.all()


@pytest.mark.parametrize("output_size", [7, 14])
def test_reference_matches_tf_float32_positions_on_edges(output_size):
    # boxes on the map borders: TensorFlow's float32 positions decide which cells extrapolate
    feats = make_features()
    rois = box_rois(EDGE_BOXES)
    actual = run(multilevel_roi_align_reference, feats, rois, output_size)
    torch.testing.assert_close(actual.double(), pyramid_oracle(feats, rois, output_size, np.float32), atol=1e-5, rtol=0)
    # the first box's last row is past H - 1 in float32 (exactly H - 1 in exact arithmetic)
    assert actual[0, :, -1, :].abs().max() == 0 and (actual[0, :, -2, :] != 0).all()
    assert (actual[2] != 0).all()  # the whole image: every cell inside


def test_ignored_arguments_and_dispatch():
    feats = make_features()
    rois = all_rois()
    base = run(multilevel_roi_align_reference, feats, rois, 7)
    other = run(multilevel_roi_align_reference, feats, rois, 7, spatial_scales=(1.0, 0.5, 0.3, 0.1), sampling_ratio=0, aligned=True)
    assert torch.equal(base, other)
    assert torch.equal(run(multilevel_roi_align, feats, rois, 7), base)  # CPU tensors: the reference
    channels_last = [f.to(memory_format=torch.channels_last) for f in feats]
    assert torch.equal(run(multilevel_roi_align_reference, channels_last, rois, 7), base)


# --------------------------------------------------------------------------------------
# Triton vs reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
def test_triton_matches_reference(device, output_size):
    feats = make_features()
    rois = torch.cat([all_rois(), box_rois(EDGE_BOXES)])
    actual = assert_triton_equals_reference(feats, rois, output_size, device)
    assert actual[8].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_triton_channel_blocks_and_ignored_arguments(device):
    # 20 channels -> two channel blocks per RoI; scales / sampling / aligned must not matter
    feats = make_features(channels=20)
    rois = box_rois([b for b, _ in BOXES[:4]])
    a = assert_triton_equals_reference(feats, rois, 7, device)
    b = assert_triton_equals_reference(feats, rois, 7, device, spatial_scales=(1.0, 0.5, 0.3, 0.1), sampling_ratio=0, aligned=True)
    assert torch.equal(a, b)


def test_triton_bad_batch_index_reads_nothing():
    if not DEVICES:
        pytest.skip("no device for the Triton kernel")
    feats = make_features()
    rois = box_rois([b for b, _ in BOXES[:2]])
    rois[1, 0] = 2.0  # batch size is 2
    with pytest.raises(ValueError, match=r"batch indices in \[0, 2\)"):
        run(multilevel_roi_align_reference, feats, rois, 7)
    out = run(multilevel_roi_align_triton, [f.to(DEVICES[0]) for f in feats], rois.to(DEVICES[0]), 7).cpu()
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", FNS)
def test_empty_rois(device, fn):
    feats = [f.to(device) for f in make_features()]
    out = run(fn, feats, torch.zeros(0, 5, device=device), 14)
    assert out.shape == (0, 3, 14, 14) and out.dtype == torch.float32 and out.device.type == device


# --------------------------------------------------------------------------------------
# The mode argument
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("mode", ["bilinear", "ROI_ALIGN", "", None])
def test_bad_mode(fn, mode):
    feats = make_features()
    rois = box_rois([b for b, _ in BOXES[:2]])
    with pytest.raises(ValueError, match=r"mode must be one of \('roi_align', 'crop_and_resize'\)"):
        run(fn, feats, rois, 7, mode=mode)


@pytest.mark.parametrize("fn", FNS)
def test_roi_align_mode_unchanged(fn):
    if fn is multilevel_roi_align_triton and not DEVICES:
        pytest.skip("no device for the Triton kernel")
    device = DEVICES[0] if fn is multilevel_roi_align_triton else "cpu"
    feats = [f.to(device) for f in make_features()]
    # pixel boxes of a 52 x 36 image, spanning the default (torchvision) levels
    rois = torch.tensor([[0, 2.0, 3.0, 20.0, 30.0], [1, -5.0, 1.0, 40.0, 33.0], [0, 10.0, 10.0, 10.0, 10.0]], device=device)
    kw = dict(output_size=5, spatial_scales=SCALES, sampling_ratio=0, aligned=True, level_rule=LevelRule())
    without = fn(feats, rois, **kw)
    assert torch.equal(fn(feats, rois, mode="roi_align", **kw), without)
    assert not torch.equal(fn(feats, rois, mode="crop_and_resize", **kw), without)
