"""A checkpoint in mmdetection's layout runs end to end with the mmdetection preset
(RGB, mmdet mean/std, cv2 resize, delta2bbox, finest-scale-56 level rule, background last,
rescale by scale factor, grid_sample paste)."""

import dataclasses

import torch

from checkpoints import photographs
from engine import Predictor
from engine.config import MMDET_MASK_RCNN_R50_FPN
from tiny import TINY_SPEC, tiny_state_dict
from engine.loading import checkpoint_config
from weights import load_checkpoint
from weights import mmdetection as mm_format

MM_SPEC = dataclasses.replace(TINY_SPEC, num_classes=5, num_box_classes=4, num_mask_classes=4)


def test_mmdetection_checkpoint_runs(tmp_path):
    canonical = tiny_state_dict(spec=MM_SPEC)
    names = {c: m for m, c in mm_format.name_map(MM_SPEC).items()}
    path = tmp_path / "mask_rcnn_r50_fpn_1x_coco.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": {names[k]: v for k, v in canonical.items()}}, path)

    loaded = load_checkpoint(path)
    assert loaded.family == "mmdetection" and loaded.spec == MM_SPEC
    config = checkpoint_config(loaded)
    assert config.name == MMDET_MASK_RCNN_R50_FPN.name and config.resize_method == "cv2_linear"
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in canonical.items())

    config = config.replace(min_size=160, max_size=256, score_threshold=0.01)
    images = photographs(("coffee", "chelsea"))
    results = Predictor(path, config=config).run(images)
    assert sum(len(r) for r in results) > 0
    for r, im in zip(results, images):
        assert r.masks.dtype == torch.bool and r.masks.shape == (len(r), *im.shape[:2])
        assert r.labels.min() >= 0 and r.labels.max() <= 3
