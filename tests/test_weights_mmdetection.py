"""mmdetection checkpoints: containers, key mapping, sizes, meta notes and clear errors.

mmdetection / mmcv are not installed here, so checkpoints are written from scratch: ``mm_layout``
follows mmdetection's modules (``ResNet`` / ``ResNeXt`` with ``ResLayer`` and ``Bottleneck``,
``FPN`` of ``ConvModule``s, ``RPNHead``, ``Shared2FCBBoxHead`` / ``ConvFCBBoxHead``,
``FCNMaskHead``; reference notes C.3, C.5, C.8, C.9, C.10) and names every tensor twice:
mmdetection's name and, from the table in section E, the engine's canonical name. Files are
saved as mmdetection saves them, ``{'meta': {...}, 'state_dict': ...}`` (plus ``optimizer`` for
training checkpoints).
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch

import engine  # noqa: F401  (import the engine before weights: weights/__init__ imports engine)
from engine.config import TORCHVISION_MASKRCNN_R50_FPN
from engine.model import ArchitectureSpec
from tiny import tiny_state_dict
from engine.loading import build_model
from weights import Checkpoint, CheckpointError
from weights import mmdetection as mm

#: the engine's behaviour is irrelevant here; only the structure (and background last) matters
MM_CONFIG = TORCHVISION_MASKRCNN_R50_FPN.replace(
    name="mmdetection_test", bn_eps=1e-5, background_index="last", min_size=96, max_size=160
)

BN = ("weight", "bias", "running_mean", "running_var")

CONFIG_2X = """model = dict(
    type='MaskRCNN',
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_outs=5),
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            scales=[8],
            ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)))
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1333, 800),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(
                type='Normalize',
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                to_rgb=True),
            dict(type='Pad', size_divisor=32)
        ])
]
"""

CONFIG_3X = """model = dict(
    type='MaskRCNN',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_mask=True,
        pad_size_divisor=32),
    backbone=dict(
        type='ResNet',
        depth=50,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False)))
"""

CONFIG_3X_CAFFE = """model = dict(
    type='MaskRCNN',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[103.53, 116.28, 123.675],
        std=[1.0, 1.0, 1.0],
        bgr_to_rgb=False,
        pad_mask=True,
        pad_size_divisor=32),
    backbone=dict(
        type='ResNet',
        depth=50,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='caffe',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='open-mmlab://detectron2/resnet50_caffe')))
"""

CLASSES = ("cat", "dog", "bird", "fish")


def meta_2x(classes=CLASSES, config=CONFIG_2X):
    """What mmdetection 2.x's train.py + mmcv's save_checkpoint put in the meta."""
    return {
        "env_info": "sys.platform: linux\nPython: 3.7.7\nPyTorch: 1.6.0",
        "config": config,
        "seed": 0,
        "exp_name": "mask_rcnn_r50_fpn_1x_coco.py",
        "mmdet_version": "2.28.2",
        "CLASSES": classes,
        "PALETTE": [(220, 20, 60), (119, 11, 32), (0, 0, 142), (0, 0, 230)],
        "epoch": 12,
        "iter": 87960,
        "mmcv_version": "1.7.1",
        "time": "Sat Feb  5 10:20:30 2022",
        "hook_msgs": {"last_ckpt": "work_dirs/epoch_12.pth"},
    }


def meta_3x(classes=CLASSES, config=CONFIG_3X):
    """What mmengine's Runner.save_checkpoint puts in the meta."""
    return {
        "epoch": 12,
        "iter": 87960,
        "cfg": config,
        "seed": 1234,
        "experiment_name": "mask-rcnn_r50_fpn_1x_coco_20230101_000000",
        "time": "20230101_000000",
        "mmengine_version": "0.10.7",
        "dataset_meta": {"classes": classes, "palette": [(220, 20, 60), (119, 11, 32), (0, 0, 142), (0, 0, 230)]},
    }


def mm_layout(
    *,
    blocks=(1, 1, 1, 1),
    groups=1,
    width_per_group=8,
    res2_out=32,
    fpn=16,
    fpn_norm=False,
    num_anchors=3,
    rpn_convs=1,
    box_convs=0,
    box_conv_dim=8,
    head_norm=False,
    fc_dim=32,
    pool=7,
    num_classes=4,
    mask_convs=2,
    mask_dim=16,
):
    """[(mmdetection name, canonical name or None, shape)] of an mmdetection Mask R-CNN R-FPN
    (defaults: tiny). BN layers carry ``num_batches_tracked`` (canonical None), as nn.BatchNorm2d saves it."""
    out = []

    def conv(m, c, shape, *, bias=True):
        out.append((f"{m}.weight", f"{c}.weight", shape))
        if bias:
            out.append((f"{m}.bias", f"{c}.bias", shape[:1]))

    def bn(m, c, channels):
        out.extend((f"{m}.{s}", f"{c}.{s}", (channels,)) for s in BN)
        out.append((f"{m}.num_batches_tracked", None, ()))

    # ResNet / ResNeXt (mmdet backbones/resnet.py, resnext.py): stem, then ResLayers of Bottlenecks
    conv("backbone.conv1", "backbone.body.conv1", (64, 3, 7, 7), bias=False)
    bn("backbone.bn1", "backbone.body.bn1", 64)
    in_c, out_c, width = 64, res2_out, groups * width_per_group
    stage_outs = []
    for i, t in enumerate((1, 2, 3, 4)):
        for b in range(blocks[i]):
            cin = in_c if b == 0 else out_c
            m, c = f"backbone.layer{t}.{b}", f"backbone.body.layer{t}.{b}"
            for k, shape in ((1, (width, cin, 1, 1)), (2, (width, width // groups, 3, 3)), (3, (out_c, width, 1, 1))):
                conv(f"{m}.conv{k}", f"{c}.conv{k}", shape, bias=False)
                bn(f"{m}.bn{k}", f"{c}.bn{k}", shape[0])
            if b == 0:  # ResLayer: stride != 1 or inplanes != planes * expansion
                conv(f"{m}.downsample.0", f"{c}.downsample.0", (out_c, cin, 1, 1), bias=False)
                bn(f"{m}.downsample.1", f"{c}.downsample.1", out_c)
        stage_outs.append(out_c)
        in_c, out_c, width = out_c, out_c * 2, width * 2
    # FPN: ConvModules, bias only without norm
    for i, cin in enumerate(stage_outs):
        for m_name, c_name, shape in (
            (f"neck.lateral_convs.{i}", f"backbone.fpn.inner_blocks.{i}", (fpn, cin, 1, 1)),
            (f"neck.fpn_convs.{i}", f"backbone.fpn.layer_blocks.{i}", (fpn, fpn, 3, 3)),
        ):
            conv(f"{m_name}.conv", f"{c_name}.0", shape, bias=not fpn_norm)
            if fpn_norm:
                bn(f"{m_name}.bn", f"{c_name}.1", fpn)
    # RPNHead: one plain conv, or num_convs ConvModules in a Sequential
    if rpn_convs == 1:
        conv("rpn_head.rpn_conv", "rpn.head.conv.0.0", (fpn, fpn, 3, 3))
    else:
        for k in range(rpn_convs):
            conv(f"rpn_head.rpn_conv.{k}.conv", f"rpn.head.conv.{k}.0", (fpn, fpn, 3, 3))
    conv("rpn_head.rpn_cls", "rpn.head.cls_logits", (num_anchors, fpn, 1, 1))  # sigmoid: A channels
    conv("rpn_head.rpn_reg", "rpn.head.bbox_pred", (4 * num_anchors, fpn, 1, 1))
    # bbox head: fc_cls K + 1 (background last), fc_reg 4K
    bh = "roi_head.bbox_head"
    prev = fpn
    for k in range(box_convs):
        conv(f"{bh}.shared_convs.{k}.conv", f"roi_heads.box_head.{k}.0", (box_conv_dim, prev, 3, 3), bias=not head_norm)
        if head_norm:
            bn(f"{bh}.shared_convs.{k}.bn", f"roi_heads.box_head.{k}.1", box_conv_dim)
        prev = box_conv_dim
    if box_convs:
        conv(f"{bh}.shared_fcs.0", f"roi_heads.box_head.{box_convs + 1}", (fc_dim, prev * pool * pool))
    else:
        conv(f"{bh}.shared_fcs.0", "roi_heads.box_head.fc6", (fc_dim, prev * pool * pool))
        conv(f"{bh}.shared_fcs.1", "roi_heads.box_head.fc7", (fc_dim, fc_dim))
    conv(f"{bh}.fc_cls", "roi_heads.box_predictor.cls_score", (num_classes + 1, fc_dim))
    conv(f"{bh}.fc_reg", "roi_heads.box_predictor.bbox_pred", (4 * num_classes, fc_dim))
    # FCNMaskHead
    mh = "roi_head.mask_head"
    prev = fpn
    for k in range(mask_convs):
        conv(f"{mh}.convs.{k}.conv", f"roi_heads.mask_head.{k}.0", (mask_dim, prev, 3, 3), bias=not head_norm)
        if head_norm:
            bn(f"{mh}.convs.{k}.bn", f"roi_heads.mask_head.{k}.1", mask_dim)
        prev = mask_dim
    conv(f"{mh}.upsample", "roi_heads.mask_predictor.conv5_mask", (mask_dim, mask_dim, 2, 2))
    conv(f"{mh}.conv_logits", "roi_heads.mask_predictor.mask_fcn_logits", (num_classes, mask_dim, 1, 1))
    return out


def layout_spec(
    *, blocks=(1, 1, 1, 1), groups=1, width_per_group=8, res2_out=32, fpn=16, fpn_norm=False, num_anchors=3,
    rpn_convs=1, box_convs=0, box_conv_dim=8, head_norm=False, fc_dim=32, pool=7, num_classes=4, mask_convs=2,
    mask_dim=16,
) -> ArchitectureSpec:
    """The engine's sizes for the same arguments as ``mm_layout``."""
    width = groups * width_per_group
    return ArchitectureSpec(
        blocks_per_stage=tuple(blocks),
        stage_widths=tuple(width * 2**i for i in range(4)),
        stage_out_channels=tuple(res2_out * 2**i for i in range(4)),
        groups=groups,
        fpn_channels=fpn,
        fpn_norm=fpn_norm,
        num_anchors=num_anchors,
        rpn_conv_depth=rpn_convs,
        box_head_convs=box_convs,
        box_head_conv_channels=box_conv_dim if box_convs else 256,
        box_head_norm=head_norm and box_convs > 0,
        representation_size=fc_dim,
        num_classes=num_classes + 1,
        num_box_classes=num_classes,
        mask_convs=mask_convs,
        mask_channels=mask_dim,
        mask_norm=head_norm,
        num_mask_classes=num_classes,
    )


def random_state(layout, seed=0, dtype=torch.float32) -> OrderedDict:
    """mmdetection name -> random tensor (running_var positive, num_batches_tracked int64)."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, _, shape in layout:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(87960, dtype=torch.int64)
            continue
        t = torch.randn(shape, generator=g)
        if name.endswith("running_var"):
            t = t.abs() + 0.5
        state[name] = t.to(dtype)
    return state


def save_pth(path, state, meta=None, *, optimizer=False, **kwargs):
    """A checkpoint as mmdetection writes it (publish_model.py keeps meta and state_dict only)."""
    data = {"meta": meta_2x() if meta is None else meta, "state_dict": state}
    if optimizer:
        data["optimizer"] = {"state": {}, "param_groups": [{"lr": 0.02, "momentum": 0.9, "params": [0, 1]}]}
    torch.save(data, path, **kwargs)
    return path


def check_loaded(canonical, layout, state, spec):
    """Every tensor is its source under the table's canonical name, and the network loads strictly."""
    expected = {c: m for m, c, _ in layout if c is not None}
    assert canonical.keys() == expected.keys()
    for c, m in expected.items():
        assert canonical[c].dtype == torch.float32
        assert torch.equal(canonical[c], state[m].float()), c
    model = build_model(Checkpoint(canonical, spec, "mmdetection"), config=MM_CONFIG)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[c], canonical[c]) for c in canonical)
    return model


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pth-2x", "pth-3x", "pth-optimizer", "pth-legacy", "container", "flat", "module"])
def test_tiny_round_trip(tmp_path, fmt):
    layout = mm_layout()
    state = random_state(layout)
    path = tmp_path / "mask_rcnn_r50_fpn_1x_coco.pth"
    if fmt == "pth-2x":
        source = save_pth(path, state, meta_2x())
    elif fmt == "pth-3x":
        source = save_pth(path, state, meta_3x())
    elif fmt == "pth-optimizer":
        source = save_pth(path, state, meta_3x(), optimizer=True)
    elif fmt == "pth-legacy":  # torch < 1.6 wrote non-zip files (mmdetection 2.0 era)
        source = save_pth(path, state, meta_2x(), _use_new_zipfile_serialization=False)
    elif fmt == "container":
        source = {"meta": meta_2x(), "state_dict": state}
    elif fmt == "flat":
        source = state
    else:  # saved from a DataParallel model; mmcv's load_checkpoint removes the prefix
        source = {"meta": meta_3x(), "state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items())}

    read = mm.read_mmdetection(source)
    assert list(read) == list(state) and all(torch.equal(read[k], state[k]) for k in state)
    canonical, spec, notes = mm.convert(source)
    assert spec == layout_spec()
    assert (spec.num_classes, spec.num_box_classes, spec.num_mask_classes) == (5, 4, 4)
    assert notes.bn_eps == 1e-5 and notes.box_pool_size == 7 and not notes.stride_in_1x1
    assert notes.stripped_prefix == ("module." if fmt == "module" else None)
    assert set(notes.ignored_keys) == {m for m, c, _ in layout if c is None}
    assert notes.class_names == (None if fmt == "flat" else CLASSES)
    assert notes.warnings == ()
    check_loaded(canonical, layout, state, spec)


def test_convert_accepts_what_the_reader_accepts(tmp_path):
    state = random_state(mm_layout())
    path = save_pth(tmp_path / "m.pth", state)
    a, spec_a, notes_a = mm.convert(path)
    b, spec_b, notes_b = mm.convert(mm.read_mmdetection(path))
    assert spec_a == spec_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert notes_a.class_names == CLASSES and notes_b.class_names is None  # the flat dict has no meta


@pytest.mark.parametrize(
    "sizes",
    [
        dict(groups=4, width_per_group=4),  # ResNeXt: grouped 3x3, width from conv1
        dict(blocks=(2, 1, 3, 1)),
        dict(rpn_convs=2, num_anchors=5),  # RPNHead num_convs=2: rpn_conv.{i}.conv
        dict(box_convs=2, box_conv_dim=8, fc_dim=24),  # ConvFCBBoxHead: 2 shared convs, 1 shared fc
        dict(fpn_norm=True, box_convs=4, head_norm=True, mask_convs=3),  # norm_cfg=BN in FPN and heads
        dict(num_classes=1, mask_dim=8),  # one class: fc_reg has 4 rows and is class-specific
    ],
)
def test_architectures_round_trip(sizes):
    layout = mm_layout(**sizes)
    state = random_state(layout, seed=1)
    canonical, spec, _ = mm.convert({"meta": meta_3x(classes=None), "state_dict": state})
    assert spec == layout_spec(**sizes)
    check_loaded(canonical, layout, state, spec)


def test_half_and_double_precision_become_float32():
    layout = mm_layout()
    for dtype in (torch.float16, torch.float64):
        canonical, _, _ = mm.convert(random_state(layout, dtype=dtype))
        assert all(v.dtype == torch.float32 for v in canonical.values())


def test_caller_mapping_not_modified():
    state = random_state(mm_layout())
    prefixed = OrderedDict((f"module.{k}", v) for k, v in state.items())
    meta = meta_2x()
    container = {"meta": meta, "state_dict": prefixed, "optimizer": {"state": {}}}
    keys, snapshot = list(prefixed), {k: v.clone() for k, v in prefixed.items()}
    meta_snapshot = dict(meta)
    canonical, _, _ = mm.convert(container)
    mm.read_mmdetection(container)
    assert list(container) == ["meta", "state_dict", "optimizer"] and container["state_dict"] is prefixed
    assert list(prefixed) == keys and all(torch.equal(prefixed[k], snapshot[k]) for k in keys)
    assert meta == meta_snapshot
    canonical["backbone.body.conv1.weight"] = torch.zeros(1)  # the result is a new dict
    assert prefixed["module.backbone.conv1.weight"].shape == (64, 3, 7, 7)


# --- notes from the meta ---------------------------------------------------------------------------


def test_notes_from_2x_meta():
    state = random_state(mm_layout())
    _, _, notes = mm.convert({"meta": meta_2x(), "state_dict": state})
    assert notes.class_names == CLASSES
    assert notes.mmdet_version == "2.28.2" and notes.mmcv_version == "1.7.1" and notes.mmengine_version is None
    assert notes.has_config and notes.style == "pytorch" and notes.style_from_config and not notes.stride_in_1x1
    assert notes.pixel_stats_from_config and notes.channel_order == "RGB"
    assert notes.pixel_mean == (123.675, 116.28, 103.53) and notes.pixel_std == (58.395, 57.12, 57.375)
    assert notes.warnings == ()


def test_notes_from_3x_meta():
    state = random_state(mm_layout())
    _, _, notes = mm.convert({"meta": meta_3x(), "state_dict": state})
    assert notes.class_names == CLASSES
    assert notes.mmengine_version == "0.10.7" and notes.mmdet_version is None
    assert notes.style == "pytorch" and notes.style_from_config
    assert notes.pixel_stats_from_config and notes.channel_order == "RGB"
    assert notes.pixel_mean == (123.675, 116.28, 103.53) and notes.pixel_std == (58.395, 57.12, 57.375)


def test_caffe_style_from_config():
    """mask-rcnn_r50-caffe_fpn configs: stride in the 1x1 conv, BGR input, std 1."""
    state = random_state(mm_layout())
    _, _, notes = mm.convert({"meta": meta_3x(config=CONFIG_3X_CAFFE), "state_dict": state})
    assert notes.style == "caffe" and notes.stride_in_1x1
    assert notes.channel_order == "BGR" and notes.pixel_stats_from_config
    assert notes.pixel_mean == (103.53, 116.28, 123.675) and notes.pixel_std == (1.0, 1.0, 1.0)


def test_notes_without_meta_are_the_pytorch_style_defaults():
    _, _, notes = mm.convert(random_state(mm_layout()))
    assert notes == mm.MMDetectionNotes(ignored_keys=notes.ignored_keys)  # every other field at its default
    assert notes.pixel_mean == (123.675, 116.28, 103.53) and notes.channel_order == "RGB"
    assert not notes.has_config and not notes.style_from_config and notes.class_names is None


def test_meta_that_does_not_fit_is_reported_not_used():
    state = random_state(mm_layout())
    conflicting = CONFIG_3X + "\nbackbone2 = dict(style='caffe')\nimg_norm_cfg = dict(mean=[1, 2, 3], std=[4, 5, 6])\n"
    meta = meta_3x(classes=("a", "b"), config=conflicting)
    _, _, notes = mm.convert({"meta": meta, "state_dict": state})
    assert notes.class_names is None
    assert notes.style == "pytorch" and not notes.style_from_config
    assert not notes.pixel_stats_from_config and notes.pixel_mean == mm.PIXEL_MEAN_RGB
    assert len(notes.warnings) == 3
    assert "2 class names but the heads have 4 classes" in notes.warnings[0]
    _, _, notes = mm.convert({"meta": "not a dict", "state_dict": state})
    assert notes.class_names is None and not notes.has_config


# --- full-size model-zoo layouts ----------------------------------------------------------------

R50 = dict(blocks=(3, 4, 6, 3), width_per_group=64, res2_out=256, fpn=256, fc_dim=1024, num_classes=80,
           mask_convs=4, mask_dim=256)


def test_full_r50_fpn_layout():
    """mask_rcnn_r50_fpn_1x_coco: the shapes of mmdetection's file, its spec, a strict load."""
    layout = mm_layout(**R50)
    shapes = {m: s for m, _, s in layout}
    # written out from mmdetection's modules (C.3, C.5, C.8, C.9, C.10), independently of mm_layout's loops
    assert shapes["backbone.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["backbone.bn1.running_var"] == (64,)
    assert shapes["backbone.layer1.0.conv1.weight"] == (64, 64, 1, 1)
    assert shapes["backbone.layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["backbone.layer2.0.conv1.weight"] == (128, 256, 1, 1)
    assert shapes["backbone.layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["backbone.layer3.5.conv3.weight"] == (1024, 256, 1, 1)
    assert shapes["backbone.layer4.2.bn2.running_var"] == (512,)
    assert shapes["backbone.layer4.2.bn2.num_batches_tracked"] == ()
    assert shapes["neck.lateral_convs.3.conv.weight"] == (256, 2048, 1, 1)
    assert shapes["neck.fpn_convs.0.conv.weight"] == (256, 256, 3, 3)
    assert shapes["rpn_head.rpn_conv.weight"] == (256, 256, 3, 3)
    assert shapes["rpn_head.rpn_cls.weight"] == (3, 256, 1, 1)
    assert shapes["rpn_head.rpn_reg.weight"] == (12, 256, 1, 1)
    assert shapes["roi_head.bbox_head.shared_fcs.0.weight"] == (1024, 12544)
    assert shapes["roi_head.bbox_head.shared_fcs.1.weight"] == (1024, 1024)
    assert shapes["roi_head.bbox_head.fc_cls.weight"] == (81, 1024)
    assert shapes["roi_head.bbox_head.fc_reg.weight"] == (320, 1024)
    assert shapes["roi_head.mask_head.convs.3.conv.weight"] == (256, 256, 3, 3)
    assert shapes["roi_head.mask_head.upsample.weight"] == (256, 256, 2, 2)
    assert shapes["roi_head.mask_head.conv_logits.weight"] == (80, 256, 1, 1)
    assert "backbone.layer1.1.downsample.0.weight" not in shapes
    # 53 convs + 53 BN (5 tensors each) in the body; 16 FPN; 6 RPN; 4 + 4 box; 12 mask
    assert len(layout) == 53 * 6 + 16 + 6 + 8 + 12

    state = random_state(layout)
    meta = meta_2x(classes=tuple(f"c{i}" for i in range(80)))
    canonical, spec, notes = mm.convert({"meta": meta, "state_dict": state})
    assert spec == ArchitectureSpec(num_classes=81, num_box_classes=80, num_mask_classes=80)
    assert len(notes.ignored_keys) == 53 and len(notes.class_names) == 80
    check_loaded(canonical, layout, state, spec)


@pytest.mark.parametrize(
    "name, sizes, widths, groups",
    [
        ("mask_rcnn_r101_fpn", dict(R50, blocks=(3, 4, 23, 3)), (64, 128, 256, 512), 1),
        ("mask_rcnn_x101_32x4d_fpn", dict(R50, blocks=(3, 4, 23, 3), groups=32, width_per_group=4),
         (128, 256, 512, 1024), 32),
        ("mask_rcnn_x101_64x4d_fpn", dict(R50, blocks=(3, 4, 23, 3), groups=64, width_per_group=4),
         (256, 512, 1024, 2048), 64),
        ("mask_rcnn_x101_32x8d_fpn", dict(R50, blocks=(3, 4, 23, 3), groups=32, width_per_group=8),
         (256, 512, 1024, 2048), 32),
    ],
)
def test_full_r101_and_x101_specs(name, sizes, widths, groups):
    layout = mm_layout(**sizes)
    shapes = {m: s for m, _, s in layout}
    # mmdet ResNeXt: width = floor(planes * base_width / 64) * groups; conv2 is grouped
    assert shapes["backbone.layer1.0.conv2.weight"] == (widths[0], widths[0] // groups, 3, 3)
    assert shapes["backbone.layer4.0.conv3.weight"] == (2048, widths[3], 1, 1)
    state = {m: torch.zeros(()).expand(s) for m, _, s in layout}  # no memory: only the shapes matter
    canonical, spec, _ = mm.convert(state)
    assert spec.blocks_per_stage == (3, 4, 23, 3) and spec.stage_widths == widths and spec.groups == groups
    assert spec.stage_out_channels == (256, 512, 1024, 2048)
    assert (spec.num_classes, spec.num_box_classes, spec.num_mask_classes) == (81, 80, 80)
    assert spec == layout_spec(**sizes)
    assert canonical.keys() == {c for _, c, _ in layout if c is not None}


# --- errors: keys and heads --------------------------------------------------------------------------


def test_missing_unmapped_and_misshaped_keys_are_listed_by_mmdetection_name():
    state = random_state(mm_layout())
    del state["backbone.layer2.0.conv2.weight"]
    del state["roi_head.mask_head.upsample.bias"]
    state["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(4, 4)
    state["neck.fpn_convs.2.conv.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        mm.convert({"meta": meta_2x(), "state_dict": state})
    msg = str(err.value)
    assert "keys that fit no parameter of the network (1): roi_head.bbox_head.fc_extra.weight" in msg
    assert "missing keys (2): backbone.layer2.0.conv2.weight, roi_head.mask_head.upsample.bias" in msg
    assert "wrong shape (1): neck.fpn_convs.2.conv.bias (7,) (expected (16,))" in msg


def test_signature_keys_missing():
    state = random_state(mm_layout())
    del state["roi_head.bbox_head.fc_cls.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): roi_head.bbox_head.fc_cls.weight"):
        mm.convert(state)


def test_softmax_rpn_is_refused():
    state = random_state(mm_layout())
    state["rpn_head.rpn_cls.weight"] = torch.zeros(6, 16, 1, 1)  # 2 x A: use_sigmoid=False
    state["rpn_head.rpn_cls.bias"] = torch.zeros(6)
    with pytest.raises(CheckpointError, match=r"rpn_head.rpn_cls has 6 output channels for 3 anchors .*softmax"):
        mm.convert(state)
    state["rpn_head.rpn_cls.weight"] = torch.zeros(4, 16, 1, 1)
    with pytest.raises(CheckpointError, match=r"rpn_head.rpn_cls has 4 output channels but rpn_head.rpn_reg has 12"):
        mm.convert(state)


def test_class_agnostic_heads_are_refused():
    state = random_state(mm_layout())
    state["roi_head.bbox_head.fc_reg.weight"] = torch.zeros(4, 32)
    state["roi_head.bbox_head.fc_reg.bias"] = torch.zeros(4)
    agnostic = r"fc_reg has 4 outputs for 4 classes: class-agnostic .*reg_class_agnostic"
    with pytest.raises(CheckpointError, match=agnostic):
        mm.convert(state)
    state = random_state(mm_layout())
    state["roi_head.bbox_head.fc_reg.weight"] = torch.zeros(20, 32)  # 4 x (K + 1): a background row
    with pytest.raises(CheckpointError, match=r"fc_reg has 20 outputs for 4 classes"):
        mm.convert(state)
    state = random_state(mm_layout())
    state["roi_head.mask_head.conv_logits.weight"] = torch.zeros(1, 16, 1, 1)
    state["roi_head.mask_head.conv_logits.bias"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="class-agnostic masks"):
        mm.convert(state)


def test_other_detectors_are_refused():
    state = random_state(mm_layout())
    faster = {k: v for k, v in state.items() if not k.startswith("roi_head.mask_head.")}
    with pytest.raises(CheckpointError, match="no mask head"):
        mm.convert(faster)
    cascade = {k.replace("roi_head.bbox_head.", "roi_head.bbox_head.0."): v for k, v in state.items()}
    with pytest.raises(CheckpointError, match="Cascade"):
        mm.convert(cascade)
    v1 = {k.replace("roi_head.", ""): v for k, v in state.items()}
    with pytest.raises(CheckpointError, match="1.x layout .*upgrade_model_version"):
        mm.convert(v1)
    retina = {k: v for k, v in state.items() if k.startswith(("backbone.", "neck."))}
    retina["bbox_head.retina_cls.weight"] = torch.zeros(9, 16, 3, 3)
    with pytest.raises(CheckpointError, match="single-stage"):
        mm.convert(retina)


def test_variants_are_named():
    state = random_state(mm_layout())
    gn = dict(state)
    for s in ("weight", "bias"):
        gn[f"roi_head.mask_head.convs.0.gn.{s}"] = torch.ones(16)
    del gn["roi_head.mask_head.convs.0.conv.bias"]
    with pytest.raises(CheckpointError) as err:
        mm.convert(gn)
    assert "GroupNorm" in str(err.value) and "roi_head.mask_head.convs.0.gn.weight" in str(err.value)
    dcn = dict(state)
    dcn["backbone.layer3.0.conv2.conv_offset.weight"] = torch.zeros(18, 128, 3, 3)
    with pytest.raises(CheckpointError, match="deformable"):
        mm.convert(dcn)
    extra = dict(state)
    extra["neck.fpn_convs.4.conv.weight"] = torch.zeros(16, 256, 3, 3)
    with pytest.raises(CheckpointError, match="add_extra_convs"):
        mm.convert(extra)


def test_names_round_trip():
    """mmdetection_name (used in messages) agrees with the table for every tensor of several layouts."""
    for sizes in ({}, dict(rpn_convs=2, box_convs=3, head_norm=True, fpn_norm=True), dict(blocks=(2, 2, 2, 2))):
        layout = mm_layout(**sizes)
        assert mm.name_map(layout_spec(**sizes)) == {m: c for m, c, _ in layout if c is not None}


def test_looks_like_mmdetection():
    assert mm.looks_like_mmdetection(random_state(mm_layout()).keys())
    assert mm.looks_like_mmdetection(["module.backbone.conv1.weight"])
    assert not mm.looks_like_mmdetection(tiny_state_dict().keys())
    assert not mm.looks_like_mmdetection(["meta", "state_dict"])
    assert not mm.looks_like_mmdetection(["backbone.bottom_up.stem.conv1.weight", "roi_heads.box_head.fc1.weight"])


# --- errors: containers and files -------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = save_pth(tmp_path / "mask_rcnn.pth", random_state(mm_layout()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"could not read .*mask_rcnn.pth.* truncated or corrupt"):
        mm.read_mmdetection(path)


def test_detectron2_files_given_to_mmdetection_reader(tmp_path):
    d2_state = {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}
    path = tmp_path / "model_final.pth"
    torch.save({"model": d2_state, "iteration": 89999}, path)
    with pytest.raises(CheckpointError) as err:
        mm.read_mmdetection(path)
    msg = str(err.value)
    assert "{'model': ...} container" in msg and "top-level keys (2): iteration, model" in msg
    assert "Detectron2-layout" in msg and "'state_dict'" in msg and "expected an mmdetection" in msg
    with pytest.raises(CheckpointError, match="Detectron2-layout"):
        mm.convert(d2_state)
    pkl = tmp_path / "model_final_f10217.pkl"
    with open(pkl, "wb") as f:
        zoo = {"model": {"backbone.bottom_up.stem.conv1.weight": [0.0]}, "__author__": "Detectron2 Model Zoo"}
        pickle.dump(zoo, f, protocol=2)
    with pytest.raises(CheckpointError, match="plain pickle"):
        mm.read_mmdetection(pkl)


def test_torchvision_state_dict_given_to_mmdetection_reader(tmp_path):
    path = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(tiny_state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        mm.read_mmdetection(path)
    msg = str(err.value)
    assert "torchvision-layout state dict" in msg and "expected an mmdetection" in msg
    assert "backbone.body.conv1.weight" in msg
    with pytest.raises(CheckpointError, match="torchvision-layout"):
        mm.convert(tiny_state_dict())
    with pytest.raises(CheckpointError, match="torchvision-layout"):
        mm.convert({"meta": {}, "state_dict": tiny_state_dict()})


class _RunsCommand:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_objects_that_weights_only_refuses(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "epoch_12.pth"
    meta = dict(meta_3x(), hook=_RunsCommand(f"touch {marker}"))
    save_pth(path, random_state(mm_layout()), meta)
    with pytest.raises(CheckpointError) as err:
        mm.read_mmdetection(path)
    msg = str(err.value)
    assert "weights_only=True" in msg and "refused to unpickle" in msg
    assert any(f"{m}.system" in msg for m in ("posix", "nt", "os"))
    assert "not loaded with unrestricted unpickling" in msg
    assert not marker.exists()


def test_other_wrong_containers(tmp_path):
    state = random_state(mm_layout())
    with pytest.raises(CheckpointError, match="'state_dict' entry is a str"):
        mm.read_mmdetection({"meta": {}, "state_dict": "weights.pth"})
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        path = tmp_path / "list.pth"
        torch.save([torch.zeros(2)], path)
        mm.read_mmdetection(path)
    with pytest.raises(CheckpointError, match="it is empty"):
        mm.read_mmdetection({"meta": {}, "state_dict": {}})
    with pytest.raises(CheckpointError, match="Caffe2"):
        mm.read_mmdetection({"blobs": {}})
    bad = dict(state, **{"roi_head.note": "hello", "roi_head.list": [1, 2]})
    listed = r"entries that are not \(2\): roi_head.list \(list\), roi_head.note \(str\)"
    with pytest.raises(CheckpointError, match=listed):
        mm.read_mmdetection({"meta": {}, "state_dict": bad})
    clash = dict(state, **{"module.backbone.conv1.weight": torch.zeros(64, 3, 7, 7)})
    duplicated = r"with and without the 'module.' prefix; duplicated \(1\): backbone.conv1.weight"
    with pytest.raises(CheckpointError, match=duplicated):
        mm.read_mmdetection(clash)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a file written by torch.save"):
        mm.read_mmdetection(text)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        mm.read_mmdetection(tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="path to a .pth file or a mapping"):
        mm.read_mmdetection(42)
