"""ResNet-18/34 (basic-block) backbones: read from torchvision checkpoints and run as torchvision does."""

import pytest
import torch
from torch import nn

from engine import Predictor
from engine.config import TORCHVISION_MASKRCNN_R50_FPN
from engine.loading import checkpoint_config
from weights import load_checkpoint

torchvision = pytest.importorskip("torchvision")


def _torchvision_model(backbone_name: str, *, norm_layer) -> nn.Module:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    backbone = resnet_fpn_backbone(backbone_name=backbone_name, weights=None, norm_layer=norm_layer, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=3, min_size=160, max_size=224)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | torchvision.ops.FrozenBatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
            if isinstance(module, torchvision.ops.FrozenBatchNorm2d):
                module.eps = 0.0  # what torchvision sets for its pretrained detection weights (_ovewrite_eps)
        model.roi_heads.box_predictor.cls_score.bias.normal_(0.0, 1.0, generator=generator)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(5.0)
    return model.eval()


@pytest.mark.parametrize(
    "backbone_name, blocks", [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))]
)
def test_spec_read_from_shapes(backbone_name, blocks):
    state = _torchvision_model(backbone_name, norm_layer=nn.BatchNorm2d).state_dict()
    spec = load_checkpoint(state).spec
    assert spec.block == "basic" and spec.blocks_per_stage == blocks
    assert spec.stage_widths == spec.stage_out_channels == (64, 128, 256, 512)
    assert spec.groups == 1 and spec.fpn_channels == 256


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d], ids=["batchnorm", "frozen"])
def test_resnet18_detections_match_torchvision(norm_layer, seed):
    """Same detections as torchvision's own ResNet-18-FPN Mask R-CNN (eps read from the file)."""
    from checkpoints import photographs, to_torchvision_input

    model = _torchvision_model("resnet18", norm_layer=norm_layer)
    images = [im[::3, ::3].copy() for im in photographs(("astronaut", "coffee"))]
    config = TORCHVISION_MASKRCNN_R50_FPN.replace(min_size=160, max_size=224)
    expected_eps = 1e-5 if norm_layer is nn.BatchNorm2d else 0.0
    state = model.state_dict()
    config = config.replace(bn_eps=checkpoint_config(load_checkpoint(state)).bn_eps)
    assert config.bn_eps == expected_eps
    ours = Predictor(state, device="cpu", config=config).run(images)
    with torch.no_grad():
        theirs = model([to_torchvision_input(im) for im in images])
    for o, t in zip(ours, theirs):
        assert len(o) == len(t["boxes"]) > 0
        torch.testing.assert_close(o.boxes, t["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(o.scores, t["scores"], atol=1e-5, rtol=0)
        assert torch.equal(o.labels, t["labels"])
        agree = (o.masks == (t["masks"][:, 0] > 0.5)).float().mean()
        assert agree > 0.999
