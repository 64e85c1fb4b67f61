"""The Mask R-CNN network, as separate stages: features, proposals, detections, mask probabilities.

Parameter names follow torchvision's current state-dict layout (``backbone.body.*``,
``backbone.fpn.*``, ``rpn.head.*``, ``roi_heads.box_head.*``, ``roi_heads.box_predictor.*``,
``roi_heads.mask_head.*``, ``roi_heads.mask_predictor.*``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from engine.anchors import grid_anchors, normalize_boxes
from engine.backbone import Backbone, FrozenBatchNorm2d
from engine.config import MaskRCNNConfig
from engine.preprocess import ImageBatch, image_windows
from engine.ragged import padded_rois, read_counts
from engine.roi_heads import (
    BatchDetections,
    BoxHead,
    ConvFCBoxHead,
    BoxPredictor,
    ImageDetections,
    MaskHead,
    MaskPredictor,
    postprocess_detections,
)
from engine.rpn import BatchProposals, RPNHead, flatten_levels, select_proposals
from kernels.roi_align import multilevel_roi_align
from weights.spec import ArchitectureSpec  # the sizes a checkpoint reader takes from tensor shapes


class _RPN(nn.Module):
    def __init__(self, head: RPNHead) -> None:
        super().__init__()
        self.head = head


class _RoIHeads(nn.Module):
    def __init__(self, spec: ArchitectureSpec, *, box_pool_size: int, bn_eps: float) -> None:
        super().__init__()
        c = spec.fpn_channels
        if spec.box_head_convs:
            self.box_head = ConvFCBoxHead(
                in_channels=c,
                pool_size=box_pool_size,
                conv_channels=spec.box_head_conv_channels,
                num_convs=spec.box_head_convs,
                norm=spec.box_head_norm,
                representation_size=spec.representation_size,
                bn_eps=bn_eps,
            )
        else:
            self.box_head = BoxHead(in_features=c * box_pool_size**2, representation_size=spec.representation_size)
        self.box_predictor = BoxPredictor(
            representation_size=spec.representation_size,
            num_classes=spec.num_classes,
            num_box_classes=spec.num_box_classes,
        )
        self.mask_head = MaskHead(
            in_channels=c, channels=spec.mask_channels, num_convs=spec.mask_convs, norm=spec.mask_norm, bn_eps=bn_eps
        )
        self.mask_predictor = MaskPredictor(
            in_channels=spec.mask_channels, channels=spec.mask_channels, num_mask_classes=spec.num_mask_classes
        )


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what oneDNN needs for fast reduced-precision kernels; without them a bf16 convolution takes a
# reference path (70 s for one 256-channel 3x3 conv at 2x64x64 on an AVX2 EPYC, 0.17 s in fp32)
CPU_PRECISION_NEEDS = {"bf16": "AVX512-BF16 or AMX", "fp16": "AVX512-FP16 or AMX-FP16"}


def cpu_has_fast_kernels(precision: str) -> bool:
    """Whether this CPU runs ``precision`` ("fp32", "bf16", "fp16") convolutions on fast oneDNN kernels."""
    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}.get(precision)
    if probe is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


class MaskRCNN(nn.Module):
    """Predict-only Mask R-CNN with a ResNet-FPN backbone.

    Args:
        spec: network sizes (from the checkpoint).
        config: behaviour (see :class:`engine.config.MaskRCNNConfig`).
        precision: "fp32" (exact parity), or "bf16" / "fp16": the backbone, FPN and heads run
            under autocast in that dtype, while their outputs are cast back to float32 before box
            decoding, top-k, NMS and the RoIAlign / paste kernels, which stay float32.

    Attribute ``trim_padding``: the stages keep ragged sets (proposals, detections per image)
    in fixed-size padded tensors, with counts on the device. With ``trim_padding=True`` the
    padding past the largest count is cut after the RPN and after the detections, at the cost
    of one host read each: free on the CPU, where it saves the heads' work on padding rows,
    but a synchronisation on CUDA. ``Predictor`` sets it for CPU devices only; the results
    are the same either way, except with ``tie_order="torch_sort"`` (mmdetection), whose
    order among equal scores is replayed exactly only where host reads are allowed.
    """

    def __init__(self, *, spec: ArchitectureSpec, config: MaskRCNNConfig, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        self.spec = spec
        self.config = config
        self.precision = precision
        self.autocast_cache = True  # False while the dense part runs from CUDA graphs
        self.trim_padding = False
        self._compiled: dict = {}  # the network parts torch.compile'd by compile_networks
        self.backbone = Backbone(
            block=spec.block,
            blocks_per_stage=spec.blocks_per_stage,
            stage_widths=spec.stage_widths,
            stage_out_channels=spec.stage_out_channels,
            groups=spec.groups,
            stride_in_1x1=config.stride_in_1x1,
            stem_pool=config.stem_pool,
            fpn_channels=spec.fpn_channels,
            fpn_norm=spec.fpn_norm,
            bn_eps=config.bn_eps,
        )
        self.rpn = _RPN(
            RPNHead(
                channels=spec.fpn_channels,
                num_anchors=spec.num_anchors,
                conv_depth=spec.rpn_conv_depth,
                conv_channels=spec.rpn_channels,
            )
        )
        self.roi_heads = _RoIHeads(spec, box_pool_size=config.box_pool_size, bn_eps=config.bn_eps)
        for module in self.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.arithmetic = config.bn_arithmetic

    def _network_precision(self, device: torch.device):
        """Autocast for the convolutional and fully connected parts, or nothing in fp32 mode."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # CUDA-graph capture needs the cast weights made inside the graph, not cached across it
        return torch.autocast(device_type=device.type, dtype=PRECISIONS[self.precision], cache_enabled=self.autocast_cache)

    # --- stages -------------------------------------------------------------------------------

    def channels_last(self, device: torch.device) -> bool:
        """Whether the convolutions run channels-last on ``device``: always in bf16 / fp16 (on the
        CPU, oneDNN's AMX / AVX512-BF16 kernels want it: 1.9x over NCHW bf16 measured), and in
        fp32 on the CPU where ``config.cpu_memory_format`` says so."""
        if self.precision != "fp32":
            return True
        return torch.device(device).type != "cuda" and self.config.cpu_memory_format == "channels_last"

    def _box_outputs(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Box head and predictor: pooled [R, C, P, P] -> class logits [R, K], deltas [R, 4 * K_box]."""
        return self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))

    def _mask_logits(self, pooled: Tensor, labels: Tensor) -> Tensor:
        """Mask head and predictor: pooled [R, C, 14, 14], labels int64 [R] -> each RoI's
        own class channel of the mask logits [R, 28, 28]."""
        return self.roi_heads.mask_predictor.selected_logits(self.roi_heads.mask_head(pooled), labels)

    def compile_networks(self) -> None:
        """Run the backbone with its FPN, the RPN head, and the box and mask heads through
        ``torch.compile`` (inductor) with weight freezing: the convolutions take oneDNN's prepacked
        weights with the ReLUs and additions fused after them.

        An opt-in CPU speed mode (``Predictor(cpu_compile=True)``): the first run of each new
        input shape compiles (tens of seconds; after two shapes the parts compile for dynamic
        sizes), and the results differ from the eager ones by float32 rounding, not bit for bit.
        Call it after the weights and the memory format are final: freezing takes the weights as
        constants. Everything outside these parts (RoIAlign, NMS, paste) stays eager.
        """
        options = {"freezing": True}
        self._compiled = {
            "backbone": torch.compile(self.backbone, options=options),
            "rpn_head": torch.compile(self.rpn.head, options=options),
            "box_outputs": torch.compile(self._box_outputs, options=options),
            "mask_logits": torch.compile(self._mask_logits, options=options),
        }

    def features(self, batch: ImageBatch) -> list[Tensor]:
        """FPN features [P2, P3, P4, P5, P6], each [B, C, Hp / 2**k, Wp / 2**k]: float32, or the
        reduced precision dtype in bf16 / fp16 mode; channels-last where :meth:`channels_last`."""
        images = batch.tensor
        if self.channels_last(images.device):
            images = images.contiguous(memory_format=torch.channels_last)
        with self._network_precision(images.device):
            if images.device.type == "cpu" and len(images) > 1:
                # oneDNN's CPU convolutions run a batch faster one image at a time (1.12-1.25x
                # on the R50 backbone, 2 cores: a smaller working set), with the very same
                # results at these widths (BENCHMARKS.md); then one tensor per level again
                backbone = self._compiled.get("backbone", self.backbone)
                per_image = [backbone(images[i : i + 1]) for i in range(len(images))]
                return [torch.cat(levels) for levels in zip(*per_image)]
            return self._compiled.get("backbone", self.backbone)(images)

    def rpn_head(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level the RPN's objectness logits [B, A, h, w] and deltas [B, 4A, h, w]."""
        with self._network_precision(features[0].device):
            return self._compiled.get("rpn_head", self.rpn.head)(features)

    def dense_outputs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The dense part of the network on a padded batch tensor: FPN features, RPN logits and
        deltas. It reads no device data on the host (what :mod:`engine.cuda_graphs` captures)."""
        features = self.features(ImageBatch(tensor=images, image_sizes=[], original_sizes=[], offsets=[]))
        logits, deltas = self.rpn_head(features)
        return features, logits, deltas

    def padded_proposals(
        self, features: list[Tensor], batch: ImageBatch, *, head_outputs: tuple[list[Tensor], list[Tensor]] | None = None
    ) -> BatchProposals:
        """RPN proposals of the batch in fixed-size form (resized-image pixels, or the normalized frame).

        ``head_outputs``: the RPN head's (logits, deltas) when already computed (:meth:`dense_outputs`).
        """
        cfg = self.config
        logits, deltas = self.rpn_head(features) if head_outputs is None else head_outputs
        logits, deltas = [t.float() for t in logits], [t.float() for t in deltas]
        objectness, flat_deltas, per_level = flatten_levels(logits, deltas)
        padded = tuple(batch.tensor.shape[-2:])
        normalized = cfg.box_frame == "normalized"
        anchors = grid_anchors(
            padded,
            [tuple(f.shape[-2:]) for f in features],
            sizes=cfg.anchor_sizes,
            aspect_ratios=cfg.anchor_aspect_ratios,
            round_anchors=cfg.anchor_round,
            stride_mode=cfg.anchor_stride,
            device=objectness.device,
            dtype=torch.float64 if normalized else torch.float32,  # matterport builds them in numpy float64
        )
        if normalized:
            anchors = [normalize_boxes(a, padded) for a in anchors]
        proposals = select_proposals(
            objectness, flat_deltas, anchors, per_level, batch.image_sizes, config=cfg, host_reads=self.trim_padding
        )
        if self.trim_padding:
            proposals = proposals.trimmed(_largest(proposals.counts))
        return proposals

    def proposals(
        self, features: list[Tensor], batch: ImageBatch, *, head_outputs: tuple[list[Tensor], list[Tensor]] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """RPN proposals per image: boxes float32 [P_i, 4] (resized-image pixels) and objectness [P_i].

        :meth:`padded_proposals` cut per image, after one host read of the counts.
        """
        proposals = self.padded_proposals(features, batch, head_outputs=head_outputs)
        return proposals.split(read_counts(proposals.counts))

    def pool(self, features: list[Tensor], boxes: list[Tensor] | Tensor, batch: ImageBatch, *, output_size: int) -> Tensor:
        """Multi-level RoIAlign of per-image boxes (resized-image pixels) -> float32 [R, C, out, out].

        ``boxes``: a list of per-image [n_i, 4] (R = sum n_i), or a padded [B, P, 4] (R = B * P).
        ``features``: the FPN levels, or :meth:`pooling_maps` of them (no copy then).

        With ``roi_mode="crop_and_resize"`` the boxes are in the normalized frame and the level
        rule's canonical size is divided by ``sqrt(Hp * Wp)`` (matterport's ``PyramidROIAlign``).
        """
        cfg = self.config
        maps = self.pooling_maps(features)
        rois = padded_rois(boxes) if isinstance(boxes, Tensor) else boxes_to_rois(boxes)
        if cfg.roi_mode == "crop_and_resize":
            height, width = batch.tensor.shape[-2:]
            scales = [2.0 ** -(2 + i) for i in range(len(maps))]  # ignored by crop_and_resize; P2 first
            canonical = cfg.level_rule.canonical_size / math.sqrt(height * width)
            rule = replace(cfg.level_rule, canonical_size=canonical, min_level=2, max_level=1 + len(maps))
        else:
            scales = infer_spatial_scales(maps, batch.image_sizes)
            first = int(round(-math.log2(scales[0])))
            rule = replace(cfg.level_rule, min_level=first, max_level=first + len(maps) - 1)
        return multilevel_roi_align(
            maps,
            rois,
            output_size=output_size,
            spatial_scales=scales,
            sampling_ratio=cfg.roi_sampling_ratio,
            aligned=cfg.roi_aligned,
            level_rule=rule,
            mode=cfg.roi_mode,
        )

    def pooling_maps(self, features: list[Tensor]) -> list[Tensor]:
        """The maps RoIAlign reads: P2..P5 in float32 (the kernel samples and accumulates in
        float32); on the CPU also channels-last, the rows the reference gathers, so that the box
        and mask heads share one copy of each level. Maps already so come back as they are."""
        maps = [m.float() for m in features[:4]]
        if maps and maps[0].device.type == "cpu":
            maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        return maps

    def padded_detect(self, features: list[Tensor], proposals: BatchProposals, batch: ImageBatch) -> BatchDetections:
        """Box head and post-processing on every row of the padded proposals: final detections
        of the batch in fixed-size form (resized-image frame)."""
        pooled = self.pool(features, proposals.boxes, batch, output_size=self.config.box_pool_size)
        with self._network_precision(pooled.device):
            class_logits, box_deltas = self._compiled.get("box_outputs", self._box_outputs)(pooled)
        class_logits, box_deltas = class_logits.float(), box_deltas.float()
        detections = postprocess_detections(
            class_logits,
            box_deltas,
            proposals,
            batch.image_sizes,
            config=self.config,
            windows=batch.windows if batch.windows is not None else image_windows(batch, self.config),
            host_reads=self.trim_padding,
        )
        if self.trim_padding:
            detections = detections.trimmed(_largest(detections.counts))
        return detections

    def detect(self, features: list[Tensor], proposals: list[Tensor], batch: ImageBatch) -> list[ImageDetections]:
        """Box head and post-processing: final detections per image (resized-image frame).

        :meth:`padded_detect` on the proposals (per image [P_i, 4]), cut per image after one
        host read of the counts.
        """
        detections = self.padded_detect(features, BatchProposals.from_lists(proposals), batch)
        return detections.split(read_counts(detections.counts))

    def padded_mask_probabilities(self, features: list[Tensor], detections: BatchDetections, batch: ImageBatch) -> Tensor:
        """float32 [B, D, 28, 28]: sigmoid of each detection's class channel, for every column
        of the padded detections (those past the counts are filler)."""
        num_images, width = detections.scores.shape
        pooled = self.pool(features, detections.boxes, batch, output_size=self.config.mask_pool_size)
        with self._network_precision(pooled.device):
            logits = self._compiled.get("mask_logits", self._mask_logits)(pooled, detections.labels.reshape(-1))
        probs = logits.float().sigmoid()
        return probs.view((num_images, width) + tuple(probs.shape[1:]))

    def mask_probabilities(
        self, features: list[Tensor], detections: list[ImageDetections], batch: ImageBatch
    ) -> list[Tensor]:
        """Per image float32 [N_i, 28, 28]: sigmoid of each detection's class channel."""
        probs = self.padded_mask_probabilities(features, BatchDetections.from_list(detections), batch)
        return [p[: len(d.boxes)] for p, d in zip(probs, detections)]


def _largest(counts: Tensor) -> int:
    """The largest count of a batch, read on the host (``trim_padding``'s read)."""
    return max(read_counts(counts), default=0)


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image boxes [n_i, 4] -> float32 [sum n_i, 5] rows (image index, x1, y1, x2, y2)."""
    rows = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rows, dim=0)


def infer_spatial_scales(maps: list[Tensor], image_sizes: list[tuple[int, int]]) -> list[float]:
    """Scale of each map relative to the input, as torchvision's ``MultiScaleRoIAlign`` infers it.

    ``2 ** round(log2(map_height / max_image_height))`` with the largest resized image height of the batch.
    """
    max_h = max(h for h, _ in image_sizes)
    return [2.0 ** round(math.log2(m.shape[-2] / max_h)) for m in maps]
