"""Parity with torchvision: same checkpoint, same photographs, same answers.

torchvision's own ``maskrcnn_resnet50_fpn`` is the oracle. Each checkpoint is saved to a
``.pth`` file and loaded by ``Predictor``; three real photographs of different sizes go
through as one padded batch (chelsea resizes to 800x1202, not a multiple of 32).
Stages are compared one by one, so that a failure points at its stage, and then the
final detections with the contract's tolerances:

- every torchvision detection has a counterpart with the same label and box IoU >= 0.99,
- score difference < 1e-4, mask IoU >= 0.99 (torchvision's masks thresholded at > 0.5),
- no extra detections.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agreement import box_iou
from checkpoints import make_torchvision_maskrcnn, photographs, to_torchvision_input, legacy_state_dict
from engine import Predictor
from engine.model import boxes_to_rois
from engine.loading import checkpoint_config
from weights import load_checkpoint

pytestmark = pytest.mark.slow


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def assert_detections_match(
    reference: dict, ours, *, box_iou_min=0.99, score_tol=1e-4, mask_iou_min=0.99, detections_per_image=100
):
    ref_boxes, ref_scores, ref_labels = reference["boxes"], reference["scores"], reference["labels"]
    ref_masks = reference["masks"][:, 0] > 0.5
    assert len(ours) == len(ref_boxes), f"{len(ours)} detections, torchvision has {len(ref_boxes)}"
    assert ours.masks.dtype == torch.bool and tuple(ours.masks.shape[1:]) == tuple(ref_masks.shape[1:])
    if len(ours) == 0:
        return
    ious = box_iou(ref_boxes, ours.boxes)
    same_label = ref_labels[:, None] == ours.labels[None, :]
    ious = torch.where(same_label, ious, torch.full_like(ious, -1.0))
    used = set()
    cut = ref_scores[-1].item()  # the lowest kept score: where the top-k cut falls when the list is full
    for i in range(len(ref_boxes)):
        order = torch.argsort(ious[i], descending=True).tolist()
        j = next(j for j in order if j not in used)
        used.add(j)
        if ious[i, j] < box_iou_min and len(ref_boxes) == detections_per_image:
            # a near-tie at the top-k cut may keep a different candidate of (almost) the same score
            at_cut = abs(ref_scores[i].item() - cut) < score_tol and abs(ours.scores[-1].item() - cut) < score_tol
            if at_cut:
                continue
        assert ious[i, j] >= box_iou_min, f"torchvision detection {i} has no counterpart (best IoU {ious[i, j]:.4f})"
        assert abs(ref_scores[i].item() - ours.scores[j].item()) < score_tol
        assert mask_iou(ref_masks[i], ours.masks[j]) >= mask_iou_min, f"detection {i}: mask IoU too low"


class Case:
    """A torchvision model, our predictor loaded from its saved file, and both outputs on the photos."""

    def __init__(
        self, tmp_path_factory, *, num_classes, frozen_bn, min_size, max_size, legacy_keys=False,
        variant="v1", backbone="resnet50",
    ):
        self.images = photographs()
        self.tv = make_torchvision_maskrcnn(
            num_classes=num_classes, frozen_bn=frozen_bn, min_size=min_size, max_size=max_size,
            variant=variant, backbone=backbone,
        )
        state = self.tv.state_dict()
        if legacy_keys:
            state = legacy_state_dict(state)
        path = tmp_path_factory.mktemp("ckpt") / "maskrcnn.pth"
        torch.save(state, path)
        config = checkpoint_config(load_checkpoint(path)).replace(min_size=min_size, max_size=max_size)
        self.predictor = Predictor(path, device="cpu", config=config)
        with torch.inference_mode():
            self.tv_inputs = [to_torchvision_input(im) for im in self.images]
            self.reference = self.tv(self.tv_inputs)
        self.images_before = [im.copy() for im in self.images]
        self.ours = self.predictor.run(self.images)


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """91 classes, FrozenBatchNorm2d with eps 0 (the COCO v1 file's layout), legacy key names, default sizes."""
    return Case(tmp_path_factory, num_classes=91, frozen_bn=True, min_size=800, max_size=1333, legacy_keys=True)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """7 classes, nn.BatchNorm2d (eps 1e-5, num_batches_tracked keys), smaller input size to keep CPU time down."""
    return Case(tmp_path_factory, num_classes=7, frozen_bn=False, min_size=480, max_size=800)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """maskrcnn_resnet50_fpn_v2: batch norm in backbone, FPN, box and mask heads; two-conv RPN; conv box head."""
    return Case(tmp_path_factory, num_classes=91, frozen_bn=False, min_size=480, max_size=800, variant="v2")


@pytest.fixture(scope="module")
def resnext(tmp_path_factory):
    """ResNeXt-50 32x4d FPN backbone (grouped 3x3 convs, wider stages), frozen batch norm, 11 classes."""
    return Case(tmp_path_factory, num_classes=11, frozen_bn=True, min_size=320, max_size=533, backbone="resnext50_32x4d")


@pytest.fixture(scope="module")
def resnet101(tmp_path_factory):
    """ResNet-101 FPN backbone (23 blocks in stage 4), frozen batch norm."""
    return Case(tmp_path_factory, num_classes=91, frozen_bn=True, min_size=320, max_size=533, backbone="resnet101")


def test_architectures_read_from_shapes(v2, resnext, resnet101):
    spec = v2.predictor.model.spec
    assert spec.fpn_norm and spec.mask_norm and spec.box_head_norm
    assert spec.box_head_convs == 4 and spec.rpn_conv_depth == 2
    assert v2.predictor.config.name == "torchvision_maskrcnn_resnet50_fpn_v2" and v2.predictor.config.bn_eps == 1e-5
    assert resnext.predictor.model.spec.groups == 32
    assert resnext.predictor.model.spec.stage_widths == (128, 256, 512, 1024)
    assert resnet101.predictor.model.spec.blocks_per_stage == (3, 4, 23, 3)


def test_batch_norm_eps_read_from_file(coco_like, fine_tuned):
    assert coco_like.predictor.config.bn_eps == 0.0
    assert fine_tuned.predictor.config.bn_eps == 1e-5
    assert fine_tuned.predictor.num_classes == 7


def test_preprocessing_matches(coco_like):
    with torch.inference_mode():
        ref, _ = coco_like.tv.transform(coco_like.tv_inputs)
    ours = coco_like.predictor.preprocess(coco_like.images)
    assert ours.image_sizes == [tuple(s) for s in ref.image_sizes]
    assert (800, 1202) in ours.image_sizes  # chelsea: a size that is not a multiple of 32
    torch.testing.assert_close(ours.tensor, ref.tensors, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def stages(coco_like):
    """torchvision's and our intermediate results on the same batch."""
    with torch.inference_mode():
        tv = coco_like.tv
        image_list, _ = tv.transform(coco_like.tv_inputs)
        tv_features = tv.backbone(image_list.tensors)
        tv_proposals, _ = tv.rpn(image_list, tv_features)
        model = coco_like.predictor.model
        batch = coco_like.predictor.preprocess(coco_like.images)
        features = model.features(batch)
        proposals, _ = model.proposals(features, batch)
        feats4 = {k: tv_features[k] for k in ("0", "1", "2", "3")}
        tv_box_pool = tv.roi_heads.box_roi_pool(feats4, tv_proposals, image_list.image_sizes)
        our_box_pool = model.pool(list(tv_features.values()), tv_proposals, batch, output_size=7)
        tv_mask_pool = tv.roi_heads.mask_roi_pool(feats4, [p[:50] for p in tv_proposals], image_list.image_sizes)
        our_mask_pool = model.pool(list(tv_features.values()), [p[:50] for p in tv_proposals], batch, output_size=14)
    return dict(
        tv_features=list(tv_features.values()),
        features=features,
        tv_proposals=tv_proposals,
        proposals=proposals,
        pools=[(tv_box_pool, our_box_pool), (tv_mask_pool, our_mask_pool)],
    )


def test_features_match(stages):
    assert len(stages["features"]) == 5
    for ref, ours in zip(stages["tv_features"], stages["features"]):
        assert ref.shape == ours.shape
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_proposals_match(stages):
    for ref, ours in zip(stages["tv_proposals"], stages["proposals"]):
        assert ref.shape[0] == ours.shape[0]
        # the same boxes; proposals whose scores tie to float noise may trade places, so match as sets
        head = min(len(ref), 500)
        best = box_iou(ref[:head], ours).max(dim=1).values
        assert (best > 0.999).float().mean() >= 0.995
        best_all = box_iou(ref, ours).max(dim=1).values
        assert (best_all > 0.999).float().mean() >= 0.99


def test_pooled_features_match(stages):
    for ref, ours in stages["pools"]:
        assert ref.shape == ours.shape
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_rois_layout():
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros((0, 4)), torch.tensor([[5.0, 6.0, 7.0, 8.0]])]
    rois = boxes_to_rois(boxes)
    assert rois.tolist() == [[0, 1, 2, 3, 4], [2, 5, 6, 7, 8]]


@pytest.mark.parametrize("case_name", ["coco_like", "fine_tuned", "v2", "resnext", "resnet101"])
def test_detections_match_torchvision(case_name, request):
    case = request.getfixturevalue(case_name)
    assert sum(len(r["boxes"]) for r in case.reference) > 0, "the test checkpoint should produce detections"
    for ref, ours, image in zip(case.reference, case.ours, case.images):
        assert ours.image_size == image.shape[:2]
        assert ours.masks.shape[1:] == image.shape[:2]
        assert ours.boxes.dtype == torch.float32 and ours.labels.dtype == torch.int64
        assert torch.all(ours.scores[:-1] >= ours.scores[1:])
        assert_detections_match(ref, ours)


def test_inputs_not_modified(coco_like):
    for before, after in zip(coco_like.images_before, coco_like.images):
        np.testing.assert_array_equal(before, after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_detections_match_torchvision_on_gpu(coco_like):
    """The compiled Triton kernels on CUDA against torchvision on CUDA, same checkpoint and photos."""
    tv = coco_like.tv.to("cuda")
    with torch.inference_mode():
        reference = tv([t.cuda() for t in coco_like.tv_inputs])
    predictor = Predictor(coco_like.tv.state_dict(), device="cuda", config=coco_like.predictor.config)
    ours = predictor.run(coco_like.images)
    for ref, det in zip(reference, ours):
        ref = {k: v.cpu() for k, v in ref.items()}
        # cuDNN convolutions differ from torchvision's only by float noise; the contract's tolerances still hold
        assert_detections_match(ref, det.to("cpu"))
    coco_like.tv.to("cpu")
