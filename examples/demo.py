"""Run a Mask R-CNN checkpoint on image files and write overlays and COCO-format results.

    python examples/demo.py --output out/                      # the bundled shapes model on generated images
    python examples/demo.py --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth photos/ "more/*.jpg" --output out/

Without ``--weights`` the demo runs the small model that ships with the project (ResNet-18-FPN
trained on synthetic circles, squares and triangles, see ``engine/bundled.py``): with no
inputs it first generates ``--shapes N`` images into ``OUTPUT/inputs/``, so that one command on
a fresh machine shows real masks.

Inputs are image files, folders (their images, sorted) and glob patterns. Each input
``NAME.ext`` gets ``OUTPUT/NAME_overlay.png`` (translucent masks, boxes, class names,
scores), and ``OUTPUT/results.json`` holds every detection in the COCO results format
with RLE masks (``image_id`` is the input's position; ``OUTPUT/images.json`` maps ids to
files). Every file is written atomically (temporary file, then rename), and no input is
ever overwritten. A file that cannot be read or decoded is skipped with one line naming it and
the reason, as ``maskrcnn-engine predict`` does.

The demo keeps detections scoring above 0.5 (``--score-threshold``), for readable overlays;
``maskrcnn-engine predict`` keeps the checkpoint family's own threshold (above 0.05; matterport
0.7), as COCO evaluation wants. The device defaults to CUDA when present, as everywhere in the engine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Predictor  # noqa: E402
from engine.image_files import IMAGE_SUFFIXES, ImageDecodeError, decode_image_file  # noqa: E402
from engine.results import Detections  # noqa: E402

#: the demo's default --score-threshold (``maskrcnn-engine predict`` keeps the family's, 0.05; matterport 0.7)
DEMO_SCORE_THRESHOLD = 0.5


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, saturated BGR colour per instance."""
    hue = (i * 47) % 180
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def draw(image_bgr: np.ndarray, det: Detections, names: list[str], *, alpha: float = 0.45) -> np.ndarray:
    """Overlay translucent masks, boxes and 'label score' captions on a copy of the image."""
    out = image_bgr.copy()
    masks = det.full_masks().cpu().numpy()
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


def write_atomically(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_image(path: Path, image_bgr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), image_bgr):
            raise OSError(f"could not write {tmp}")

    write_atomically(path, write)


def write_json(path: Path, payload) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload)))


def collect_inputs(patterns: list[str]) -> list[Path]:
    """Image files from files, folders (sorted, not recursive) and glob patterns, in the order given, without repeats."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found = [p]
        elif glob.has_magic(pattern):
            found = sorted(Path(f) for f in glob.glob(pattern) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise SystemExit(f"error: input not found: {pattern}")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


class Progress:
    """A one-line progress bar on a terminal, a line per batch otherwise (as in logs)."""

    def __init__(self, total: int, *, stream=sys.stderr) -> None:
        self.total, self.stream, self.start = total, stream, time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, done: int) -> None:
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        width = 30
        filled = int(width * done / max(self.total, 1))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} images, {rate:.2f} images/s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help="image files, folders or glob patterns (none: generated shape images)")
    ap.add_argument("--weights", help="Mask R-CNN checkpoint: torchvision .pth, Detectron2 .pkl/.pth or mmdetection .pth "
                    "(default: the bundled shapes model)")
    ap.add_argument("--shapes", type=int, default=6,
                    help="without inputs or --weights: how many shape images to generate (default: 6)")
    ap.add_argument("--family", choices=["torchvision", "detectron2", "mmdetection", "matterport"],
                    help="checkpoint family (default: detected from the checkpoint's keys)")
    ap.add_argument("--output", default="out", help="folder for overlays and results.json (default: out)")
    ap.add_argument("--device", default=None,
                    help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    ap.add_argument("--score-threshold", type=float, default=DEMO_SCORE_THRESHOLD,
                    help=f"keep detections scoring above this (default: {DEMO_SCORE_THRESHOLD}, for readable overlays; "
                    "maskrcnn-engine predict keeps the checkpoint family's own, 0.05, matterport 0.7)")
    ap.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability threshold (default: 0.5)")
    ap.add_argument("--class-names", help="names of a fine-tuned checkpoint's classes: a file with one per line, "
                    "or a comma-separated list, in label order without background (default: the names the "
                    "checkpoint carries, else COCO's for COCO layouts, else 'class i')")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be at least 1; got {args.batch_size}")
    if args.weights and not args.inputs:
        ap.error("with --weights, give the images to run it on (files, folders or glob patterns)")
    if args.shapes < 1:
        ap.error(f"--shapes must be at least 1; got {args.shapes}")
    return args


#: seed of the demo's generated images (training used weights.shapes.TRAIN_SEED)
DEMO_SEED = 2026


def generate_inputs(folder: Path, count: int) -> list[str]:
    """Write ``count`` shape images (RGB PNG) to ``folder``; returns their paths."""
    from weights.shapes import generate

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"shapes_{index:02d}.png"
        write_image(path, cv2.cvtColor(generate(DEMO_SEED, index).image, cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


def read_image(path: Path) -> tuple[np.ndarray | None, str | None]:
    """``(rgb, None)``: uint8 [H, W, 3] RGB of an image file (:func:`engine.image_files.decode_image_file`),
    or ``(None, reason)`` for a file that cannot be read or decoded."""
    try:
        return decode_image_file(path), None
    except ImageDecodeError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, exc.strerror or str(exc)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import pycocotools.mask  # noqa: F401  (results.json holds RLE masks)
    except ImportError:
        print("error: the demo encodes masks with pycocotools: pip install -e '.[coco]' (or pip install pycocotools)",
              file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    patterns = args.inputs
    if not patterns:
        patterns = generate_inputs(out_dir / "inputs", args.shapes)
        print(f"generated {len(patterns)} shape images in {out_dir / 'inputs'}")
    files = collect_inputs(patterns)
    if not files:
        print("error: no images found in the inputs", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {f.resolve() for f in files}
    options = dict(device=args.device, score_threshold=args.score_threshold, mask_threshold=args.mask_threshold)
    if args.class_names:
        options["class_names"] = args.class_names
    if args.weights:
        predictor = Predictor(args.weights, family=args.family, **options)
    else:
        from engine.bundled import shapes_predictor

        predictor = shapes_predictor(**options)
        print("no --weights: running the bundled shapes model (weights/data/shapes_r18_fpn.pth)")
    names = list(predictor.class_names)  # indexed by label
    default = " (the demo's default; maskrcnn-engine predict uses the family's, 0.05)" if args.score_threshold == DEMO_SCORE_THRESHOLD else ""
    print(f"keeping detections scoring above {predictor.config.score_threshold:g}{default}; device {predictor.device}")

    def target_for(f: Path, suffix: str) -> Path:
        target = out_dir / f"{f.stem}{suffix}"
        if target.resolve() in inputs:
            raise SystemExit(f"error: refusing to overwrite input {target}")
        return target

    coco_results, image_ids, skipped = [], {}, 0
    progress = Progress(len(files))
    start, done = time.perf_counter(), 0
    for i in range(0, len(files), args.batch_size):
        chunk = []  # (image_id, file, rgb): image_id is the file's position among the inputs
        for image_id, f in enumerate(files[i : i + args.batch_size], start=i):
            rgb, reason = read_image(f)
            if rgb is None:
                print(f"skipped {f}: {reason}", file=sys.stderr)
                skipped += 1
            else:
                chunk.append((image_id, f, rgb))
        results = predictor.run([rgb for _, _, rgb in chunk]) if chunk else []
        for (image_id, f, rgb), det in zip(chunk, results):
            det = det.to("cpu")
            image_ids[image_id] = str(f)
            coco_results.extend(det.to_coco(image_id, category_ids=predictor.coco_category_ids))
            write_image(target_for(f, "_overlay.png"), draw(rgb[:, :, ::-1], det, names))
        done += len(chunk)
        progress.update(min(i + args.batch_size, len(files)))  # files looked at, skipped ones included
    elapsed = time.perf_counter() - start
    write_json(target_for(Path("results"), ".json"), coco_results)
    write_json(target_for(Path("images"), ".json"), {str(k): v for k, v in image_ids.items()})
    if skipped:
        print(f"skipped {skipped} of {len(files)} files that could not be read or decoded")
    if not done:
        print("error: none of the input files could be read as an image", file=sys.stderr)
        return 1
    print(f"{len(coco_results)} detections in {done} images; overlays and results.json in {out_dir}")
    print(f"{done} images in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.2f} images/s) on {predictor.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
