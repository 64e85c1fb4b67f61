"""matterport's inference on TensorFlow against the engine's matterport preset, stage by stage (CPU).

matterport's Mask_RCNN runs one Keras graph on TensorFlow: the ResNet-FPN, the RPN, its
``ProposalLayer`` (top-k, box deltas, ``tf.image.non_max_suppression``), ``PyramidROIAlign``
(``tf.image.crop_and_resize``), the classifier head, ``DetectionLayer`` (per-class NMS) and the mask
head, with numpy around it (``mold_inputs`` with scikit-image's resize, ``unmold_detections`` with
one scikit-image resize per mask). Its TF1 / Keras 2.2 code does not install on a current Python, so
this script runs the same graph rebuilt for TensorFlow 2:

- the layers with weights are ``tests/matterport_keras.py``'s real Keras layers, here on Keras's
  TensorFlow backend (NHWC, TensorFlow's oneDNN kernels), each part as one ``tf.function``;
- the graph layers between them follow matterport's ``mrcnn/model.py`` with the same TF ops
  (``tf.math.top_k``, ``tf.image.non_max_suppression``, ``tf.image.crop_and_resize``); the facts
  are in ``shared/reference/checkpoint-families.md`` section D;
- the numpy steps are ``tests/matterport_reference.py``'s literal mirrors of ``mold_image``,
  ``resize_image`` and ``unmold_detections``.

The engine loads the same weights from a matterport-layout ``.h5`` file and runs its matterport
preset; its stages are timed as ``examples/benchmark.py --sections profile`` times them. Both run
the same photographs: matterport one image per call (``MaskRCNN.detect`` with a batch of one), the
engine as one ``run()`` of the list. The report also gives how many of the TF pipeline's detections
the engine matches (same class, box IoU >= 0.9): a check that both compute the same thing.

TensorFlow is not a dependency of the project. In a virtual environment beside the project's:

    python -m venv --system-site-packages /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tfenv/bin/python examples/matterport_tf_stages.py --images 3 --repeats 3
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # before keras is imported: matterport ran on TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]

from engine.predictor import STAGES  # noqa: E402  (torch and triton before TensorFlow: the other order crashes)

ENGINE_VARIANTS = ("default", "nchw", "bf16", "compile")


def _tf():
    import tensorflow as tf

    return tf


# --- matterport's graph layers, in TensorFlow -----------------------------------------------------


def apply_box_deltas(tf, boxes, deltas):
    """``apply_box_deltas_graph``: (y1, x1, y2, x2) boxes moved by (dy, dx, log dh, log dw)."""
    height = boxes[:, 2] - boxes[:, 0]
    width = boxes[:, 3] - boxes[:, 1]
    center_y = boxes[:, 0] + 0.5 * height + deltas[:, 0] * height
    center_x = boxes[:, 1] + 0.5 * width + deltas[:, 1] * width
    height = height * tf.exp(deltas[:, 2])
    width = width * tf.exp(deltas[:, 3])
    y1 = center_y - 0.5 * height
    x1 = center_x - 0.5 * width
    return tf.stack([y1, x1, y1 + height, x1 + width], axis=1)


def clip_boxes(tf, boxes, window):
    """``clip_boxes_graph``: each coordinate clamped into the window (wy1, wx1, wy2, wx2)."""
    wy1, wx1, wy2, wx2 = tf.split(window, 4)
    y1, x1, y2, x2 = tf.split(boxes, 4, axis=1)
    y1 = tf.maximum(tf.minimum(y1, wy2), wy1)
    x1 = tf.maximum(tf.minimum(x1, wx2), wx1)
    y2 = tf.maximum(tf.minimum(y2, wy2), wy1)
    x2 = tf.maximum(tf.minimum(x2, wx2), wx1)
    return tf.concat([y1, x1, y2, x2], axis=1)


def proposal_layer(tf, probs, deltas, anchors, *, pre_nms_limit, post_nms_rois, nms_threshold, rpn_bbox_std):
    """``ProposalLayer`` for one image: probs [A] (foreground), deltas [A, 4], anchors [A, 4]
    normalized -> [post_nms_rois, 4] proposals, zero padded."""
    k = tf.minimum(pre_nms_limit, tf.shape(anchors)[0])
    scores, ix = tf.math.top_k(probs, k, sorted=True)
    boxes = apply_box_deltas(tf, tf.gather(anchors, ix), tf.gather(deltas, ix) * rpn_bbox_std)
    boxes = clip_boxes(tf, boxes, tf.constant([0.0, 0.0, 1.0, 1.0]))
    keep = tf.image.non_max_suppression(boxes, scores, post_nms_rois, nms_threshold)
    proposals = tf.gather(boxes, keep)
    return tf.pad(proposals, [(0, post_nms_rois - tf.shape(proposals)[0]), (0, 0)])


def pyramid_roi_align(tf, boxes, feature_maps, *, pool_size, image_size):
    """``PyramidROIAlign`` for one image: boxes [R, 4] normalized, maps P2..P5 [1, h, w, C] ->
    [R, pool, pool, C]: level ``4 + round(log2(sqrt(h w) / (224 / image_size)))`` in [2, 5], one
    ``crop_and_resize`` per level, rows put back in box order."""
    y1, x1, y2, x2 = tf.split(boxes, 4, axis=1)
    area = (y2 - y1) * (x2 - x1)
    level = tf.math.log(tf.sqrt(area) / (224.0 / image_size)) / tf.math.log(2.0)
    level = tf.minimum(5, tf.maximum(2, 4 + tf.cast(tf.round(level), tf.int32)))[:, 0]
    pooled, order = [], []
    for i, feature in enumerate(feature_maps, start=2):
        ix = tf.where(tf.equal(level, i))[:, 0]
        level_boxes = tf.stop_gradient(tf.gather(boxes, ix))
        indices = tf.zeros_like(ix, dtype=tf.int32)
        pooled.append(tf.image.crop_and_resize(feature, level_boxes, indices, [pool_size, pool_size], method="bilinear"))
        order.append(ix)
    order = tf.concat(order, axis=0)
    return tf.gather(tf.concat(pooled, axis=0), tf.argsort(order))


def refine_detections(tf, rois, probs, deltas, window, *, bbox_std, min_confidence, nms_threshold, max_instances):
    """``refine_detections_graph`` for one image: [max_instances, 6] (y1, x1, y2, x2, class, score),
    zero padded: argmax class, its deltas, clipped to the window, background and low scores out,
    NMS per class, the best ``max_instances`` by score."""
    class_ids = tf.argmax(probs, axis=1, output_type=tf.int32)
    rows = tf.range(tf.shape(probs)[0])
    scores = tf.gather_nd(probs, tf.stack([rows, class_ids], axis=1))
    specific = tf.gather_nd(deltas, tf.stack([rows, class_ids], axis=1))
    refined = clip_boxes(tf, apply_box_deltas(tf, rois, specific * bbox_std), window)
    keep = tf.where((class_ids > 0) & (scores >= min_confidence))[:, 0]
    kept_classes = tf.gather(class_ids, keep)
    kept_scores = tf.gather(scores, keep)
    kept_boxes = tf.gather(refined, keep)

    def per_class(class_id):
        members = tf.where(tf.equal(kept_classes, class_id))[:, 0]
        chosen = tf.image.non_max_suppression(
            tf.gather(kept_boxes, members), tf.gather(kept_scores, members), max_instances, nms_threshold
        )
        chosen = tf.gather(members, chosen)
        return tf.pad(chosen, [(0, max_instances - tf.shape(chosen)[0])], constant_values=-1)

    unique = tf.unique(kept_classes)[0]
    spec = tf.TensorSpec([max_instances], tf.int64)  # a known shape: an image may have no class
    chosen = tf.reshape(tf.map_fn(per_class, unique, fn_output_signature=spec), [-1])
    chosen = tf.gather(chosen, tf.where(chosen > -1)[:, 0])
    count = tf.minimum(tf.shape(chosen)[0], max_instances)
    best = tf.math.top_k(tf.gather(kept_scores, chosen), k=count, sorted=True)[1]
    chosen = tf.gather(chosen, best)
    detections = tf.concat(
        [
            tf.gather(kept_boxes, chosen),
            tf.cast(tf.gather(kept_classes, chosen), tf.float32)[:, None],
            tf.gather(kept_scores, chosen)[:, None],
        ],
        axis=1,
    )
    return tf.pad(detections, [(0, max_instances - tf.shape(detections)[0]), (0, 0)])


class MatterportOnTensorFlow:
    """matterport's ``MaskRCNN.detect`` for one image, on TensorFlow, with a stage clock.

    ``models``: ``matterport_keras.matterport_models`` built on Keras's TensorFlow backend, with
    weights. Each graph part is one ``tf.function`` (traced on the first call), so the numbers are
    TensorFlow graph execution, as matterport's ``keras_model.predict`` runs it.
    """

    def __init__(self, models: dict, *, num_classes: int, min_dim: int = 800, max_dim: int = 1024):
        import matterport_reference as ref

        tf = _tf()
        self.ref, self.tf = ref, tf
        self.min_dim, self.max_dim = min_dim, max_dim
        self.mean_pixel = (123.7, 116.8, 103.9)
        self.num_classes = num_classes
        shapes = ref.backbone_shapes(max_dim, (4, 8, 16, 32, 64))
        anchors = ref.generate_pyramid_anchors((32, 64, 128, 256, 512), (0.5, 1, 2), shapes, (4, 8, 16, 32, 64))
        self.anchors = tf.constant(ref.norm_boxes(anchors, (max_dim, max_dim)))
        backbone, rpn, classifier, mask = (models[k] for k in ("backbone", "rpn", "classifier", "mask"))
        std = tf.constant([0.1, 0.1, 0.2, 0.2])

        @tf.function(reduce_retracing=True)
        def features(image):
            return backbone(image, training=False)

        @tf.function(reduce_retracing=True)
        def proposals(feature_maps):
            outputs = [rpn(f, training=False) for f in feature_maps]
            probs = tf.concat([o[1][0, :, 1] for o in outputs], axis=0)
            deltas = tf.concat([o[2][0] for o in outputs], axis=0)
            return proposal_layer(
                tf, probs, deltas, self.anchors, pre_nms_limit=6000, post_nms_rois=1000, nms_threshold=0.7, rpn_bbox_std=std
            )

        @tf.function(reduce_retracing=True)
        def detect(feature_maps, rois, window):
            pooled = pyramid_roi_align(tf, rois, feature_maps[:4], pool_size=7, image_size=float(max_dim))
            probs, deltas = classifier(pooled, training=False)
            return refine_detections(
                tf, rois, probs, deltas, window, bbox_std=std, min_confidence=0.7, nms_threshold=0.3, max_instances=100
            )

        @tf.function(reduce_retracing=True)
        def masks(feature_maps, detections):
            pooled = pyramid_roi_align(tf, detections[:, :4], feature_maps[:4], pool_size=14, image_size=float(max_dim))
            return mask(pooled, training=False)

        self._features, self._proposals, self._detect, self._masks = features, proposals, detect, masks

    def detect(self, image: np.ndarray, clock: dict | None = None) -> dict:
        """One image, uint8 RGB [H, W, 3] -> rois int32 [N, 4] (y1, x1, y2, x2), class_ids, scores,
        masks bool [H, W, N]; ``clock`` gets seconds per stage added."""
        ref, tf = self.ref, self.tf
        marks = [time.perf_counter()]
        resized, window, _ = ref.resize_image_square(image, self.min_dim, self.max_dim)
        molded = ref.mold_image(resized, self.mean_pixel)
        window_norm = tf.constant(ref.norm_boxes(np.asarray(window), molded.shape[:2]))
        marks.append(time.perf_counter())
        feature_maps = [f for f in self._features(tf.constant(molded[None]))]
        _ = feature_maps[0].numpy()  # wait for the values
        marks.append(time.perf_counter())
        rois = self._proposals(feature_maps)
        _ = rois.numpy()
        marks.append(time.perf_counter())
        detections = self._detect(feature_maps, rois, window_norm)
        detections_np = detections.numpy()
        marks.append(time.perf_counter())
        mrcnn_mask = self._masks(feature_maps, detections).numpy()
        marks.append(time.perf_counter())
        count = int((detections_np[:, 4] > 0).sum())  # DetectionLayer's zero rows have class 0
        boxes, class_ids, scores, full = ref.unmold_detections(
            detections_np[:count], mrcnn_mask[:count], image.shape, molded.shape, window
        )
        marks.append(time.perf_counter())
        if clock is not None:
            for name, a, b in zip(STAGES, marks, marks[1:]):
                clock[name] = clock.get(name, 0.0) + (b - a)
        return {"rois": boxes, "class_ids": class_ids, "scores": scores, "masks": full}


# --- the engine's stages ---------------------------------------------------------------------------


def engine_stages(predictor, images, clock: dict | None = None):
    """``Predictor.run(images)`` split at the stages of ``examples/benchmark.py``'s profile."""
    results, seconds = predictor.profile_stages(images)
    if clock is not None:
        for name, value in seconds.items():
            clock[name] = clock.get(name, 0.0) + value
    return results


def matched_fraction(theirs: dict, ours) -> float | None:
    """Share of the TF pipeline's detections that the engine has too (same class, box IoU >= 0.9)."""
    if not len(theirs["rois"]):
        return None
    our_boxes = ours.boxes.numpy()[:, [1, 0, 3, 2]]  # y1 x1 y2 x2, as matterport
    import torch

    from agreement import box_iou

    iou = box_iou(torch.from_numpy(theirs["rois"]).double(), torch.from_numpy(our_boxes).double()).numpy()
    same = theirs["class_ids"][:, None] == ours.labels.numpy()[None, :]
    return float(((iou >= 0.9) & same).any(axis=1).mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3, help="photographs (one matterport call each)")
    parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-dim", type=int, default=1024, help="matterport's IMAGE_MAX_DIM (the square canvas)")
    parser.add_argument("--min-dim", type=int, default=800)
    parser.add_argument("--engine-configs", nargs="+", default=["default", "nchw"], choices=ENGINE_VARIANTS,
                        help="engine variants: the preset (channels-last, folded norms), nchw (its fp32 run as the "
                        "PyTorch presets run: NCHW, norms unfolded), bf16 (where the CPU has bf16 kernels), compile (the preset "
                        "with cpu_compile=True; its first run, compile included, is reported apart)")
    parser.add_argument("--class-logit-scale", type=float, default=0.1,
                        help="factor on the random classifier logits' kernel (how many detections pass 0.7)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    # the engine (torch, and triton's LLVM) loads before TensorFlow: the other order crashes in
    # triton's import (two LLVMs in one process)
    import torch

    from benchmark import photographs
    from engine import Predictor
    from engine.config import MATTERPORT_MASK_RCNN_FPN

    tf = _tf()
    import keras
    from matterport_keras import matterport_models, randomise, write_keras2_h5

    num_classes = 81
    models = matterport_models(num_classes, depth=args.depth)
    weights = randomise(models, seed=0)
    # random weights saturate every softmax; spread the scores (as the parity tests do), the class
    # scores less, so that some tens of detections per image pass matterport's 0.7 threshold
    for name, factor in (("mrcnn_class_logits", args.class_logit_scale), ("rpn_class_raw", 0.02)):
        layer = next(l for m in models.values() for l in m.layers if l.name == name)
        kernel, bias = layer.get_weights()
        kernel = kernel * np.float32(factor)
        layer.set_weights([kernel, bias])
        weights[f"{name}/kernel"] = kernel
    images = photographs(args.images)
    tf_pipeline = MatterportOnTensorFlow(models, num_classes=num_classes, min_dim=args.min_dim, max_dim=args.max_dim)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mask_rcnn_random.h5"
        write_keras2_h5(path, weights)
        base = MATTERPORT_MASK_RCNN_FPN.replace(min_size=args.min_dim, max_size=args.max_dim)
        variants = {
            "default": (base, "fp32"),
            "nchw": (base.replace(cpu_memory_format="contiguous", fold_batch_norms=False), "fp32"),
            "bf16": (base, "bf16"),
            "compile": (base, "fp32"),
        }
        engines = {
            name: Predictor(path, config=variants[name][0], precision=variants[name][1], cpu_compile=name == "compile")
            for name in args.engine_configs
        }

        systems = {"matterport on TensorFlow, one image per call": lambda clock: [tf_pipeline.detect(im, clock) for im in images]}
        for name, predictor in engines.items():
            systems[f"engine, matterport preset ({name})"] = lambda clock, p=predictor: engine_stages(p, images, clock)
        first_runs = {}  # the first call of each system (the compiled variant's compile included)
        for _ in range(args.warmup):
            for name, run in systems.items():
                start = time.perf_counter()
                run(None)
                first_runs.setdefault(name, time.perf_counter() - start)
        clocks = {name: [] for name in systems}
        for _ in range(args.repeats):  # alternating rounds
            for name, run in systems.items():
                clock: dict = {}
                run(clock)
                clocks[name].append(clock)
        theirs = [tf_pipeline.detect(im) for im in images]
        agreement = {}
        for name, predictor in engines.items():
            ours = engine_stages(predictor, images)
            fractions = [f for f in (matched_fraction(t, o) for t, o in zip(theirs, ours)) if f is not None]
            agreement[name] = {
                "matched": statistics.mean(fractions) if fractions else None,
                "tf_detections": [len(t["rois"]) for t in theirs],
                "engine_detections": [len(o.boxes) for o in ours],
            }

    rows = []
    for name, runs in clocks.items():
        medians = {stage: statistics.median(run[stage] for run in runs) for stage in STAGES}
        rows.append({
            "system": name, "stages_s": medians, "total_s": statistics.median(sum(run.values()) for run in runs),
            "first_run_s": first_runs.get(name),
        })
    report = {
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "images": [list(im.shape) for im in images],
            "depth": args.depth,
            "canvas": args.max_dim,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "rows": rows,
        "agreement": agreement,
    }
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(text)
    return report


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = rows[0]
    lines = [
        f"matterport R-{report['environment']['depth']} on TensorFlow {report['environment']['tensorflow']} against the engine, "
        f"{len(report['environment']['images'])} photographs, {report['environment']['canvas']} square canvas; "
        f"medians of {report['environment']['repeats']} alternating rounds, seconds for all the photographs:",
        "",
        "| system | " + " | ".join(STAGES) + " | total | speed vs matterport |",
        "|---|" + "---|" * (len(STAGES) + 2),
    ]
    for r in rows:
        cells = [f"{r['stages_s'][s]:.2f}" for s in STAGES]
        lines.append(f"| {r['system']} | " + " | ".join(cells) + f" | {r['total_s']:.2f} | {base['total_s'] / r['total_s']:.2f}x |")
    lines.append("")
    first = [f"{r['system']} {r['first_run_s']:.1f} s" for r in rows if r.get("first_run_s") is not None]
    if first:
        lines.append("- first runs (warm-up, apart from the medians; compile included where compiled): " + "; ".join(first) + ".")
    for name, a in report["agreement"].items():
        matched = "-" if a["matched"] is None else f"{a['matched']:.3f}"
        lines.append(
            f"- engine ({name}): matches {matched} of the TF pipeline's detections (same class, box IoU >= 0.9); "
            f"detections per image TF {a['tf_detections']}, engine {a['engine_detections']}."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
