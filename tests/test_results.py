"""Result formats (engine.results) and chunked paste-back (engine.postprocess).

Checks: BoxMasks against the full-size masks it stands for, COCO RLE against
pycocotools.mask.encode of the full masks, to_coco / to_numpy / to_dict for both mask
forms, and to_original_frame with mask_format="box" and with tiny chunks against the
plain unchunked paste.
"""

import json
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import engine.postprocess as pp
from conftest import kernel_devices
from engine.config import MaskRCNNConfig
from engine.postprocess import plan_paste_chunks, to_original_frame
from engine.results import BoxMasks, _crop_rle_counts
from engine.roi_heads import ImageDetections
from kernels.paste_masks import paste_masks_reference


def encode_full(mask: torch.Tensor) -> dict:
    """What the COCO format asks for: pycocotools.mask.encode on Fortran uint8 [H, W, 1]."""
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)[:, :, None]))[0]
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def random_detections(counts, sizes, *, seed=0, outside=0.4, m=28):
    """ImageDetections in a resized frame (half size), mask probabilities, and the sizes."""
    g = torch.Generator().manual_seed(seed)
    dets, probs, resized = [], [], []
    for n, (h, w) in zip(counts, sizes):
        rh, rw = (h + 1) // 2, (w + 1) // 2
        x1 = (torch.rand(n, generator=g) * (1 + outside) - outside) * rw
        y1 = (torch.rand(n, generator=g) * (1 + outside) - outside) * rh
        bw = torch.rand(n, generator=g) * 0.7 * rw + 0.5
        bh = torch.rand(n, generator=g) * 0.7 * rh + 0.5
        boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], 1)
        scores = torch.sort(torch.rand(n, generator=g), descending=True).values
        labels = torch.randint(1, 91, (n,), generator=g)
        dets.append(ImageDetections(boxes=boxes, scores=scores, labels=labels))
        probs.append(torch.sigmoid((torch.rand((n, m, m), generator=g) - 0.5) * 10))
        resized.append((rh, rw))
    return dets, probs, resized


def make_box_masks(full: torch.Tensor, regions) -> BoxMasks:
    """BoxMasks from full masks and chosen regions (y0, x0, h, w) that contain every True pixel."""
    table, crops, off = [], [], 0
    for j, (y0, x0, h, w) in enumerate(regions):
        table.append([off, y0, x0, h, w])
        crops.append(full[j, y0 : y0 + h, x0 : x0 + w].reshape(-1))
        off += h * w
    data = torch.cat(crops) if crops else torch.zeros(0, dtype=torch.bool)
    return BoxMasks(data, torch.tensor(table, dtype=torch.int64).reshape(-1, 5), tuple(full.shape[1:]))


CONFIG = MaskRCNNConfig()
COUNTS = [4, 0, 3]
SIZES = [(37, 53), (20, 30), (29, 41)]


# ---------------------------------------------------------------------------------------------
# BoxMasks
# ---------------------------------------------------------------------------------------------


def test_box_masks_crop_full_area():
    full = torch.zeros((3, 10, 12), dtype=torch.bool)
    full[0, 2:5, 3:9] = torch.rand(3, 6) > 0.3
    full[2, 0:10, 11] = True
    regions = [(1, 2, 5, 8), (0, 0, 0, 0), (0, 10, 10, 2)]
    bm = make_box_masks(full, regions)
    assert len(bm) == 3 and bm.shape == (3, 10, 12) and bm.dtype == torch.bool
    assert bm.image_size == (10, 12) and bm.nbytes == 40 + 0 + 20
    assert torch.equal(bm.regions, torch.tensor(regions))
    assert torch.equal(bm.crop(0), full[0, 1:6, 2:10])
    assert bm.crop(1).shape == (0, 0)
    assert torch.equal(bm.crop(-1), full[2, :, 10:12])
    assert torch.equal(bm.to_full(), full)
    assert torch.equal(bm.to_full([2, 0]), full[[2, 0]])
    assert torch.equal(bm.to_full(torch.tensor([1])), full[[1]])
    assert bm.to_full([]).shape == (0, 10, 12)
    assert torch.equal(bm.area(), full.sum((1, 2)))
    assert "n=3" in repr(bm)
    with pytest.raises(IndexError):
        bm.crop(3)
    with pytest.raises(IndexError):
        bm.to_full([0, 5])


def test_box_masks_empty_and_from_full():
    empty = BoxMasks(torch.zeros(0, dtype=torch.bool), torch.zeros((0, 5), dtype=torch.int64), (4, 5))
    assert len(empty) == 0 and empty.to_full().shape == (0, 4, 5) and empty.area().shape == (0,)
    assert empty.to_rle() == []
    full = torch.rand((5, 9, 7)) > 0.8
    full[1] = False
    full[3] = True
    bm = BoxMasks.from_full(full)
    assert torch.equal(bm.to_full(), full)
    assert bm.regions[1].tolist() == [0, 0, 0, 0] and bm.regions[3].tolist() == [0, 0, 9, 7]
    assert BoxMasks.from_full(torch.zeros((0, 3, 4), dtype=torch.bool)).shape == (0, 3, 4)


def test_box_masks_validation():
    data = torch.zeros(6, dtype=torch.bool)
    with pytest.raises(TypeError, match="torch.bool"):
        BoxMasks(data.float(), torch.zeros((0, 5), dtype=torch.int64), (3, 3))
    with pytest.raises(TypeError, match="int64"):
        BoxMasks(data, torch.zeros((1, 4), dtype=torch.int64), (3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        BoxMasks(data, torch.tensor([[0, 2, 0, 2, 3]]), (3, 3))  # rows 2..4 of 3
    with pytest.raises(ValueError, match="does not fit"):
        BoxMasks(data, torch.tensor([[1, 0, 0, 2, 3]]), (3, 3))  # 1 + 6 > 6 elements
    with pytest.raises(ValueError, match="positive"):
        BoxMasks(data, torch.zeros((0, 5), dtype=torch.int64), (0, 3))


def test_crop_rle_equals_pycocotools_encode():
    rng = np.random.default_rng(0)
    for _ in range(400):
        height, width = (int(v) for v in rng.integers(1, 8, 2))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = rng.random((h, w)) < rng.random()
        full = torch.zeros((1, height, width), dtype=torch.bool)
        full[0, y0 : y0 + h, x0 : x0 + w] = torch.from_numpy(crop)
        bm = make_box_masks(full, [(y0, x0, h, w)])
        assert bm.rle(0) == encode_full(full[0]), (height, width, y0, x0, crop)
        counts = _crop_rle_counts(crop, y0, x0, height, width)
        assert sum(counts) == height * width
        assert torch.equal(bm.to_full(), full) and int(bm.area()[0]) == int(full.sum())


def test_rle_large_image_without_full_masks():
    # 100 box-local masks on an 8000 x 6000 image: 4.8 GB full-size, a few MB here.
    g = torch.Generator().manual_seed(0)
    height, width, n = 6000, 8000, 100
    table, off = [], 0
    for _ in range(n):
        h, w = (int(v) for v in torch.randint(1, 120, (2,), generator=g))
        y0, x0 = int(torch.randint(0, height - h + 1, (1,), generator=g)), int(torch.randint(0, width - w + 1, (1,), generator=g))
        table.append([off, y0, x0, h, w])
        off += h * w
    data = torch.rand(off, generator=g) > 0.5
    bm = BoxMasks(data, torch.tensor(table), (height, width))
    assert bm.nbytes < 2_000_000
    rles = bm.to_rle()
    assert len(rles) == n and rles[0]["size"] == [height, width]
    for i in (0, 57):  # spot-check against the full mask
        assert rles[i] == encode_full(bm.to_full([i])[0])
    assert torch.equal(torch.tensor([int(mask_utils.area(r)) for r in rles]), bm.area())


# ---------------------------------------------------------------------------------------------
# Detections exports
# ---------------------------------------------------------------------------------------------


def _detections(mask_format):
    dets, probs, resized = random_detections([5], [(31, 44)], seed=2)
    return to_original_frame(
        dets, probs, image_sizes=resized, original_sizes=[(31, 44)], config=CONFIG, mask_format=mask_format
    )[0]


@pytest.mark.parametrize("mask_format", ["full", "box"])
def test_to_coco(mask_format):
    det = _detections(mask_format)
    full = _detections("full").masks
    results = det.to_coco(np.int64(42))
    assert len(results) == len(det) == 5
    for i, r in enumerate(results):
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert r["image_id"] == 42 and type(r["image_id"]) is int
        assert r["category_id"] == int(det.labels[i])
        x1, y1, x2, y2 = det.boxes[i].tolist()
        assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert all(type(v) is float for v in r["bbox"]) and type(r["score"]) is float
        assert r["score"] == pytest.approx(float(det.scores[i]))
        assert r["segmentation"] == encode_full(full[i])
        assert isinstance(r["segmentation"]["counts"], str)
    json.dumps(results)
    # the whole-batch encode of the COCO format gives the same
    batch = mask_utils.encode(np.asfortranarray(full.numpy().transpose(1, 2, 0).astype(np.uint8)))
    assert [r["segmentation"]["counts"] for r in results] == [b["counts"].decode() for b in batch]


def test_to_coco_category_ids():
    det = _detections("box")
    labels = det.labels.tolist()
    mapping = {lab: 1000 + lab for lab in labels}
    assert [r["category_id"] for r in det.to_coco(1, category_ids=mapping)] == [1000 + lab for lab in labels]
    seq = list(range(0, 300, 2))
    assert [r["category_id"] for r in det.to_coco(1, category_ids=seq)] == [2 * lab for lab in labels]
    assert [r["category_id"] for r in det.to_coco(1, category_ids=np.arange(100) + 7)] == [lab + 7 for lab in labels]
    with pytest.raises(ValueError, match="no entry in category_ids"):
        det.to_coco(1, category_ids={})
    with pytest.raises(ValueError, match="no entry in category_ids"):
        det.to_coco(1, category_ids=[1, 2])


def test_pycocotools_missing(monkeypatch):
    det = _detections("full")
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        det.to_coco(1)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        det.to_dict()
    assert det.to_numpy()["masks"].shape == (5, 31, 44)  # no pycocotools needed


@pytest.mark.parametrize("mask_format", ["full", "box"])
def test_to_numpy_and_to_dict(mask_format):
    det = _detections(mask_format)
    full = _detections("full").masks
    arrays = det.to_numpy()
    assert set(arrays) == {"boxes", "scores", "labels", "masks"}
    assert arrays["boxes"].dtype == np.float32 and arrays["boxes"].shape == (5, 4)
    assert arrays["scores"].dtype == np.float32 and arrays["labels"].dtype == np.int64
    assert arrays["masks"].dtype == np.bool_ and np.array_equal(arrays["masks"], full.numpy())
    d = det.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["image_size"] == [31, 44]
    assert d["boxes"] == det.boxes.tolist() and d["labels"] == det.labels.tolist()
    assert d["masks"] == [encode_full(m) for m in full]
    assert torch.equal(det.full_masks(), full)


def test_empty_detections_exports():
    dets, probs, resized = random_detections([0], [(12, 9)])
    for fmt in ("full", "box"):
        det = to_original_frame(dets, probs, image_sizes=resized, original_sizes=[(12, 9)], config=CONFIG, mask_format=fmt)[0]
        assert det.to_coco(3) == []
        assert det.to_numpy()["masks"].shape == (0, 12, 9)
        assert det.to_dict()["masks"] == [] and det.to_dict()["image_size"] == [12, 9]
        assert len(det.to("cpu")) == 0


# ---------------------------------------------------------------------------------------------
# to_original_frame: mask formats and chunks
# ---------------------------------------------------------------------------------------------


def _frame(mask_format="full", max_chunk_bytes=None, seed=0, counts=COUNTS, sizes=SIZES):
    dets, probs, resized = random_detections(counts, sizes, seed=seed)
    return to_original_frame(
        dets, probs, image_sizes=resized, original_sizes=sizes, config=CONFIG,
        mask_format=mask_format, max_chunk_bytes=max_chunk_bytes,
    )


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.image_size == y.image_size
        for name in ("boxes", "scores", "labels"):
            assert torch.equal(getattr(x, name), getattr(y, name))
        assert torch.equal(x.full_masks(), y.full_masks())


def test_box_format_equals_full_format():
    full = _frame("full")
    box = _frame("box")
    assert all(isinstance(d.masks, BoxMasks) for d in box)
    assert all(d.masks.dtype == torch.bool and isinstance(d.masks, torch.Tensor) for d in full)
    _assert_same(full, box)
    # the unchunked paste, as before this change
    dets, probs, resized = random_detections(COUNTS, SIZES)
    boxes = torch.cat([pp.rescale_boxes(d.boxes, s, o) for d, s, o in zip(dets, resized, SIZES)])
    expected = paste_masks_reference(torch.cat(probs), boxes, COUNTS, SIZES, threshold=CONFIG.mask_threshold)
    assert all(torch.equal(d.masks, e) for d, e in zip(full, expected))
    for d in box:  # the crops are the paste regions, much smaller than the image
        assert d.masks.nbytes <= len(d) * d.image_size[0] * d.image_size[1]


@pytest.mark.parametrize("mask_format", ["full", "box"])
@pytest.mark.parametrize("parts", [None, 2, 3])
def test_chunked_paste_equals_unchunked(mask_format, parts, monkeypatch):
    calls = []
    real = pp.paste_masks
    monkeypatch.setattr(pp, "paste_masks", lambda *a, **k: calls.append(list(a[2])) or real(*a, **k))
    expected = _frame(mask_format)
    assert len(calls) == 1
    calls.clear()
    if mask_format == "full":
        total = sum(len(d) * d.image_size[0] * d.image_size[1] for d in expected)
    else:
        total = sum(d.masks.nbytes for d in expected)
    max_chunk_bytes = 1 if parts is None else total // parts  # None: one detection per launch
    got = _frame(mask_format, max_chunk_bytes=max_chunk_bytes)
    _assert_same(got, expected)
    assert len(calls) >= (sum(COUNTS) if parts is None else parts)
    assert all(sum(c) >= 1 for c in calls) and sum(sum(c) for c in calls) == sum(COUNTS)
    if parts is None:
        assert all(sum(c) == 1 for c in calls)


@pytest.mark.parametrize("mask_format", ["full", "box"])
def test_chunked_paste_to_host_path(mask_format, monkeypatch):
    # The path taken on CUDA when the results do not fit in GPU memory (there: pinned host
    # memory), forced here on CPU: chunks are copied into preallocated host results.
    expected = _frame(mask_format)
    real = pp.plan_paste_chunks
    monkeypatch.setattr(pp, "plan_paste_chunks", lambda b, **k: (real(b, **dict(k, max_chunk_bytes=1))[0], True))
    got = _frame(mask_format)
    _assert_same(got, expected)
    assert all(d.boxes.device.type == "cpu" and d.masks.device.type == "cpu" for d in got)


@pytest.mark.skipif("cpu" not in kernel_devices(), reason="Triton interpreter is off")
@pytest.mark.parametrize("mask_format", ["full", "box"])
def test_chunked_paste_through_triton(mask_format, monkeypatch):
    counts, sizes = [2, 1], [(20, 25), (18, 22)]
    expected = _frame(mask_format, counts=counts, sizes=sizes, seed=5)
    monkeypatch.setenv("ENGINE_FORCE_TRITON", "1")
    _assert_same(_frame(mask_format, max_chunk_bytes=600, counts=counts, sizes=sizes, seed=5), expected)
    _assert_same(_frame(mask_format, counts=counts, sizes=sizes, seed=5), expected)


def test_plan_paste_chunks():
    # CPU: one chunk however large (the results are host memory; a chunk would copy them),
    # unless max_chunk_bytes caps it: then greedy chunks of at most the cap.
    assert plan_paste_chunks([10, 20, 30], device_type="cpu") == ([(0, 3)], False)
    huge = 3 << 30
    assert plan_paste_chunks([huge, huge, huge], device_type="cpu") == ([(0, 3)], False)
    assert plan_paste_chunks([10, 20, 30], device_type="cpu", max_chunk_bytes=30) == ([(0, 2), (2, 3)], False)
    assert plan_paste_chunks([10, 20, 30], device_type="cpu", max_chunk_bytes=5) == ([(0, 1), (1, 2), (2, 3)], False)
    assert plan_paste_chunks([], device_type="cpu") == ([(0, 0)], False)
    # CUDA, budget 80 % of free memory: all fits -> one launch straight into the results.
    assert plan_paste_chunks([100] * 10, device_type="cuda", free_bytes=2000) == ([(0, 10)], False)
    # results (1000) fit, leaving room for chunks of 1600 - 1000 = 600 bytes: results stay on the GPU.
    chunks, to_host = plan_paste_chunks([100] * 10, device_type="cuda", free_bytes=2000, max_chunk_bytes=250)
    assert chunks == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)] and not to_host
    chunks, to_host = plan_paste_chunks([100] * 10, device_type="cuda", free_bytes=1300)
    assert chunks == [(0, 10)] and not to_host  # 1000 <= 1040
    # results (1000) do not fit beside a chunk in 0.8 * 1000: chunks of 800 go to pinned host memory.
    chunks, to_host = plan_paste_chunks([100] * 10, device_type="cuda", free_bytes=1000)
    assert chunks == [(0, 8), (8, 10)] and to_host
    chunks, to_host = plan_paste_chunks([100] * 10, device_type="cuda", free_bytes=1200)
    assert to_host and chunks == [(0, 9), (9, 10)]
    with pytest.raises(ValueError, match="free_bytes"):
        plan_paste_chunks([1], device_type="cuda")


def test_to_original_frame_arguments():
    dets, probs, resized = random_detections([1], [(10, 10)])
    kw = dict(image_sizes=resized, original_sizes=[(10, 10)], config=CONFIG)
    with pytest.raises(ValueError, match="mask_format"):
        to_original_frame(dets, probs, mask_format="rle", **kw)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        to_original_frame(dets, probs, max_chunk_bytes=0, **kw)
    assert to_original_frame([], [], image_sizes=[], original_sizes=[], config=CONFIG) == []
