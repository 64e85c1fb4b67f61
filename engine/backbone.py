"""ResNet body with frozen batch norm, and the feature pyramid (P2..P6).

Module and parameter names follow torchvision's current state-dict layout
(``body.conv1``, ``body.layer1.0.conv2``, ``fpn.inner_blocks.0.0``...), which is
the engine's canonical layout: :mod:`weights` maps every checkpoint family onto it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics: ``y = x * scale + shift`` per channel.

    ``scale = weight * rsqrt(running_var + eps)``, ``shift = bias - running_mean * scale``,
    computed as torchvision's ``FrozenBatchNorm2d`` does (its COCO v1 weights use eps = 0).
    With ``arithmetic = "batch_norm"`` (set by :class:`engine.model.MaskRCNN` from
    ``config.bn_arithmetic``) it calls ``F.batch_norm`` in eval mode instead, bit for bit what an
    ``nn.BatchNorm2d`` in eval mode gives (mmdetection). Input and output: float [B, C, H, W].

    With ``inplace=True`` either form overwrites its input when the input has the statistics'
    dtype (float32), with the same roundings: every network here passes it a fresh convolution
    output, and the CPU then skips full-size allocations (page faults) per layer.
    """

    arithmetic = "scale_shift"
    folded = False  # True once fold_frozen_batch_norms moved it into the convolution before it

    def __init__(self, num_features: int, *, eps: float, inplace: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.inplace = inplace
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """float32 [C] each: ``y = x * scale + shift``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return x
        if self.arithmetic == "batch_norm":
            if self.inplace and _overwritable(x, self.weight.dtype):
                # the very kernel F.batch_norm runs (same roundings), writing over its input: a fresh
                # full-size output costs the CPU more in page faults than the norm itself (BENCHMARKS.md)
                empty = x.new_empty(0)
                return torch.ops.aten.native_batch_norm.out(
                    x, self.weight, self.bias, self.running_mean, self.running_var, False, 0.0, self.eps,
                    out=x, save_mean=empty, save_invstd=empty.clone(),
                )[0]
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        scale, shift = (t.reshape(1, -1, 1, 1) for t in self.scale_shift())
        if self.inplace and x.dtype == scale.dtype:
            return x.mul_(scale).add_(shift)
        return x * scale + shift  # under autocast a bf16 / fp16 input comes out float32, as in torchvision


def _overwritable(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``native_batch_norm.out`` may write over ``x``: the statistics' dtype, dense in
    NCHW or channels-last order (its kernel reads a strided view differently), no autograd."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return x.dtype == dtype and dense and not (torch.is_grad_enabled() and x.requires_grad)


@torch.no_grad()
def fold_frozen_batch_norms(root: nn.Module) -> int:
    """Fold each frozen batch norm that directly follows a convolution into it: the weight scaled
    per output channel, the shift added to (or made) its bias; the norm then passes its input on.

    For the reduced-precision modes only: it changes roundings (scores moved by up to ~1e-4 on a
    ResNet-50 in fp32), and in bf16 / fp16 it spares the float32 round trip that the norm's
    float32 statistics force on every activation under autocast. Pairs are the ``convN`` /
    ``bnN`` attributes of a block and a conv followed by a norm inside an ``nn.Sequential``
    (:class:`ConvNorm`, the projection shortcut). Returns the number of norms folded.
    """
    pairs = []
    for module in root.modules():
        if isinstance(module, nn.Sequential):
            children = list(module)
            pairs += [(a, b) for a, b in zip(children, children[1:]) if isinstance(a, nn.Conv2d) and isinstance(b, FrozenBatchNorm2d)]
        for i in range(1, 4):
            conv, norm = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d):
                pairs.append((conv, norm))
    folded = 0
    for conv, norm in pairs:
        if norm.folded:
            continue
        scale, shift = norm.scale_shift()
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.mul_(scale).add_(shift)
        norm.folded = True
        folded += 1
    return folded


def add_into(out: Tensor, other: Tensor) -> Tensor:
    """``out + other``, written into ``out`` (a fresh intermediate) when that changes no dtype.

    Both are feature maps (not zero-dimensional), so the result's dtype is the promotion of the two
    dtypes (``torch.promote_types``, which torch.compile reads as a constant; ``torch.result_type``
    breaks its graph)."""
    return out.add_(other) if torch.promote_types(out.dtype, other.dtype) == out.dtype else out + other


class ConvNorm(nn.Sequential):
    """Conv (index 0), optional frozen batch norm (index 1), optional ReLU.

    The layout of torchvision's ``Conv2dNormActivation``: the conv has a bias only without norm,
    so parameters are named ``0.weight``, ``0.bias`` or ``0.weight``, ``1.running_mean``, ...
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, norm: bool, relu: bool, bn_eps: float
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=not norm)
        ]
        if norm:
            layers.append(FrozenBatchNorm2d(out_channels, eps=bn_eps, inplace=True))
        super().__init__(*layers)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return F.relu_(x) if self.relu else x


def projection_shortcut(in_channels: int, out_channels: int, *, stride: int, bn_eps: float) -> nn.Sequential:
    """A residual block's shortcut where the stride or width changes: strided 1x1 conv + frozen batch norm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        FrozenBatchNorm2d(out_channels, eps=bn_eps, inplace=True),
    )


class Bottleneck(nn.Module):
    """ResNet / ResNeXt bottleneck: 1x1, 3x3 (grouped for ResNeXt), 1x1, plus shortcut.

    The stride sits on the 3x3 conv (torchvision, mmdet "pytorch" style) or on the first 1x1
    (``stride_in_1x1``: Detectron2's MSRA weights, matterport).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        *,
        stride: int,
        groups: int,
        stride_in_1x1: bool,
        bn_eps: float,
        downsample: bool,
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride_1x1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width, eps=bn_eps, inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride_3x3, padding=1, groups=groups, bias=False)
        self.bn2 = FrozenBatchNorm2d(width, eps=bn_eps, inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels, eps=bn_eps, inplace=True)
        self.downsample = projection_shortcut(in_channels, out_channels, stride=stride, bn_eps=bn_eps) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu_(add_into(out, identity))


class BasicBlock(nn.Module):
    """ResNet-18/34 block (He et al. 2016): two 3x3 convs plus shortcut, the stride on the first conv.

    The shortcut is a strided 1x1 conv + batch norm where the stride or the width changes
    (torchvision's rule), the identity elsewhere.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, bn_eps: float, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(out_channels, eps=bn_eps, inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(out_channels, eps=bn_eps, inplace=True)
        self.downsample = projection_shortcut(in_channels, out_channels, stride=stride, bn_eps=bn_eps) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu_(add_into(out, identity))


BLOCKS = ("bottleneck", "basic")


def tf_same_max_pool(x: Tensor, *, kernel_size: int, stride: int) -> Tensor:
    """Max-pool with TensorFlow's SAME padding: [B, C, H, W] -> [B, C, ceil(H / s), ceil(W / s)].

    Per axis, ``pad = max((out - 1) * stride + kernel - size, 0)`` with ``pad // 2`` before and the
    rest after (so for an even map and kernel 3, stride 2: none before, one after), padded
    cells never winning. PyTorch's symmetric ``padding=1`` would shift every window by one pixel.
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last axis first
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    x = F.pad(x, pads, value=float("-inf"))
    return F.max_pool2d(x, kernel_size=kernel_size, stride=stride)


def stem_max_pool(x: Tensor) -> Tensor:
    """The ResNet stem's 3x3 stride-2 max pool with 1 pixel of padding, float [B, C, H, W].

    On CPU an NCHW map is pooled in channels-last and returned in NCHW: the same values (a
    maximum has no rounding). PyTorch vectorises its CPU pool over channels in channels-last:
    124 ms -> 70 ms on a [1, 64, 400, 608] map, 2 cores, conversions counted. Every other
    input is pooled as it is.
    """
    if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and x.shape[1] > 1:
        pooled = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size=3, stride=2, padding=1)
        return pooled.contiguous()
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNetBody(nn.Module):
    """ResNet / ResNeXt stem and four stages; returns C2..C5 (strides 4, 8, 16, 32).

    Args:
        block: "bottleneck" (ResNet-50/101/152, ResNeXt) or "basic" (ResNet-18/34, where
            ``stage_widths`` must equal ``stage_out_channels`` and ``groups`` is 1).
        blocks_per_stage: e.g. (3, 4, 6, 3) for ResNet-50, (3, 4, 23, 3) for ResNet-101,
            (2, 2, 2, 2) for ResNet-18.
        stage_widths: inner (3x3) width of each stage's blocks: (64, 128, 256, 512) for ResNet,
            (128, 256, 512, 1024) for ResNeXt-50 32x4d.
        stage_out_channels: output channels of each stage, (256, 512, 1024, 2048).
        groups: groups of the 3x3 convs (32 for ResNeXt 32xNd).
        stride_in_1x1: put the stride on the first 1x1 conv instead of the 3x3.
        stem_pool: "torch" (max-pool padded by 1 on each side) or "tf_same" (TensorFlow's SAME
            padding, see :func:`tf_same_max_pool`; Keras ResNets such as matterport's).
        bn_eps: eps of every frozen batch norm.
    """

    def __init__(
        self,
        *,
        block: str = "bottleneck",
        blocks_per_stage: tuple[int, int, int, int],
        stage_widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        stage_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 2048),
        groups: int = 1,
        stride_in_1x1: bool = False,
        stem_pool: str = "torch",
        bn_eps: float,
    ) -> None:
        super().__init__()
        if stem_pool not in ("torch", "tf_same"):
            raise ValueError(f"stem_pool must be 'torch' or 'tf_same'; got {stem_pool!r}")
        self.stem_pool = stem_pool
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}; got {block!r}")
        if block == "basic" and (tuple(stage_widths) != tuple(stage_out_channels) or groups != 1):
            raise ValueError(
                f"basic blocks have one width per stage and no groups; got widths {stage_widths}, "
                f"outputs {stage_out_channels}, groups {groups}"
            )
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64, eps=bn_eps, inplace=True)
        in_channels = 64
        for stage, (blocks, width, out_channels) in enumerate(
            zip(blocks_per_stage, stage_widths, stage_out_channels), start=1
        ):
            layers = []
            for b in range(blocks):
                stride = 2 if (b == 0 and stage > 1) else 1
                downsample = stride != 1 or in_channels != out_channels
                if block == "basic":
                    layers.append(BasicBlock(in_channels, out_channels, stride=stride, bn_eps=bn_eps, downsample=downsample))
                else:
                    layers.append(
                        Bottleneck(
                            in_channels,
                            width,
                            out_channels,
                            stride=stride,
                            groups=groups,
                            stride_in_1x1=stride_in_1x1,
                            bn_eps=bn_eps,
                            downsample=downsample,
                        )
                    )
                in_channels = out_channels
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        self.out_channels = tuple(stage_out_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu_(self.bn1(self.conv1(x)))
        if self.stem_pool == "tf_same":
            x = tf_same_max_pool(x, kernel_size=3, stride=2)
        else:
            x = stem_max_pool(x)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class FeaturePyramid(nn.Module):
    """FPN (Lin et al. 2017) as torchvision builds it, plus P6 by max-pool(kernel 1, stride 2) of P5.

    Lateral 1x1 convs (``inner_blocks``) and output 3x3 convs (``layer_blocks``): with bias (v1),
    or without bias and followed by batch norm (``norm``, torchvision v2). The top-down path
    upsamples by nearest neighbour to the lateral's size and adds.
    Input: C2..C5; output: [P2, P3, P4, P5, P6], each float [B, out_channels, H/2**k, W/2**k].
    """

    def __init__(self, *, in_channels: tuple[int, ...], out_channels: int, norm: bool = False, bn_eps: float = 0.0) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(
            ConvNorm(c, out_channels, 1, norm=norm, relu=False, bn_eps=bn_eps) for c in in_channels
        )
        self.layer_blocks = nn.ModuleList(
            ConvNorm(out_channels, out_channels, 3, norm=norm, relu=False, bn_eps=bn_eps) for _ in in_channels
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        last_inner = self.inner_blocks[-1](features[-1])
        outputs = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = add_into(lateral, top_down)
            outputs.insert(0, self.layer_blocks[idx](last_inner))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2, padding=0))
        return outputs


class Backbone(nn.Module):
    """ResNet body + FPN: padded image batch float32 [B, 3, Hp, Wp] -> [P2..P6].

    Keyword arguments are those of :class:`ResNetBody`, plus ``fpn_channels`` and ``fpn_norm``.
    """

    def __init__(self, *, fpn_channels: int, fpn_norm: bool = False, bn_eps: float, **body) -> None:
        super().__init__()
        self.body = ResNetBody(bn_eps=bn_eps, **body)
        self.fpn = FeaturePyramid(
            in_channels=self.body.out_channels, out_channels=fpn_channels, norm=fpn_norm, bn_eps=bn_eps
        )

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.fpn(self.body(images))
