"""torchvision Mask R-CNN checkpoints (``maskrcnn_resnet50_fpn`` and ``maskrcnn_resnet50_fpn_v2`` layouts).

Sizes are read from tensor shapes, so ResNet-18/34 (basic blocks), ResNet-50/101/152 and ResNeXt backbones
(``resnet_fpn_backbone("resnext101_32x8d", ...)``) load too, as does v2's batch norm in the
FPN and heads, its two-conv RPN head and four-conv box head.

A torchvision checkpoint is a plain state dict saved with ``torch.save`` (the published
COCO file ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth`` and fine-tuned ones alike). The
engine's canonical parameter names are torchvision's current ones; older files use
legacy names that torchvision remaps when loading, and so do we:

- ``backbone.fpn.inner_blocks.{i}.{weight,bias}``  -> ``backbone.fpn.inner_blocks.{i}.0.*`` (and ``layer_blocks``)
- ``rpn.head.conv.{weight,bias}``                -> ``rpn.head.conv.0.0.*``
- ``roi_heads.mask_head.mask_fcn{i}.*``          -> ``roi_heads.mask_head.{i-1}.0.*``

Batch-norm eps is read from the file (reference notes F.1): files written from
``FrozenBatchNorm2d`` (the COCO v1 weights and models fine-tuned from them) carry no
``num_batches_tracked`` buffers and run with eps 0; files written from ``nn.BatchNorm2d``
(a model built with ``weights_backbone=None``) carry them and run with eps 1e-5.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from weights.errors import CheckpointError, require_keys
from weights.spec import ArchitectureSpec

_LEGACY_RENAMES = (
    (re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"), r"backbone.fpn.\1.\2.0.\3"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
)
_LEGACY_MASK_FCN = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$")

#: keys every torchvision Mask R-CNN R-FPN checkpoint has (after legacy renames)
SIGNATURE_KEYS = (
    "backbone.body.conv1.weight",
    "backbone.body.layer1.0.conv1.weight",
    "backbone.fpn.inner_blocks.0.0.weight",
    "rpn.head.cls_logits.weight",
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
)

BN_EPS_FROZEN = 0.0
BN_EPS_BATCHNORM = 1e-5


def rename_legacy_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A new dict with torchvision's legacy key names replaced by the current ones; other keys unchanged."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _LEGACY_RENAMES:
            new = pattern.sub(repl, new)
        m = _LEGACY_MASK_FCN.match(new)
        if m:
            new = f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
        if new in out:
            raise CheckpointError(f"checkpoint has both the legacy and the current name of {new!r}")
        out[new] = value
    return out


def batch_norm_eps(state: Mapping[str, Tensor]) -> float:
    """eps the file's batch norms were trained with: 1e-5 if it has ``num_batches_tracked`` buffers, else 0."""
    return BN_EPS_BATCHNORM if any(k.endswith("num_batches_tracked") for k in state) else BN_EPS_FROZEN


def architecture(state: Mapping[str, Tensor]) -> ArchitectureSpec:
    """Network sizes read from a torchvision-layout state dict (current key names).

    Raises:
        CheckpointError: if keys needed to tell the sizes are missing, or the backbone is not a bottleneck ResNet.
    """
    require_keys(state, SIGNATURE_KEYS, family="torchvision")

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in state if (m := rx.match(k))})

    blocks = tuple(count(rf"^backbone\.body\.layer{s}\.(\d+)\.conv1\.weight$") for s in (1, 2, 3, 4))
    if min(blocks) == 0:
        raise CheckpointError(f"backbone stages have {blocks} blocks; every stage layer1..layer4 needs at least one")
    # bottleneck blocks (ResNet-50 and deeper, ResNeXt) end in conv3; basic blocks (ResNet-18/34) stop at conv2
    block = "bottleneck" if "backbone.body.layer1.0.conv3.weight" in state else "basic"
    last_conv = "conv3" if block == "bottleneck" else "conv2"
    require_keys(state, [f"backbone.body.layer{s}.0.{last_conv}.weight" for s in (1, 2, 3, 4)], family="torchvision")
    num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    mask_convs = count(r"^roi_heads\.mask_head\.(\d+)\.0\.weight$")
    if mask_convs == 0:
        raise CheckpointError("roi_heads.mask_head.0.0.weight is missing: the mask head has no convolutions")
    widths = tuple(state[f"backbone.body.layer{s}.0.conv1.weight"].shape[0] for s in (1, 2, 3, 4))
    outs = tuple(state[f"backbone.body.layer{s}.0.{last_conv}.weight"].shape[0] for s in (1, 2, 3, 4))
    groups = widths[0] // state["backbone.body.layer1.0.conv2.weight"].shape[1]
    box_convs = count(r"^roi_heads\.box_head\.(\d+)\.0\.weight$")
    if box_convs:  # torchvision v2 FastRCNNConvFCHead: convs 0..n-1, Flatten n, Linear n+1
        fc_key = f"roi_heads.box_head.{box_convs + 1}.weight"
        require_keys(state, (fc_key,), family="torchvision")
        representation = state[fc_key].shape[0]
        box_conv_channels = state["roi_heads.box_head.0.0.weight"].shape[0]
    else:
        require_keys(state, ("roi_heads.box_head.fc6.weight",), family="torchvision")
        representation = state["roi_heads.box_head.fc6.weight"].shape[0]
        box_conv_channels = 256
    return ArchitectureSpec(
        block=block,
        blocks_per_stage=blocks,  # type: ignore[arg-type]
        stage_widths=widths,  # type: ignore[arg-type]
        stage_out_channels=outs,  # type: ignore[arg-type]
        groups=max(groups, 1),
        fpn_channels=state["backbone.fpn.inner_blocks.0.0.weight"].shape[0],
        fpn_norm="backbone.fpn.inner_blocks.0.1.weight" in state,
        num_anchors=state["rpn.head.cls_logits.weight"].shape[0],
        rpn_conv_depth=max(count(r"^rpn\.head\.conv\.(\d+)\.0\.weight$"), 1),
        box_head_convs=box_convs,
        box_head_conv_channels=box_conv_channels,
        box_head_norm="roi_heads.box_head.0.1.weight" in state,
        representation_size=representation,
        num_classes=num_classes,
        num_box_classes=state["roi_heads.box_predictor.bbox_pred.weight"].shape[0] // 4,
        mask_convs=mask_convs,
        mask_channels=state["roi_heads.mask_head.0.0.weight"].shape[0],
        mask_norm="roi_heads.mask_head.0.1.weight" in state,
        num_mask_classes=state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0],
    )


def convert(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], ArchitectureSpec, float]:
    """Canonical state dict (float32, current names, no ``num_batches_tracked``), sizes, and batch-norm eps."""
    renamed = rename_legacy_keys(state)
    eps = batch_norm_eps(renamed)
    spec = architecture(renamed)
    canonical = {
        k: (v.float() if v.is_floating_point() else v)
        for k, v in renamed.items()
        if not k.endswith("num_batches_tracked")
    }
    return canonical, spec, eps
