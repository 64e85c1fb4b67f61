"""COCO evaluation on a generated dataset whose expected AP is known."""

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import Predictor
from tiny import TINY_CONFIG, tiny_state_dict

pycocotools_mask = pytest.importorskip("pycocotools.mask")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "evaluate_coco.py"
DATASET_CATEGORY_IDS = [10, 20, 30, 40]  # the tiny checkpoint has 4 foreground classes, labels 1..4


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_coco", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def predictor():
    return Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)


def write_dataset(root: Path, predictor: Predictor, *, category_of_label):
    """Images on disk, and ground truth made of the predictor's own non-empty detections."""
    rng = np.random.default_rng(0)
    images, annotations, infos = [], [], []
    for image_id, hw in enumerate([(60, 80), (45, 70), (64, 64)], start=1):
        image = rng.integers(0, 256, size=hw + (3,), dtype=np.uint8)
        name = f"img{image_id}.png"
        cv2.imwrite(str(root / name), image[..., ::-1])
        images.append(image)
        infos.append({"id": image_id, "file_name": name, "height": hw[0], "width": hw[1]})
    for info, det in zip(infos, predictor.run(images)):
        for k in range(len(det)):
            mask = det.masks[k].numpy()
            if not mask.any():
                continue
            rle = pycocotools_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = det.boxes[k].tolist()
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": info["id"],
                "category_id": category_of_label(int(det.labels[k])),
                "segmentation": rle,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(mask.sum()),
                "iscrowd": 0,
            })
    dataset = {
        "images": infos,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in DATASET_CATEGORY_IDS],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(dataset))
    return path, len(annotations)


def test_own_predictions_as_ground_truth_score_ap_one(tmp_path, predictor):
    script = load_script()
    ann, n_gt = write_dataset(tmp_path, predictor, category_of_label=lambda label: DATASET_CATEGORY_IDS[label - 1])
    assert n_gt > 0
    # one batch of all three, as when the ground truth was made: batch padding shifts results slightly
    report = script.evaluate(predictor, ann, tmp_path, batch_size=3)
    assert report["images"] == 3
    assert {r["category_id"] for r in report["results"]} <= set(DATASET_CATEGORY_IDS)
    assert report["bbox"]["AP"] == pytest.approx(1.0)
    assert report["segm"]["AP"] == pytest.approx(1.0)


def test_wrong_categories_score_zero(tmp_path, predictor):
    script = load_script()
    # every ground-truth object carries a category the predictor never gives it
    ann, _ = write_dataset(tmp_path, predictor, category_of_label=lambda label: DATASET_CATEGORY_IDS[label % 4])
    report = script.evaluate(predictor, ann, tmp_path, batch_size=3)
    assert report["bbox"]["AP"] == pytest.approx(0.0) and report["segm"]["AP"] == pytest.approx(0.0)


def test_category_mapping():
    script = load_script()
    assert script.category_mapping(91, "first", [1, 2, 90])[17] == 17
    assert script.category_mapping(5, "first", [40, 10, 30, 20]) == {1: 10, 2: 20, 3: 30, 4: 40}
    assert script.category_mapping(3, "last", [7, 3]) == {0: 3, 1: 7}
    with pytest.raises(ValueError, match="4 foreground classes but the dataset has 2 categories"):
        script.category_mapping(5, "first", [1, 2])
