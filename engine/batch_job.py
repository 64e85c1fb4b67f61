"""The main job: a checkpoint over many image files, resumable, results as JSON lines or Parquet.

``maskrcnn-engine predict`` (:mod:`engine.cli`) runs :func:`run_job`:

- **inputs** (:func:`collect_inputs`): files, folders (recursive), glob patterns and ``@list.txt``
  files of paths. Each image's ``image_id`` is its path relative to its input root (the folder,
  the glob's fixed prefix, the list file's folder, or the file's own folder), POSIX-style, so it
  is stable across machines and reruns;
- **decoding** in a small thread pool (``cv2.imdecode`` releases the GIL), ahead of the model,
  so that the device does not wait for JPEG decoding;
- **batches by size** (:func:`plan_batches`): decoded images are grouped, within a window of a
  few batches, by the padded canvas they resize to, so that one batch pads little;
- **output** in the output folder (:mod:`engine.job_outputs`): ``predictions.jsonl`` (one line
  per image, appended and flushed to disk as each batch completes) or, with ``format="parquet"``,
  the same rows as Parquet shards in ``predictions.parquet/``; ``errors.jsonl`` (one line per
  file that could not be read or decoded: a bad file never stops the run) and ``run.json``
  (weights and sha256, family, thresholds, versions, counts, images/s, seconds by step),
  written by rename;
- **resume**: a rerun on the same folder skips the images already written. A run killed at
  any point (SIGKILL included) leaves at most a torn last line, which the rerun drops (or, in
  Parquet, rows not yet in a shard, which it predicts again), so the final output holds every
  image exactly once.

Each detection is written as ``bbox`` (COCO ``[x, y, w, h]``), ``score``, ``category_id`` (the
checkpoint's label), ``category_name`` and ``segmentation`` (COCO compressed RLE, from
pycocotools).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.job_outputs import RUN_RECORD, JobOutputs, read_done_ids, write_atomically

__all__ = [
    "IMAGE_SUFFIXES",
    "InputFile",
    "JobOptions",
    "JobSummary",
    "collect_inputs",
    "decode_image",
    "plan_batches",
    "read_done_ids",
    "run_job",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class InputFile:
    """One input: its file and its stable ``image_id`` (path relative to its input root, POSIX)."""

    path: Path
    image_id: str


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _relative_id(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def collect_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Input files, in the order given (folders and globs sorted), each once.

    Args:
        inputs: files (taken whatever their suffix: a file that is not an image becomes an
            error line, not a crash), folders (searched recursively for image suffixes), glob
            patterns, and ``@list.txt`` (one path per line, relative to the list's folder).

    Raises:
        FileNotFoundError: an input that is none of these.
        ValueError: two different files with the same ``image_id``.
    """
    found: list[InputFile] = []
    for item in inputs:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise FileNotFoundError(f"list file not found: {listing}")
            root = listing.parent
            for line in listing.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    path = Path(line) if Path(line).is_absolute() else root / line
                    found.append(InputFile(path, _relative_id(path, root)))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p))
            found.extend(InputFile(p, _relative_id(p, path)) for p in files)
        elif path.is_file():
            found.append(InputFile(path, path.name))
        elif glob.has_magic(item):
            root = Path(item.split("*")[0].split("?")[0].split("[")[0])
            root = root if str(item).endswith(os.sep) or root.is_dir() else root.parent
            files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            found.extend(InputFile(p, _relative_id(p, root)) for p in files)
        else:
            raise FileNotFoundError(f"input not found: {item} (a file, a folder, a glob pattern or @list.txt)")
    unique: dict[str, InputFile] = {}
    for f in found:
        other = unique.get(f.image_id)
        if other is None:
            unique[f.image_id] = f
        elif other.path.resolve() != f.path.resolve():
            raise ValueError(f"two inputs have the image_id {f.image_id!r}: {other.path} and {f.path}; pass their common folder instead")
    return list(unique.values())


def decode_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB from an image file (cv2, any format it reads; grey and alpha converted).

    Raises:
        ValueError: the file is empty or is not an image cv2 can decode.
        OSError: the file cannot be read.
    """
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ValueError("empty file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not an image that OpenCV can decode (corrupt, truncated or another format)")
    return np.ascontiguousarray(image[:, :, ::-1])


def plan_batches(sizes: Sequence[tuple[int, int]], batch_size: int, canvas: Callable[[int, int], tuple[int, int]]) -> list[list[int]]:
    """Indices of ``sizes`` grouped into batches of at most ``batch_size``, by padded canvas.

    Images are ordered by the canvas ``canvas(h, w)`` they resize and pad to (then by input
    order), and cut into consecutive batches, so that a batch pads each image little. The plan
    depends only on the sizes and their order.
    """
    order = sorted(range(len(sizes)), key=lambda i: (canvas(*sizes[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class JobOptions:
    """What :func:`run_job` does besides the predictor's own settings.

    Attributes:
        batch_size: images per ``Predictor.run``.
        decode_workers: decoding threads.
        window: images decoded ahead and grouped by size (a few batches).
        progress: show a tqdm bar (images/s, ETA) on stderr.
        format: ``"jsonl"`` or ``"parquet"``, and
        rows_per_shard: images per Parquet shard (both checked by :class:`engine.job_outputs.JobOutputs`).
    """

    batch_size: int = 4
    decode_workers: int = 4
    window: int = 0  # 0: 8 batches
    progress: bool = True
    format: str = "jsonl"
    rows_per_shard: int = 1000

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")

    @property
    def window_images(self) -> int:
        """Images per window: ``window``, or 8 batches when it is 0."""
        return self.window or self.batch_size * 8


@dataclass
class JobSummary:
    """Counts of a run: ``images`` given, ``skipped`` (already done), ``predicted``, ``errors``,
    ``detections``, ``seconds`` and ``images_per_second`` (of this run's new images), and
    ``timings``: seconds by step (in-process: ``decode`` summed over the decoding threads,
    ``waiting_for_decoding``, ``predict`` in ``Predictor.run``, ``encode`` of the rows and their
    RLEs, ``write`` to disk)."""

    images: int = 0
    skipped: int = 0
    predicted: int = 0
    errors: int = 0
    detections: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    timings: dict = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"{self.predicted} images predicted ({self.detections} detections), {self.errors} errors, "
            f"{self.skipped} already done, in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)"
        )


def detections_rows(det, *, class_names: Sequence[str] | None) -> list[dict]:
    """One image's :class:`engine.results.Detections` as JSON-ready dicts (COCO bbox and RLE)."""
    rows = det.to("cpu").to_coco(0)
    for r in rows:
        del r["image_id"]
        label = r["category_id"]
        r["category_name"] = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
    return rows


def _versions() -> dict:
    import cv2
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__, "opencv": cv2.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        versions["maskrcnn-engine"] = version("maskrcnn-engine")
    except Exception:  # noqa: BLE001 - not installed as a distribution (run from a checkout)
        pass
    return versions


def job_windows(inputs: Sequence[InputFile], done: set[str], window: int) -> list[list[InputFile]]:
    """The windows of a job: consecutive groups of ``window`` inputs over the *whole* input list,
    without those whose images are all done already.

    Batches are planned within a window, from all its decodable images, done or not: so every
    image gets the same batch companions in a first run, a resumed run and a Ray run, and
    (batching pads to the largest canvas and changes float rounding) the same results.
    """
    chunks = [list(inputs[i : i + window]) for i in range(0, len(inputs), window)]
    return [c for c in chunks if any(f.image_id not in done for f in c)]


def predict_window(
    predictor,
    files: Sequence[InputFile],
    decoded: Sequence[tuple[np.ndarray | None, str | None]],
    done: set[str],
    *,
    batch_size: int,
    class_names: Sequence[str] | None,
    on_batch: Callable[[list[dict], list[dict]], None],
    timings: dict | None = None,
) -> None:
    """One window: ``decoded[i]`` is ``(image, None)`` or ``(None, error)`` for ``files[i]``.

    Plans the batches over the window's decodable images (:func:`plan_batches`), runs each batch
    that holds an image not yet done, and calls ``on_batch(predictions, errors)`` with the rows
    of the images not yet done (the window's error rows come with its first call). Adds the
    seconds in ``Predictor.run`` and in encoding the rows to ``timings["predict"]`` and
    ``timings["encode"]`` when given.
    """
    from engine.preprocess import resized_canvas

    good = [(f, im) for f, (im, err) in zip(files, decoded) if err is None]
    bad = [
        {"image_id": f.image_id, "file": str(f.path), "error": err}
        for f, (im, err) in zip(files, decoded)
        if err is not None and f.image_id not in done
    ]
    canvas = lambda h, w: resized_canvas((h, w), predictor.config)  # noqa: E731
    batches = plan_batches([im.shape[:2] for _, im in good], batch_size, canvas)
    if bad and not any(any(good[i][0].image_id not in done for i in b) for b in batches):
        on_batch([], bad)
        return
    for batch in batches:
        items = [good[i] for i in batch]
        if all(f.image_id in done for f, _ in items):
            continue
        t0 = time.perf_counter()
        results = predictor.run([im for _, im in items])
        t1 = time.perf_counter()
        rows = [
            {
                "image_id": f.image_id,
                "file": str(f.path),
                "height": int(im.shape[0]),
                "width": int(im.shape[1]),
                "detections": detections_rows(det, class_names=class_names),
            }
            for (f, im), det in zip(items, results)
            if f.image_id not in done
        ]
        if timings is not None:
            timings["predict"] = timings.get("predict", 0.0) + t1 - t0
            timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t1
        on_batch(rows, bad)
        bad = []


def job_record(summary: JobSummary, record: dict | None, extra: dict) -> str:
    """``run.json``'s text: the caller's entries, versions, counts and speed."""
    run = dict(record or {})
    run.update(
        {
            "versions": _versions(),
            "counts": {k: getattr(summary, k) for k in ("images", "skipped", "predicted", "errors", "detections")},
            "seconds": summary.seconds,
            "images_per_second": summary.images_per_second,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
    )
    return json.dumps(run, indent=2) + "\n"


def run_job(
    predictor,
    inputs: Sequence[InputFile],
    output: Path,
    *,
    options: JobOptions = JobOptions(),
    class_names: Sequence[str] | None = None,
    record: dict | None = None,
) -> JobSummary:
    """Predicts every input not yet in ``output``; see the module docstring.

    Args:
        predictor: an :class:`engine.Predictor` (its ``mask_format`` decides full or box masks;
            the RLEs are the same).
        inputs: from :func:`collect_inputs`.
        output: the output folder (created).
        class_names: names indexed by label, for ``category_name``.
        record: extra entries for ``run.json`` (weights, family, ...).

    Returns:
        The :class:`JobSummary` also written to ``run.json``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    done = read_done_ids(output)
    summary = JobSummary(images=len(inputs), skipped=sum(f.image_id in done for f in inputs))
    windows = job_windows(inputs, done, options.window_images)
    outputs = JobOutputs(
        output, summary, _progress(summary.images - summary.skipped, options.progress),
        format=options.format, rows_per_shard=options.rows_per_shard,
    )
    timings = {"decode": 0.0, "waiting_for_decoding": 0.0, "predict": 0.0, "encode": 0.0}
    start = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.decode_workers)) as pool:
            for files, decoded in _decoded_windows(pool, windows, timings):
                predict_window(
                    predictor, files, decoded, done, batch_size=options.batch_size, class_names=class_names,
                    on_batch=outputs.write, timings=timings,
                )
    finally:
        outputs.close()
    summary.seconds = time.perf_counter() - start
    new = summary.predicted + summary.errors
    summary.images_per_second = new / summary.seconds if summary.seconds > 0 else 0.0
    summary.timings = {**timings, "write": outputs.write_seconds}
    extra = {"batch_size": options.batch_size, "format": options.format, "seconds_by_step": summary.timings}
    write_atomically(output / RUN_RECORD, job_record(summary, record, extra))
    return summary


def decode_or_error(path: Path) -> tuple[np.ndarray | None, str | None]:
    """``(image, None)``, or ``(None, reason)`` for a file that cannot be read or decoded."""
    try:
        return decode_image(path), None
    except (OSError, ValueError) as exc:
        return None, str(exc) or type(exc).__name__


def _timed_decode(path: Path) -> tuple[tuple[np.ndarray | None, str | None], float]:
    start = time.perf_counter()
    result = decode_or_error(path)
    return result, time.perf_counter() - start


def _decoded_windows(pool, windows: Sequence[Sequence[InputFile]], timings: dict) -> Iterator[tuple[Sequence[InputFile], list]]:
    """Each window's files and their :func:`decode_or_error`, decoded in ``pool``; the next
    window's decoding is submitted before the current one is handed out. Adds the decoding
    threads' seconds to ``timings["decode"]`` and this thread's wait to
    ``timings["waiting_for_decoding"]``."""

    def submit(files):
        return [pool.submit(_timed_decode, f.path) for f in files]

    pending = submit(windows[0]) if windows else []
    for k, files in enumerate(windows):
        current = pending
        pending = submit(windows[k + 1]) if k + 1 < len(windows) else []
        wait_start = time.perf_counter()
        done = [future.result() for future in current]
        timings["waiting_for_decoding"] += time.perf_counter() - wait_start
        timings["decode"] += sum(seconds for _, seconds in done)
        yield files, [result for result, _ in done]


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)
