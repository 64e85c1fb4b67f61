"""The network's sizes and its canonical tensor layout, as the checkpoint readers see them.

:class:`ArchitectureSpec` holds the sizes a reader takes from a checkpoint's tensor shapes;
:func:`canonical_shapes` lists, for such sizes, every tensor of the engine's network under its
canonical name (torchvision's current state-dict names, the names :class:`engine.model.MaskRCNN`
registers) with its shape. The readers use it to map and check a family's names without building
the network; ``tests/test_weights.py`` checks it against ``MaskRCNN(spec).state_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureSpec:
    """Sizes of the network, read from a checkpoint's tensor shapes.

    Attributes:
        block: residual block kind, "bottleneck" (ResNet-50 and deeper, ResNeXt) or "basic" (ResNet-18/34).
        blocks_per_stage: residual blocks in ResNet stages 2..5 ((3, 4, 6, 3) is ResNet-50).
        stage_widths: inner 3x3 width per stage ((64, 128, 256, 512) ResNet; wider for ResNeXt).
        stage_out_channels: output channels per stage.
        groups: groups of the 3x3 convs (1 ResNet, 32 or 64 ResNeXt).
        fpn_channels: FPN and head input width.
        fpn_norm: FPN convs followed by batch norm (torchvision v2).
        num_anchors: anchors per location (A).
        rpn_conv_depth: 3x3 convs in the RPN head.
        rpn_channels: width of those convs (None: ``fpn_channels``; matterport: 512).
        box_head_convs: 3x3 convs before the box head's fully connected layer (0: two-layer MLP head).
        box_head_conv_channels, box_head_norm: width of those convs, and whether batch norm follows them.
        representation_size: width of the box head's fully connected layers.
        num_classes: classifier outputs, background included.
        num_box_classes: class-specific box regressors (num_classes, or num_classes - 1 without background).
        mask_convs, mask_channels, mask_norm: the mask head's 3x3 convs, their width, batch norm after them.
        num_mask_classes: mask logit channels.
    """

    block: str = "bottleneck"
    blocks_per_stage: tuple[int, int, int, int] = (3, 4, 6, 3)
    stage_widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    stage_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 2048)
    groups: int = 1
    fpn_channels: int = 256
    fpn_norm: bool = False
    num_anchors: int = 3
    rpn_conv_depth: int = 1
    rpn_channels: int | None = None
    box_head_convs: int = 0
    box_head_conv_channels: int = 256
    box_head_norm: bool = False
    representation_size: int = 1024
    num_classes: int = 91
    num_box_classes: int = 91
    mask_convs: int = 4
    mask_channels: int = 256
    mask_norm: bool = False
    num_mask_classes: int = 91


def canonical_shapes(spec: ArchitectureSpec, *, box_pool_size: int = 7) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor of the engine's network with these sizes, in the
    network's state-dict order.

    ``box_pool_size``: the box RoIAlign output size, which sets the input width of the box head's
    first fully connected layer. Frozen batch norms hold ``weight``, ``bias``, ``running_mean`` and
    ``running_var``; a conv followed by batch norm has no bias.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out: int, inp: int, kernel: int, *, bias: bool, groups: int = 1) -> None:
        shapes[f"{name}.weight"] = (out, inp // groups, kernel, kernel)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    def norm(name: str, channels: int) -> None:
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{buffer}"] = (channels,)

    def conv_norm(name: str, out: int, inp: int, kernel: int, *, with_norm: bool) -> None:
        """torchvision's ``Conv2dNormActivation`` layout: ``{name}.0`` conv, ``{name}.1`` norm."""
        conv(f"{name}.0", out, inp, kernel, bias=not with_norm)
        if with_norm:
            norm(f"{name}.1", out)

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"] = (out, inp)
        shapes[f"{name}.bias"] = (out,)

    body = "backbone.body"
    conv(f"{body}.conv1", 64, 3, 7, bias=False)
    norm(f"{body}.bn1", 64)
    in_channels = 64
    stages = zip(spec.blocks_per_stage, spec.stage_widths, spec.stage_out_channels)
    for stage, (blocks, width, out_channels) in enumerate(stages, start=1):
        for b in range(blocks):
            block = f"{body}.layer{stage}.{b}"
            stride = 2 if (b == 0 and stage > 1) else 1
            if spec.block == "basic":
                conv(f"{block}.conv1", out_channels, in_channels, 3, bias=False)
                norm(f"{block}.bn1", out_channels)
                conv(f"{block}.conv2", out_channels, out_channels, 3, bias=False)
                norm(f"{block}.bn2", out_channels)
            else:
                conv(f"{block}.conv1", width, in_channels, 1, bias=False)
                norm(f"{block}.bn1", width)
                conv(f"{block}.conv2", width, width, 3, bias=False, groups=spec.groups)
                norm(f"{block}.bn2", width)
                conv(f"{block}.conv3", out_channels, width, 1, bias=False)
                norm(f"{block}.bn3", out_channels)
            if stride != 1 or in_channels != out_channels:
                conv(f"{block}.downsample.0", out_channels, in_channels, 1, bias=False)
                norm(f"{block}.downsample.1", out_channels)
            in_channels = out_channels

    fpn = spec.fpn_channels
    for i, c in enumerate(spec.stage_out_channels):
        conv_norm(f"backbone.fpn.inner_blocks.{i}", fpn, c, 1, with_norm=spec.fpn_norm)
    for i in range(len(spec.stage_out_channels)):
        conv_norm(f"backbone.fpn.layer_blocks.{i}", fpn, fpn, 3, with_norm=spec.fpn_norm)

    rpn_width = fpn if spec.rpn_channels is None else spec.rpn_channels
    for i in range(spec.rpn_conv_depth):
        conv(f"rpn.head.conv.{i}.0", rpn_width, fpn if i == 0 else rpn_width, 3, bias=True)
    conv("rpn.head.cls_logits", spec.num_anchors, rpn_width, 1, bias=True)
    conv("rpn.head.bbox_pred", spec.num_anchors * 4, rpn_width, 1, bias=True)

    channels = fpn
    if spec.box_head_convs:
        for i in range(spec.box_head_convs):
            conv_norm(f"roi_heads.box_head.{i}", spec.box_head_conv_channels, channels, 3, with_norm=spec.box_head_norm)
            channels = spec.box_head_conv_channels
        # then a Flatten (index n, no tensors) and the fully connected layer (index n + 1)
        linear(f"roi_heads.box_head.{spec.box_head_convs + 1}", spec.representation_size, channels * box_pool_size**2)
    else:
        linear("roi_heads.box_head.fc6", spec.representation_size, channels * box_pool_size**2)
        linear("roi_heads.box_head.fc7", spec.representation_size, spec.representation_size)
    linear("roi_heads.box_predictor.cls_score", spec.num_classes, spec.representation_size)
    linear("roi_heads.box_predictor.bbox_pred", spec.num_box_classes * 4, spec.representation_size)

    for i in range(spec.mask_convs):
        conv_norm(f"roi_heads.mask_head.{i}", spec.mask_channels, fpn if i == 0 else spec.mask_channels, 3, with_norm=spec.mask_norm)
    # ConvTranspose2d weights are (in, out, kh, kw)
    shapes["roi_heads.mask_predictor.conv5_mask.weight"] = (spec.mask_channels, spec.mask_channels, 2, 2)
    shapes["roi_heads.mask_predictor.conv5_mask.bias"] = (spec.mask_channels,)
    conv("roi_heads.mask_predictor.mask_fcn_logits", spec.num_mask_classes, spec.mask_channels, 1, bias=True)
    return shapes
