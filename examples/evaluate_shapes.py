"""Score the bundled shapes model on held-out generated images: engine and torchvision, with pycocotools.

    python examples/evaluate_shapes.py --count 200 [--device cuda] [--json report.json]
    python examples/evaluate_shapes.py --count 200 --no-torchvision --precisions fp32 bf16   # the fast mode's AP

The images come from :mod:`weights.shapes` with ``HELD_OUT_SEED`` (training used ``TRAIN_SEED``).
The same fp16-stored weights, upcast to float32, run twice: through the engine (``Predictor``) and
through torchvision's own ``MaskRCNN`` (the reference oracle; needs torchvision). Both results go
through the same COCO conversion (masks thresholded at 0.5) and COCOeval, and the script prints
box and mask AP@[.5:.95] for each and their difference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.results import Detections  # noqa: E402
from examples.evaluate_coco import coco_evaluate  # noqa: E402
from engine.bundled import shapes_model, shapes_predictor  # noqa: E402
from weights.shapes import HELD_OUT_SEED, coco_dataset, samples  # noqa: E402


def ground_truth(seed: int, count: int):
    """(images uint8 RGB [H, W, 3] list, pycocotools COCO ground truth; image ids 1..count)."""
    from pycocotools.coco import COCO

    images = [s.image for s in samples(seed, count)]
    coco_gt = COCO()
    coco_gt.dataset = coco_dataset(seed, count)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    return images, coco_gt


def engine_results(predictor, images, *, batch_size: int = 4) -> list[dict]:
    """COCO results of the engine; image ids 1..len(images)."""
    results = []
    for start in range(0, len(images), batch_size):
        for offset, det in enumerate(predictor.run(images[start : start + batch_size])):
            results.extend(det.to("cpu").to_coco(start + offset + 1))
    return results


def torchvision_model(device: torch.device):
    """torchvision's MaskRCNN with the bundled weights (fp16 file upcast to float32), in eval mode."""
    from examples.train_shapes import build_torchvision_model

    model = build_torchvision_model()
    state = torch.load(shapes_model().checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    return model.eval().to(device)


@torch.inference_mode()
def torchvision_results(model, images, *, batch_size: int = 4, mask_threshold: float = 0.5) -> list[dict]:
    """COCO results of torchvision's model, through the engine's own COCO conversion."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs = [torch.from_numpy(im).to(device).permute(2, 0, 1).float() / 255 for im in chunk]
        for offset, (im, out) in enumerate(zip(chunk, model(inputs))):
            det = Detections(
                boxes=out["boxes"],
                scores=out["scores"],
                labels=out["labels"],
                masks=out["masks"][:, 0] > mask_threshold,
                image_size=tuple(im.shape[:2]),
            )
            results.extend(det.to("cpu").to_coco(start + offset + 1))
    return results


def evaluate(
    count: int, *, device: str = "cpu", seed: int = HELD_OUT_SEED, with_torchvision: bool = True,
    precisions: tuple[str, ...] = ("fp32",),
) -> dict:
    """{"engine": {"bbox": {...}, "segm": {...}, "seconds": t}, "torchvision": {...}, "images": count};
    a precision other than fp32 is reported under "engine bf16" / "engine fp16"."""
    images, coco_gt = ground_truth(seed, count)
    ids = list(range(1, count + 1))
    report: dict = {"images": count, "seed": seed, "device": device}
    for precision in precisions:
        start = time.perf_counter()
        ours = engine_results(shapes_predictor(device=device, precision=precision), images)
        key = "engine" if precision == "fp32" else f"engine {precision}"
        report[key] = {**coco_evaluate(coco_gt, ours, ids), "seconds": time.perf_counter() - start}
    if with_torchvision:
        start = time.perf_counter()
        theirs = torchvision_results(torchvision_model(torch.device(device)), images)
        report["torchvision"] = {**coco_evaluate(coco_gt, theirs, ids), "seconds": time.perf_counter() - start}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200, help="held-out images (default: 200)")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-torchvision", action="store_true", help="score the engine only")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                    help="engine precisions to score (default: fp32); each other one is compared with fp32 when both run")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    report = evaluate(args.count, device=args.device, seed=args.seed, with_torchvision=not args.no_torchvision,
                      precisions=tuple(args.precisions))
    for who in ("engine", *(f"engine {p}" for p in args.precisions if p != "fp32"), "torchvision"):
        if who in report:
            r = report[who]
            print(
                f"{who:12s} box AP {r['bbox']['AP']:.4f} (AP50 {r['bbox']['AP50']:.4f})  "
                f"mask AP {r['segm']['AP']:.4f} (AP50 {r['segm']['AP50']:.4f})  {r['seconds']:.1f} s"
            )
    if "torchvision" in report:
        for kind in ("bbox", "segm"):
            diff = report["engine"][kind]["AP"] - report["torchvision"][kind]["AP"]
            print(f"engine - torchvision {kind} AP: {diff:+.4f}")
    for precision in args.precisions:
        if precision != "fp32" and "engine" in report:
            for kind in ("bbox", "segm"):
                diff = report[f"engine {precision}"][kind]["AP"] - report["engine"][kind]["AP"]
                print(f"engine {precision} - engine fp32 {kind} AP: {diff:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
