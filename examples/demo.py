"""Run a Mask R-CNN checkpoint on image files and write overlays (masks, boxes, labels, scores).

    python examples/demo.py --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth photo1.jpg photo2.png --output out/

Each input ``NAME.ext`` gets ``OUTPUT/NAME_overlay.png``. Inputs are never overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Predictor  # noqa: E402
from engine.results import Detections  # noqa: E402

# torchvision's 91 COCO slots: index = COCO category id, "N/A" where COCO has no class
COCO_91 = (
    "__background__ person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant N/A "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe N/A backpack umbrella "
    "N/A N/A handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle N/A wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli "
    "carrot hot_dog pizza donut cake chair couch potted_plant bed N/A dining_table N/A N/A toilet N/A tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator N/A book clock vase scissors "
    "teddy_bear hair_drier toothbrush"
)
COCO_91 = tuple(n if n.startswith("__") else n.replace("_", " ") for n in COCO_91.split())

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def class_names(num_classes: int) -> list[str]:
    """COCO names for torchvision's 91-slot layout; plain indices otherwise."""
    if num_classes == len(COCO_91):
        return list(COCO_91)
    return [f"class {i}" for i in range(num_classes)]


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, saturated BGR colour per instance."""
    hue = (i * 47) % 180
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def draw(image_bgr: np.ndarray, det: Detections, names: list[str], *, alpha: float = 0.45) -> np.ndarray:
    """Overlay translucent masks, boxes and 'label score' captions on a copy of the image."""
    out = image_bgr.copy()
    masks = det.masks.cpu().numpy()
    boxes = det.boxes.cpu().numpy()
    labels = det.labels.cpu().numpy()
    scores = det.scores.cpu().numpy()
    for i in range(len(det) - 1, -1, -1):  # best detection drawn last, on top
        c = np.array(colour(i), dtype=np.float32)
        m = masks[i]
        out[m] = (out[m] * (1 - alpha) + c * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour(i), 1, cv2.LINE_AA)
    for i in range(len(det) - 1, -1, -1):
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), colour(i), 2, cv2.LINE_AA)
        label = int(labels[i])
        name = names[label] if 0 <= label < len(names) else str(label)
        caption = f"{name} {scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(y1, th + base + 2)
        cv2.rectangle(out, (x1, ty - th - base - 2), (x1 + tw + 4, ty), colour(i), -1)
        cv2.putText(out, caption, (x1 + 2, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def write_atomically(path: Path, image_bgr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if not cv2.imwrite(str(tmp), image_bgr):
        raise OSError(f"could not write {tmp}")
    os.replace(tmp, path)


def collect_inputs(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"error: input not found: {p}")
    return files


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="image files or folders")
    ap.add_argument("--weights", help="torchvision Mask R-CNN checkpoint (.pth state dict)")
    ap.add_argument("--output", default="out", help="folder for the overlays (default: out)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--score-threshold", type=float, default=0.5, help="draw detections above this score")
    ap.add_argument("--mask-threshold", type=float, default=0.5)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.weights:
        print(
            "error: --weights PATH is required: a torchvision Mask R-CNN checkpoint, e.g. the file\n"
            "  maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth that torchvision's maskrcnn_resnet50_fpn(weights='DEFAULT')\n"
            "  downloads into ~/.cache/torch/hub/checkpoints/, or a state_dict you saved from a fine-tuned model.",
            file=sys.stderr,
        )
        return 2
    files = collect_inputs(args.inputs)
    if not files:
        print("error: no images found in the inputs", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {f.resolve() for f in files}
    predictor = Predictor(
        args.weights, device=args.device, score_threshold=args.score_threshold, mask_threshold=args.mask_threshold
    )
    names = class_names(predictor.num_classes)
    start, done = time.perf_counter(), 0
    for i in range(0, len(files), args.batch_size):
        chunk = files[i : i + args.batch_size]
        bgr = []
        for f in chunk:
            im = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if im is None:
                raise SystemExit(f"error: could not read image {f}")
            bgr.append(im)
        results = predictor.run([np.ascontiguousarray(im[..., ::-1]) for im in bgr])
        for f, im, det in zip(chunk, bgr, results):
            target = out_dir / f"{f.stem}_overlay.png"
            if target.resolve() in inputs:
                raise SystemExit(f"error: refusing to overwrite input {target}")
            write_atomically(target, draw(im, det.to("cpu"), names))
            print(f"{f} -> {target}: {len(det)} detections")
        done += len(chunk)
    elapsed = time.perf_counter() - start
    print(f"{done} images in {elapsed:.1f} s ({done / elapsed:.2f} images/s) on {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
