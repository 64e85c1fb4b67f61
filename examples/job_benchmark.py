"""The predict job's memory on hostile input and its resume start-up (issue 28).

    python examples/job_benchmark.py [--root CHECKOUT] [--work DIR] [--images 200] [--rows 100000]

Two measurements, each in a fresh process running the engine of ``--root`` (default: this
checkout), so that the same script measures an older checkout for a before/after table:

- ``job``: ``maskrcnn-engine predict`` (bundled shapes model, CPU, batch 4, box masks by
  default, so that the masks of the huge image, 144 MB each when full, do not hide the decoding) over
  ``--images`` photographs of mixed sizes from scikit-image (up to 1024 px on the long side),
  one of them a 12000 x 12000 JPEG; the peak resident set (VmHWM) and seconds.
- ``large``: the same job over ``--large-images`` 4000 x 3000 JPEGs (36 MB each decoded), where
  the decoded images held at once, not one image's own processing, set the peak; with
  ``--decode-budget MIB`` passed to the job when given (checkouts that have the option).
- ``resume``: the resume index of an output folder holding ``--rows`` synthetic prediction rows
  (each 20 detections with 400-byte RLE strings, as a real run writes them): seconds and peak
  resident set of reading which image ids are done (``read_index`` here, ``read_done_ids`` in
  checkouts before it).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PEAK = """
import runpy, sys, time
start = time.perf_counter()
sys.argv = sys.argv[1:]
code = 0
try:
    {body}
except SystemExit as exc:
    code = exc.code or 0
seconds = time.perf_counter() - start
with open("/proc/self/status") as status:
    peak = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
print("MEASURED", seconds, peak * 1024, code)
"""

_JOB = "from engine.cli import main; code = main(sys.argv)"
_RESUME = """import engine.job_outputs as jo
    ids = jo.read_index(sys.argv[0]).predicted if hasattr(jo, "read_index") else jo.read_done_ids(sys.argv[0])
    print("IDS", len(ids))"""


def _measure(root: Path, body: str, args: list[str]) -> dict:
    code = _PEAK.replace("{body}", body)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("MEASURED")), None)
    if line is None:
        raise RuntimeError(f"the measured process failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    _, seconds, peak, status = line.split()
    return {"seconds": round(float(seconds), 2), "peak_rss_mib": round(int(peak) / 2**20, 1), "exit": int(status), "stdout_tail": done.stdout.splitlines()[-2:]}


def make_images(folder: Path, count: int) -> None:
    """``count - 1`` photographs of mixed sizes and one 12000 x 12000 JPEG."""
    import cv2
    import numpy as np
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count - 1):
        photo = photos[i % len(photos)]
        long_side = int(rng.integers(320, 1025))
        scale = long_side / max(photo.shape[:2])
        size = (max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale)))
        cv2.imwrite(str(folder / f"photo{i:04d}.jpg"), cv2.resize(photo, size)[:, :, ::-1])
    big = cv2.resize(data.astronaut(), (12000, 12000), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(folder / "huge_12000x12000.jpg"), big[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])


def make_large_images(folder: Path, count: int) -> None:
    """``count`` 4000 x 3000 JPEGs, each a different crop of an upscaled photograph."""
    import cv2
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    big = cv2.resize(data.astronaut(), (4400, 3300), interpolation=cv2.INTER_LINEAR)
    for i in range(count):
        y, x = (i * 37) % 300, (i * 53) % 400
        cv2.imwrite(str(folder / f"large{i:03d}.jpg"), big[y : y + 3000, x : x + 4000, ::-1])


def make_rows(folder: Path, rows: int) -> None:
    """``rows`` lines of predictions.jsonl as a real run writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    detection = {
        "category_id": 1, "bbox": [10.5, 20.25, 100.0, 80.0], "score": 0.9, "category_name": "circle",
        "segmentation": {"size": [480, 640], "counts": "x" * 400},
    }
    with open(folder / "predictions.jsonl", "w") as f:
        for i in range(rows):
            row = {"image_id": f"images/{i:07d}.jpg", "file": f"/data/images/{i:07d}.jpg", "height": 480, "width": 640, "detections": [detection] * 20}
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", default=str(ROOT), help="the engine checkout to measure")
    parser.add_argument("--work", default=None, help="folder for the generated images and rows (default: a temporary one)")
    parser.add_argument("--images", type=int, default=200, help="images in the job, one of them 12000 x 12000")
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the resumed predictions.jsonl")
    parser.add_argument("--sections", default="job,resume", help="comma-separated: job, large, resume")
    parser.add_argument("--large-images", type=int, default=64, help="images of the large section")
    parser.add_argument("--decode-budget", type=int, default=None, help="the large section's --decode-budget (MiB), if given")
    parser.add_argument("--mask-format", default="box", choices=("box", "full"), help="the job's --mask-format")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="job_benchmark_"))
    sections = set(args.sections.split(","))
    report: dict = {"root": str(root)}
    if "job" in sections:
        images = work / "images"
        if not images.is_dir():
            make_images(images, args.images)
        out = Path(tempfile.mkdtemp(prefix="job_out_", dir=work))
        job_args = ["predict", str(images), "-o", str(out), "--device", "cpu", "--batch-size", "4", "--no-progress", "--mask-format", args.mask_format]
        report["job"] = _measure(root, _JOB, job_args)
    if "large" in sections:
        large = work / "large"
        if not large.is_dir():
            make_large_images(large, args.large_images)
        out = Path(tempfile.mkdtemp(prefix="large_out_", dir=work))
        job_args = ["predict", str(large), "-o", str(out), "--device", "cpu", "--batch-size", "4", "--no-progress", "--mask-format", "box"]
        if args.decode_budget is not None:
            job_args += ["--decode-budget", str(args.decode_budget)]
        report["large"] = _measure(root, _JOB, job_args)
    if "resume" in sections:
        rows = work / "rows"
        if not (rows / "predictions.jsonl").exists():
            make_rows(rows, args.rows)
        report["resume"] = _measure(root, _RESUME, [str(rows)])
        report["resume"]["file_mib"] = round((rows / "predictions.jsonl").stat().st_size / 2**20, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
