"""A checkpoint in Detectron2's layout runs end to end: family detection, the Detectron2 preset
(BGR, caffe means, PIL-exact resize, aligned RoIAlign, background last, grid_sample paste), and
clear errors when the family is forced wrongly or unknown."""

import dataclasses
import pickle

import pytest
import torch

from checkpoints import photographs
from engine import Predictor
from engine.config import DETECTRON2_MASK_RCNN_R50_FPN
from tiny import TINY_SPEC, tiny_state_dict
from engine.loading import checkpoint_config
from weights import CheckpointError, load_checkpoint
from weights import detectron2 as d2_format

# Detectron2 class layout: 4 classes + background last; box and mask predictors without background
D2_SPEC = dataclasses.replace(TINY_SPEC, num_classes=5, num_box_classes=4, num_mask_classes=4)


@pytest.fixture(scope="module")
def d2_pkl(tmp_path_factory):
    """The tiny network's random weights under Detectron2's names, as a model-zoo style .pkl of numpy arrays."""
    canonical = tiny_state_dict(spec=D2_SPEC)
    names = {c: d for d, c in d2_format.name_map(D2_SPEC).items()}
    model = {names[k]: v.numpy() for k, v in canonical.items()}
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "test"}, f, protocol=2)
    return path, canonical


def test_family_detected_and_preset_applied(d2_pkl):
    path, canonical = d2_pkl
    loaded = load_checkpoint(path)
    assert loaded.family == "detectron2"
    assert loaded.spec == D2_SPEC
    config = checkpoint_config(loaded)
    assert config.name == DETECTRON2_MASK_RCNN_R50_FPN.name and config.background_index == "last"
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in canonical.items())


def test_runs_on_photographs(d2_pkl):
    path, _ = d2_pkl
    config = checkpoint_config(load_checkpoint(path)).replace(min_size=160, max_size=256, score_threshold=0.01)
    predictor = Predictor(path, device="cpu", config=config)
    images = photographs(("astronaut", "chelsea"))
    results = predictor.run(images)
    assert sum(len(r) for r in results) > 0
    for r, im in zip(results, images):
        h, w = im.shape[:2]
        assert r.masks.dtype == torch.bool and r.masks.shape == (len(r), h, w)
        assert r.labels.min() >= 0 and r.labels.max() <= 3  # contiguous 0..K-1, background last
        # Detectron2 clips the scaled boxes to the image and drops empty ones
        assert (r.boxes[:, 0] >= 0).all() and (r.boxes[:, 2] <= w).all() and (r.boxes[:, 3] <= h).all()
        assert ((r.boxes[:, 2] > r.boxes[:, 0]) & (r.boxes[:, 3] > r.boxes[:, 1])).all()


def test_forced_wrong_family_and_unknown_family(d2_pkl, tmp_path):
    path, _ = d2_pkl
    with pytest.raises(CheckpointError, match="torchvision"):
        load_checkpoint(path, family="torchvision")
    with pytest.raises(ValueError, match="family must be one of"):
        load_checkpoint(path, family="mmdet")
    tv_file = tmp_path / "tv.pth"
    torch.save(tiny_state_dict(), tv_file)
    with pytest.raises(CheckpointError):
        load_checkpoint(tv_file, family="detectron2")
    partial = {"backbone.body.conv1.weight": torch.zeros(1), "rpn.head.cls_logits.weight": torch.zeros(1),
               "extra.thing": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"closest: torchvision, 2 of 3 keys .*did not fit \(1\): extra.thing"):
        load_checkpoint(partial)
    # keys that look like Detectron2's go to its reader, which lists what is missing
    with pytest.raises(CheckpointError, match="not a complete Detectron2 Mask R-CNN"):
        load_checkpoint({"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)})
