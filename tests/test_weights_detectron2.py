"""Detectron2 checkpoints: containers, key mapping, sizes, FrozenBN defaults and clear errors.

Detectron2 is not installable here, so checkpoints are written from scratch: ``d2_layout``
follows Detectron2's builders (``build_resnet_backbone``, ``FPN``, ``StandardRPNHead``,
``FastRCNNConvFCHead``, ``FastRCNNOutputLayers``, ``MaskRCNNConvUpsampleHead``; reference notes
B.3, B.8, B.9, B.11) and names every tensor twice: Detectron2's name and, from the table in
section E, the engine's canonical name. The mapping under test is checked against that table.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

import engine  # noqa: F401  (import the engine before weights: weights/__init__ imports engine)
from engine.config import TORCHVISION_MASKRCNN_R50_FPN
from engine.model import ArchitectureSpec
from tiny import tiny_state_dict
from engine.loading import build_model
from weights import Checkpoint, CheckpointError
from weights import detectron2 as d2

#: the engine's behaviour is irrelevant here; only the structure (and background last) matters
D2_CONFIG = TORCHVISION_MASKRCNN_R50_FPN.replace(
    name="detectron2_test", bn_eps=1e-5, stride_in_1x1=True, background_index="last", min_size=96, max_size=160
)

BN = ("weight", "bias", "running_mean", "running_var")


def d2_layout(
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
    """[(Detectron2 name, canonical name, shape)] of a Detectron2 Mask R-CNN R-FPN (defaults: tiny)."""
    out = []

    def conv(d, c, shape, *, bias=True):
        out.append((f"{d}.weight", f"{c}.weight", shape))
        if bias:
            out.append((f"{d}.bias", f"{c}.bias", shape[:1]))

    def norm(d, c, channels):
        out.extend((f"{d}.{s}", f"{c}.{s}", (channels,)) for s in BN)

    # ResNet (build_resnet_backbone): stem 64, bottleneck = groups * width_per_group, doubling per stage
    conv("backbone.bottom_up.stem.conv1", "backbone.body.conv1", (64, 3, 7, 7), bias=False)
    norm("backbone.bottom_up.stem.conv1.norm", "backbone.body.bn1", 64)
    in_c, out_c, bott = 64, res2_out, groups * width_per_group
    stage_outs = []
    for i, s in enumerate((2, 3, 4, 5)):
        for b in range(blocks[i]):
            cin = in_c if b == 0 else out_c
            d, c = f"backbone.bottom_up.res{s}.{b}", f"backbone.body.layer{s - 1}.{b}"
            if cin != out_c:  # Detectron2 adds a shortcut only when the channels change
                conv(f"{d}.shortcut", f"{c}.downsample.0", (out_c, cin, 1, 1), bias=False)
                norm(f"{d}.shortcut.norm", f"{c}.downsample.1", out_c)
            for k, shape in ((1, (bott, cin, 1, 1)), (2, (bott, bott // groups, 3, 3)), (3, (out_c, bott, 1, 1))):
                conv(f"{d}.conv{k}", f"{c}.conv{k}", shape, bias=False)
                norm(f"{d}.conv{k}.norm", f"{c}.bn{k}", shape[0])
        stage_outs.append(out_c)
        in_c, out_c, bott = out_c, out_c * 2, bott * 2
    # FPN: lateral 1x1 and output 3x3, bias only without norm
    for s, cin in zip((2, 3, 4, 5), stage_outs):
        for d_name, c_name, shape in (
            (f"backbone.fpn_lateral{s}", f"backbone.fpn.inner_blocks.{s - 2}", (fpn, cin, 1, 1)),
            (f"backbone.fpn_output{s}", f"backbone.fpn.layer_blocks.{s - 2}", (fpn, fpn, 3, 3)),
        ):
            conv(d_name, f"{c_name}.0", shape, bias=not fpn_norm)
            if fpn_norm:
                norm(f"{d_name}.norm", f"{c_name}.1", fpn)
    # RPN
    rpn = "proposal_generator.rpn_head"
    if rpn_convs == 1:
        conv(f"{rpn}.conv", "rpn.head.conv.0.0", (fpn, fpn, 3, 3))
    else:
        for k in range(rpn_convs):
            conv(f"{rpn}.conv.conv{k}", f"rpn.head.conv.{k}.0", (fpn, fpn, 3, 3))
    conv(f"{rpn}.objectness_logits", "rpn.head.cls_logits", (num_anchors, fpn, 1, 1))
    conv(f"{rpn}.anchor_deltas", "rpn.head.bbox_pred", (4 * num_anchors, fpn, 1, 1))
    # box head and predictor (81-way with background last, 80 x 4 boxes)
    prev = fpn
    for k in range(1, box_convs + 1):
        conv(f"roi_heads.box_head.conv{k}", f"roi_heads.box_head.{k - 1}.0", (box_conv_dim, prev, 3, 3), bias=not head_norm)
        if head_norm:
            norm(f"roi_heads.box_head.conv{k}.norm", f"roi_heads.box_head.{k - 1}.1", box_conv_dim)
        prev = box_conv_dim
    if box_convs:
        conv("roi_heads.box_head.fc1", f"roi_heads.box_head.{box_convs + 1}", (fc_dim, prev * pool * pool))
    else:
        conv("roi_heads.box_head.fc1", "roi_heads.box_head.fc6", (fc_dim, prev * pool * pool))
        conv("roi_heads.box_head.fc2", "roi_heads.box_head.fc7", (fc_dim, fc_dim))
    conv("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.cls_score", (num_classes + 1, fc_dim))
    conv("roi_heads.box_predictor.bbox_pred", "roi_heads.box_predictor.bbox_pred", (4 * num_classes, fc_dim))
    # mask head
    prev = fpn
    for k in range(1, mask_convs + 1):
        conv(f"roi_heads.mask_head.mask_fcn{k}", f"roi_heads.mask_head.{k - 1}.0", (mask_dim, prev, 3, 3), bias=not head_norm)
        if head_norm:
            norm(f"roi_heads.mask_head.mask_fcn{k}.norm", f"roi_heads.mask_head.{k - 1}.1", mask_dim)
        prev = mask_dim
    conv("roi_heads.mask_head.deconv", "roi_heads.mask_predictor.conv5_mask", (mask_dim, mask_dim, 2, 2))
    conv("roi_heads.mask_head.predictor", "roi_heads.mask_predictor.mask_fcn_logits", (num_classes, mask_dim, 1, 1))
    return out


def layout_spec(
    *, blocks=(1, 1, 1, 1), groups=1, width_per_group=8, res2_out=32, fpn=16, fpn_norm=False, num_anchors=3,
    rpn_convs=1, box_convs=0, box_conv_dim=8, head_norm=False, fc_dim=32, pool=7, num_classes=4, mask_convs=2,
    mask_dim=16,
) -> ArchitectureSpec:
    """The engine's sizes for the same arguments as ``d2_layout``."""
    bott = groups * width_per_group
    return ArchitectureSpec(
        blocks_per_stage=tuple(blocks),
        stage_widths=tuple(bott * 2**i for i in range(4)),
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


def random_arrays(layout, seed=0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Detectron2 name -> random array (running_var positive)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, _, shape in layout:
        a = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("running_var"):
            a = np.abs(a) + 0.5
        arrays[name] = a.astype(dtype)
    return arrays


def save_pkl(path, arrays, protocol=2, **extra):
    """A model-zoo style pickle (protocol 2 by default, as Python 2 era files are)."""
    data = {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": False, **extra}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def save_pth(path, arrays, **extra):
    """What DetectionCheckpointer saves: the model's state dict plus trainer state."""
    data = {
        "model": {k: torch.from_numpy(v) for k, v in arrays.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "params": [0, 1]}]},
        "scheduler": {"base_lrs": [0.02], "last_epoch": 89999},
        "iteration": 89999,
        **extra,
    }
    torch.save(data, path)
    return path


def check_loaded(canonical, layout, arrays, spec):
    """Every tensor is its source under the table's canonical name, and the network loads strictly."""
    expected = {c: d for d, c, _ in layout}
    assert canonical.keys() == expected.keys()
    for c, d in expected.items():
        assert canonical[c].dtype == torch.float32
        assert torch.equal(canonical[c], torch.from_numpy(arrays[d]).float()), c
    checkpoint = Checkpoint(state_dict=canonical, spec=spec, family="detectron2")
    model = build_model(checkpoint, config=D2_CONFIG)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[c], canonical[c]) for c in canonical)
    return model


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pkl", "pkl-protocol5", "pth", "container", "flat", "flat-numpy"])
def test_tiny_round_trip(tmp_path, fmt):
    layout = d2_layout()
    arrays = random_arrays(layout)
    if fmt == "pkl":
        source = save_pkl(tmp_path / "model_final.pkl", arrays)
    elif fmt == "pkl-protocol5":
        source = save_pkl(tmp_path / "model_final.pkl", arrays, protocol=5)
    elif fmt == "pth":
        source = save_pth(tmp_path / "model_final.pth", arrays)
    elif fmt == "container":
        source = {"model": arrays, "__author__": "someone"}
    elif fmt == "flat":
        source = {k: torch.from_numpy(v) for k, v in arrays.items()}
    else:
        source = arrays
    state = d2.read_detectron2(source)
    assert state.keys() == arrays.keys()
    canonical, spec, notes = d2.convert(state)
    assert spec == layout_spec()
    assert spec.num_classes == 5 and spec.num_box_classes == 4 and spec.num_mask_classes == 4
    assert notes.bn_eps == 1e-5 and notes.stride_in_1x1 and notes.box_pool_size == 7
    assert notes.defaulted_bn_stats == () and notes.ignored_keys == ()
    assert notes.pixel_mean == d2.PIXEL_MEAN_BGR and notes.pixel_std == (1.0, 1.0, 1.0)
    assert not notes.pixel_stats_from_file
    check_loaded(canonical, layout, arrays, spec)


def test_convert_accepts_what_the_reader_accepts():
    arrays = random_arrays(d2_layout())
    a, spec_a, _ = d2.convert({"model": arrays, "__author__": "x"})
    b, spec_b, _ = d2.convert(d2.read_detectron2(arrays))
    assert spec_a == spec_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(groups=4, width_per_group=4),  # ResNeXt: grouped 3x3, width from conv1
        dict(blocks=(2, 1, 3, 1)),
        dict(rpn_convs=2, num_anchors=5),
        dict(box_convs=2, box_conv_dim=8, fc_dim=24),  # FastRCNNConvFCHead NUM_CONV 2, NUM_FC 1
        dict(fpn_norm=True, box_convs=4, head_norm=True, mask_convs=3),  # *_syncbn configs: BN in FPN and heads
        dict(num_classes=1, mask_dim=8),
    ],
)
def test_architectures_round_trip(sizes):
    layout = d2_layout(**sizes)
    arrays = random_arrays(layout, seed=1)
    canonical, spec, notes = d2.convert(arrays)
    assert spec == layout_spec(**sizes)
    assert notes.stride_in_1x1 == (spec.groups == 1)
    check_loaded(canonical, layout, arrays, spec)


def test_half_and_double_precision_become_float32():
    layout = d2_layout()
    for dtype in (np.float16, np.float64):
        canonical, _, _ = d2.convert(random_arrays(layout, dtype=dtype))
        assert all(v.dtype == torch.float32 for v in canonical.values())


def test_caller_mapping_not_modified():
    arrays = random_arrays(d2_layout())
    for k in [k for k in arrays if k.endswith(("running_mean", "running_var"))]:
        del arrays[k]
    keys, snapshot = list(arrays), {k: v.copy() for k, v in arrays.items()}
    canonical, _, _ = d2.convert(arrays)
    assert list(arrays) == keys and all(np.array_equal(arrays[k], snapshot[k]) for k in keys)
    assert len(canonical) > len(arrays)  # the running statistics were added to the copy only


# --- full-size model-zoo layouts ----------------------------------------------------------------

R50 = dict(blocks=(3, 4, 6, 3), width_per_group=64, res2_out=256, fpn=256, fc_dim=1024, num_classes=80,
           mask_convs=4, mask_dim=256)


def test_full_r50_fpn_layout():
    """mask_rcnn_R_50_FPN_3x: the shapes of Detectron2's file, its spec, a strict load."""
    layout = d2_layout(**R50)
    shapes = {d: s for d, _, s in layout}
    # written out from Detectron2's modules (B.3, B.8, B.9), independently of d2_layout's loops
    assert shapes["backbone.bottom_up.stem.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["backbone.bottom_up.res2.0.conv1.weight"] == (64, 64, 1, 1)
    assert shapes["backbone.bottom_up.res2.0.shortcut.weight"] == (256, 64, 1, 1)
    assert shapes["backbone.bottom_up.res3.0.conv1.weight"] == (128, 256, 1, 1)
    assert shapes["backbone.bottom_up.res4.5.conv3.weight"] == (1024, 256, 1, 1)
    assert shapes["backbone.bottom_up.res5.2.conv2.norm.running_var"] == (512,)
    assert shapes["backbone.fpn_lateral5.weight"] == (256, 2048, 1, 1)
    assert shapes["backbone.fpn_output2.weight"] == (256, 256, 3, 3)
    assert shapes["proposal_generator.rpn_head.anchor_deltas.weight"] == (12, 256, 1, 1)
    assert shapes["roi_heads.box_head.fc1.weight"] == (1024, 12544)
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == (81, 1024)
    assert shapes["roi_heads.box_predictor.bbox_pred.weight"] == (320, 1024)
    assert shapes["roi_heads.mask_head.deconv.weight"] == (256, 256, 2, 2)
    assert shapes["roi_heads.mask_head.predictor.weight"] == (80, 256, 1, 1)
    assert "backbone.bottom_up.res2.1.shortcut.weight" not in shapes
    # 53 convs + 53 FrozenBN (4 tensors each) in the body; 16 FPN; 6 RPN; 4 + 4 box; 12 mask
    assert len(layout) == 53 * 5 + 16 + 6 + 8 + 12

    arrays = random_arrays(layout)
    canonical, spec, notes = d2.convert(arrays)
    assert spec == ArchitectureSpec(num_classes=81, num_box_classes=80, num_mask_classes=80)
    assert notes.stride_in_1x1 and notes.pixel_std == (1.0, 1.0, 1.0)
    check_loaded(canonical, layout, arrays, spec)


@pytest.mark.parametrize(
    "sizes, widths, stride_in_1x1, std",
    [
        (dict(R50, blocks=(3, 4, 23, 3)), (64, 128, 256, 512), True, (1.0, 1.0, 1.0)),  # mask_rcnn_R_101_FPN_3x
        (dict(R50, blocks=(3, 4, 23, 3), groups=32, width_per_group=8), (256, 512, 1024, 2048), False,
         (57.375, 57.120, 58.395)),  # mask_rcnn_X_101_32x8d_FPN_3x
    ],
)
def test_full_r101_and_x101_specs(sizes, widths, stride_in_1x1, std):
    layout = d2_layout(**sizes)
    arrays = {d: np.zeros(s, np.float32) for d, _, s in layout}  # untouched pages: cheap
    canonical, spec, notes = d2.convert(arrays)
    assert spec.blocks_per_stage == (3, 4, 23, 3) and spec.stage_widths == widths
    assert spec.stage_out_channels == (256, 512, 1024, 2048) and spec.groups == sizes.get("groups", 1)
    assert (spec.num_classes, spec.num_box_classes, spec.num_mask_classes) == (81, 80, 80)
    assert spec == layout_spec(**sizes)
    assert notes.stride_in_1x1 is stride_in_1x1 and notes.pixel_std == std
    assert canonical.keys() == {c for _, c, _ in layout}


# --- batch norm and non-parameters -------------------------------------------------------------


def test_missing_frozen_bn_stats_default_to_zero_and_one():
    layout = d2_layout()
    arrays = random_arrays(layout)
    dropped = [k for k in arrays if k.startswith("backbone.bottom_up.") and k.endswith(("running_mean", "running_var"))]
    for k in dropped:
        del arrays[k]
    arrays_only_var = dict(arrays)
    canonical, spec, notes = d2.convert(arrays)
    assert "backbone.bottom_up.stem.conv1.norm" in notes.defaulted_bn_stats
    assert "backbone.bottom_up.res3.0.shortcut.norm" in notes.defaulted_bn_stats
    assert len(notes.defaulted_bn_stats) == len(dropped) // 2
    assert torch.equal(canonical["backbone.body.bn1.running_mean"], torch.zeros(64))
    assert torch.equal(canonical["backbone.body.layer4.0.bn3.running_var"], torch.ones(256))
    assert torch.equal(canonical["backbone.body.layer1.0.downsample.1.running_var"], torch.ones(32))
    kept = {c: d for d, c, _ in layout if d in arrays}
    assert all(torch.equal(canonical[c], torch.from_numpy(arrays[d])) for c, d in kept.items())
    build_model(Checkpoint(canonical, spec, "detectron2"), config=D2_CONFIG)

    # only one of the two missing: only that one is filled
    arrays_only_var["backbone.bottom_up.stem.conv1.norm.running_mean"] = np.full(64, 3.0, np.float32)
    canonical, _, _ = d2.convert(arrays_only_var)
    assert torch.equal(canonical["backbone.body.bn1.running_mean"], torch.full((64,), 3.0))
    assert torch.equal(canonical["backbone.body.bn1.running_var"], torch.ones(64))


def test_non_parameters_are_dropped_and_pixel_stats_reported():
    arrays = random_arrays(d2_layout())
    arrays["backbone.bottom_up.stem.conv1.norm.num_batches_tracked"] = np.array(0, np.int64)
    arrays["proposal_generator.anchor_generator.cell_anchors.0"] = np.zeros((3, 4), np.float32)
    arrays["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    arrays["pixel_std"] = np.array([57.375, 57.12, 58.395], np.float32).reshape(3, 1, 1)
    canonical, _, notes = d2.convert(arrays)
    assert set(notes.ignored_keys) == {
        "backbone.bottom_up.stem.conv1.norm.num_batches_tracked",
        "proposal_generator.anchor_generator.cell_anchors.0",
        "pixel_mean",
        "pixel_std",
    }
    assert notes.pixel_stats_from_file
    assert notes.pixel_std == pytest.approx((57.375, 57.12, 58.395))
    assert not any("num_batches_tracked" in k or "anchor" in k or "pixel" in k for k in canonical)


def test_head_norm_without_stats_is_group_norm():
    arrays = random_arrays(d2_layout(fpn_norm=True))
    del arrays["backbone.fpn_lateral3.norm.running_mean"], arrays["backbone.fpn_lateral3.norm.running_var"]
    with pytest.raises(CheckpointError) as err:
        d2.convert(arrays)
    msg = str(err.value)
    assert "missing keys (2): backbone.fpn_lateral3.norm.running_mean, backbone.fpn_lateral3.norm.running_var" in msg
    assert "GroupNorm" in msg


# --- errors: keys ---------------------------------------------------------------------------------


def test_missing_unmapped_and_misshaped_keys_are_listed_by_detectron2_name():
    arrays = random_arrays(d2_layout())
    del arrays["backbone.bottom_up.res3.0.conv2.weight"]
    del arrays["roi_heads.mask_head.deconv.bias"]
    arrays["roi_heads.keypoint_head.conv_fcn1.weight"] = np.zeros((4, 4), np.float32)
    arrays["backbone.fpn_output4.bias"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError) as err:
        d2.convert(arrays)
    msg = str(err.value)
    assert "keys that fit no parameter of the network (1): roi_heads.keypoint_head.conv_fcn1.weight" in msg
    assert "missing keys (2): backbone.bottom_up.res3.0.conv2.weight, roi_heads.mask_head.deconv.bias" in msg
    assert "wrong shape (1): backbone.fpn_output4.bias (7,) (expected (16,))" in msg


def test_signature_keys_missing():
    arrays = random_arrays(d2_layout())
    del arrays["roi_heads.box_predictor.cls_score.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): roi_heads.box_predictor.cls_score.weight"):
        d2.convert(arrays)


def test_faster_rcnn_has_no_mask_head():
    arrays = {k: v for k, v in random_arrays(d2_layout()).items() if ".mask_head." not in k}
    with pytest.raises(CheckpointError, match="no mask head"):
        d2.convert(arrays)


def test_class_agnostic_heads_are_refused():
    arrays = random_arrays(d2_layout())
    arrays["roi_heads.box_predictor.bbox_pred.weight"] = np.zeros((4, 32), np.float32)
    arrays["roi_heads.box_predictor.bbox_pred.bias"] = np.zeros(4, np.float32)
    with pytest.raises(CheckpointError, match="CLS_AGNOSTIC_BBOX_REG"):
        d2.convert(arrays)
    arrays = random_arrays(d2_layout())
    arrays["roi_heads.mask_head.predictor.weight"] = np.zeros((1, 16, 1, 1), np.float32)
    arrays["roi_heads.mask_head.predictor.bias"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError, match="CLS_AGNOSTIC_MASK"):
        d2.convert(arrays)


def test_names_round_trip():
    """detectron2_name (used in messages) agrees with the table for every tensor of several layouts."""
    for sizes in ({}, dict(rpn_convs=2, box_convs=3, head_norm=True, fpn_norm=True), dict(blocks=(2, 2, 2, 2))):
        layout = d2_layout(**sizes)
        spec = layout_spec(**sizes)
        assert d2.name_map(spec) == {d: c for d, c, _ in layout}


def test_looks_like_detectron2():
    assert d2.looks_like_detectron2(random_arrays(d2_layout()).keys())
    assert not d2.looks_like_detectron2(tiny_state_dict().keys())
    assert not d2.looks_like_detectron2(["model", "__author__"])
    assert not d2.looks_like_detectron2(["neck.lateral_convs.0.conv.weight", "backbone.conv1.weight"])


# --- errors: containers and files -----------------------------------------------------------------


def test_truncated_pkl(tmp_path):
    path = save_pkl(tmp_path / "model_final.pkl", random_arrays(d2_layout()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read .*model_final.pkl"):
        d2.read_detectron2(path)


def test_truncated_pth(tmp_path):
    path = save_pth(tmp_path / "model_final.pth", random_arrays(d2_layout()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read"):
        d2.read_detectron2(path)


def test_torchvision_file_given_to_detectron2_reader(tmp_path):
    path = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(tiny_state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        d2.read_detectron2(path)
    msg = str(err.value)
    assert "torchvision-layout state dict" in msg and "expected a Detectron2" in msg
    assert "backbone.body.conv1.weight" in msg
    with pytest.raises(CheckpointError, match="torchvision-layout"):
        d2.convert(tiny_state_dict())
    # torchvision's training scripts save {'model': ..., 'optimizer': ...} too
    with pytest.raises(CheckpointError, match="torchvision-layout"):
        d2.read_detectron2({"model": tiny_state_dict(), "epoch": 25})


def test_mmdet_container(tmp_path):
    path = tmp_path / "mask_rcnn_r50_fpn_1x_coco.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(CheckpointError) as err:
        d2.read_detectron2(path)
    msg = str(err.value)
    assert "mmdetection" in msg and "top-level keys (2): meta, state_dict" in msg
    assert "expected a Detectron2" in msg and "{'model'" in msg
    # an mmdet state dict under 'model'
    with pytest.raises(CheckpointError, match="mmdetection-layout"):
        d2.read_detectron2({"model": {"neck.lateral_convs.0.conv.weight": torch.zeros(1)}})


def test_other_wrong_containers(tmp_path):
    path = tmp_path / "list.pkl"
    with open(path, "wb") as f:
        pickle.dump([np.zeros(2)], f)
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        d2.read_detectron2(path)
    with pytest.raises(CheckpointError, match="'model' entry is a str"):
        d2.read_detectron2({"model": "weights.pkl", "__author__": "x"})
    with pytest.raises(CheckpointError, match="Caffe2 / Detectron1 blob file"):
        d2.read_detectron2({"blobs": {"conv1_w": np.zeros(2)}})
    arrays = random_arrays(d2_layout())
    arrays["roi_heads.note"] = "hello"
    arrays["roi_heads.objects"] = np.array([object()], dtype=object)
    with pytest.raises(CheckpointError) as err:
        d2.read_detectron2({"model": arrays, "__author__": "x"})
    assert "entries that are not (2): roi_heads.note (str), roi_heads.objects (ndarray object)" in str(err.value)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        d2.read_detectron2(tmp_path / "nope.pkl")
    with pytest.raises(TypeError, match="path to a .pkl / .pth file or a mapping"):
        d2.read_detectron2(42)


def test_other_file_encodings(tmp_path):
    """A legacy (non-zip) torch.save file and a zoo pickle under a .pth name are read too;
    a torch file with pickled Python objects is refused by torch.load(weights_only=True)."""
    arrays = random_arrays(d2_layout())
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": tensors, "iteration": 3}, legacy, _use_new_zipfile_serialization=False)
    renamed = save_pkl(tmp_path / "model_final.pth", arrays)
    for path in (legacy, renamed):
        state = d2.read_detectron2(path)
        assert state.keys() == arrays.keys() and all(torch.equal(state[k], tensors[k]) for k in state)
    objects = tmp_path / "objects.pth"
    torch.save({"model": tensors, "cfg": _RunsCommand("true")}, objects)
    refused = r"could not read .* as a PyTorch checkpoint \(UnpicklingError: .*GLOBAL (posix|nt|os).system"
    with pytest.raises(CheckpointError, match=refused):
        d2.read_detectron2(objects)


class _RunsCommand:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_restricted_unpickler_refuses_code(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    arrays = random_arrays(d2_layout())
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": _RunsCommand(f"touch {marker}")}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"refused to load the global (posix|os|nt)\.system"):
        d2.read_detectron2(path)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.eval", "subprocess.Popen", "copyreg._reconstructor", "numpy.load"])
def test_restricted_unpickler_refuses_other_globals(target):
    module, name = target.rsplit(".", 1)
    data = f"c{module}\n{name}\n.".encode()
    with pytest.raises(pickle.UnpicklingError, match=f"refused to load the global {target}"):
        d2.RestrictedUnpickler(__import__("io").BytesIO(data), encoding="latin1").load()


def test_restricted_unpickler_reads_python2_style_numpy_pickles():
    """Protocol 0 and 2 pickles name __builtin__ and _codecs.encode as Python 2 files do."""
    import io

    data = {"model": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2.5)}, "set": {1, 2}}
    for protocol in (0, 2, 4, 5):
        out = d2.RestrictedUnpickler(io.BytesIO(pickle.dumps(data, protocol=protocol)), encoding="latin1").load()
        assert np.array_equal(out["model"]["a"], data["model"]["a"]) and out["set"] == {1, 2}
