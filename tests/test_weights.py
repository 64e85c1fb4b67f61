"""Checkpoint loading: layouts, legacy names, eps, and clear errors for bad files."""

import pytest
import torch

from checkpoints import legacy_state_dict
from tiny import TINY_SPEC, tiny_state_dict
from engine.loading import checkpoint_config
from weights import CheckpointError, load_checkpoint
from weights.torchvision import architecture, rename_legacy_keys


def test_reads_file_and_state_dict_alike(tmp_path):
    state = tiny_state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    from_file, from_dict = load_checkpoint(path), load_checkpoint(state)
    assert from_file.spec == from_dict.spec == TINY_SPEC
    assert from_file.family == "torchvision"
    assert from_file.state_dict.keys() == from_dict.state_dict.keys()


def test_legacy_names_are_accepted():
    state = tiny_state_dict()
    legacy = legacy_state_dict(state)
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn1.weight" in legacy
    assert "backbone.fpn.inner_blocks.0.weight" in legacy
    assert rename_legacy_keys(legacy).keys() == state.keys()
    loaded = load_checkpoint(legacy)
    assert loaded.spec == TINY_SPEC


def test_eps_follows_num_batches_tracked():
    state = tiny_state_dict()
    assert checkpoint_config(load_checkpoint(state)).bn_eps == 0.0
    state["backbone.body.bn1.num_batches_tracked"] = torch.tensor(0)
    loaded = load_checkpoint(state)
    assert checkpoint_config(loaded).bn_eps == 1e-5
    assert not any(k.endswith("num_batches_tracked") for k in loaded.state_dict)


def test_half_precision_is_upcast():
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_state_dict().items()}
    loaded = load_checkpoint(state)
    assert all(v.dtype == torch.float32 for v in loaded.state_dict.values())


def test_caller_state_dict_not_modified():
    state = legacy_state_dict(tiny_state_dict())
    keys = list(state)
    snapshot = {k: v.clone() for k, v in state.items()}
    from engine import Predictor

    Predictor(state)
    assert list(state) == keys
    assert all(torch.equal(state[k], snapshot[k]) for k in keys)


def test_sizes_read_from_shapes():
    spec = architecture(tiny_state_dict())
    assert spec.blocks_per_stage == (1, 1, 1, 1) and spec.fpn_channels == 16 and spec.num_classes == 5


def test_missing_unexpected_and_misshaped_are_listed():
    from engine import Predictor

    state = tiny_state_dict()
    del state["backbone.body.layer2.0.bn2.running_var"]
    state["roi_heads.extra.weight"] = torch.zeros(3)
    state["rpn.head.bbox_pred.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as err:
        Predictor(state)
    msg = str(err.value)
    assert "missing (1): backbone.body.layer2.0.bn2.running_var" in msg
    assert "unexpected (1): roi_heads.extra.weight" in msg
    assert "wrong shape (1): rpn.head.bbox_pred.bias (5,) (expected (12,))" in msg


def test_not_a_maskrcnn_checkpoint():
    with pytest.raises(CheckpointError, match=r"no known family .*keys that did not fit \(1\): fc.weight"):
        load_checkpoint({"fc.weight": torch.zeros(2, 2)})
    # a torchvision file missing a signature key is named as torchvision, with the misfits listed
    state = tiny_state_dict()
    del state["roi_heads.box_predictor.cls_score.weight"]
    with pytest.raises(CheckpointError, match="closest: torchvision"):
        load_checkpoint(state)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(state, family="torchvision")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_truncated_file(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read"):
        load_checkpoint(path)


def test_wrong_container(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"no known family .*did not fit \(1\): a"):
        load_checkpoint({"model": {"a": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint({"backbone.body.conv1.weight": [1, 2]}, family="torchvision")
    with pytest.raises(TypeError, match="path to a checkpoint file or a state dict"):
        load_checkpoint(42)


@pytest.mark.parametrize(
    "changes",
    [
        dict(fpn_norm=True, box_head_convs=2, box_head_conv_channels=8, box_head_norm=True, mask_norm=True,
             rpn_conv_depth=2),  # torchvision v2 layout
        dict(groups=4, stage_widths=(32, 64, 128, 256)),  # ResNeXt-style grouped, wider stages
        dict(blocks_per_stage=(2, 1, 3, 1)),
        dict(block="basic", stage_out_channels=(64, 128, 256, 512)),  # ResNet-18/34 basic blocks
        dict(block="basic", blocks_per_stage=(2, 2, 2, 2), stage_widths=(32, 64, 96, 128),
             stage_out_channels=(32, 64, 96, 128)),  # stem 64 -> 32: layer1 needs a projection shortcut
    ],
)
def test_architecture_round_trip(changes):
    """Sizes written into a state dict by the engine's own network are read back from its shapes."""
    from dataclasses import replace

    from tiny import TINY_SPEC

    spec = replace(TINY_SPEC, **changes)
    loaded = load_checkpoint(tiny_state_dict(spec=spec))
    assert loaded.spec == spec
    expected = "torchvision_maskrcnn_resnet50_fpn_v2" if spec.fpn_norm else "torchvision_maskrcnn_resnet50_fpn"
    assert checkpoint_config(loaded).name == expected


@pytest.mark.parametrize(
    "changes, box_pool_size",
    [
        (dict(), 7),
        (dict(), 5),
        (dict(fpn_norm=True, box_head_convs=4, box_head_conv_channels=8, box_head_norm=True, mask_norm=True,
              rpn_conv_depth=2), 7),  # torchvision v2
        (dict(box_head_convs=2, box_head_conv_channels=8), 7),  # conv heads without norm: convs with bias
        (dict(groups=4, stage_widths=(32, 64, 128, 256), rpn_channels=24), 7),  # ResNeXt, matterport-wide RPN
        (dict(block="basic", blocks_per_stage=(2, 2, 2, 2), stage_widths=(32, 64, 96, 128),
              stage_out_channels=(32, 64, 96, 128)), 7),
        (dict(num_classes=6, num_box_classes=5, num_mask_classes=5), 7),  # background last (Detectron2, mmdet)
    ],
)
def test_canonical_shapes_are_the_networks_own(changes, box_pool_size):
    """weights.spec lists the engine network's tensors without building it: same names, order and shapes."""
    from dataclasses import replace

    from engine.config import MaskRCNNConfig
    from engine.model import MaskRCNN
    from weights.spec import canonical_shapes

    spec = replace(TINY_SPEC, **changes)
    with torch.device("meta"):
        model = MaskRCNN(spec=spec, config=MaskRCNNConfig(name="shapes", box_pool_size=box_pool_size))
    expected = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert list(canonical_shapes(spec, box_pool_size=box_pool_size).items()) == expected


def test_every_family_has_a_preset():
    from engine.loading import family_preset
    from weights import FAMILIES

    for family in FAMILIES:
        assert family_preset(family, TINY_SPEC).name
    with pytest.raises(ValueError, match="family"):
        family_preset("yolo", TINY_SPEC)
