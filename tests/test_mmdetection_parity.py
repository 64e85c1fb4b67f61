"""mmdetection checkpoints give mmdetection's answers: parity against real mmdetection 3.3 (issue 12).

mmdetection 3.3 runs here on CPU with the mmcv 2.1.0 wheel in ``../shared/wheels`` (``.ci/run``
installs it). Each model is mmdetection's own, built from its shipped config with calibrated
random weights (``tests/mmdet_models.py``) and saved as mmengine saves it; ``Predictor`` loads
the file. On the CPU the results are compared **bit for bit** (``torch.equal``): boxes, scores,
labels and masks, and stage by stage where a failure should name its stage (input tensor,
FPN features, proposals, pooled features, detections before the rescale, final masks).

What each difference fixed is pinned by:

- ``config.bn_arithmetic="batch_norm"`` (``nn.BatchNorm2d.eval()``'s own arithmetic): the
  features stage;
- ``nms_group_offsets`` (mmcv ``batched_nms`` moves groups apart before one NMS) and
  ``tie_order="torch_sort"`` (mmdetection's unstable sorts, replayed): the proposals stage with
  saturated objectness, and ``test_batched_nms_matches_mmcv`` on both of mmcv's branches;
- the level rule (``finest_scale=56``): the pooled-features stage;
- the grid_sample paste with ``skip_empty`` on CPU and ``>= mask_thr_binary``: the masks.
"""

import pytest
import torch

mmdet_apis = pytest.importorskip(
    "mmdet.apis",
    reason="real mmdetection 3.3 is not installed: pip install ../shared/wheels/mmcv-2.1.0-*.whl "
    "mmengine==0.10.7 mmdet==3.3.0 (as .ci/run does)",
)

from checkpoints import photographs  # noqa: E402
from mmdet_models import ZOO_CONFIGS, bgr, build_model, mmdet_batch, save_checkpoint, save_checkpoint_2x  # noqa: E402

from engine import Predictor  # noqa: E402
from engine.predictor import padded_size_groups  # noqa: E402
from engine.boxes import offset_by_group  # noqa: E402
from engine.tie_order import batched_nms_final_keys, batched_nms_visit_keys, sort_keys  # noqa: E402
from kernels.nms import segmented_nms_keep  # noqa: E402

R50 = "mask-rcnn_r50_fpn_1x_coco"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Models and checkpoint files, built once per (config, rpn_scale)."""
    cache = {}

    def get(name: str, rpn_scale: float = 0.2):
        key = (name, rpn_scale)
        if key not in cache:
            cfg, model = build_model(name, rpn_scale=rpn_scale)
            path = tmp_path_factory.mktemp("mmdet") / f"{name}.pth"
            save_checkpoint(cfg, model, path)
            cache[key] = (cfg, model, path)
        return cache[key]

    return get


def _mmdet_results(model, images):
    """mmdetection's ``test_step`` on one padded batch of ``images`` (RGB): per image pred_instances."""
    data = mmdet_batch(model, images)
    with torch.no_grad():
        return [s.pred_instances for s in model.predict(data["inputs"], data["data_samples"])]


def assert_same_detections(ours, theirs, where: str) -> None:
    assert len(ours) == len(theirs.bboxes), f"{where}: {len(ours)} detections, mmdetection {len(theirs.bboxes)}"
    for field, a, b in (
        ("labels", ours.labels, theirs.labels),
        ("scores", ours.scores, theirs.scores),
        ("boxes", ours.boxes, theirs.bboxes),
        ("masks", ours.masks, theirs.masks),
    ):
        if not torch.equal(a, b):
            diff = (a.float() - b.float()).abs()
            raise AssertionError(f"{where}: {field} differ ({int((diff > 0).sum())} entries, max {float(diff.max()):.3g})")


@pytest.mark.parametrize("name", ZOO_CONFIGS)
def test_zoo_config_matches_mmdetection(built, name):
    """Every config family of the zoo table, one photograph, the whole run."""
    cfg, model, path = built(name)
    image = photographs(("astronaut",))[0]
    predictor = Predictor(path)
    assert predictor.family == "mmdetection"
    # what the file's config says (x101-32x8d: BGR input with the pytorch style)
    rgb = cfg.model.data_preprocessor.get("bgr_to_rgb", False)
    assert predictor.config.channel_order == ("RGB" if rgb else "BGR")
    assert predictor.config.stride_in_1x1 == (cfg.model.backbone.get("style", "pytorch") == "caffe")
    assert_same_detections(predictor.run([image])[0], mmdet_apis.inference_detector(model, bgr(image)).pred_instances, name)


@pytest.mark.parametrize("rpn_scale", [0.2, 1.0], ids=["realistic-objectness", "saturated-objectness"])
def test_stage_by_stage(built, rpn_scale):
    """Input, features, proposals, pooled features, detections before the rescale, final results."""
    _, model, path = built(R50, rpn_scale)
    predictor = Predictor(path)
    net = predictor.model
    for image in photographs(("astronaut", "coffee", "chelsea")):
        batch = predictor.preprocess([image])
        data = mmdet_batch(model, [image])
        samples = data["data_samples"]
        with torch.no_grad():
            assert torch.equal(batch.tensor, data["inputs"]), "input tensor"
            feats, theirs = net.features(batch), model.extract_feat(data["inputs"])
            for level, (a, b) in enumerate(zip(feats, theirs)):
                assert torch.equal(a, b), f"FPN features P{level + 2}: max {float((a - b).abs().max()):.3g}"
            rpn = model.rpn_head.predict(theirs, samples, rescale=False)[0]
            proposals, scores = net.proposals(feats, batch)
            assert torch.equal(proposals[0], rpn.bboxes) and torch.equal(scores[0], rpn.scores), "proposals"
            rois = torch.cat([torch.zeros_like(rpn.bboxes[:, :1]), rpn.bboxes], dim=1)
            pooled = model.roi_head.bbox_roi_extractor(theirs[:4], rois)
            assert torch.equal(net.pool(feats, proposals, batch, output_size=7), pooled), "pooled box features"
            metas = [s.metainfo for s in samples]
            before = model.roi_head.predict_bbox(theirs, metas, [rpn], model.roi_head.test_cfg, rescale=False)[0]
            dets = net.detect(feats, proposals, batch)[0]
        for field, a, b in (("labels", dets.labels, before.labels), ("scores", dets.scores, before.scores), ("boxes", dets.boxes, before.bboxes)):
            assert torch.equal(a, b), f"detections before the rescale: {field}"
        assert_same_detections(predictor.run([image])[0], _mmdet_results(model, [image])[0], "final results")


def _padded_together(path) -> Predictor:
    """The engine with ``batch_padding="together"``: a list runs as one padded batch, as
    mmdetection's ``predict`` runs a batch of its test loader."""
    from engine.loading import checkpoint_config
    from weights import load_checkpoint

    return Predictor(path, config=checkpoint_config(load_checkpoint(path)).replace(batch_padding="together"))


def test_mixed_sizes_run_as_inference_detector_runs_them(built):
    """The preset's default ``batch_padding="by_size"``: a list of mixed sizes in one ``run()``
    gives each image what mmdetection's ``inference_detector`` gives it, one image per call.
    coffee and chelsea share a padded size, so they also run as one batch of two."""
    _, model, path = built(R50)
    images = photographs(("coffee", "astronaut", "chelsea"))
    predictor = Predictor(path)
    assert predictor.config.batch_padding == "by_size"
    assert padded_size_groups(images, predictor.config) == [[0, 2], [1]]
    for i, (image, ours) in enumerate(zip(images, predictor.run(images))):
        assert_same_detections(ours, mmdet_apis.inference_detector(model, bgr(image)).pred_instances, f"image {i}")


@pytest.mark.parametrize("rpn_scale", [0.2, 1.0], ids=["realistic-objectness", "saturated-objectness"])
def test_batched_run_matches_one_padded_batch(built, rpn_scale):
    """Three photographs in one ``run()`` padded together against mmdetection's ``predict`` on one padded batch."""
    _, model, path = built(R50, rpn_scale)
    images = photographs(("astronaut", "coffee", "chelsea"))
    ours = _padded_together(path).run(images)
    for i, (o, t) in enumerate(zip(ours, _mmdet_results(model, images))):
        assert_same_detections(o, t, f"image {i} of the batch")


def _candidates(model, images):
    """mmdetection's scored box candidates before its NMS, per image of one padded batch:
    ``(scores [N, K + 1], boxes [N, K, 4])`` in the original image's frame (``predict_by_feat``
    without a test config returns them raw)."""
    data = mmdet_batch(model, images)
    samples = data["data_samples"]
    metas = [s.metainfo for s in samples]
    with torch.no_grad():
        feats = model.extract_feat(data["inputs"])
        proposals = model.rpn_head.predict(feats, samples, rescale=False)
        # one box-head pass over every image's RoIs, as mmdetection's predict_bbox runs it
        rois = torch.cat([torch.cat([torch.full_like(p.bboxes[:, :1], i), p.bboxes], 1) for i, p in enumerate(proposals)])
        heads = model.roi_head._bbox_forward(feats, rois)
        counts = [len(p.bboxes) for p in proposals]
        raw = model.roi_head.bbox_head.predict_by_feat(
            rois=rois.split(counts), cls_scores=heads["cls_score"].split(counts), bbox_preds=heads["bbox_pred"].split(counts),
            batch_img_metas=metas, rcnn_test_cfg=None, rescale=True,
        )
    return [(r.scores, r.bboxes.view(r.bboxes.shape[0], -1, 4)) for r in raw]


def _near(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=0, atol=1e-3))


def test_sync_free_path_matches_but_for_exact_ties(built):
    """The CUDA configuration (no host reads, ``trim_padding`` off) gives mmdetection's results,
    except that among candidates of exactly equal score it keeps the stable order where
    mmdetection's sort is unstable (see ``engine/tie_order.py``). So a detection may differ only
    in its box, and only where mmdetection has another candidate of the same label and the very
    same score: then our box is that candidate's. (Which photographs hold such ties
    depends on the CPU's float arithmetic: on an AMX machine astronaut does, elsewhere none did.)"""
    _, model, path = built(R50, 0.2)
    predictor = _padded_together(path)
    predictor.model.trim_padding = False
    images = photographs(("astronaut", "coffee"))
    candidates = _candidates(model, images)
    for i, (o, t) in enumerate(zip(predictor.run(images), _mmdet_results(model, images))):
        where = f"sync-free, image {i}"
        assert len(o) == len(t.bboxes), f"{where}: {len(o)} detections, mmdetection {len(t.bboxes)}"
        assert torch.equal(o.labels, t.labels) and torch.equal(o.scores, t.scores), f"{where}: labels or scores differ"
        scores, boxes = candidates[i]
        for row in (o.boxes != t.bboxes).any(1).nonzero().flatten().tolist():
            label = int(o.labels[row])
            tied = (scores[:, label] == o.scores[row]).nonzero().flatten()
            assert len(tied) >= 2, f"{where}: detection {row} has another box and no tie among mmdetection's candidates"
            # (mmdetection's own final boxes come out of another decoding route, 1 ulp apart)
            assert any(_near(o.boxes[row], boxes[j, label]) for j in tied), f"{where}: detection {row}'s box is no tied candidate's"
            assert any(_near(t.bboxes[row], boxes[j, label]) for j in tied), f"{where}: the check cannot see mmdetection's own box"
        same = ~(o.boxes != t.bboxes).any(1)
        assert torch.equal(o.masks[same], t.masks[same]), f"{where}: masks differ where the boxes agree"


@pytest.mark.parametrize("caffe", [False, True], ids=["pytorch-style", "caffe-style"])
def test_mmdetection_2x_checkpoint(built, tmp_path, caffe):
    """A 2.x file (meta ``config`` text and ``CLASSES``) gives what mmdetection 3.3 gives on its weights."""
    name = "mask-rcnn_r50-caffe_fpn_ms-poly-3x_coco" if caffe else R50
    _, model, _ = built(name)
    path = tmp_path / "mask_rcnn_2x.pth"
    save_checkpoint_2x(model, path, caffe=caffe)
    predictor = Predictor(path)
    assert predictor.config.channel_order == ("BGR" if caffe else "RGB")
    image = photographs(("coffee",))[0]
    assert_same_detections(predictor.run([image])[0], mmdet_apis.inference_detector(model, bgr(image)).pred_instances, "2.x file")


def _clustered(n: int, groups: int, seed: int, *, ties: bool):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(n // 8, 1), 2, generator=g) * 700
    xy = centres[torch.randint(0, len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 40], dim=1)
    scores = torch.rand(n, generator=g)
    if ties:
        scores = (scores * 5).floor() / 5 + 0.1  # five values: ties everywhere
    return boxes, scores, torch.randint(0, groups, (n,), generator=g)


@pytest.mark.parametrize("n", [300, 12000], ids=["one-nms", "split-per-group"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_batched_nms_matches_mmcv(n, ties):
    """Group offsets + replayed tie order + segmented NMS = ``mmcv.ops.batched_nms``, kept indices in order,
    below and above its ``split_thr`` (10,000)."""
    from mmcv.ops import batched_nms

    boxes, scores, groups = _clustered(n, 6, seed=n, ties=ties)
    _, expected = batched_nms(boxes, scores, groups, dict(type="nms", iou_threshold=0.5))
    valid = torch.ones(1, n, dtype=torch.bool)
    visit = batched_nms_visit_keys(scores[None], valid, groups[None])
    moved = offset_by_group(boxes[None], valid, groups[None])[0]
    keep = torch.zeros(n, dtype=torch.bool)
    for g in range(6):  # one segment per group, as the engine lays them out
        members = torch.nonzero(groups == g).squeeze(1)
        keep[members] = segmented_nms_keep(moved[members][None], visit[0, members][None], valid[:, members], 0.5)[0]
    final = batched_nms_final_keys(scores[None], valid, keep[None], visit)[0]
    kept = torch.nonzero(keep).squeeze(1)
    ours = kept[torch.sort(final[kept], descending=True, stable=True).indices]
    assert torch.equal(ours, expected)


def test_sort_keys_replay_torch_sort_row_by_row():
    """The arrangement of an unstable ``torch.sort`` is replayed, and a row of a batched sort is
    arranged as that row sorted alone (what ``engine.tie_order`` relies on)."""
    values = (torch.rand(3, 5000, generator=torch.Generator().manual_seed(0)) * 4).floor()
    order = torch.sort(values[1], descending=True).indices
    assert torch.equal(torch.sort(sort_keys(values[1]), descending=True, stable=True).indices, order)
    assert not torch.equal(order, torch.sort(values[1], descending=True, stable=True).indices)  # ties matter
    batched = torch.sort(values, dim=1, descending=True).indices
    assert all(torch.equal(batched[i], torch.sort(values[i], descending=True).indices) for i in range(3))
