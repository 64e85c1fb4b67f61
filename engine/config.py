"""Inference configuration: one frozen dataclass, with a named preset per checkpoint family.

Every behavioural switch on which the Mask R-CNN implementations differ
(``../shared/reference/checkpoint-families.md``, section 0) is a field here, so
that a family is a preset, not a fork of the pipeline. Architecture sizes
(depth, widths, number of classes) are not configuration: they are read from
the checkpoint (:class:`engine.model.ArchitectureSpec`).

Values that another family needs but that this engine does not implement yet
are rejected in ``__post_init__`` with an error that names what is supported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from kernels.roi_align import LevelRule

_RESIZE_ROUNDINGS = ("floor", "round_half_up")
_RESIZE_METHODS = (
    "torch_bilinear",  # torchvision: F.interpolate bilinear on the normalised float image, no antialias
    "antialias_uint8",  # Detectron2: PIL Image.resize(BILINEAR) on uint8 (antialiased when shrinking)
    "cv2_linear",  # mmdetection: cv2.resize(INTER_LINEAR) on uint8
    "skimage_uint8",  # matterport: skimage.transform.resize(order=1) on uint8, truncated to uint8
)
_ANCHOR_STRIDES = ("padded_div_feature", "fixed")
STEM_POOLS = ("torch", "tf_same")
RESIZE_MODES = ("shortest_edge", "square")
BOX_FRAMES = ("pixels", "normalized")
RPN_SELECTIONS = ("per_level", "global")
BATCH_PADDINGS = ("together", "by_size")
ROI_MODES = ("roi_align", "crop_and_resize")
DETECTION_RULES = ("per_class", "argmax")
BOX_OUTPUTS = ("float", "integer")
_DELTA_CLAMPS = ("upper", "symmetric", "none")
_BACKGROUND = ("first", "last")
_PASTE_METHODS = ("torchvision", "grid_sample")


@dataclass(frozen=True)
class MaskRCNNConfig:
    """How a Mask R-CNN checkpoint is run, stage by stage.

    Attributes (grouped by stage):

    Input and pre-processing
        channel_order: "RGB" or "BGR": the order the network expects (inputs are always RGB).
        input_scale: uint8 pixels are divided by this before normalisation (255 -> [0, 1], as torchvision).
        pixel_mean, pixel_std: per channel, in the network's channel order and in units after ``input_scale``.
        normalize_before_resize: torchvision normalises, then resizes the float image; False resizes first
            (required by the uint8 resize methods, which resize the uint8 image).
        normalize_precision: "float32", or "float64" (matterport's ``mold_image`` subtracts its float64
            mean in numpy; the result is rounded to float32 once, after the subtraction).
        min_size, max_size: the short side is scaled to ``min_size`` unless the long side would exceed ``max_size``.
        resize_rounding: "floor" (torchvision) or "round_half_up" (Detectron2, mmdet) for the output size.
        resize_method: "torch_bilinear" (torchvision: F.interpolate bilinear, align_corners=False, no
            antialias, on the normalised float image), or a uint8 resize reproduced bit for bit:
            "antialias_uint8" (Detectron2: PIL BILINEAR), "cv2_linear" (mmdet: cv2 INTER_LINEAR) or
            "skimage_uint8" (matterport: skimage order-1 resize, truncated); see engine/preprocess.py.
        size_divisibility: the batch is zero-padded bottom/right to a multiple of this.
        batch_padding: how ``Predictor.run`` pads a list of mixed sizes. "together": one batch
            padded to the largest image (torchvision's and Detectron2's batched call). "by_size":
            the images are grouped by the padded size each has alone, and each group runs as one
            batch, so every image gets the input tensor it has alone, as in mmdetection's
            ``inference_detector``, which runs a list one image per call (mmdet/apis/inference.py).
            The results are then each image's own, bit for bit where the CPU's convolutions do not
            depend on the batch size (so on the mmdetection R50, tests/test_mmdetection_parity.py).
            It also skips the padding's work (figures in BENCHMARKS.md).
        resize_mode: "shortest_edge" (the rule above, bottom/right padding) or "square" (matterport's
            ``resize_image(mode="square")``: ``scale = max(1, min_size / short)``, reduced to
            ``max_size / long`` when ``round(long * scale) > max_size``, sides ``round(side * scale)``
            (Python round), then centred padding to ``max_size`` x ``max_size`` with raw 0 pixels;
            ``resize_rounding`` and ``size_divisibility`` are then unused).

    Backbone
        bn_eps: eps of the frozen batch norms (torchvision COCO v1: 0.0; nn.BatchNorm2d: 1e-5).
        bn_arithmetic: how a frozen batch norm is computed: "scale_shift" (``x * scale + shift`` with
            ``scale = weight * rsqrt(var + eps)``: torchvision's and Detectron2's ``FrozenBatchNorm2d``)
            or "batch_norm" (``F.batch_norm`` in eval mode, what ``nn.BatchNorm2d.eval()`` computes:
            mmdetection's ``norm_eval=True`` ResNet). Both are the same function; their float32
            roundings differ, and 50 layers make that a 1e-3 difference in the FPN features.
        cpu_memory_format: the memory format of the convolutions on the CPU: "contiguous" (NCHW,
            the PyTorch families' presets: their frameworks' own arithmetic) or "channels_last", a
            speed mode (oneDNN's faster layout: 1.26x end to end on the torchvision R50-FPN, 2-core
            CPU). Same function, other float32 roundings: against torchvision, R50 scores moved by
            up to 5e-5 but a ResNet-101 broke the parity tolerance of 1e-4, hence not their default.
            The matterport preset takes it (with ``fold_batch_norms``): matterport runs on
            TensorFlow, whose NHWC convolutions no NCHW arithmetic reproduces either.
            bf16 / fp16 run channels-last on every device, whatever this says; CUDA fp32 runs NCHW.
        fold_batch_norms: fold each frozen batch norm into the convolution before it when the model
            loads (:func:`engine.backbone.fold_frozen_batch_norms`): an opt-in fp32 speed mode, on
            every device. Same function, other float32 roundings (the scale multiplies the weights,
            not the outputs), hence off in the PyTorch families' presets; see BENCHMARKS.md for how
            far each parity case moves. On in the matterport preset (see ``cpu_memory_format``).
            bf16 / fp16 always fold, whatever this says.
        stride_in_1x1: bottleneck stride on the first 1x1 conv (Detectron2's MSRA weights) instead of the 3x3.
        stem_pool: the stem's 3x3 stride-2 max-pool padding: "torch" (1 pixel each side) or "tf_same"
            (TensorFlow SAME: the odd padding pixel goes after, so none before for even inputs; matterport).

    Box frame
        box_frame: "pixels" (resized-image pixels, x2 - x1 widths) or "normalized" (matterport: anchors,
            proposals and detections as ``(x1 / (S - 1), y1 / (S - 1), (x2 - 1) / (S - 1), (y2 - 1) / (S - 1))``
            of the S x S padded image; needs ``resize_mode="square"``).

    Anchors
        anchor_sizes: one size per FPN level P2..P6, in input pixels.
        anchor_aspect_ratios: height / width ratios.
        anchor_round: round the base anchors half-to-even (torchvision).
        anchor_stride: "padded_div_feature" (torchvision: padded size // feature size) or "fixed" (2**level).

    RPN
        rpn_pre_nms_top_n: top-k per level on the raw objectness logits.
        rpn_post_nms_top_n: proposals kept per image after NMS.
        rpn_nms_threshold: IoU threshold of the per-level NMS.
        rpn_min_size: proposals with a side < this (resized-image pixels) are dropped.
        rpn_min_size_inclusive: keep sides >= rpn_min_size (torchvision) or only > it (Detectron2's
            ``nonempty``, with rpn_min_size 0).
        rpn_score_threshold: proposals with sigmoid score < this are dropped.
        rpn_box_weights: (wx, wy, ww, wh) of the RPN box coder.
        rpn_selection: "per_level" (torchvision, Detectron2, mmdet: top-k per level, NMS per level) or
            "global" (matterport's ``ProposalLayer``: top-k of the foreground probabilities over all
            levels, clipped to the padded image, one NMS).
        rpn_pad_proposals: pad each image's proposals with zero boxes up to ``rpn_post_nms_top_n``
            (matterport: the padding rows go through the heads like the others).

    Ranking and NMS (RPN and detections)
        tie_order: order among equal scores: "stable" (candidate order) or "torch_sort"
            (mmdetection: the per-level top-k is ``torch.sort`` of the probabilities, and NMS
            visits and returns boxes in the arrangement of mmcv's ``torch.sort`` calls on each
            image's compacted candidates, replayed by :mod:`engine.tie_order` where host reads
            are free; on CUDA the NMS order among exact ties stays stable).
        nms_group_offsets: NMS on boxes moved apart by group (``mmcv.ops.batched_nms``; see
            :func:`engine.boxes.offset_by_group`), so that IoUs carry the same rounding.

    Box coder (shared by RPN and box head)
        box_delta_clip: dw, dh limit, log(1000/16).
        box_delta_clamp: "upper" (torchvision, Detectron2), "symmetric" (mmdet) or "none" (matterport).
        box_coder_style: float32 operation order of the decoding, "torchvision" (also Detectron2's),
            "mmdet" (``delta2bbox``) or "matterport" (``apply_box_deltas_graph``); see
            :func:`engine.boxes.decode_deltas`.

    RoI pooling
        box_pool_size, mask_pool_size: RoIAlign output sizes.
        roi_sampling_ratio: samples per bin per axis; 0 is adaptive.
        roi_aligned: half-pixel offset (RoIAlignV2).
        level_rule: FPN level assignment, see :class:`kernels.roi_align.LevelRule`. With
            ``roi_mode="crop_and_resize"`` its ``canonical_size`` (224) is divided by the padded
            image's ``sqrt(H * W)``, as matterport's ``PyramidROIAlign`` does on normalized boxes.
        roi_mode: "roi_align" or "crop_and_resize" (matterport: TensorFlow's ``crop_and_resize``,
            one corner-aligned sample per bin; needs ``box_frame="normalized"``).

    Box head and detections
        box_coder_weights: (wx, wy, ww, wh) of the box-head coder.
        background_index: "first" (torchvision: class 0) or "last" (Detectron2, mmdet).
        score_threshold: candidates need score > this.
        detection_min_size: candidates need both sides >= this (resized-image pixels).
        nms_threshold: IoU threshold of the per-class NMS.
        detections_per_image: at most this many detections per image.
        detection_rule: "per_class" (every foreground class of a proposal is a candidate, score >
            threshold) or "argmax" (matterport's ``refine_detections_graph``: only the proposal's
            most probable class, background included, score >= threshold, boxes clipped to the
            image's window in the padded frame).

    Back to the input image
        rescale_style: "multiply" by original / resized (torchvision, Detectron2) or "divide" by
            resized / original (mmdetection's scale_factor).
        clip_boxes_to_original: clip the scaled boxes to the input image and drop empty ones before
            pasting masks (Detectron2's ``detector_postprocess``); torchvision does neither.
        box_output: "float" boxes, or "integer" (matterport's ``unmold_detections``: window-relative
            normalized boxes scaled by the input's ``(W - 1, H - 1)``, +1 on x2 and y2, rounded half to
            even, empty boxes dropped; masks are pasted into those integer boxes).

    Masks
        mask_threshold: pasted probabilities > this are foreground.
        paste_method: "torchvision" (30/28 box expansion, integer box, bilinear resize, > threshold)
            or "grid_sample" (Detectron2 / mmdetection: grid_sample at pixel centres, >= threshold).
    """

    name: str = "custom"
    # input
    channel_order: str = "RGB"
    input_scale: float = 255.0
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    normalize_before_resize: bool = True
    normalize_precision: str = "float32"
    min_size: int = 800
    max_size: int = 1333
    resize_rounding: str = "floor"
    resize_method: str = "torch_bilinear"
    size_divisibility: int = 32
    batch_padding: str = "together"
    resize_mode: str = "shortest_edge"
    # backbone
    bn_eps: float = 0.0
    bn_arithmetic: str = "scale_shift"
    cpu_memory_format: str = "contiguous"
    fold_batch_norms: bool = False
    tie_order: str = "stable"
    nms_group_offsets: bool = False
    stride_in_1x1: bool = False
    stem_pool: str = "torch"
    # anchors
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_round: bool = True
    anchor_stride: str = "padded_div_feature"
    box_frame: str = "pixels"
    # rpn
    rpn_pre_nms_top_n: int = 1000
    rpn_post_nms_top_n: int = 1000
    rpn_nms_threshold: float = 0.7
    rpn_min_size: float = 1e-3
    rpn_min_size_inclusive: bool = True
    rpn_score_threshold: float = 0.0
    rpn_box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    rpn_selection: str = "per_level"
    rpn_pad_proposals: bool = False
    # box coder
    box_delta_clip: float = math.log(1000.0 / 16)
    box_delta_clamp: str = "upper"
    box_coder_style: str = "torchvision"
    # roi pooling
    box_pool_size: int = 7
    mask_pool_size: int = 14
    roi_sampling_ratio: int = 2
    roi_aligned: bool = False
    level_rule: LevelRule = field(default_factory=LevelRule)
    roi_mode: str = "roi_align"
    # box head and detections
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    background_index: str = "first"
    score_threshold: float = 0.05
    detection_min_size: float = 1e-2
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    detection_rule: str = "per_class"
    # back to the input image
    rescale_style: str = "multiply"
    clip_boxes_to_original: bool = False
    box_output: str = "float"
    # masks
    mask_threshold: float = 0.5
    paste_method: str = "torchvision"

    def __post_init__(self) -> None:
        _one_of("channel_order", self.channel_order, ("RGB", "BGR"))
        _one_of("resize_rounding", self.resize_rounding, _RESIZE_ROUNDINGS)
        _one_of("resize_method", self.resize_method, _RESIZE_METHODS)
        _one_of("bn_arithmetic", self.bn_arithmetic, ("scale_shift", "batch_norm"))
        _one_of("cpu_memory_format", self.cpu_memory_format, ("channels_last", "contiguous"))
        _one_of("batch_padding", self.batch_padding, BATCH_PADDINGS)
        if not isinstance(self.fold_batch_norms, bool):
            raise TypeError(f"fold_batch_norms must be True or False; got {self.fold_batch_norms!r}")
        _one_of("tie_order", self.tie_order, ("stable", "torch_sort"))
        if self.normalize_before_resize and self.resize_method != "torch_bilinear":
            raise ValueError(
                f"resize_method={self.resize_method!r} resizes the uint8 image, before normalisation; "
                "it needs normalize_before_resize=False"
            )
        _one_of("stem_pool", self.stem_pool, STEM_POOLS)
        _one_of("anchor_stride", self.anchor_stride, _ANCHOR_STRIDES)
        _one_of("box_delta_clamp", self.box_delta_clamp, _DELTA_CLAMPS)
        _one_of("box_coder_style", self.box_coder_style, ("torchvision", "mmdet", "matterport"))
        _one_of("resize_mode", self.resize_mode, RESIZE_MODES)
        _one_of("normalize_precision", self.normalize_precision, ("float32", "float64"))
        if self.normalize_precision == "float64" and self.resize_method == "torch_bilinear":
            raise ValueError(
                "normalize_precision='float64' applies to the uint8 resize methods "
                "(normalize_before_resize=False and resize_method antialias_uint8, cv2_linear or skimage_uint8)"
            )
        _one_of("box_frame", self.box_frame, BOX_FRAMES)
        _one_of("rpn_selection", self.rpn_selection, RPN_SELECTIONS)
        _one_of("roi_mode", self.roi_mode, ROI_MODES)
        _one_of("detection_rule", self.detection_rule, DETECTION_RULES)
        _one_of("box_output", self.box_output, BOX_OUTPUTS)
        normalized = (
            self.resize_mode == "square",
            self.box_frame == "normalized",
            self.roi_mode == "crop_and_resize",
            self.box_output == "integer",
        )
        if any(normalized) and not all(normalized):
            raise ValueError(
                "matterport's normalized box frame comes as a whole: resize_mode='square', box_frame='normalized', "
                "roi_mode='crop_and_resize' and box_output='integer' together (got "
                f"resize_mode={self.resize_mode!r}, box_frame={self.box_frame!r}, roi_mode={self.roi_mode!r}, "
                f"box_output={self.box_output!r})"
            )
        _one_of("rescale_style", self.rescale_style, ("multiply", "divide"))
        _one_of("background_index", self.background_index, _BACKGROUND)
        _one_of("paste_method", self.paste_method, _PASTE_METHODS)
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 values (one per channel); got {getattr(self, name)!r}")
        if any(s <= 0 for s in self.pixel_std) or self.input_scale <= 0:
            raise ValueError("pixel_std and input_scale must be positive")
        if not (0 < self.min_size <= self.max_size):
            raise ValueError(f"need 0 < min_size <= max_size; got min_size={self.min_size}, max_size={self.max_size}")
        if self.size_divisibility < 1:
            raise ValueError(f"size_divisibility must be >= 1; got {self.size_divisibility}")
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level P2..P6 (5); got {self.anchor_sizes!r}")
        for name in ("score_threshold", "nms_threshold", "rpn_nms_threshold", "mask_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]; got {value}")
        for name in ("detections_per_image", "rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.roi_sampling_ratio < 0:
            raise ValueError(f"roi_sampling_ratio must be >= 0 (0 = adaptive); got {self.roi_sampling_ratio}")

    def replace(self, **changes) -> "MaskRCNNConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _one_of(name: str, value, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {', '.join(map(repr, accepted))}")


#: torchvision ``maskrcnn_resnet50_fpn`` (COCO v1 weights): section A of the reference notes.
TORCHVISION_MASKRCNN_R50_FPN = MaskRCNNConfig(name="torchvision_maskrcnn_resnet50_fpn")
#: torchvision ``maskrcnn_resnet50_fpn_v2``: the same inference rules; batch norm (eps 1e-5) in the
#: backbone, FPN, box head and mask head (the architecture itself is read from the checkpoint).
TORCHVISION_MASKRCNN_R50_FPN_V2 = TORCHVISION_MASKRCNN_R50_FPN.replace(
    name="torchvision_maskrcnn_resnet50_fpn_v2", bn_eps=1e-5
)

#: Detectron2 ``mask_rcnn_R_50_FPN_{1x,3x}`` run by ``DefaultPredictor``: section B of the reference notes.
DETECTRON2_MASK_RCNN_R50_FPN = MaskRCNNConfig(
    name="detectron2_mask_rcnn_R_50_FPN",
    channel_order="BGR",
    input_scale=1.0,
    pixel_mean=(103.530, 116.280, 123.675),
    pixel_std=(1.0, 1.0, 1.0),
    normalize_before_resize=False,
    resize_rounding="round_half_up",
    resize_method="antialias_uint8",
    bn_eps=1e-5,
    stride_in_1x1=True,
    anchor_round=False,
    anchor_stride="fixed",
    rpn_min_size=0.0,
    rpn_min_size_inclusive=False,
    roi_sampling_ratio=0,
    roi_aligned=True,
    level_rule=LevelRule(canonical_size=224.0, canonical_level=4, eps=1e-8, eps_inside_log=True),
    background_index="last",
    detection_min_size=0.0,
    clip_boxes_to_original=True,
    paste_method="grid_sample",
)

#: mmdetection 2.x / 3.x ``mask-rcnn_r50_fpn_1x_coco``: section C of the reference notes.
MMDET_MASK_RCNN_R50_FPN = MaskRCNNConfig(
    name="mmdet_mask_rcnn_r50_fpn",
    batch_padding="by_size",
    bn_arithmetic="batch_norm",
    tie_order="torch_sort",
    nms_group_offsets=True,
    channel_order="RGB",
    input_scale=1.0,
    pixel_mean=(123.675, 116.28, 103.53),
    pixel_std=(58.395, 57.12, 57.375),
    normalize_before_resize=False,
    resize_rounding="round_half_up",
    resize_method="cv2_linear",
    bn_eps=1e-5,
    anchor_round=False,
    anchor_stride="fixed",
    rpn_min_size=0.0,
    rpn_min_size_inclusive=False,
    box_delta_clamp="symmetric",
    box_coder_style="mmdet",
    roi_sampling_ratio=0,
    roi_aligned=True,
    level_rule=LevelRule(canonical_size=56.0, canonical_level=2, eps=1e-6, eps_inside_log=True),
    background_index="last",
    detection_min_size=0.0,
    rescale_style="divide",
    paste_method="grid_sample",
)

#: matterport Mask_RCNN (``mask_rcnn_coco.h5``, ``MaskRCNN.detect`` with the base ``Config``):
#: section D of the reference notes. The checkpoint's depth (R101 in the COCO file) is read from it.
MATTERPORT_MASK_RCNN_FPN = MaskRCNNConfig(
    name="matterport_mask_rcnn_fpn",
    channel_order="RGB",
    input_scale=1.0,
    pixel_mean=(123.7, 116.8, 103.9),
    pixel_std=(1.0, 1.0, 1.0),
    normalize_before_resize=False,
    normalize_precision="float64",
    min_size=800,
    max_size=1024,
    resize_method="skimage_uint8",
    resize_mode="square",
    # TensorFlow's NHWC convolutions are matterport's arithmetic, not torch's NCHW ones: on the CPU
    # the preset takes the faster channels-last layout with the norms folded (BENCHMARKS.md)
    cpu_memory_format="channels_last",
    fold_batch_norms=True,
    bn_eps=1e-3,
    stride_in_1x1=True,
    stem_pool="tf_same",
    anchor_aspect_ratios=(2.0, 1.0, 0.5),  # matterport's width/height ratios (0.5, 1, 2), as height/width
    anchor_round=False,
    anchor_stride="fixed",
    box_frame="normalized",
    rpn_pre_nms_top_n=6000,
    rpn_post_nms_top_n=1000,
    rpn_nms_threshold=0.7,
    rpn_min_size=0.0,
    rpn_box_weights=(10.0, 10.0, 5.0, 5.0),  # RPN_BBOX_STD_DEV (0.1, 0.1, 0.2, 0.2)
    rpn_selection="global",
    rpn_pad_proposals=True,
    box_delta_clamp="none",
    box_coder_style="matterport",
    roi_mode="crop_and_resize",
    level_rule=LevelRule(canonical_size=224.0, canonical_level=4, rounding="round"),
    box_coder_weights=(10.0, 10.0, 5.0, 5.0),  # BBOX_STD_DEV
    background_index="first",
    score_threshold=0.7,
    nms_threshold=0.3,
    detections_per_image=100,
    detection_rule="argmax",
    box_output="integer",
    paste_method="grid_sample",
)

PRESETS: dict[str, MaskRCNNConfig] = {
    preset.name: preset
    for preset in (
        TORCHVISION_MASKRCNN_R50_FPN,
        TORCHVISION_MASKRCNN_R50_FPN_V2,
        DETECTRON2_MASK_RCNN_R50_FPN,
        MMDET_MASK_RCNN_R50_FPN,
        MATTERPORT_MASK_RCNN_FPN,
    )
}


def get_preset(name: str) -> MaskRCNNConfig:
    """The preset called ``name``; raises KeyError listing the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
