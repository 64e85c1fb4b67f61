"""From a read checkpoint to a network: the family's preset, what the file said, the weights loaded.

:func:`weights.load_checkpoint` reads a file or state dict into canonical tensors, the sizes read
from their shapes, the family and what the file states about its behaviour
(:class:`weights.Checkpoint`); it knows nothing of the engine. Here the engine picks the family's
preset (:func:`family_preset`), applies what the file stated (:func:`checkpoint_config`), builds
:class:`engine.model.MaskRCNN` and loads the tensors into it, strictly (:func:`build_model`).

    checkpoint = load_checkpoint("maskrcnn_resnet50_fpn_coco.pth")
    model = build_model(checkpoint, config=checkpoint_config(checkpoint))
"""

from __future__ import annotations

from engine.config import (
    DETECTRON2_MASK_RCNN_R50_FPN,
    MATTERPORT_MASK_RCNN_FPN,
    MMDET_MASK_RCNN_R50_FPN,
    TORCHVISION_MASKRCNN_R50_FPN,
    TORCHVISION_MASKRCNN_R50_FPN_V2,
    MaskRCNNConfig,
)
from engine.model import MaskRCNN
from weights import FAMILIES, Checkpoint, CheckpointError, load_checkpoint
from weights.errors import format_lists
from weights.spec import ArchitectureSpec

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "family_preset", "checkpoint_config", "build_model"]

_PRESETS = {
    "detectron2": DETECTRON2_MASK_RCNN_R50_FPN,
    "mmdetection": MMDET_MASK_RCNN_R50_FPN,
    "matterport": MATTERPORT_MASK_RCNN_FPN,
}


def family_preset(family: str, spec: ArchitectureSpec) -> MaskRCNNConfig:
    """The preset of a checkpoint family: torchvision's v2 preset where the FPN has batch norm, v1 otherwise."""
    if family == "torchvision":
        return TORCHVISION_MASKRCNN_R50_FPN_V2 if spec.fpn_norm else TORCHVISION_MASKRCNN_R50_FPN
    try:
        return _PRESETS[family]
    except KeyError:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))}; got {family!r}") from None


def checkpoint_config(checkpoint: Checkpoint) -> MaskRCNNConfig:
    """The family's preset with what the file states applied: batch-norm eps, stride placement,
    channel order and pixel statistics (the fields the reader left None keep the preset's values)."""
    preset = family_preset(checkpoint.family, checkpoint.spec)
    stated = {
        "bn_eps": checkpoint.bn_eps,
        "stride_in_1x1": checkpoint.stride_in_1x1,
        "channel_order": checkpoint.channel_order,
        "pixel_mean": checkpoint.pixel_mean,
        "pixel_std": checkpoint.pixel_std,
    }
    changes = {k: v for k, v in stated.items() if v is not None}
    return preset.replace(**changes) if changes else preset


def build_model(checkpoint: Checkpoint, *, config: MaskRCNNConfig, precision: str = "fp32") -> MaskRCNN:
    """Instantiate the network and load the checkpoint's tensors into it, strictly.

    Raises:
        CheckpointError: listing missing, unexpected and wrongly shaped tensors.
    """
    model = MaskRCNN(spec=checkpoint.spec, config=config, precision=precision)
    expected = model.state_dict()
    given = checkpoint.state_dict
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    problems = format_lists(("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
    if problems:
        raise CheckpointError(f"{checkpoint.family} checkpoint does not fit the network: " + "; ".join(problems))
    model.load_state_dict(given, strict=True)
    return model.eval().requires_grad_(False)
