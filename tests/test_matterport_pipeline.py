"""matterport checkpoints end to end: ``Predictor`` on a Keras .h5 file against matterport's inference.

The oracle (tests/matterport_reference.py) follows matterport's ``MaskRCNN.detect`` step by step in
numpy (real scikit-image resizes, TensorFlow's crop_and_resize and NMS semantics), with the network
parts run by real Keras layers (tests/matterport_keras.py). Random weights make every class score
saturate at 1.0, which would leave the order of detections to tie-breaking; the classifier's and the
RPN's logit kernels are scaled down so that scores are spread and the comparison means something.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch

import engine  # noqa: F401
from engine import Predictor
from engine.boxes import decode_deltas
from engine.config import MATTERPORT_MASK_RCNN_FPN
from engine.postprocess import window_relative_integer_boxes
from engine.preprocess import square_resized_size

keras = pytest.importorskip("keras")
pytest.importorskip("h5py")
pytest.importorskip("skimage")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("the Keras oracle needs KERAS_BACKEND=torch", allow_module_level=True)

import matterport_reference as ref  # noqa: E402
from matterport_keras import matterport_models, randomise, write_keras2_h5  # noqa: E402

NUM_CLASSES = 4  # a fine-tuned model's size (background + 3); the COCO file has 81
MAX_DIM = 256  # small padded canvas (matterport's default is 1024) to keep the CPU run short


@pytest.fixture(scope="module")
def matterport_checkpoint(tmp_path_factory):
    models = matterport_models(NUM_CLASSES)
    weights = randomise(models, seed=0)
    for name in ("mrcnn_class_logits", "rpn_class_raw"):
        layer = next(l for m in models.values() for l in m.layers if l.name == name)
        kernel, bias = layer.get_weights()
        kernel = kernel * np.float32(0.02)
        layer.set_weights([kernel, bias])
        weights[f"{name}/kernel"] = kernel
    path = tmp_path_factory.mktemp("matterport") / "mask_rcnn_random.h5"
    write_keras2_h5(path, weights)
    return models, path


def _photo(name: str, height: int, width: int) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()[:height, :width]


CASES = {
    # (photo, crop, min_dim): at scale 1 (no resampling), and resized with the long-side cap
    "no_resize": ("astronaut", (200, 150), 128),
    "resized": ("coffee", (160, 240), 200),
}


@pytest.mark.parametrize("case", list(CASES))
def test_predictor_matches_matterport(matterport_checkpoint, case):
    models, path = matterport_checkpoint
    name, (h, w), min_dim = CASES[case]
    image = _photo(name, h, w)
    before = image.copy()
    config = MATTERPORT_MASK_RCNN_FPN.replace(min_size=min_dim, max_size=MAX_DIM, score_threshold=0.0)
    predictor = Predictor(path, config=config)
    assert predictor.family == "matterport"
    ours = predictor.run([image])[0]
    theirs = ref.matterport_detect(models, image, min_dim=min_dim, max_dim=MAX_DIM, detection_min_confidence=0.0)
    assert np.array_equal(image, before)

    our_rois = ours.boxes[:, [1, 0, 3, 2]].round().to(torch.int64).numpy()  # y1 x1 y2 x2, as matterport
    assert np.array_equal(ours.boxes.numpy(), ours.boxes.round().numpy()), "matterport boxes are integers"
    n_ours, n_theirs = len(our_rois), len(theirs["rois"])
    assert n_theirs > 20 and abs(n_ours - n_theirs) <= 2

    # the first detections agree in order; float rounding (folded batch norm, fg - bg logits) can
    # later flip a near-tie, so the rest is compared as a set
    head = 20
    assert np.array_equal(our_rois[:head], theirs["rois"][:head])
    assert np.array_equal(ours.labels[:head].numpy(), theirs["class_ids"][:head])
    np.testing.assert_allclose(ours.scores[:head].numpy(), theirs["scores"][:head], atol=1e-4)

    # the same (class, box) can occur more than once (boxes clipped onto the window's edges): pair
    # each of ours with the unused matterport detection of that key whose score is closest
    index: dict = {}
    for j, (c, r) in enumerate(zip(theirs["class_ids"].tolist(), theirs["rois"].tolist())):
        index.setdefault((c, tuple(r)), []).append(j)
    matched = 0
    masks_ours, masks_theirs = ours.masks.numpy(), theirs["masks"]
    for i, (c, r) in enumerate(zip(ours.labels.tolist(), our_rois.tolist())):
        candidates = index.get((c, tuple(r)), [])
        if not candidates:
            continue
        j = min(candidates, key=lambda k: abs(float(theirs["scores"][k]) - float(ours.scores[i])))
        candidates.remove(j)
        matched += 1
        assert abs(float(ours.scores[i]) - float(theirs["scores"][j])) <= 1e-3
        y1, x1, y2, x2 = r
        differ = int((masks_ours[i] != masks_theirs[:, :, j]).sum())
        assert differ <= max(2, 0.01 * (y2 - y1) * (x2 - x1)), f"mask {i}: {differ} pixels differ"
    assert matched >= 0.9 * n_theirs, f"{matched} of {n_theirs} matterport detections found"
    # every mask lies inside its integer box, as matterport pastes it
    for i, (y1, x1, y2, x2) in enumerate(our_rois.tolist()):
        outside = masks_ours[i].copy()
        outside[y1:y2, x1:x2] = False
        assert not outside.any()


def test_default_threshold_can_leave_no_detection(matterport_checkpoint):
    _, path = matterport_checkpoint
    config = MATTERPORT_MASK_RCNN_FPN.replace(min_size=128, max_size=MAX_DIM, score_threshold=1.0)
    result = Predictor(path, config=config).run([_photo("chelsea", 120, 100)])[0]
    assert len(result.boxes) == 0 and tuple(result.masks.shape) == (0, 120, 100)


@pytest.mark.parametrize(
    "size, min_dim, max_dim",
    [((200, 150), 128, 256), ((160, 240), 200, 256), ((480, 640), 800, 1024), ((1000, 500), 800, 1024), ((333, 777), 800, 1024)],
)
def test_square_size_rule_matches_matterport(size, min_dim, max_dim):
    image = np.zeros(size + (3,), dtype=np.uint8)
    resized, window, _ = ref.resize_image_square(image, min_dim, max_dim)
    y1, x1, y2, x2 = window
    assert square_resized_size(*size, min_size=min_dim, max_size=max_dim) == (y2 - y1, x2 - x1)
    assert resized.shape[:2] == (max_dim, max_dim)


def test_box_decoding_and_unmolding_match_matterport():
    rng = np.random.default_rng(0)
    yx = rng.uniform(0, 0.8, (50, 2)).astype(np.float32)
    boxes = np.concatenate([yx, yx + rng.uniform(0, 0.2, (50, 2)).astype(np.float32)], axis=1)  # y1 x1 y2 x2
    deltas = rng.normal(0, 1, (50, 4)).astype(np.float32)  # dy dx dh dw
    std = np.array([0.1, 0.1, 0.2, 0.2], dtype=np.float32)
    expected = ref.apply_box_deltas(boxes, deltas * std)
    ours = decode_deltas(
        torch.from_numpy(deltas[:, [1, 0, 3, 2]]),
        torch.from_numpy(boxes[:, [1, 0, 3, 2]]),
        weights=(10.0, 10.0, 5.0, 5.0),
        clip=0.0,
        clamp="none",
        style="matterport",
    )
    # same operations in the same order; exp may differ by an ulp between numpy and torch
    np.testing.assert_allclose(ours.numpy()[:, [1, 0, 3, 2]], expected, rtol=0, atol=1e-6)
    decoded = torch.from_numpy(expected[:, [1, 0, 3, 2]].copy())

    window_px = (42, 0, 213, 256)  # y1 x1 y2 x2 in a 256 x 256 canvas
    window = ref.norm_boxes(np.array(window_px), (256, 256))  # float32, as matterport's unmold_detections
    shift = np.array([window[0], window[1], window[0], window[1]])
    scale = np.array([window[2] - window[0], window[3] - window[1]] * 2)
    expected = ref.denorm_boxes((expected - shift) / scale, (160, 240))
    ours_int = window_relative_integer_boxes(decoded, tuple(float(window[k]) for k in (1, 0, 3, 2)), (160, 240))
    assert np.array_equal(ours_int.numpy()[:, [1, 0, 3, 2]].astype(np.int32), expected)


def test_preset_rejects_a_partial_normalized_frame():
    with pytest.raises(ValueError, match="normalized box frame"):
        MATTERPORT_MASK_RCNN_FPN.replace(roi_mode="roi_align")
    with pytest.raises(ValueError, match="normalized box frame"):
        MATTERPORT_MASK_RCNN_FPN.replace(resize_mode="shortest_edge")
