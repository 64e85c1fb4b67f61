"""Mask paste-back (kernels.paste_masks) against torchvision's paste_masks_in_image and,
for ``method="grid_sample"``, against F.grid_sample over the whole image as Detectron2 /
mmdetection call it.

The Triton launcher runs under the interpreter on CPU (see conftest.py) and on
CUDA when a GPU is present; shapes are small so each launch has tens of programs.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, paste_masks_in_image

import kernels.paste_masks as pm
from conftest import HAS_CUDA, kernel_devices
from kernels.paste_masks import paste_masks, paste_masks_reference, paste_masks_triton

# Probability tolerance per dtype (CUDA: torch's fused bilinear sum is not checked bit for bit;
# a source-index ulp at |src| < 32 moves a value by up to ~2e-6 where neighbours differ by 1).
# On CPU the Triton kernel (interpreter) is also checked to be bit-identical.
TOL = {torch.float32: dict(atol=2e-6, rtol=0.0)}
# Thresholded pixels may differ only where torchvision's probability is this close to the threshold.
NEAR_THRESHOLD = 1e-5


def _impls():
    impls = [pytest.param(paste_masks_reference, "cpu", id="reference-cpu")]
    if HAS_CUDA:
        impls.append(pytest.param(paste_masks_reference, "cuda", id="reference-cuda"))
    impls += [pytest.param(paste_masks_triton, d, id=f"triton-{d}") for d in kernel_devices()]
    return impls


IMPLS = _impls()
TRITON_DEVICES = kernel_devices()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _int_box(box, m, padding):
    return expand_boxes(box[None].float(), (m + 2 * padding) / m).to(torch.int64)[0].tolist()


def _misses_image(box, m, padding, h, w):
    x1, y1, x2, y2 = _int_box(box, m, padding)
    return min(x2 + 1, w) <= max(x1, 0) or min(y2 + 1, h) <= max(y1, 0)


def torchvision_paste(masks, boxes, counts, sizes, padding=1):
    """Per-image float32 [n, H, W] from torchvision, one detection at a time.

    torchvision raises a shape error for most boxes whose expanded integer box misses
    the image; their plane is all zeros by definition.
    """
    outs, start = [], 0
    for n, (h, w) in zip(counts, sizes):
        planes = []
        for i in range(start, start + n):
            if _misses_image(boxes[i].cpu(), masks.shape[-1], padding, h, w):
                planes.append(torch.zeros((h, w), dtype=torch.float32, device=masks.device))
            else:
                planes.append(paste_masks_in_image(masks[i][None, None], boxes[i][None], (h, w), padding=padding)[0, 0])
        outs.append(torch.stack(planes) if planes else torch.zeros((0, h, w), device=masks.device))
        start += n
    return outs


def binarise(prob, threshold, method="torchvision"):
    """The method's threshold: torchvision's callers use ``>``, Detectron2 / mmdet ``>=``."""
    return prob >= threshold if method == "grid_sample" else prob > threshold


def assert_matches(outs, expected_probs, threshold, *, exact=False, method="torchvision"):
    """outs agree with the expected probabilities (binarised with the method's comparison):
    bit for bit when exact, else within TOL (probabilities) or except where the probability
    is within NEAR_THRESHOLD of the threshold."""
    assert len(outs) == len(expected_probs)
    for out, prob in zip(outs, expected_probs):
        assert out.shape == prob.shape
        assert out.device == prob.device
        if exact:
            assert torch.equal(out, prob if threshold is None else binarise(prob, threshold, method))
        if threshold is None:
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, prob, **TOL[torch.float32])
        else:
            assert out.dtype == torch.bool
            thr = float(np.float32(threshold))
            wrong = out != binarise(prob, threshold, method)
            ambiguous = (prob - thr).abs() <= NEAR_THRESHOLD
            assert not (wrong & ~ambiguous).any(), f"{int((wrong & ~ambiguous).sum())} pixels differ"


def random_batch(counts, sizes, m=28, *, device="cpu", seed=0, outside=0.25):
    """Random probabilities and boxes around each image (some partly outside it)."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for n, (h, w) in zip(counts, sizes):
        x1 = (torch.rand(n, generator=g) * (1 + outside) - outside) * w
        y1 = (torch.rand(n, generator=g) * (1 + outside) - outside) * h
        bw = torch.rand(n, generator=g) * 0.8 * w + 0.3
        bh = torch.rand(n, generator=g) * 0.8 * h + 0.3
        boxes.append(torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1))
    boxes = torch.cat(boxes) if boxes else torch.zeros((0, 4))
    masks = torch.rand((sum(counts), m, m), generator=g)
    return masks.to(device), boxes.to(device)


# ---------------------------------------------------------------------------------------------
# agreement with torchvision
# ---------------------------------------------------------------------------------------------

BATCH_COUNTS = [3, 0, 2]
BATCH_SIZES = [(40, 60), (37, 53), (23, 31)]


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("impl,device", IMPLS)
def test_batch_of_images_matches_torchvision(impl, device, threshold):
    masks, boxes = random_batch(BATCH_COUNTS, BATCH_SIZES, device=device)
    outs = impl(masks, boxes, BATCH_COUNTS, BATCH_SIZES, threshold=threshold)
    assert [tuple(o.shape) for o in outs] == [(n, h, w) for n, (h, w) in zip(BATCH_COUNTS, BATCH_SIZES)]
    assert_matches(outs, torchvision_paste(masks, boxes, BATCH_COUNTS, BATCH_SIZES), threshold, exact=device == "cpu")


def test_reference_is_bit_identical_to_torchvision():
    counts, sizes = [4, 3], [(45, 70), (37, 53)]
    masks, boxes = random_batch(counts, sizes, seed=3)
    for out, exp in zip(paste_masks_reference(masks, boxes, counts, sizes, threshold=None), torchvision_paste(masks, boxes, counts, sizes)):
        assert torch.equal(out, exp)
    for out, exp in zip(paste_masks_reference(masks, boxes, counts, sizes, threshold=0.5), torchvision_paste(masks, boxes, counts, sizes)):
        assert torch.equal(out, exp > 0.5)


@pytest.mark.parametrize("threshold", [None, 0.5, 0.25, 0.8, -0.1, 1.0])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_matches_reference(device, threshold):
    counts, sizes = [2, 3], [(37, 53), (29, 40)]
    masks, boxes = random_batch(counts, sizes, device=device, seed=7)
    tri = paste_masks_triton(masks, boxes, counts, sizes, threshold=threshold)
    ref = paste_masks_reference(masks, boxes, counts, sizes, threshold=threshold)
    probs = paste_masks_reference(masks, boxes, counts, sizes, threshold=None)
    assert_matches(tri, probs, threshold)
    assert_matches(ref, probs, threshold)
    if device == "cpu":
        assert all(torch.equal(t, r) for t, r in zip(tri, ref))
    if threshold is not None and threshold < 0:  # outside every box: 0 > threshold
        assert all(t.all() for t in tri)


@pytest.mark.parametrize("m,padding", [(28, 1), (1, 1), (2, 0), (7, 2), (14, 1), (28, 0)])
@pytest.mark.parametrize("impl,device", IMPLS)
def test_other_mask_sizes_and_padding(impl, device, m, padding):
    counts, sizes = [3], [(33, 47)]
    masks, boxes = random_batch(counts, sizes, m=m, device=device, seed=m + 10 * padding)
    expected = torchvision_paste(masks, boxes, counts, sizes, padding=padding)
    for threshold in (None, 0.5):
        outs = impl(masks, boxes, counts, sizes, threshold=threshold, padding=padding)
        assert_matches(outs, expected, threshold, exact=device == "cpu")


# Boxes (x1, y1, x2, y2) in a 20 x 150 image: partly outside, negative coordinates whose
# expansion lies in (-1, 0) (truncation toward zero gives 0, floor would give -1), tiny,
# zero-size and inverted boxes, a box covering (and exceeding) the whole image, and a
# wide one that spans several BLOCK_W column chunks.
EDGE_BOXES = [
    [-12.0, -6.0, 25.0, 11.0],  # partly outside, top-left
    [130.0, 12.0, 171.5, 33.0],  # partly outside, bottom-right
    [-0.3, -0.2, 10.0, 9.0],  # expanded x1, y1 in (-1, 0)
    [-3.7, 4.0, 6.2, 14.9],  # negative, fractional
    [50.2, 7.1, 50.6, 7.4],  # tiny
    [60.0, 10.0, 60.0, 10.0],  # zero size
    [90.0, 15.0, 80.0, 5.0],  # inverted
    [-30.0, -30.0, 200.0, 60.0],  # covers the whole image
    [-9.5, 1.5, 148.5, 18.5],  # wide: several column chunks
    [0.0, 0.0, 149.0, 19.0],  # exactly the image
]


@pytest.mark.parametrize("threshold", [None, 0.5, 0.3])
@pytest.mark.parametrize("impl,device", IMPLS)
def test_edge_boxes(impl, device, threshold):
    boxes = torch.tensor(EDGE_BOXES, device=device)
    masks = torch.rand((len(EDGE_BOXES), 28, 28)).to(device)
    counts, sizes = [len(EDGE_BOXES)], [(20, 150)]
    outs = impl(masks, boxes, counts, sizes, threshold=threshold)
    assert_matches(outs, torchvision_paste(masks, boxes, counts, sizes), threshold, exact=device == "cpu")


@pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="Triton interpreter is off")
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_triton_bit_identical_to_torchvision_on_cpu(threshold):
    # Boxes from a few pixels up to larger than the image: both of torch's CPU resize
    # paths (output h + w <= 128 and > 128) and several column chunks per row band.
    counts, sizes = [4, 2], [(70, 140), (37, 53)]
    masks, boxes = random_batch(counts, sizes, seed=11, outside=0.3)
    boxes[0] = torch.tensor([-20.0, -10.0, 150.0, 75.0])
    boxes[1] = torch.tensor([3.0, 2.0, 130.0, 40.0])
    masks = torch.sigmoid((masks - 0.5) * 12)  # mask-like: flat regions and steep edges
    outs = paste_masks_triton(masks, boxes, counts, sizes, threshold=threshold)
    for out, prob in zip(outs, torchvision_paste(masks, boxes, counts, sizes)):
        assert torch.equal(out, prob if threshold is None else prob > threshold)


def test_truncation_toward_zero_for_negative_coordinates():
    box = torch.tensor([[-0.3, -0.2, 10.0, 9.0]])
    ex = expand_boxes(box, 30 / 28)
    assert (-1 < ex[0, :2]).all() and (ex[0, :2] < 0).all()
    assert pm._expanded_int_boxes(box, pm._box_scale(28, 1))[0, :2].tolist() == [0, 0]


def test_integer_boxes_match_torchvision_expand_boxes():
    g = torch.Generator().manual_seed(1)
    boxes = (torch.rand(20000, 4, generator=g) - 0.3) * 400
    boxes[:2000] = torch.randint(-50, 300, (2000, 4), generator=g).float()
    for m, padding in [(28, 1), (5, 1), (1, 2), (28, 0)]:
        scale = (m + 2 * padding) / m
        expected = expand_boxes(boxes, scale).to(torch.int64)
        assert torch.equal(pm._expanded_int_boxes(boxes, pm._box_scale(m, padding)), expected)


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("impl,device", IMPLS)
def test_boxes_wholly_outside_give_empty_planes(impl, device, threshold):
    boxes = torch.tensor(
        [
            [-40.0, -30.0, -10.0, -10.0],  # above-left
            [70.0, 5.0, 90.0, 20.0],  # right
            [5.0, 50.0, 20.0, 70.0],  # below
            [-30.0, 5.0, -10.0, 20.0],  # left
            [10.0, 10.0, 30.0, 30.0],  # inside, for contrast
        ],
        device=device,
    )
    masks = torch.rand((5, 28, 28)).to(device)
    outs = impl(masks, boxes, [5], [(40, 60)], threshold=threshold)
    assert not outs[0][:4].any()
    assert outs[0][4].any()
    assert_matches(outs, torchvision_paste(masks, boxes, [5], [(40, 60)]), threshold, exact=device == "cpu")


@pytest.mark.parametrize("impl,device", IMPLS)
def test_threshold_compares_in_float32(impl, device):
    # padding 0 and an expanded box of exactly M x M: the resize is an exact copy.
    p = float(np.float32(0.1))
    masks = torch.full((1, 28, 28), p, device=device)
    masks[0, :, :14] = float(np.float32(0.3))
    boxes = torch.tensor([[2.0, 3.0, 29.0, 30.0]], device=device)
    probs = impl(masks, boxes, [1], [(40, 40)], threshold=None, padding=0)[0]
    assert torch.equal(probs[0, 3:31, 2:30], masks[0])
    out = impl(masks, boxes, [1], [(40, 40)], threshold=0.1, padding=0)[0]
    assert torch.equal(out, probs > 0.1)
    assert out[0, 3:31, 2:16].all() and not out[0, :, 16:].any()


# ---------------------------------------------------------------------------------------------
# empty inputs, dtypes, shapes, devices, side effects
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("impl,device", IMPLS + [pytest.param(paste_masks, "cpu", id="dispatch-cpu")])
def test_no_detections(impl, device, threshold):
    masks = torch.zeros((0, 28, 28), device=device)
    boxes = torch.zeros((0, 4), device=device)
    outs = impl(masks, boxes, [0, 0], [(37, 53), (4, 5)], threshold=threshold)
    assert [tuple(o.shape) for o in outs] == [(0, 37, 53), (0, 4, 5)]
    assert all(o.dtype == (torch.float32 if threshold is None else torch.bool) for o in outs)
    assert all(o.device == masks.device for o in outs)
    assert impl(masks, boxes, [], [], threshold=threshold) == []


@pytest.mark.parametrize("impl,device", IMPLS)
def test_output_dtype_and_shapes(impl, device):
    counts, sizes = [0, 2, 1], [(5, 7), (37, 53), (12, 9)]
    masks, boxes = random_batch(counts, sizes, device=device, seed=5)
    outs = impl(masks, boxes, counts, sizes)  # default threshold 0.5
    assert len(outs) == 3
    for out, n, (h, w) in zip(outs, counts, sizes):
        assert out.dtype == torch.bool
        assert tuple(out.shape) == (n, h, w)
        assert out.device == masks.device


@pytest.mark.parametrize("impl,device", IMPLS)
def test_inputs_not_modified_and_non_contiguous_inputs(impl, device):
    counts, sizes = [2, 2], [(30, 41), (25, 33)]
    big_masks, big_boxes = random_batch([8], [(30, 41)], device=device, seed=9)
    masks = big_masks[::2]  # non-contiguous
    boxes = big_boxes[::2]
    masks_before, boxes_before = masks.clone(), boxes.clone()
    for threshold in (None, 0.5):
        outs = impl(masks, boxes, counts, sizes, threshold=threshold)
        assert torch.equal(masks, masks_before) and torch.equal(boxes, boxes_before)
        expected = impl(masks.contiguous(), boxes.contiguous(), counts, sizes, threshold=threshold)
        for o, e in zip(outs, expected):
            assert torch.equal(o, e)
        assert_matches(outs, torchvision_paste(masks, boxes, counts, sizes), threshold, exact=device == "cpu")


def _bad_inputs():
    m, b = torch.rand(2, 28, 28), torch.rand(2, 4) * 10
    ok = dict(masks=m, boxes=b, counts=[1, 1], image_sizes=[(10, 10), (8, 9)])
    cases = [
        ("masks", [[0.0]], TypeError, "masks must be a torch.Tensor"),
        ("masks", torch.rand(2, 1, 28, 28), ValueError, r"\[N, M, M\]"),
        ("masks", torch.rand(2, 28, 27), ValueError, r"\[N, M, M\]"),
        ("masks", torch.rand(2, 0, 0), ValueError, "M >= 1"),
        ("masks", torch.rand(2, 28, 28).double(), TypeError, "masks must be float32"),
        ("masks", torch.rand(3, 28, 28), ValueError, "same N"),
        ("boxes", b.numpy(), TypeError, "boxes must be a torch.Tensor"),
        ("boxes", torch.rand(2, 5), ValueError, r"\[N, 4\]"),
        ("boxes", b.half(), TypeError, "boxes must be float32"),
        ("counts", [2, 1], ValueError, "sum\\(counts\\)"),
        ("counts", [1.0, 1.0], TypeError, "counts"),
        ("counts", [3, -1], ValueError, "non-negative"),
        ("counts", 2, TypeError, "counts must be a sequence"),
        ("image_sizes", [(10, 10)], ValueError, "one entry per image"),
        ("image_sizes", [(10, 10), (0, 9)], ValueError, "positive"),
        ("image_sizes", [(10, 10), (8,)], ValueError, r"\(H, W\) pair"),
        ("image_sizes", [(10, 10), (8.0, 9)], TypeError, "height/width"),
        ("threshold", "0.5", TypeError, "threshold"),
        ("padding", -1, ValueError, "padding"),
        ("padding", 1.5, TypeError, "padding"),
    ]
    return ok, cases


@pytest.mark.parametrize("fn", [paste_masks_reference, paste_masks_triton, paste_masks], ids=["reference", "triton", "dispatch"])
def test_input_validation(fn):
    ok, cases = _bad_inputs()
    for key, value, exc, match in cases:
        kwargs = dict(ok, **{key: value})
        args = [kwargs.pop(k) for k in ("masks", "boxes", "counts", "image_sizes")]
        with pytest.raises(exc, match=match):
            fn(*args, **kwargs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        paste_masks_reference(torch.rand(1, 28, 28, device="cuda"), torch.rand(1, 4), [1], [(5, 5)])


def test_dispatcher_picks_by_device(monkeypatch):
    calls = []
    monkeypatch.setattr(pm, "paste_masks_triton", lambda *a, **k: calls.append("triton") or [])
    masks, boxes = random_batch([2], [(20, 30)], seed=2)
    outs = paste_masks(masks, boxes, [2], [(20, 30)], threshold=None)
    assert calls == []
    assert torch.equal(outs[0], paste_masks_reference(masks, boxes, [2], [(20, 30)], threshold=None)[0])
    if HAS_CUDA:
        paste_masks(masks.cuda(), boxes.cuda(), [2], [(20, 30)])
        assert calls == ["triton"]
        monkeypatch.setenv("ENGINE_FORCE_REFERENCE", "1")
        paste_masks(masks.cuda(), boxes.cuda(), [2], [(20, 30)])
        assert calls == ["triton"]


# ---------------------------------------------------------------------------------------------
# crop mode: each detection's paste region only
# ---------------------------------------------------------------------------------------------

CROP_IMPLS = IMPLS + [pytest.param(paste_masks, "cpu", id="dispatch-cpu")]


def assert_crops_equal_full(
    crops, full, counts, sizes, m=28, padding=1, boxes=None, outside_value=0, method="torchvision"
):
    """Each (data, table) crop equals the full plane on its region, the full plane is
    ``outside_value`` elsewhere, and the regions are the clipped expanded integer boxes
    (computed here with torchvision's expand_boxes) or, for "grid_sample", gs_region's."""
    assert len(crops) == len(full) == len(counts)
    det = 0
    for (data, table), f, n, (h_img, w_img) in zip(crops, full, counts, sizes):
        assert data.dim() == 1 and data.dtype == f.dtype and data.device == f.device
        assert table.dtype == torch.int64 and tuple(table.shape) == (n, 5) and table.device.type == "cpu"
        expected_offset = 0
        for j, (off, y0, x0, h, w) in enumerate(table.tolist()):
            assert off == expected_offset
            expected_offset += h * w
            if boxes is not None and method == "grid_sample":
                assert (y0, x0, h, w) == gs_region(boxes[det], m, h_img, w_img)
            elif boxes is not None:
                x1, y1, x2, y2 = _int_box(boxes[det].cpu(), m, padding)
                ey0, ey1 = max(y1, 0), min(y2 + 1, h_img)
                ex0, ex1 = max(x1, 0), min(x2 + 1, w_img)
                if ey1 > ey0 and ex1 > ex0:
                    assert (y0, x0, h, w) == (ey0, ex0, ey1 - ey0, ex1 - ex0)
                else:
                    assert h == w == 0
            crop = data[off : off + h * w].view(h, w)
            assert torch.equal(crop, f[j, y0 : y0 + h, x0 : x0 + w])
            rest = torch.ones_like(f[j], dtype=torch.bool)
            rest[y0 : y0 + h, x0 : x0 + w] = False
            assert (f[j][rest] == outside_value).all()  # the paste wrote nothing outside the region
            det += 1
        assert data.shape[0] == expected_offset


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_crop_mode_equals_full_mode_on_regions(impl, device, threshold):
    counts, sizes = [3, 0, 4], [(40, 60), (10, 10), (23, 150)]
    masks, boxes = random_batch(counts, sizes, device=device, seed=3, outside=0.6)
    full = paste_masks_reference(masks, boxes, counts, sizes, threshold=threshold)
    crops = impl(masks, boxes, counts, sizes, threshold=threshold, crop=True)
    assert_crops_equal_full(crops, full, counts, sizes, boxes=boxes)


@pytest.mark.parametrize("threshold", [None, 0.5, -0.1])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_crop_mode_edge_and_outside_boxes(impl, device, threshold):
    outside = [[-40.0, -30.0, -10.0, -10.0], [170.0, 5.0, 190.0, 15.0], [5.0, 25.0, 20.0, 40.0]]
    boxes = torch.tensor(EDGE_BOXES + outside, device=device)
    masks = torch.rand((len(boxes), 28, 28)).to(device)
    counts, sizes = [len(boxes)], [(20, 150)]
    full = paste_masks_reference(masks, boxes, counts, sizes, threshold=threshold)
    crops = impl(masks, boxes, counts, sizes, threshold=threshold, crop=True)
    fill = threshold is not None and threshold < 0
    assert_crops_equal_full(crops, full, counts, sizes, boxes=boxes, outside_value=fill)
    table = crops[0][1]
    assert (table[-3:, 3:] == 0).all()  # wholly outside: empty crops
    assert table[7, 1:].tolist() == [0, 0, 20, 150]  # covers the whole image


@pytest.mark.parametrize("m,padding", [(1, 1), (7, 2), (28, 0)])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_crop_mode_other_mask_sizes(impl, device, m, padding):
    counts, sizes = [3], [(33, 47)]
    masks, boxes = random_batch(counts, sizes, m=m, device=device, seed=m + 10 * padding)
    full = paste_masks_reference(masks, boxes, counts, sizes, threshold=0.5, padding=padding)
    crops = impl(masks, boxes, counts, sizes, threshold=0.5, padding=padding, crop=True)
    assert_crops_equal_full(crops, full, counts, sizes, m=m, padding=padding, boxes=boxes)


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_crop_mode_no_detections(impl, device, threshold):
    masks = torch.zeros((0, 28, 28), device=device)
    boxes = torch.zeros((0, 4), device=device)
    outs = impl(masks, boxes, [0, 0], [(37, 53), (4, 5)], threshold=threshold, crop=True)
    dtype = torch.float32 if threshold is None else torch.bool
    assert len(outs) == 2
    for data, table in outs:
        assert data.shape == (0,) and data.dtype == dtype and data.device == masks.device
        assert table.shape == (0, 5) and table.dtype == torch.int64
    assert impl(masks, boxes, [], [], threshold=threshold, crop=True) == []


@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_crop_mode_all_boxes_outside(impl, device):
    boxes = torch.tensor([[-40.0, -30.0, -10.0, -10.0], [70.0, 5.0, 90.0, 20.0]], device=device)
    masks = torch.rand((2, 28, 28)).to(device)
    (data, table), = impl(masks, boxes, [2], [(40, 60)], threshold=0.5, crop=True)
    assert data.numel() == 0 and (table[:, 3:] == 0).all() and (table[:, 0] == 0).all()


@pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="Triton interpreter is off")
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_triton_crop_mode_bit_identical_to_torchvision_on_cpu(threshold):
    counts, sizes = [3, 2], [(70, 140), (37, 53)]
    masks, boxes = random_batch(counts, sizes, seed=11, outside=0.3)
    boxes[0] = torch.tensor([-20.0, -10.0, 150.0, 75.0])
    masks = torch.sigmoid((masks - 0.5) * 12)
    crops = paste_masks_triton(masks, boxes, counts, sizes, threshold=threshold, crop=True)
    tv = torchvision_paste(masks, boxes, counts, sizes)
    assert_crops_equal_full(crops, [p if threshold is None else p > threshold for p in tv], counts, sizes, boxes=boxes)


def test_crop_tables_match_crop_mode_and_validate():
    counts, sizes = [3, 0, 4], [(40, 60), (10, 10), (23, 150)]
    masks, boxes = random_batch(counts, sizes, seed=4, outside=0.6)
    tables = pm.crop_tables(boxes, counts, sizes, mask_size=28)
    crops = paste_masks_reference(masks, boxes, counts, sizes, crop=True)
    assert all(torch.equal(t, c[1]) for t, c in zip(tables, crops))
    with pytest.raises(ValueError, match="mask_size"):
        pm.crop_tables(boxes, counts, sizes, mask_size=0)
    with pytest.raises(ValueError, match="sum\\(counts\\)"):
        pm.crop_tables(boxes, [1], [(5, 5)])


@pytest.mark.parametrize("fn", [paste_masks_reference, paste_masks_triton, paste_masks], ids=["reference", "triton", "dispatch"])
def test_crop_must_be_bool(fn):
    with pytest.raises(TypeError, match="crop must be a bool"):
        fn(torch.rand(1, 28, 28), torch.tensor([[1.0, 1.0, 5.0, 5.0]]), [1], [(8, 8)], crop="yes")


def test_dispatcher_passes_crop(monkeypatch):
    calls = []
    monkeypatch.setattr(pm, "paste_masks_triton", lambda *a, **k: calls.append(k["crop"]) or [])
    monkeypatch.setenv("ENGINE_FORCE_TRITON", "1")
    masks, boxes = random_batch([2], [(20, 30)], seed=2)
    paste_masks(masks, boxes, [2], [(20, 30)], crop=True)
    assert calls == [True]


# ---------------------------------------------------------------------------------------------
# method="grid_sample": Detectron2 / mmdetection's paste
# ---------------------------------------------------------------------------------------------


def grid_sample_oracle(masks, boxes, counts, sizes):
    """Per-image float32 [n, H, W]: Detectron2's ``_do_paste_mask`` with ``skip_empty=False``
    (what it runs on a GPU, mmdet likewise): F.grid_sample at every pixel centre of the image,
    the float box mapped to [-1, 1], bilinear, zeros outside the mask, align_corners=False."""
    outs, start = [], 0
    for n, (h, w) in zip(counts, sizes):
        m, b = masks[start : start + n], boxes[start : start + n]
        start += n
        if n == 0:
            outs.append(torch.zeros((0, h, w), device=masks.device))
            continue
        x0, y0, x1, y1 = torch.split(b, 1, dim=1)
        img_y = torch.arange(0, h, device=masks.device, dtype=torch.float32) + 0.5
        img_x = torch.arange(0, w, device=masks.device, dtype=torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack([img_x[:, None, :].expand(n, h, w), img_y[:, :, None].expand(n, h, w)], dim=3)
        outs.append(F.grid_sample(m[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0])
    return outs


def gs_region(box, m, h_img, w_img):
    """(y0, x0, h, w) of a detection's "grid_sample" paste region: the float box widened by half
    a mask cell ((x2 - x1) / 2M, float32), integer hull grown by one pixel, clipped to the image.
    Empty: h = w = 0 (corner clamped); (0, 0, 0, 0) for boxes with x2 <= x1 or y2 <= y1."""
    b = box.detach().cpu().to(torch.float32)
    x1, y1, x2, y2 = b.unbind()
    if not (torch.isfinite(b).all() and x2 > x1 and y2 > y1):
        return (0, 0, 0, 0)
    two_m = torch.tensor(2.0 * m)

    def span(lo, hi, size):
        half = (hi - lo) / two_m
        a = min(max(math.floor(float(lo - half)) - 1, 0), size)
        e = min(max(math.ceil(float(hi + half)) + 1, 0), size)
        return a, max(e - a, 0)

    y0, h = span(y1, y2, h_img)
    x0, w = span(x1, x2, w_img)
    return (y0, x0, h, w) if h and w else (y0, x0, 0, 0)


# Boxes in a 31 x 57 image (odd sizes): inside, partly outside on each side, sub-pixel and
# tiny, edges on pixel centres (x + 0.5) and on integers, one larger than the image, and wide
# ones whose nonzero halo (half a mask cell) exceeds one pixel.
GS_BOXES = [
    [4.3, 3.7, 25.2, 20.9],  # inside
    [-6.5, -4.2, 12.8, 9.1],  # partly outside, top-left
    [44.6, 22.3, 70.1, 40.9],  # partly outside, bottom-right
    [20.2, 10.6, 20.7, 11.0],  # sub-pixel (0.5 x 0.4)
    [30.45, 15.5, 30.5, 15.52],  # tiny
    [10.5, 5.5, 18.5, 14.5],  # edges on pixel centres
    [2.0, 1.0, 30.0, 29.0],  # integer edges, 28 x 28
    [-20.0, -15.0, 80.0, 50.0],  # larger than the image
    [3.2, 2.6, 53.9, 28.1],  # wide: 50 px -> halo ~0.9 px (M = 28), ~3.6 px (M = 7)
]
GS_SIZES = [(31, 57)]


def gs_batch(m, *, device="cpu", seed=0, mask_like=True):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand((len(GS_BOXES), m, m), generator=g)
    if mask_like:  # flat regions, steep edges, exact 0 and 1 in float32
        masks = torch.sigmoid((masks - 0.5) * 40)
    return masks.to(device), torch.tensor(GS_BOXES, device=device)


@pytest.mark.parametrize("m", [28, 1, 2, 7, 14])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_grid_sample_matches_grid_sample_over_the_whole_image(impl, device, m):
    masks, boxes = gs_batch(m, device=device, seed=m)
    counts = [len(GS_BOXES)]
    expected = grid_sample_oracle(masks, boxes, counts, GS_SIZES)
    exact = device == "cpu" or impl is paste_masks_reference
    for threshold in (None, 0.5):
        outs = impl(masks, boxes, counts, GS_SIZES, threshold=threshold, method="grid_sample")
        assert_matches(outs, expected, threshold, exact=exact, method="grid_sample")
        assert outs[0].any()


@pytest.mark.parametrize("threshold", [None, 0.5, 0.3])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_grid_sample_batch_of_images(impl, device, threshold):
    # Several images (odd sizes, one without detections), random boxes partly outside, random
    # probabilities; one box far larger than the image.
    counts, sizes = [3, 0, 2], [(40, 61), (9, 7), (23, 31)]
    masks, boxes = random_batch(counts, sizes, device=device, seed=21, outside=0.4)
    boxes[1] = torch.tensor([-30.0, -20.0, 110.0, 70.0])
    outs = impl(masks, boxes, counts, sizes, threshold=threshold, method="grid_sample")
    assert [tuple(o.shape) for o in outs] == [(n, h, w) for n, (h, w) in zip(counts, sizes)]
    exact = device == "cpu" or impl is paste_masks_reference
    assert_matches(outs, grid_sample_oracle(masks, boxes, counts, sizes), threshold, exact=exact, method="grid_sample")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_grid_sample_triton_matches_reference_across_tiles(device):
    # An image taller than BLOCK_H and wider than BLOCK_W (several row bands and column chunks),
    # big boxes with M = 7 (halos of several pixels), random probabilities including negatives.
    counts, sizes = [3], [(70, 140)]
    boxes = torch.tensor([[-20.0, -10.0, 150.0, 75.0], [3.3, 2.1, 130.4, 40.2], [60.5, 33.5, 61.5, 34.5]])
    masks = torch.randn((3, 7, 7), generator=torch.Generator().manual_seed(4)) * 2
    masks, boxes = masks.to(device), boxes.to(device)
    expected = grid_sample_oracle(masks, boxes, counts, sizes)
    for threshold in (None, 0.5):
        tri = paste_masks_triton(masks, boxes, counts, sizes, threshold=threshold, method="grid_sample")
        ref = paste_masks_reference(masks, boxes, counts, sizes, threshold=threshold, method="grid_sample")
        assert_matches(ref, expected, threshold, exact=True, method="grid_sample")
        assert_matches(tri, expected, threshold, exact=device == "cpu", method="grid_sample")


def test_grid_sample_halo_reaches_beyond_one_pixel_and_stays_in_the_region():
    # grid_sample fades the mask's border cells out over half a mask cell outside the float box:
    # more than one pixel for boxes wider than 2M. The paste region holds every nonzero pixel;
    # Detectron2's CPU region [floor(x1) - 1, ceil(x2) + 1) would cut this halo off.
    m = 7
    masks, boxes = gs_batch(m, seed=5, mask_like=False)
    masks = masks + 0.5  # no zero cells: the halo is nonzero all around
    (h_img, w_img), = GS_SIZES
    full = grid_sample_oracle(masks, boxes, [len(GS_BOXES)], GS_SIZES)[0]
    tables = pm.crop_tables(boxes, [len(GS_BOXES)], GS_SIZES, mask_size=m, method="grid_sample")[0]
    beyond_d2_cpu = 0
    for plane, box, (off, y0, x0, h, w) in zip(full, boxes, tables.tolist()):
        assert (y0, x0, h, w) == gs_region(box, m, h_img, w_img)
        inside = torch.zeros_like(plane, dtype=torch.bool)
        inside[y0 : y0 + h, x0 : x0 + w] = True
        assert not plane[~inside].any()
        x1, y1, x2, y2 = box.tolist()
        d2 = torch.zeros_like(inside)
        d2_rows = slice(max(math.floor(y1) - 1, 0), min(math.ceil(y2) + 1, h_img))
        d2[d2_rows, max(math.floor(x1) - 1, 0) : min(math.ceil(x2) + 1, w_img)] = True
        assert not (d2 & ~inside).any()  # the region contains Detectron2's CPU region
        beyond_d2_cpu += int(plane[~d2].ne(0).sum())
    assert beyond_d2_cpu > 0
    # Thresholded at 0.5 with probabilities in [0, 1], nothing outside the float box is set.
    binary = paste_masks_reference(masks.clamp(max=1.0), boxes, [len(GS_BOXES)], GS_SIZES, method="grid_sample")[0]
    for plane, (x1, y1, x2, y2) in zip(binary, boxes.tolist()):
        ys, xs = torch.nonzero(plane, as_tuple=True)
        assert ((xs + 0.5 >= x1) & (xs + 0.5 <= x2) & (ys + 0.5 >= y1) & (ys + 0.5 <= y2)).all()


@pytest.mark.parametrize("threshold", [None, 0.5, 0.0, -0.1])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_grid_sample_crop_mode_equals_full_mode_on_regions(impl, device, threshold):
    m = 7
    masks, boxes = gs_batch(m, device=device, seed=8)
    extra = torch.tensor([[-40.0, -30.0, -10.0, -10.0], [160.0, 5.0, 180.0, 20.0], [5.0, 5.0, 5.0, 9.0]], device=device)
    boxes = torch.cat([boxes, extra])
    masks = torch.cat([masks, masks[:3]])
    counts, sizes = [6, 0, len(boxes) - 6], [GS_SIZES[0], (5, 5), (23, 150)]
    full = paste_masks_reference(masks, boxes, counts, sizes, threshold=threshold, method="grid_sample")
    crops = impl(masks, boxes, counts, sizes, threshold=threshold, crop=True, method="grid_sample")
    fill = threshold is not None and threshold <= 0  # outside: 0 >= threshold
    assert_crops_equal_full(crops, full, counts, sizes, m=m, boxes=boxes, outside_value=fill, method="grid_sample")
    table = crops[2][1]
    assert (table[-3:, 3:] == 0).all()  # outside the image, zero-size: empty crops
    tables = pm.crop_tables(boxes, counts, sizes, mask_size=m, method="grid_sample")
    assert all(torch.equal(t, c[1]) for t, c in zip(tables, crops))


@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_grid_sample_threshold_is_greater_or_equal(impl, device):
    # M = 32 and a 32 x 32 box on integer corners: every grid step is exact, so each pixel
    # samples one mask cell with weight 1 and the paste is an exact copy of the mask.
    half, p3 = 0.5, float(np.float32(0.3))
    masks = torch.full((1, 32, 32), 0.25, device=device)
    masks[0, :, :10] = half
    masks[0, :, 10:20] = p3
    boxes = torch.tensor([[4.0, 2.0, 36.0, 34.0]], device=device)
    kw = dict(method="grid_sample")
    probs = impl(masks, boxes, [1], [(40, 45)], threshold=None, **kw)[0]
    assert torch.equal(probs[0, 2:34, 4:36], masks[0])
    out = impl(masks, boxes, [1], [(40, 45)], threshold=0.5, **kw)[0]
    assert out[0, 2:34, 4:14].all() and out.sum() == 32 * 10  # exactly 0.5 is foreground
    out = impl(masks, boxes, [1], [(40, 45)], threshold=0.3, **kw)[0]
    assert torch.equal(out, probs >= float(np.float32(0.3))) and out.sum() == 32 * 20
    # torchvision's method keeps ">": at threshold 0 the outside is False there, True here.
    assert impl(masks, boxes, [1], [(40, 45)], threshold=0.0, **kw)[0].all()
    assert not impl(masks, boxes, [1], [(40, 45)], threshold=0.0)[0][0, 0, 0]


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_grid_sample_empty_and_invalid_boxes(impl, device, threshold):
    nan, inf = float("nan"), float("inf")
    boxes = torch.tensor(
        [
            [10.0, 5.0, 10.0, 15.0],  # zero width
            [10.0, 5.0, 20.0, 5.0],  # zero height
            [20.0, 15.0, 10.0, 5.0],  # inverted
            [nan, 5.0, 20.0, 15.0],
            [-inf, 5.0, 20.0, 15.0],
            [-40.0, -30.0, -10.0, -10.0],  # wholly outside
            [5.0, 5.0, 20.0, 15.0],  # valid, for contrast
        ],
        device=device,
    )
    masks = (torch.rand((7, 28, 28)) + 0.5).to(device)
    outs = impl(masks, boxes, [7], [(24, 33)], threshold=threshold, method="grid_sample")
    assert not outs[0][:6].any() and outs[0][6].any()
    (data, table), = impl(masks, boxes, [7], [(24, 33)], threshold=threshold, crop=True, method="grid_sample")
    assert (table[:6, 3:] == 0).all() and (table[:5, 1:3] == 0).all() and table[6, 3:].prod() > 0
    assert data.numel() == int(table[6, 3] * table[6, 4])


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_grid_sample_no_detections(impl, device, threshold):
    masks = torch.zeros((0, 28, 28), device=device)
    boxes = torch.zeros((0, 4), device=device)
    dtype = torch.float32 if threshold is None else torch.bool
    outs = impl(masks, boxes, [0, 0], [(37, 53), (4, 5)], threshold=threshold, method="grid_sample")
    assert [tuple(o.shape) for o in outs] == [(0, 37, 53), (0, 4, 5)]
    assert all(o.dtype == dtype and o.device == masks.device for o in outs)
    crops = impl(masks, boxes, [0, 0], [(37, 53), (4, 5)], threshold=threshold, crop=True, method="grid_sample")
    for data, table in crops:
        assert data.shape == (0,) and data.dtype == dtype and table.shape == (0, 5)
    assert impl(masks, boxes, [], [], threshold=threshold, method="grid_sample") == []


@pytest.mark.parametrize("impl,device", CROP_IMPLS)
def test_grid_sample_inputs_not_modified_and_non_contiguous(impl, device):
    big_masks, big_boxes = random_batch([8], [(30, 41)], m=14, device=device, seed=9)
    masks, boxes = big_masks[::2], big_boxes[::2]  # non-contiguous
    masks_before, boxes_before = masks.clone(), boxes.clone()
    counts, sizes = [2, 2], [(30, 41), (25, 33)]
    for crop in (False, True):
        outs = impl(masks, boxes, counts, sizes, threshold=None, crop=crop, method="grid_sample")
        assert torch.equal(masks, masks_before) and torch.equal(boxes, boxes_before)
        kw = dict(threshold=None, crop=crop, method="grid_sample")
        expected = impl(masks.contiguous(), boxes.contiguous(), counts, sizes, **kw)
        for o, e in zip(outs, expected):
            assert all(torch.equal(a, b) for a, b in zip(o, e)) if crop else torch.equal(o, e)
    exact = device == "cpu" or impl is paste_masks_reference
    full = impl(masks, boxes, counts, sizes, threshold=None, method="grid_sample")
    assert_matches(full, grid_sample_oracle(masks, boxes, counts, sizes), None, exact=exact, method="grid_sample")


@pytest.mark.parametrize(
    "fn", [paste_masks_reference, paste_masks_triton, paste_masks], ids=["reference", "triton", "dispatch"]
)
def test_method_validation(fn):
    masks, boxes = torch.rand(1, 28, 28), torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    for bad in ("detectron2", "GRID_SAMPLE", "", "bilinear"):
        with pytest.raises(ValueError, match=r"unknown paste method .*'torchvision', 'grid_sample'"):
            fn(masks, boxes, [1], [(8, 8)], method=bad)
    for bad in (None, 1, ["grid_sample"]):
        with pytest.raises(TypeError, match="method must be a str"):
            fn(masks, boxes, [1], [(8, 8)], method=bad)
    with pytest.raises(ValueError, match="padding applies only to method='torchvision'"):
        fn(masks, boxes, [1], [(8, 8)], method="grid_sample", padding=1)
    # padding=None means each method's own (1 and 0); explicit 0 is accepted for grid_sample.
    ref = paste_masks_reference(masks, boxes, [1], [(8, 8)], method="grid_sample")[0]
    assert torch.equal(fn(masks, boxes, [1], [(8, 8)], method="grid_sample", padding=0)[0], ref)
    default = paste_masks_reference(masks, boxes, [1], [(8, 8)])[0]
    assert torch.equal(default, paste_masks_reference(masks, boxes, [1], [(8, 8)], padding=1)[0])


def test_crop_tables_method_validation():
    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="unknown paste method"):
        pm.crop_tables(boxes, [1], [(8, 8)], method="mmdet")
    with pytest.raises(ValueError, match="padding applies only"):
        pm.crop_tables(boxes, [1], [(8, 8)], method="grid_sample", padding=2)


def test_dispatcher_passes_method(monkeypatch):
    calls = []
    monkeypatch.setattr(pm, "paste_masks_triton", lambda *a, **k: calls.append(k["method"]) or [])
    monkeypatch.setenv("ENGINE_FORCE_TRITON", "1")
    masks, boxes = random_batch([2], [(20, 30)], seed=2)
    paste_masks(masks, boxes, [2], [(20, 30)], method="grid_sample")
    paste_masks(masks, boxes, [2], [(20, 30)])
    assert calls == ["grid_sample", "torchvision"]
    monkeypatch.setenv("ENGINE_FORCE_REFERENCE", "1")
    outs = paste_masks(masks, boxes, [2], [(20, 30)], threshold=None, method="grid_sample")
    assert torch.equal(outs[0], grid_sample_oracle(masks, boxes, [2], [(20, 30)])[0])


# ---------------------------------------------------------------------------------------------
# CUDA launch tile under the interpreter (issue 11)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="needs the Triton interpreter")
@pytest.mark.parametrize("crop", [False, True])
@pytest.mark.parametrize("method, m", [("torchvision", 28), ("grid_sample", 7)])
def test_cuda_tile_under_interpreter(monkeypatch, method, m, crop):
    """The CUDA launch tile (``_tile``, shorter than the interpreter's) gives bit-identical results."""
    block_h, block_w, _ = pm._tile()
    assert pm._interpreter_tile()[0] > block_h  # the test must actually change the tile
    # Several row bands and column chunks of both tiles; one box with h + w > 128 (torch's
    # large-output CPU path for "torchvision"), others partly outside the image.
    counts, sizes = [3, 2], [(70, 140), (2 * block_h + 3, block_w + 5)]
    masks, boxes = random_batch(counts, sizes, m, seed=11, outside=0.3)
    boxes[0] = torch.tensor([-20.0, -10.0, 150.0, 75.0])
    for threshold in (None, 0.5):
        kw = dict(threshold=threshold, crop=crop, method=method)
        with_interpreter_tile = paste_masks_triton(masks, boxes, counts, sizes, **kw)
        with monkeypatch.context() as mp:
            mp.setattr(pm, "_interpreter_tile", pm._tile)
            with_cuda_tile = paste_masks_triton(masks, boxes, counts, sizes, **kw)
        reference = paste_masks_reference(masks, boxes, counts, sizes, **kw)
        for cuda_out, interp_out, ref_out in zip(with_cuda_tile, with_interpreter_tile, reference):
            if crop:
                (cuda_out, cuda_table), (interp_out, interp_table), (ref_out, ref_table) = cuda_out, interp_out, ref_out
                assert torch.equal(cuda_table, interp_table) and torch.equal(cuda_table, ref_table)
            assert cuda_out.dtype == interp_out.dtype == ref_out.dtype
            assert torch.equal(cuda_out, interp_out)
            assert torch.equal(cuda_out, ref_out)  # the interpreter is bit-identical to torch's CPU kernels
