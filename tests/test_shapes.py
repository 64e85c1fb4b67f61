"""The synthetic shapes data: deterministic, exact disjoint masks, valid COCO ground truth."""

import json

import cv2
import numpy as np
import pytest

from weights.shapes import (
    CLASS_NAMES,
    DEFAULT_SPEC,
    ShapesSpec,
    coco_dataset,
    generate,
    mask_box,
    uncompressed_rle,
    write_dataset,
)

SPECS = {
    "default": DEFAULT_SPEC,
    "odd_small": ShapesSpec(size_range=(97, 131), shapes_range=(1, 3), radius_range=(9, 20)),
    "crowded": ShapesSpec(size_range=(160, 160), shapes_range=(12, 12), radius_range=(20, 40)),
    "empty": ShapesSpec(size_range=(64, 65), shapes_range=(0, 0)),
}


def test_same_seed_and_index_give_the_same_sample():
    a, b = generate(3, 5), generate(3, 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(generate(4, 5).image[:50, :50], a.image[:50, :50])
    assert not np.array_equal(generate(3, 6).image[:50, :50], a.image[:50, :50])


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("index", [0, 1, 7])
def test_samples_are_well_formed(spec_name, index):
    spec = SPECS[spec_name]
    s = generate(11, index, spec)
    h, w = s.image.shape[:2]
    assert s.image.dtype == np.uint8 and s.image.shape[2] == 3
    assert spec.size_range[0] <= h <= spec.size_range[1] and spec.size_range[0] <= w <= spec.size_range[1]
    n = len(s.labels)
    assert s.masks.shape == (n, h, w) and s.masks.dtype == bool
    assert s.boxes.shape == (n, 4) and s.boxes.dtype == np.float32
    assert n <= spec.shapes_range[1]
    if spec_name == "empty":
        assert n == 0
        return
    assert n >= 1 and set(s.labels.tolist()) <= {1, 2, 3}
    assert s.masks.sum(axis=0).max() == 1, "instance masks overlap"
    for mask, box in zip(s.masks, s.boxes):
        assert mask.sum() > 20
        assert tuple(box) == mask_box(mask)
        x1, y1, x2, y2 = box.astype(int)
        assert mask[y1:y2, x1:x2].sum() == mask.sum()  # tight: the box holds the whole mask...
        assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()  # ...and touches it on every side
        assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()


def test_masks_are_the_shapes_visible_pixels():
    """Each mask's pixels share the shape's colour (up to the noise); the ring just outside it does not."""
    s = generate(1, 2)
    for mask in s.masks:
        inside = s.image[mask].astype(float)
        assert inside.std(axis=0).max() < 3 * DEFAULT_SPEC.noise_std
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~mask
        ring &= ~s.masks.any(axis=0)  # background only
        if ring.sum() > 20:
            distance = np.linalg.norm(s.image[ring].astype(float).mean(0) - inside.mean(0))
            assert distance > 30


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((5, 7), bool),
        np.ones((4, 3), bool),
        np.eye(6, 5, dtype=bool),
        np.pad(np.ones((3, 3), bool), ((0, 2), (1, 0))),  # starts with a 0 run
        np.pad(np.ones((3, 3), bool), ((0, 2), (0, 1))),  # starts with a 1 run
    ],
    ids=["zeros", "ones", "diagonal", "starts_zero", "starts_one"],
)
def test_uncompressed_rle_decodes_to_the_mask(mask):
    mask_utils = pytest.importorskip("pycocotools.mask")
    rle = uncompressed_rle(mask)
    assert sum(rle["counts"]) == mask.size
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *rle["size"]))
    assert np.array_equal(decoded.astype(bool), mask)


def test_written_dataset_loads_in_pycocotools(tmp_path):
    coco_module = pytest.importorskip("pycocotools.coco")
    mask_utils = pytest.importorskip("pycocotools.mask")
    path = write_dataset(tmp_path, seed=5, count=3)
    coco = coco_module.COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES[1:])
    for image_id in (1, 2, 3):
        sample = generate(5, image_id - 1)
        info = coco.loadImgs(image_id)[0]
        on_disk = cv2.cvtColor(cv2.imread(str(tmp_path / info["file_name"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(on_disk, sample.image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert [a["category_id"] for a in anns] == sample.labels.tolist()
        for ann, mask in zip(anns, sample.masks):
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["area"] == mask.sum()
            assert mask_utils.toBbox(coco.annToRLE(ann)).tolist() == ann["bbox"]
    assert json.loads(path.read_text()) == coco_dataset(5, 3)


def test_negative_index_is_refused():
    with pytest.raises(ValueError, match="index must be >= 0"):
        generate(0, -1)
