"""What Detectron2 and mmdetection users expect of the API (issue 28): ``input_format``, file
paths in ``run()``, the device default, ``class_names``, ``coco_category_ids`` and
``Detections`` selection as Detectron2's ``Instances``."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engine import BoxMasks, Detections, Predictor
from engine.bundled import shapes_predictor
from engine.class_names import COCO_80, COCO_80_CATEGORY_IDS, COCO_91, coco_category_ids, default_class_names
from engine.predictor import default_device, resolve_device
from tiny import TINY_CONFIG, TINY_SPEC, tiny_state_dict
from weights.shapes import generate

#: the tiny network, few detections per image (fast on the CPU)
FEW = TINY_CONFIG.replace(detections_per_image=8)


def _same(a: Detections, b: Detections) -> None:
    assert len(a) == len(b)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.full_masks(), b.full_masks()) and a.image_size == b.image_size


@pytest.fixture(scope="module")
def shapes():
    """The bundled shapes model in both input formats, and its RGB results on two images."""
    rgb = shapes_predictor(device="cpu")
    bgr = shapes_predictor(device="cpu", input_format="BGR")
    images = [generate(2026, i).image for i in range(2)]
    return rgb, bgr, images, rgb.run(images)


@pytest.fixture(scope="module")
def tiny():
    """The tiny network in both input formats (RGB network)."""
    return (Predictor(tiny_state_dict(), config=FEW, device="cpu"),
            Predictor(tiny_state_dict(), config=FEW, device="cpu", input_format="BGR"))


def random_images(count=3) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, size=(40 + 9 * i, 57 - 5 * i, 3), dtype=np.uint8) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# input_format (Detectron2's cfg.INPUT.FORMAT)
# ---------------------------------------------------------------------------------------------


def as_bgr(image: np.ndarray, form: str):
    """The BGR twin of an RGB uint8 [H, W, 3] image, in one of the forms run() takes."""
    if form == "cv2 copy":  # what cv2.imread gives
        return np.ascontiguousarray(image[:, :, ::-1])
    if form == "flipped view":  # negative strides
        return image[:, :, ::-1]
    if form == "bgra":  # cv2.IMREAD_UNCHANGED of a PNG with alpha
        return np.concatenate((image[:, :, ::-1], np.full(image.shape[:2] + (1,), 7, np.uint8)), axis=2)
    if form == "chw tensor":
        return torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1)
    raise ValueError(form)


@pytest.mark.parametrize("form", ["cv2 copy", "flipped view"])
def test_bgr_arrays_give_the_detections_of_their_rgb_twins(shapes, form):
    """The bundled model: BGR arrays with input_format="BGR" give exactly what RGB ones give."""
    rgb_predictor, bgr_predictor, images, expected = shapes
    assert all(len(d) > 0 for d in expected), "the shapes model finds its shapes"
    bgr = [as_bgr(im, form) for im in images]
    before = [b.copy() for b in bgr]
    for got, want in zip(bgr_predictor.run(bgr), expected):
        _same(got, want)
    for a, b in zip(before, bgr):
        np.testing.assert_array_equal(a, b)  # the caller's arrays are untouched


def test_bgr_cv2_imread_file(shapes, tmp_path):
    rgb_predictor, bgr_predictor, images, expected = shapes
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.ascontiguousarray(images[0][:, :, ::-1]))
    _same(bgr_predictor.run(cv2.imread(str(path)))[0], expected[0])


@pytest.mark.parametrize("network_order", ["RGB", "BGR"])
@pytest.mark.parametrize("kind", ["cv2 copy", "flipped view", "bgra", "chw tensor", "grey", "one pixel"])
def test_input_format_on_rgb_and_bgr_networks(network_order, kind):
    """The swap composes with the network's own order (a BGR network fed BGR arrays reorders
    nothing), for every form of array run() takes."""
    config = FEW.replace(channel_order=network_order, score_threshold=0.0)
    rgb_predictor = Predictor(tiny_state_dict(), config=config, device="cpu")
    bgr_predictor = Predictor(tiny_state_dict(), config=config, device="cpu", input_format="BGR")
    rng = np.random.default_rng(3)
    if kind == "grey":
        image = twin = rng.integers(0, 256, size=(61, 47), dtype=np.uint8)
    else:
        image = rng.integers(0, 256, size=(1, 1, 3) if kind == "one pixel" else (61, 47, 3), dtype=np.uint8)
        twin = as_bgr(image, "cv2 copy" if kind == "one pixel" else kind)
    assert torch.equal(bgr_predictor.preprocess([twin]).tensor, rgb_predictor.preprocess([image]).tensor)
    _same(bgr_predictor.run([twin])[0], rgb_predictor.run([image])[0])


@pytest.mark.parametrize("bad", ["rgb", "bgr", "L", "YUV-BT.601", "", None, 3, ("R", "G", "B")])
def test_input_format_is_checked(bad):
    with pytest.raises(ValueError, match=r'input_format must be "RGB" or "BGR".*got'):
        Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cpu", input_format=bad)


def test_input_format_default_is_rgb():
    assert inspect.signature(Predictor).parameters["input_format"].default == "RGB"
    assert Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cpu").input_format == "RGB"


# ---------------------------------------------------------------------------------------------
# file paths in run()
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def png_files(tmp_path_factory):
    """PNG files (lossless) of :func:`random_images`, and those images."""
    folder = tmp_path_factory.mktemp("png")
    images = random_images()
    paths = []
    for i, im in enumerate(images):
        path = folder / f"s{i}.png"
        cv2.imwrite(str(path), np.ascontiguousarray(im[:, :, ::-1]))
        paths.append(path)
    return paths, images


@pytest.mark.parametrize("input_format", ["RGB", "BGR"])
def test_paths_mixed_with_arrays(tiny, png_files, input_format):
    """str and os.PathLike paths decode as RGB whatever input_format says; arrays follow it."""
    rgb_predictor, bgr_predictor = tiny
    paths, images = png_files
    expected = rgb_predictor.run(images)
    assert sum(len(d) for d in expected) > 0, "the tiny checkpoint should detect something"
    predictor = bgr_predictor if input_format == "BGR" else rgb_predictor
    array = images[1] if input_format == "RGB" else as_bgr(images[1], "cv2 copy")
    results = predictor.run([str(paths[0]), array, paths[2]])
    for got, want in zip(results, expected):
        _same(got, want)


@pytest.mark.parametrize("form", [str, Path, lambda p: (str(p),), lambda p: [p]], ids=["str", "Path", "tuple", "list"])
def test_one_path(tiny, png_files, form):
    rgb_predictor, bgr_predictor = tiny
    paths, images = png_files
    (expected,) = rgb_predictor.run(images[0])
    for predictor in tiny:
        (result,) = predictor.run(form(paths[0]))
        _same(result, expected)


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty file"), (b"not an image at all", "not an image"), (b"\x89PNG\r\n\x1a\n\x00\x00", "corrupt PNG")],
    ids=["empty", "text", "truncated png"],
)
def test_undecodable_file_is_a_clear_error(tiny, tmp_path, content, match):
    from engine.image_files import ImageDecodeError

    predictor = tiny[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=rf"images\[1\] \(.*bad.png\): .*{match}"):
        predictor.run([np.zeros((8, 8, 3), np.uint8), bad])
    with pytest.raises(FileNotFoundError):
        predictor.run([tmp_path / "missing.png"])


def test_max_pixels(png_files):
    from engine.image_files import ImageDecodeError

    path = png_files[0][0]
    h, w = png_files[1][0].shape[:2]
    small = Predictor(tiny_state_dict(), config=FEW, device="cpu", max_pixels=h * w - 1)
    with pytest.raises(ImageDecodeError, match="over the limit") as info:
        small.run(path)
    assert info.value.reason == "too_large"
    assert len(small.run(np.zeros((h, w + 5, 3), np.uint8))) == 1  # arrays are not files: no cap
    for limit in (h * w, 0):
        assert len(Predictor(tiny_state_dict(), config=FEW, device="cpu", max_pixels=limit).run(path)) == 1
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_pixels"):
            Predictor(tiny_state_dict(), config=FEW, device="cpu", max_pixels=bad)


# ---------------------------------------------------------------------------------------------
# device default
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cuda", [True, False])
def test_device_default_is_cuda_when_present(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert default_device() == resolve_device(None) == torch.device("cuda" if cuda else "cpu")


def test_predictor_and_demo_default_to_the_same_device():
    assert inspect.signature(Predictor).parameters["device"].default is None
    assert Predictor(tiny_state_dict(), config=TINY_CONFIG).device == default_device()
    assert shapes_predictor().device == default_device()


# ---------------------------------------------------------------------------------------------
# class_names and coco_category_ids
# ---------------------------------------------------------------------------------------------


def tiny_torchvision(num_classes):
    spec = replace(TINY_SPEC, num_classes=num_classes, num_box_classes=num_classes, num_mask_classes=num_classes)
    return tiny_state_dict(spec=spec)


def detectron2_file(tmp_path, num_classes):
    from test_weights_detectron2 import d2_layout, random_arrays, save_pkl

    return save_pkl(tmp_path / f"model_final_{num_classes}.pkl", random_arrays(d2_layout(num_classes=num_classes)))


def mmdetection_file(tmp_path, classes, num_classes=None):
    from test_weights_mmdetection import meta_3x, mm_layout, random_state, save_pth

    layout = mm_layout(num_classes=num_classes or len(classes))
    return save_pth(tmp_path / "mmdet.pth", random_state(layout), meta_3x(classes=tuple(classes)))


def test_bundled_model_names():
    predictor = shapes_predictor(device="cpu")
    assert predictor.class_names == ("__background__", "circle", "square", "triangle")
    assert predictor.coco_category_ids is None
    assert shapes_predictor(device="cpu", class_names=["a", "b", "c"]).class_names == ("__background__", "a", "b", "c")


@pytest.mark.parametrize("num_classes,names,ids", [
    (91, COCO_91, None),
    (5, ("class 0", "class 1", "class 2", "class 3", "class 4"), None),
    (81, tuple(f"class {i}" for i in range(81)), None),  # a torchvision model fine-tuned on 80 classes of its own
    (2, ("class 0", "class 1"), None),
])
def test_torchvision_names(num_classes, names, ids):
    predictor = Predictor(tiny_torchvision(num_classes), config=TINY_CONFIG, device="cpu")
    assert predictor.class_names == names and len(predictor.class_names) == predictor.num_classes
    assert predictor.coco_category_ids == ids
    assert predictor.class_names[1] == names[1] and predictor.class_names[0] == names[0]


def test_detectron2_coco_layout(tmp_path):
    predictor = Predictor(detectron2_file(tmp_path, 80), device="cpu")
    assert predictor.family == "detectron2" and predictor.num_classes == 81
    assert predictor.class_names == COCO_80 and len(predictor.class_names) == 80  # background last: no entry
    assert predictor.coco_category_ids == COCO_80_CATEGORY_IDS


@pytest.mark.parametrize(
    "names,expected",
    [
        (["person", "bicycle", "toothbrush"], [1, 2, 90]),
        (["traffic light", "stop sign", "dining table", "hair drier"], [10, 13, 67, 89]),
        ([], []),
    ],
    ids=["person-bicycle-toothbrush", "around the gaps", "none"],
)
@pytest.mark.parametrize("mask_format", ["full", "box"])
def test_detectron2_to_coco_category_ids(tmp_path, names, expected, mask_format):
    predictor = Predictor(detectron2_file(tmp_path, 80), device="cpu")
    labels = torch.tensor([predictor.class_names.index(n) for n in names], dtype=torch.int64)
    n = len(names)
    masks = torch.zeros((n, 6, 7), dtype=torch.bool)
    masks[:, 1:3, 2:5] = True
    det = Detections(
        boxes=torch.tensor([[1.0, 1.0, 5.0, 3.0]] * n).reshape(n, 4),
        scores=torch.linspace(0.9, 0.5, n),
        labels=labels,
        masks=BoxMasks.from_full(masks) if mask_format == "box" else masks,
        image_size=(6, 7),
    )
    results = det.to_coco(7, category_ids=predictor.coco_category_ids)
    assert [r["category_id"] for r in results] == expected
    assert [predictor.class_names[label] for label in labels.tolist()] == names


def test_detectron2_fine_tuned_layout(tmp_path):
    path = detectron2_file(tmp_path, 4)
    predictor = Predictor(path, device="cpu")
    assert predictor.class_names == ("class 0", "class 1", "class 2", "class 3") and predictor.coco_category_ids is None
    own = Predictor(path, device="cpu", class_names=["cat", "dog", "bird", "fish"])
    assert own.class_names == ("cat", "dog", "bird", "fish") and own.coco_category_ids is None
    with pytest.raises(ValueError, match="5 class names given, but the checkpoint has 4 foreground classes"):
        Predictor(path, device="cpu", class_names="bg,cat,dog,bird,fish")


@pytest.mark.parametrize(
    "classes,ids",
    [
        (("cat", "dog", "bird", "fish"), None),
        (COCO_80, COCO_80_CATEGORY_IDS),
        (tuple(n.replace(" ", "_") for n in COCO_80), COCO_80_CATEGORY_IDS),  # mmdetection 1.x spelling
        (("person", "dog", "bird", "fish"), None),
    ],
    ids=["own", "coco", "coco underscores", "partly coco"],
)
def test_mmdetection_names_from_the_checkpoint(tmp_path, classes, ids):
    predictor = Predictor(mmdetection_file(tmp_path, classes), device="cpu")
    assert predictor.family == "mmdetection"
    assert predictor.class_names == tuple(classes) and predictor.coco_category_ids == ids
    override = Predictor(mmdetection_file(tmp_path, classes), device="cpu", class_names=[f"c{i}" for i in range(len(classes))])
    assert override.class_names == tuple(f"c{i}" for i in range(len(classes))) and override.coco_category_ids is None


def test_user_names_from_a_file(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n\nc\nd\n")
    for source in (names, str(names), ["a", "b", "c", "d"], ("a", "b", "c", "d"), "a,b,c,d"):
        predictor = Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cpu", class_names=source)
        assert predictor.class_names == ("__background__", "a", "b", "c", "d")
    with pytest.raises(FileNotFoundError):
        Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cpu", class_names=tmp_path / "absent.txt")
    with pytest.raises(ValueError, match="leave out the background's name"):
        Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cpu", class_names=["bg", "a", "b", "c", "d"])
    with pytest.raises(ValueError, match="0 class names given"):
        Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cpu", class_names=[])
    with pytest.raises(TypeError, match="must be strings"):
        Predictor(tiny_state_dict(), config=TINY_CONFIG, device="cpu", class_names=[1, 2, 3, 4])


@pytest.mark.parametrize(
    "num_classes,background,family,names,ids",
    [
        (81, "first", "matterport", ("__background__", *COCO_80), (0, *COCO_80_CATEGORY_IDS)),
        (81, "first", "torchvision", tuple(f"class {i}" for i in range(81)), None),
        (81, "last", "mmdetection", COCO_80, COCO_80_CATEGORY_IDS),
        (91, "first", "torchvision", COCO_91, None),
        (2, "last", "detectron2", ("class 0",), None),
        (1, "last", "detectron2", (), None),
    ],
)
def test_layouts(num_classes, background, family, names, ids):
    got = default_class_names(num_classes, background=background, family=family)
    assert tuple(got) == names
    assert coco_category_ids(got, background=background) == ids
    if ids is not None:  # indexed by label: 'person' -> 1, 'bicycle' -> 2, 'toothbrush' -> 90
        assert [ids[got.index(n)] for n in ("person", "bicycle", "toothbrush")] == [1, 2, 90]


# ---------------------------------------------------------------------------------------------
# Detections selection (Detectron2's Instances.__getitem__)
# ---------------------------------------------------------------------------------------------


def make_detections(n, mask_format, *, size=(23, 31), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    x1 = torch.randint(0, w - 6, (n,), generator=g).float()
    y1 = torch.randint(0, h - 6, (n,), generator=g).float()
    boxes = torch.stack((x1, y1, x1 + 5, y1 + 5), 1).reshape(n, 4)
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    for i, (a, b) in enumerate(zip(x1.long().tolist(), y1.long().tolist())):
        masks[i, b : b + 1 + i % 5, a : a + 2 + i % 3] = True
    masks[n // 2 :: 4] = False if n else masks[n // 2 :: 4]  # some empty masks
    det = Detections(
        boxes=boxes,
        scores=torch.sort(torch.rand(n, generator=g), descending=True).values,
        labels=torch.randint(1, 4, (n,), generator=g),
        masks=BoxMasks.from_full(masks) if mask_format == "box" else masks,
        image_size=size,
    )
    return det, masks


SELECTIONS = {
    "scores > 0.5": lambda d: d.scores > 0.5,
    "all false": lambda d: torch.zeros(len(d), dtype=torch.bool),
    "all true": lambda d: torch.ones(len(d), dtype=torch.bool),
    "label 2": lambda d: (d.labels == 2).numpy(),
    "bool list": lambda d: [i % 2 == 0 for i in range(len(d))],
    "int 3": lambda d: 3,
    "int -1": lambda d: -1,
    "numpy int": lambda d: np.int64(2),
    "0-d tensor": lambda d: torch.tensor(1),
    "slice 1:4": lambda d: slice(1, 4),
    "slice ::2": lambda d: slice(None, None, 2),
    "slice ::-1": lambda d: slice(None, None, -1),
    "slice past the end": lambda d: slice(4, 100),
    "empty slice": lambda d: slice(3, 3),
    "tensor [0, 2]": lambda d: torch.tensor([0, 2]),
    "tensor repeats, negative": lambda d: torch.tensor([2, 2, -1, 0]),
    "empty tensor": lambda d: torch.tensor([], dtype=torch.int64),
    "empty float tensor": lambda d: torch.tensor([]),
    "numpy ints": lambda d: np.array([4, 1], dtype=np.int32),
    "list": lambda d: [1, 3],
    "empty list": lambda d: [],
}


def expected_positions(item, n):
    """The positions torch/numpy indexing gives (a Python int keeps its dimension, as Detectron2)."""
    if isinstance(item, (int, np.integer)) or (isinstance(item, torch.Tensor) and item.dim() == 0):
        return [int(item) % n]
    if isinstance(item, slice):
        return list(range(n))[item]
    arr = np.asarray(item.numpy() if isinstance(item, torch.Tensor) else item)
    if arr.dtype == bool:
        return np.flatnonzero(arr).tolist()
    return [int(i) % n for i in arr.reshape(-1).tolist()]


@pytest.mark.parametrize("mask_format", ["full", "box"])
@pytest.mark.parametrize("name", list(SELECTIONS))
def test_selection(name, mask_format):
    det, full = make_detections(6, mask_format)
    item = SELECTIONS[name](det)
    positions = expected_positions(item, len(det))
    got = det[item]
    assert isinstance(got, Detections) and len(got) == len(positions)
    idx = torch.tensor(positions, dtype=torch.int64)
    assert torch.equal(got.boxes, det.boxes[idx]) and got.boxes.shape == (len(positions), 4)
    assert torch.equal(got.scores, det.scores[idx]) and torch.equal(got.labels, det.labels[idx])
    assert got.labels.dtype == torch.int64 and got.image_size == det.image_size
    assert torch.equal(got.full_masks(), full[idx]) and got.full_masks().shape == (len(positions), 23, 31)
    if mask_format == "box":
        assert isinstance(got.masks, BoxMasks)
        assert got.masks.nbytes == int(det.masks.regions[idx][:, 2:].prod(1).sum())  # only the chosen crops
        assert torch.equal(got.masks.area(), det.masks.area()[idx])
    got.to_coco(1)  # exports work on a selection


@pytest.mark.parametrize("mask_format", ["full", "box"])
@pytest.mark.parametrize("item", [slice(None), slice(0, 5), torch.zeros(0, dtype=torch.bool), [], torch.tensor([], dtype=torch.int64)],
                         ids=["all", "slice", "mask", "list", "tensor"])
def test_selection_of_no_detections(mask_format, item):
    det, _ = make_detections(0, mask_format)
    got = det[item]
    assert len(got) == 0 and got.boxes.shape == (0, 4) and got.full_masks().shape == (0, 23, 31)
    assert got.to_coco(1) == []


@pytest.mark.parametrize("mask_format", ["full", "box"])
@pytest.mark.parametrize(
    "n,item",
    [(6, 6), (6, -7), (0, 0), (0, -1), (6, torch.tensor([0, 6])), (6, [-7]), (6, np.array([9])),
     (6, torch.ones(5, dtype=torch.bool)), (6, torch.ones(7, dtype=torch.bool)), (0, torch.ones(1, dtype=torch.bool)),
     (6, np.ones((6, 1), dtype=bool)), (0, [0])],
    ids=["n", "-n-1", "empty 0", "empty -1", "tensor", "list", "numpy", "short mask", "long mask", "mask on empty",
         "2-d mask", "list on empty"],
)
def test_selection_out_of_range(mask_format, n, item):
    det, _ = make_detections(n, mask_format)
    with pytest.raises(IndexError):
        det[item]


@pytest.mark.parametrize(
    "item",
    [0.5, True, np.bool_(False), torch.tensor(True), torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]]), "0", None,
     [True, 1], np.array([0.5])],
    ids=["float", "bool", "numpy bool", "0-d bool tensor", "float tensor", "2-d tensor", "str", "None", "mixed list",
         "float array"],
)
def test_selection_type_errors(item):
    det, _ = make_detections(6, "full")
    with pytest.raises(TypeError, match="(?i)select"):  # says what selects detections
        det[item]


def test_not_iterable_and_views():
    det, _ = make_detections(6, "full")
    with pytest.raises(TypeError, match="not iterable"):
        list(det)
    one = det[2]
    assert one.boxes.data_ptr() == det.boxes[2:].data_ptr()  # an int is a view, as Detectron2's slice(i, None, N)
    assert det[1:4].masks.data_ptr() == det.masks[1:].data_ptr()


def test_box_masks_select_directly():
    det, full = make_detections(6, "box")
    picked = det.masks.select(torch.tensor([5, 0]))
    assert isinstance(picked, BoxMasks) and len(picked) == 2
    assert torch.equal(picked.to_full(), full[[5, 0]])
    assert picked.to_rle() == [det.masks.rle(5), det.masks.rle(0)]
    assert len(det.masks.select([])) == 0 and det.masks.select([]).nbytes == 0
