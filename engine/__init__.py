"""Predict-only Mask R-CNN with Triton post-processing kernels.

    from engine import Predictor
    predictor = Predictor("maskrcnn_resnet50_fpn_coco.pth")   # CUDA when present, else CPU
    results = predictor.run(images)   # RGB arrays (input_format="BGR" for cv2.imread's) and/or file paths
    results[0][results[0].scores > 0.5]                       # select detections as Detectron2's Instances
"""

from engine.config import PRESETS, TORCHVISION_MASKRCNN_R50_FPN, MaskRCNNConfig, get_preset
from engine.predictor import Predictor
from engine.results import BoxMasks, Detections

__all__ = ["Predictor", "Detections", "BoxMasks", "MaskRCNNConfig", "PRESETS", "TORCHVISION_MASKRCNN_R50_FPN", "get_preset"]
