"""Real mmdetection 3.3 Mask R-CNN models with random, calibrated weights, and their checkpoints.

mmdetection cannot download weights here, so each model is built by mmdetection itself
(``init_detector`` on a config shipped in ``mmdet/.mim/configs/mask_rcnn/``, ``init_cfg=None``),
then given weights in its real layout:

- batch norm: random affine parameters, running statistics measured on a photograph through
  mmdetection's own ``inference_detector`` (each batch norm on its own input, in forward order)
  and then perturbed per channel, as ``tests/checkpoints.py`` does for torchvision;
- heads: classifier and mask logits scaled so that detections pass the 0.05 score threshold;
  the RPN objectness weights scaled by ``rpn_scale``: 0.2 gives a realistic spread of
  probabilities, 1.0 saturates many float32 sigmoids to exactly 1.0 (ties).

:func:`save_checkpoint` writes the file as mmengine's Runner does (3.x meta: ``cfg`` text,
``dataset_meta``, versions); :func:`save_checkpoint_2x` as mmdetection 2.x did (meta ``config``
text, ``CLASSES``, ``mmdet_version`` 2.x).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from checkpoints import calibrate_batch_norm, photographs

#: the Mask R-CNN configs of the design card's model-zoo table (mmdetection 3.3 names)
ZOO_CONFIGS = (
    "mask-rcnn_r50_fpn_1x_coco",
    "mask-rcnn_r50_fpn_ms-poly-3x_coco",
    "mask-rcnn_r50-caffe_fpn_ms-poly-3x_coco",
    "mask-rcnn_r101_fpn_1x_coco",
    "mask-rcnn_r101_fpn_ms-poly-3x_coco",
    "mask-rcnn_r101-caffe_fpn_ms-poly-3x_coco",
    "mask-rcnn_x101-32x4d_fpn_1x_coco",
    "mask-rcnn_x101-32x4d_fpn_ms-poly-3x_coco",
    "mask-rcnn_x101-32x8d_fpn_1x_coco",
    "mask-rcnn_x101-32x8d_fpn_ms-poly-3x_coco",
    "mask-rcnn_x101-64x4d_fpn_1x_coco",
    "mask-rcnn_x101-64x4d_fpn_ms-poly_3x_coco",
)


def config_path(name: str) -> str:
    import mmdet

    return os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "mask_rcnn", name + ".py")


def build_model(name: str, *, seed: int = 0, rpn_scale: float = 0.2, calibration: np.ndarray | None = None):
    """``(cfg, model)``: mmdetection's own model for config ``name``, eval mode, calibrated weights."""
    from mmdet.apis import inference_detector, init_detector
    from mmengine.config import Config

    cfg = Config.fromfile(config_path(name))
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(seed)
    model = init_detector(cfg, checkpoint=None, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        box = model.roi_head.bbox_head
        box.fc_cls.weight.normal_(0.0, 0.05, generator=g)
        box.fc_cls.bias.normal_(0.0, 0.5, generator=g)
        box.fc_reg.weight.normal_(0.0, 0.01, generator=g)
        box.fc_reg.bias.normal_(0.0, 0.1, generator=g)
        rpn = model.rpn_head
        rpn.rpn_cls.weight.normal_(0.0, 0.05 * rpn_scale, generator=g)
        rpn.rpn_cls.bias.normal_(0.0, 0.5, generator=g)
        rpn.rpn_reg.weight.normal_(0.0, 0.01, generator=g)
        mask = model.roi_head.mask_head
        mask.conv_logits.weight.mul_(3.0)
        mask.conv_logits.bias.normal_(0.0, 1.0, generator=g)
    image = photographs(("astronaut",))[0] if calibration is None else calibration
    calibrate_batch_norm(model, lambda: inference_detector(model, bgr(image)), g)
    return cfg, model.eval()


def bgr(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> the BGR array mmdetection's ``inference_detector`` expects."""
    return np.ascontiguousarray(image[:, :, ::-1])


def save_checkpoint(cfg, model, path) -> None:
    """mmengine's Runner container: ``{'meta': {'cfg', 'dataset_meta', versions}, 'state_dict'}``."""
    import mmdet
    import mmengine

    meta = {
        "cfg": cfg.pretty_text,
        "dataset_meta": {"classes": tuple(model.dataset_meta["classes"])},
        "mmdet_version": mmdet.__version__,
        "mmengine_version": mmengine.__version__,
    }
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)


def config_text_2x(*, caffe: bool) -> str:
    """A mmdetection 2.x training config as 2.x saved it in ``meta['config']`` (the parts the
    loader reads: the backbone ``style`` and ``img_norm_cfg`` expanded into the pipelines)."""
    if caffe:
        norm = "mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], to_rgb=False"
        style, pretrained = "caffe", "open-mmlab://detectron2/resnet50_caffe"
    else:
        norm = "mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True"
        style, pretrained = "pytorch", "torchvision://resnet50"
    return f"""model = dict(
    type='MaskRCNN',
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='{style}',
        init_cfg=dict(type='Pretrained', checkpoint='{pretrained}')),
    neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100, mask_thr_binary=0.5)))
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
img_norm_cfg = dict({norm})
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1333, 800),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', {norm}),
            dict(type='Pad', size_divisor=32),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img'])
        ])
]
"""


def save_checkpoint_2x(model, path, *, caffe: bool) -> None:
    """mmdetection 2.x's container: ``{'meta': {'mmdet_version', 'config', 'CLASSES'}, 'state_dict'}``."""
    meta = {
        "mmdet_version": "2.25.0",
        "config": config_text_2x(caffe=caffe),
        "CLASSES": tuple(model.dataset_meta["classes"]),
    }
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"meta": meta, "state_dict": state}, path)


def mmdet_batch(model, images: list[np.ndarray]) -> dict:
    """mmdetection's test pipeline on RGB images, then its data preprocessor: one padded batch.

    Returns ``{'inputs': float [B, 3, Hp, Wp], 'data_samples': [...]}`` as ``model.predict`` takes it.
    """
    from mmengine.dataset import Compose
    from mmdet.utils import get_test_pipeline_cfg

    pipeline = get_test_pipeline_cfg(copy.deepcopy(model.cfg))
    pipeline[0].type = "mmdet.LoadImageFromNDArray"
    pipeline = Compose(pipeline)
    items = [pipeline(dict(img=bgr(im), img_id=i)) for i, im in enumerate(images)]
    data = {"inputs": [d["inputs"] for d in items], "data_samples": [d["data_samples"] for d in items]}
    with torch.no_grad():
        return model.data_preprocessor(data, False)
