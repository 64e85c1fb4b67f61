"""Evaluate a checkpoint on a COCO-format dataset: bbox and segm AP with pycocotools.

    python examples/evaluate_coco.py --weights model.pth --annotations instances_val2017.json --images val2017/

The predictor runs over the dataset's images in batches. The checkpoint's class indices are
mapped to the dataset's category ids (see :func:`category_mapping`; ``--category-map`` gives
the mapping explicitly), the detections are written in the COCO results format, and
pycocotools' COCOeval reports AP for boxes and masks. Needs ``pip install pycocotools``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Predictor  # noqa: E402

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("COCO evaluation needs pycocotools: pip install pycocotools") from exc
    return COCO, COCOeval


def category_mapping(num_classes: int, background: str, dataset_category_ids: Sequence[int]) -> dict[int, int]:
    """Checkpoint label -> dataset category id.

    - torchvision's 91-slot COCO layout on a dataset whose ids lie in 1..90: labels are category ids.
    - Otherwise the checkpoint's foreground classes, in label order, are the dataset's categories
      sorted by id (Detectron2's convention for contiguous ids), which needs as many categories
      as foreground classes.

    Raises:
        ValueError: when the counts differ; pass an explicit mapping instead.
    """
    ids = sorted(int(i) for i in dataset_category_ids)
    if background == "first" and num_classes == 91 and all(1 <= i <= 90 for i in ids):
        return {i: i for i in range(1, 91)}
    foreground = num_classes - 1
    if len(ids) != foreground:
        raise ValueError(
            f"the checkpoint has {foreground} foreground classes but the dataset has {len(ids)} categories; "
            "give the label -> category id mapping explicitly (--category-map)"
        )
    first_label = 1 if background == "first" else 0
    return {first_label + k: cat for k, cat in enumerate(ids)}


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"could not read image {path}")
    return np.ascontiguousarray(image[..., ::-1])


def predict_dataset(
    predictor: Predictor,
    coco_gt,
    image_dir: Path,
    *,
    category_ids: Mapping[int, int],
    batch_size: int = 4,
    max_images: int | None = None,
) -> tuple[list[dict], int]:
    """Run the predictor over the dataset's images; returns (COCO results, number of images)."""
    image_ids = sorted(coco_gt.getImgIds())[:max_images]
    results: list[dict] = []
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start : start + batch_size]
        infos = coco_gt.loadImgs(ids)
        images = [read_rgb(image_dir / info["file_name"]) for info in infos]
        for image_id, det in zip(ids, predictor.run(images)):
            results.extend(det.to("cpu").to_coco(image_id, category_ids=category_ids))
    return results, len(image_ids)


def coco_evaluate(coco_gt, results: list[dict], image_ids: Sequence[int], *, verbose: bool = False) -> dict:
    """{"bbox": {stat: value}, "segm": {...}} from pycocotools' COCOeval on the given images."""
    _, COCOeval = _pycocotools()
    report = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            report[iou_type] = {name: 0.0 for name in STAT_NAMES}
            continue
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        # loadRes turns a result that has a bbox into a box polygon, so masks are scored without it
        scored = results if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        with quiet:
            coco_dt = coco_gt.loadRes(scored)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        report[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    return report


def evaluate(
    predictor: Predictor,
    annotations: str | Path,
    image_dir: str | Path,
    *,
    category_ids: Mapping[int, int] | None = None,
    batch_size: int = 4,
    max_images: int | None = None,
    verbose: bool = False,
) -> dict:
    """Predict over a COCO-format dataset and score it.

    Returns:
        {"bbox": {...}, "segm": {...}, "images": n, "seconds": t, "results": [COCO result dicts]}.
    """
    COCO, _ = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(annotations))
    if category_ids is None:
        category_ids = category_mapping(
            predictor.num_classes, predictor.config.background_index, coco_gt.getCatIds()
        )
    start = time.perf_counter()
    results, n = predict_dataset(
        predictor, coco_gt, Path(image_dir), category_ids=category_ids, batch_size=batch_size, max_images=max_images
    )
    seconds = time.perf_counter() - start
    report = coco_evaluate(coco_gt, results, sorted(coco_gt.getImgIds())[:max_images], verbose=verbose)
    return {**report, "images": n, "seconds": seconds, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="checkpoint (.pth)")
    ap.add_argument("--annotations", required=True, help="COCO-format annotation JSON")
    ap.add_argument("--images", required=True, help="folder holding the images named in the annotations")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-images", type=int, help="evaluate only the first N images (by id)")
    ap.add_argument("--category-map", help='JSON file or string {"label": category_id, ...}')
    ap.add_argument("--output", help="write the COCO results JSON here")
    args = ap.parse_args(argv)

    category_ids = None
    if args.category_map:
        text = Path(args.category_map).read_text() if Path(args.category_map).is_file() else args.category_map
        category_ids = {int(k): int(v) for k, v in json.loads(text).items()}
    predictor = Predictor(args.weights, device=args.device)
    report = evaluate(
        predictor,
        args.annotations,
        args.images,
        category_ids=category_ids,
        batch_size=args.batch_size,
        max_images=args.max_images,
        verbose=True,
    )
    if args.output:
        Path(args.output).write_text(json.dumps(report["results"]))
    for iou_type in ("bbox", "segm"):
        stats = report[iou_type]
        print(f"{iou_type}: AP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  AP75 {stats['AP75']:.4f}")
    print(f"{report['images']} images in {report['seconds']:.1f} s ({report['images'] / report['seconds']:.2f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
