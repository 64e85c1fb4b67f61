"""A tiny network in torchvision's key layout, for fast tests of loading and of the Predictor's behaviour.

The loader reads every size from the tensors' shapes, so a one-block-per-stage ResNet with
narrow FPN and heads loads and runs through the same code as ResNet-50.
"""

import torch

from engine.config import TORCHVISION_MASKRCNN_R50_FPN
from engine.model import ArchitectureSpec, MaskRCNN

TINY_SPEC = ArchitectureSpec(
    blocks_per_stage=(1, 1, 1, 1),
    fpn_channels=16,
    representation_size=32,
    num_classes=5,
    num_box_classes=5,
    mask_convs=2,
    mask_channels=16,
    num_mask_classes=5,
)

#: small inputs keep the tests fast
TINY_CONFIG = TORCHVISION_MASKRCNN_R50_FPN.replace(min_size=96, max_size=160)


def tiny_state_dict(seed: int = 0, *, spec: ArchitectureSpec = TINY_SPEC) -> dict:
    """Random weights of the tiny network, scaled so that detections pass the score threshold and
    masks are neither empty nor full."""
    torch.manual_seed(seed)
    model = MaskRCNN(spec=spec, config=TINY_CONFIG)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(20)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(30)
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.normal_(0.0, 1.0)
    return {k: v.clone() for k, v in model.state_dict().items()}
