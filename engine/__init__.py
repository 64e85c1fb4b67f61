"""Predict-only Mask R-CNN with Triton post-processing kernels.

    from engine import Predictor
    results = Predictor("maskrcnn_resnet50_fpn_coco.pth", device="cuda").run(images)
"""

from engine.config import PRESETS, TORCHVISION_MASKRCNN_R50_FPN, MaskRCNNConfig, get_preset
from engine.predictor import Predictor
from engine.results import Detections

__all__ = ["Predictor", "Detections", "MaskRCNNConfig", "PRESETS", "TORCHVISION_MASKRCNN_R50_FPN", "get_preset"]
