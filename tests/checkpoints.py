"""Test checkpoints: torchvision Mask R-CNN models with random but well-conditioned weights.

No pretrained weights can be downloaded, so the tests build torchvision's own
``maskrcnn_resnet50_fpn`` (the reference oracle) with random weights in the real key
layout and make its batch norm non-trivial:

- batch-norm weight and bias are random;
- running statistics are first measured on real photographs, each batch norm on its own
  input in one pass (so activations stay in a sane range through 50 layers), then perturbed
  per channel (variance x U(0.6, 1.6), mean shifted by 0.3 std), so that the frozen
  normalisation really changes the result;
- the classifier and mask logits are scaled up so that detections pass the 0.05 score
  threshold and mask probabilities are not all close to 0.5.

``variant="v2"`` gives ``maskrcnn_resnet50_fpn_v2``'s layout; ``backbone`` picks a ResNet/ResNeXt
for v1. ``frozen_bn=True`` gives a COCO-v1-like file: FrozenBatchNorm2d, eps 0, no
``num_batches_tracked`` keys. ``frozen_bn=False`` gives what ``weights_backbone=None`` builds:
nn.BatchNorm2d with eps 1e-5 and ``num_batches_tracked`` keys.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PHOTOS = ("astronaut", "coffee", "chelsea")


def photographs(names=PHOTOS) -> list[np.ndarray]:
    """Real RGB uint8 photographs shipped with scikit-image."""
    import skimage.data

    out = []
    for name in names:
        im = getattr(skimage.data, name)()
        if im.ndim == 2:
            im = np.stack([im] * 3, axis=-1)
        out.append(np.ascontiguousarray(im[..., :3]))
    return out


def to_torchvision_input(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float CHW in [0, 1], as torchvision's detection presets give it."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def _randomise_heads(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        rh = model.roi_heads
        rh.box_predictor.cls_score.weight.normal_(0.0, 0.05, generator=generator)
        rh.box_predictor.cls_score.bias.normal_(0.0, 0.5, generator=generator)
        rh.box_predictor.bbox_pred.weight.normal_(0.0, 0.01, generator=generator)
        rh.box_predictor.bbox_pred.bias.normal_(0.0, 0.1, generator=generator)
        model.rpn.head.cls_logits.weight.normal_(0.0, 0.05, generator=generator)
        model.rpn.head.cls_logits.bias.normal_(0.0, 0.5, generator=generator)
        model.rpn.head.bbox_pred.weight.normal_(0.0, 0.01, generator=generator)
        rh.mask_predictor.mask_fcn_logits.weight.mul_(3.0)
        rh.mask_predictor.mask_fcn_logits.bias.normal_(0.0, 1.0, generator=generator)


def calibrate_batch_norm(model: nn.Module, forward, generator: torch.Generator) -> None:
    """Random affine parameters, and running statistics measured by ``forward()`` then perturbed.

    Every nn.BatchNorm2d of the model takes its statistics from its own input in one eval-mode
    pass of ``forward`` (a callable running the model on calibration images), in forward order,
    so each layer sees already calibrated layers upstream: variance x U(0.6, 1.6), mean shifted
    by 0.3 std per channel. A batch norm that sees no input (a mask head without detections)
    keeps 0 / 1.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0.0, 0.2, generator=generator)
            bn.reset_running_stats()

    def calibrate(bn, inputs):
        x = inputs[0]
        if getattr(bn, "_calibrated", False) or x.numel() == 0:
            return
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=(0, 2, 3))
            std = var.clamp(min=1e-4).sqrt()
            bn.running_mean.copy_(mean + 0.3 * std * torch.randn(std.shape, generator=generator))
            bn.running_var.copy_(std.square() * torch.empty_like(std).uniform_(0.6, 1.6, generator=generator))
        bn._calibrated = True

    hooks = [bn.register_forward_pre_hook(calibrate) for bn in bns]
    model.eval()
    with torch.no_grad():
        forward()
    for hook in hooks:
        hook.remove()
    for bn in bns:
        bn.__dict__.pop("_calibrated", None)


def _calibrate_batch_norm(model: nn.Module, images: list[np.ndarray], generator: torch.Generator) -> None:
    """:func:`calibrate_batch_norm` of a torchvision model on ``images``."""
    calibrate_batch_norm(model, lambda: model([to_torchvision_input(im) for im in images]), generator)


def make_torchvision_maskrcnn(
    *,
    num_classes: int = 91,
    frozen_bn: bool = True,
    min_size: int = 800,
    max_size: int = 1333,
    seed: int = 0,
    variant: str = "v1",
    backbone: str = "resnet50",
    calibration_images: list[np.ndarray] | None = None,
) -> nn.Module:
    """A torchvision ``MaskRCNN`` in eval mode with random, calibrated weights.

    Args:
        variant: "v1" (``maskrcnn_resnet50_fpn`` layout) or "v2" (``maskrcnn_resnet50_fpn_v2``:
            nn.BatchNorm2d in backbone, FPN and heads; ``frozen_bn`` does not apply).
        backbone: a torchvision ResNet/ResNeXt name for v1 ("resnet50", "resnet101", "resnext50_32x4d", ...).
        frozen_bn: v1 only: FrozenBatchNorm2d with eps 0 (COCO v1 files) or nn.BatchNorm2d (eps 1e-5).

    Returns the torchvision model itself; ``model.state_dict()`` is the checkpoint.
    """
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sizes = dict(num_classes=num_classes, min_size=min_size, max_size=max_size)
    if variant == "v2":
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **sizes)
    elif variant == "v1":
        body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)
        model = MaskRCNN(body, **sizes)
    else:
        raise ValueError(f"variant must be 'v1' or 'v2'; got {variant!r}")
    _randomise_heads(model, generator)
    _calibrate_batch_norm(model, calibration_images or photographs(("astronaut", "coffee")), generator)
    if variant == "v2" or not frozen_bn:
        return model.eval()

    body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    frozen = MaskRCNN(body, **sizes)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen.load_state_dict(state)
    overwrite_eps(frozen, 0.0)
    return frozen.eval()


def legacy_state_dict(state: dict) -> dict:
    """The same tensors under torchvision's pre-rename key names (what old files carry)."""
    out = {}
    for key, value in state.items():
        new = key
        for kind in ("inner_blocks", "layer_blocks"):
            prefix = f"backbone.fpn.{kind}."
            if key.startswith(prefix):
                i, _, rest = key[len(prefix) :].split(".", 2)
                new = f"{prefix}{i}.{rest}"
        if key.startswith("rpn.head.conv.0.0."):
            new = "rpn.head.conv." + key.rsplit(".", 1)[1]
        if key.startswith("roi_heads.mask_head."):
            i, _, rest = key[len("roi_heads.mask_head.") :].split(".", 2)
            new = f"roi_heads.mask_head.mask_fcn{int(i) + 1}.{rest}"
        out[new] = value
    return out
