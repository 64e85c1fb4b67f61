"""The main job: a checkpoint over many image files, resumable, results as JSON lines or Parquet.

``maskrcnn-engine predict`` (:mod:`engine.cli`) runs :func:`run_job`:

- **inputs** (:func:`collect_inputs`): files, folders (recursive), glob patterns and ``@list.txt``
  files of paths. Each image's ``image_id`` is its path relative to its input root (the folder,
  the glob's fixed prefix, the list file's folder, or the file's own folder), POSIX-style and
  lexical: symbolic links are not followed, so the id is the same however the input was
  spelled (relative, absolute, through a linked folder) and a linked file keeps its link's
  name. A list line outside its list's folder keeps its absolute, normalised path;
- **headers first** (:mod:`engine.image_files`): each file's header gives its size, and a file
  over ``max_pixels``, not an image, or unreadable becomes an error line before any decoding;
- **batches by size** (:func:`plan_batches`): within a window of a few batches, the images are
  grouped by the padded canvas their header size resizes to, so that one batch pads little;
- **decoding** in a thread pool (``cv2.imdecode`` releases the GIL), ahead of the model, with at
  most ``decode_budget`` bytes of decoded pixels held at once (a larger batch alone);
- **one writer**: the output folder is locked (:class:`engine.job_outputs.OutputLock`), and a
  resume refuses other settings than the folder's (``run.json``);
- **output** in the output folder (:mod:`engine.job_outputs`): ``predictions.jsonl`` (one line
  per image, appended and flushed to disk as each batch completes) or, with ``format="parquet"``,
  the same rows as Parquet shards in ``predictions.parquet/``; ``errors.jsonl`` (one line per
  file that could not be read or decoded: a bad file never stops the run) and ``run.json``
  (weights and sha256, family, thresholds, versions, counts, images/s, seconds by step),
  written by rename;
- **resume**: a rerun on the same folder skips the images already written and the errors
  (``retry_errors``: not the transient ones, a read that failed). A run killed at any point
  (SIGKILL included) leaves at most a torn last line, which the rerun drops (or, in Parquet,
  rows not yet in a shard, which it predicts again), so the final output holds every image
  exactly once. An image that makes the predictor fail becomes an error line of its own (its
  batch companions are predicted alone), so no file stops the run.

Each detection is written as ``bbox`` (COCO ``[x, y, w, h]``), ``score``, ``category_id`` (the
COCO category id for the COCO class layouts, the checkpoint's label otherwise; see
``Predictor.coco_category_ids``), ``category_name`` and ``segmentation`` (COCO compressed RLE, from
pycocotools).
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.image_files import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageDecodeError, check_pixels, decode_image_file, read_image_header
from engine.job_outputs import (
    RUN_RECORD,
    JobOutputs,
    OutputLock,
    check_settings,
    read_done_ids,
    read_index,
    repair_for_append,
    write_atomically,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "InputFile",
    "JobOptions",
    "JobSummary",
    "OpenOutput",
    "WindowPlan",
    "collect_inputs",
    "decode_image",
    "job_settings",
    "plan_batches",
    "plan_window",
    "predict_batch",
    "probe_image",
    "read_done_ids",
    "run_job",
]


@dataclass(frozen=True)
class InputFile:
    """One input: its file and its stable ``image_id`` (path relative to its input root, POSIX)."""

    path: Path
    image_id: str


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _relative_id(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, POSIX-style, lexically (``os.path.abspath`` normalises
    ``..`` and ``.`` without following links); a path outside ``root`` keeps its absolute form."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return Path(os.path.abspath(path)).as_posix()
    return Path(relative).as_posix()


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
            files = sorted(p for p in path.rglob("*") if _is_image_name(p) and p.is_file())
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


def decode_image(path: Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] RGB from an image file: :func:`engine.image_files.decode_image_file`."""
    return decode_image_file(path, max_pixels=max_pixels)


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
        decode_workers: header-reading and decoding threads.
        window: images whose batches are planned together (0: 8 batches).
        progress: show a tqdm bar (images/s, ETA) on stderr.
        format: ``"jsonl"`` or ``"parquet"``, and
        rows_per_shard: images per Parquet shard (both checked by :class:`engine.job_outputs.JobOutputs`).
        max_pixels: the largest ``height * width`` decoded (``None``: no limit); a larger image
            is an error line (:data:`engine.image_files.DEFAULT_MAX_PIXELS` by default).
        decode_budget: bytes of decoded images held at once, those decoded ahead and those being
            predicted (a batch larger than this is decoded alone).
        retry_errors: a resume tries the transient errors of the runs before again.
        force: add to an output folder written with other settings.
    """

    batch_size: int = 4
    decode_workers: int = 4
    window: int = 0  # 0: 8 batches
    progress: bool = True
    format: str = "jsonl"
    rows_per_shard: int = 1000
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode_budget: int = 1 << 30
    retry_errors: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None (no limit); got {self.max_pixels}")
        if self.decode_budget < 1:
            raise ValueError(f"decode_budget must be >= 1 byte; got {self.decode_budget}")

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


def detections_rows(det, *, class_names: Sequence[str] | None, category_ids: Sequence[int] | Mapping | None = None) -> list[dict]:
    """One image's :class:`engine.results.Detections` as JSON-ready dicts (COCO bbox and RLE):
    ``category_id`` from ``category_ids`` (indexed by label; None: the label), ``category_name``
    from ``class_names`` (indexed by label)."""
    labels = det.labels.tolist()
    rows = det.to("cpu").to_coco(0, category_ids=category_ids)
    for r, label in zip(rows, labels):
        del r["image_id"]
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

    Batches are planned within a window, from the header sizes of all its images, done or not:
    so every image gets the same batch companions in a first run, a resumed run and a Ray run,
    and (batching pads to the largest canvas and changes float rounding) the same results.
    """
    chunks = [list(inputs[i : i + window]) for i in range(0, len(inputs), window)]
    return [c for c in chunks if any(f.image_id not in done for f in c)]


# --- errors ----------------------------------------------------------------------------------


def error_fields(exc: BaseException) -> dict:
    """The ``error`` (a reason a person reads), ``reason`` and ``kind`` of an error line:
    ``"permanent"`` when reading the file again gives the same answer (not an image, corrupt,
    too large), ``"transient"`` when it may not (a read that failed, memory that ran out)."""
    if isinstance(exc, ImageDecodeError):
        fields = {"error": str(exc), "reason": exc.reason, "kind": "permanent"}
        if exc.pixels is not None:
            fields["pixels"] = exc.pixels
        return fields
    if isinstance(exc, OSError):
        detail = exc.strerror or str(exc) or type(exc).__name__
        return {"error": f"cannot read the file: {detail}", "reason": "unreadable", "kind": "transient"}
    if isinstance(exc, MemoryError):
        return {"error": "out of memory while decoding", "reason": "out_of_memory", "kind": "transient"}
    return {"error": f"{type(exc).__name__}: {exc}", "reason": "corrupt", "kind": "permanent"}


def _error_row(f: InputFile, fields: dict) -> dict:
    return {"image_id": f.image_id, "file": str(f.path), **fields}


def probe_image(path: Path, max_pixels: int | None) -> tuple[tuple[int, int] | None, dict | None]:
    """``((height, width), None)`` from the file's header, or ``(None, error fields)``."""
    try:
        header = read_image_header(path)
        check_pixels(header, max_pixels)
        return (header.height, header.width), None
    except Exception as exc:  # noqa: BLE001 - any failure on one file is that file's error line
        return None, error_fields(exc)


def decode_or_error(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, dict | None]:
    """``(image, None)``, or ``(None, error fields)`` for a file that cannot be read or decoded."""
    try:
        return decode_image_file(path, max_pixels=max_pixels), None
    except Exception as exc:  # noqa: BLE001 - cv2.error and the rest: that file's error line
        return None, error_fields(exc)


# --- planning and predicting -----------------------------------------------------------------


@dataclass
class WindowPlan:
    """One window's work: its ``files``, the ``error_rows`` of its files whose header failed
    (those not done), and its ``batches`` (indices into ``files``; only batches holding an image
    not done), with ``sizes[i]`` the header (height, width) of ``files[i]`` (None on error)."""

    files: list[InputFile]
    error_rows: list[dict]
    batches: list[list[int]]
    sizes: list[tuple[int, int] | None]

    def batch_bytes(self, batch: Sequence[int]) -> int:
        """Bytes of the batch's decoded RGB images, from their header sizes."""
        return sum(self.sizes[i][0] * self.sizes[i][1] * 3 for i in batch)


def plan_window(files: Sequence[InputFile], probes: Sequence[tuple], done: set[str], *, batch_size: int, config) -> WindowPlan:
    """The :class:`WindowPlan` of a window from its files' :func:`probe_image` results; batches
    by the padded canvas (:func:`plan_batches`) of the header sizes."""
    from engine.preprocess import resized_canvas

    good = [i for i, (size, err) in enumerate(probes) if err is None]
    error_rows = [_error_row(files[i], err) for i, (_, err) in enumerate(probes) if err is not None and files[i].image_id not in done]
    canvas = lambda h, w: resized_canvas((h, w), config)  # noqa: E731
    plan = plan_batches([probes[i][0] for i in good], batch_size, canvas)
    batches = [[good[j] for j in b] for b in plan if any(files[good[j]].image_id not in done for j in b)]
    return WindowPlan(list(files), error_rows, batches, [size for size, _ in probes])


def _predict_failure(exc: BaseException) -> dict:
    return {"error": f"the predictor failed on this image: {type(exc).__name__}: {exc}", "reason": "predict_failed", "kind": "transient"}


def predict_batch(
    predictor,
    files: Sequence[InputFile],
    decoded: Sequence[tuple[np.ndarray | None, dict | None]],
    done: set[str],
    *,
    class_names: Sequence[str] | None,
    category_ids=None,
    timings: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """``(rows, error_rows)`` of one batch, for the images not done: ``decoded[i]`` is
    ``(image, None)`` or ``(None, error fields)`` for ``files[i]``. The decoded images run as one
    ``Predictor.run``; if it raises, each image runs alone, and one that still fails becomes an
    error line (``reason="predict_failed"``, transient). Adds the seconds in ``Predictor.run``
    and in encoding to ``timings["predict"]`` and ``timings["encode"]``."""
    items = [(f, im) for f, (im, err) in zip(files, decoded) if err is None]
    error_rows = [_error_row(f, err) for f, (_, err) in zip(files, decoded) if err is not None and f.image_id not in done]
    t0 = time.perf_counter()
    try:
        results = predictor.run([im for _, im in items]) if items else []
        outcomes = [(f, im, det) for (f, im), det in zip(items, results)]
    except Exception:  # noqa: BLE001 - find the image at fault, predict the rest
        outcomes = []
        for f, im in items:
            try:
                outcomes.append((f, im, predictor.run([im])[0]))
            except Exception as exc:  # noqa: BLE001
                if f.image_id not in done:
                    error_rows.append(_error_row(f, _predict_failure(exc)))
    t1 = time.perf_counter()
    rows = [
        {
            "image_id": f.image_id,
            "file": str(f.path),
            "height": int(im.shape[0]),
            "width": int(im.shape[1]),
            "detections": detections_rows(det, class_names=class_names, category_ids=category_ids),
        }
        for f, im, det in outcomes
        if f.image_id not in done
    ]
    if timings is not None:
        timings["predict"] = timings.get("predict", 0.0) + t1 - t0
        timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t1
    return rows, error_rows


def job_settings(*, weights_sha256: str, family: str, config, precision: str, mask_format: str, class_names, category_ids, input_format: str = "RGB") -> dict:
    """What decides a job's rows, kept in ``run.json`` and checked on a resume
    (:func:`engine.job_outputs.check_settings`)."""
    return {
        "weights_sha256": weights_sha256,
        "family": family,
        "preset": config.name,
        "precision": precision,
        "mask_format": mask_format,
        "input_format": input_format,
        "thresholds": {
            "score": config.score_threshold,
            "nms": config.nms_threshold,
            "mask": config.mask_threshold,
            "detections_per_image": config.detections_per_image,
        },
        "class_names": list(class_names) if class_names is not None else None,
        "category_ids": list(category_ids) if category_ids is not None else None,
    }


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


class OpenOutput:
    """The writer's hold on an output folder for one run: the lock (:class:`OutputLock`), the
    settings check, the repair of a killed run's torn tail, the index of what is there, and
    ``run.json`` (written at the start with ``"status": "running"`` and the settings, so that
    even a killed first run leaves them, and at the end with the counts of this run and the
    ``totals`` of the whole folder). Used by the in-process and the Ray job alike."""

    def __init__(self, output: Path, *, settings: Mapping | None, options: JobOptions, record: dict | None) -> None:
        self.output, self.settings, self.options, self.record = Path(output), settings, options, record
        self.lock = OutputLock(self.output)

    def __enter__(self) -> "OpenOutput":
        self.lock.__enter__()
        try:
            if self.settings is not None:
                check_settings(self.output, self.settings, force=self.options.force)
            repair_for_append(self.output)
            self.index = read_index(self.output)
            self.done = self.index.done(retry_errors=self.options.retry_errors, max_pixels=self.options.max_pixels)
            self._write_record({"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "totals": self.index.totals()})
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def note_written(self, rows: list[dict], error_rows: list[dict]) -> None:
        """Keeps :attr:`index` up to date with what this run wrote."""
        self.index.predicted.update(r["image_id"] for r in rows)
        self.index.errors.update((r["image_id"], r) for r in error_rows)

    def finish(self, summary: JobSummary, extra: dict) -> None:
        self._write_record({"status": "finished", "totals": self.index.totals(), **extra}, summary=summary)

    def _write_record(self, entries: dict, summary: JobSummary | None = None) -> None:
        record = {**(self.record or {}), "settings": self.settings}
        if summary is None:
            text = json.dumps({**record, **entries}, indent=2) + "\n"
        else:
            text = job_record(summary, record, entries)
        write_atomically(self.output / RUN_RECORD, text)

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)


def run_job(
    predictor,
    inputs: Sequence[InputFile],
    output: Path,
    *,
    options: JobOptions = JobOptions(),
    class_names: Sequence[str] | None = None,
    category_ids=None,
    record: dict | None = None,
    settings: Mapping | None = None,
) -> JobSummary:
    """Predicts every input not yet in ``output``; see the module docstring.

    Args:
        predictor: an :class:`engine.Predictor` (its ``mask_format`` decides full or box masks;
            the RLEs are the same).
        inputs: from :func:`collect_inputs`.
        output: the output folder (created).
        class_names: names indexed by label, for ``category_name``.
        category_ids: COCO category ids indexed by label, for ``category_id`` (None: the label).
        record: extra entries for ``run.json`` (weights, family, ...).
        settings: what decides the rows (:func:`job_settings`); a folder written with other
            settings is refused unless ``options.force``.

    Returns:
        The :class:`JobSummary` also written to ``run.json``.

    Raises:
        engine.job_outputs.OutputBusyError: another process writes ``output``.
        engine.job_outputs.SettingsMismatchError: ``output`` holds another model's results.
    """
    if getattr(predictor, "input_format", "RGB") != "RGB":
        raise ValueError("run_job decodes files to RGB: give it a Predictor with input_format='RGB' (the default)")
    with OpenOutput(output, settings=settings, options=options, record=record) as folder:
        done = folder.done
        summary = JobSummary(images=len(inputs), skipped=sum(f.image_id in done for f in inputs))
        windows = job_windows(inputs, done, options.window_images)
        outputs = JobOutputs(
            folder.output, summary, _progress(summary.images - summary.skipped, options.progress),
            format=options.format, rows_per_shard=options.rows_per_shard,
        )

        def write(rows: list[dict], error_rows: list[dict]) -> None:
            outputs.write(rows, error_rows)
            folder.note_written(rows, error_rows)

        timings = {"decode": 0.0, "waiting_for_decoding": 0.0, "predict": 0.0, "encode": 0.0}
        start = time.perf_counter()
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.decode_workers)) as pool:
                plans = _window_plans(pool, windows, done, options, predictor.config)
                for plan, batch, decoded in _decoded_batches(pool, plans, options, timings):
                    if batch is None:
                        write([], plan.error_rows)
                        continue
                    rows, error_rows = predict_batch(
                        predictor, [plan.files[i] for i in batch], decoded, done,
                        class_names=class_names, category_ids=category_ids, timings=timings,
                    )
                    write(rows, error_rows)
        finally:
            outputs.close()
        summary.seconds = time.perf_counter() - start
        new = summary.predicted + summary.errors
        summary.images_per_second = new / summary.seconds if summary.seconds > 0 else 0.0
        summary.timings = {**timings, "write": outputs.write_seconds}
        extra = {"batch_size": options.batch_size, "format": options.format, "max_pixels": options.max_pixels, "seconds_by_step": summary.timings}
        folder.finish(summary, extra)
    return summary


def _window_plans(pool, windows: Sequence[Sequence[InputFile]], done: set[str], options: JobOptions, config) -> Iterator[WindowPlan]:
    """Each window's :class:`WindowPlan`; the next window's headers are read in ``pool`` while
    this one is handed out."""

    def submit(files):
        return [pool.submit(probe_image, f.path, options.max_pixels) for f in files]

    pending = submit(windows[0]) if windows else []
    for k, files in enumerate(windows):
        current = pending
        pending = submit(windows[k + 1]) if k + 1 < len(windows) else []
        probes = [future.result() for future in current]
        yield plan_window(files, probes, done, batch_size=options.batch_size, config=config)


def _timed_decode(path: Path, max_pixels: int | None) -> tuple[tuple[np.ndarray | None, dict | None], float]:
    start = time.perf_counter()
    result = decode_or_error(path, max_pixels)
    return result, time.perf_counter() - start


def _decoded_batches(pool, plans: Iterator[WindowPlan], options: JobOptions, timings: dict):
    """``(plan, batch, decoded)`` for each batch of each plan, in order, decoded in ``pool`` as
    far ahead as ``options.decode_budget`` allows: the decoded images of the batches submitted
    and not yet handed back, plus the one handed back last (being predicted), take at most the
    budget (by header size), or are one batch alone. A window's error lines come first, as
    ``(plan, None, None)``. Adds the decoding threads' seconds to ``timings["decode"]`` and this
    thread's wait to ``timings["waiting_for_decoding"]``."""
    work = ((plan, batch) for plan in plans for batch in ([None] if plan.error_rows else []) + plan.batches)
    queued: collections.deque = collections.deque()  # (plan, batch, futures, bytes)
    held = 0  # bytes of the queued batches and of the one being predicted
    staged = next(work, None)
    while staged is not None or queued:
        while staged is not None:
            plan, batch = staged
            size = 0 if batch is None else plan.batch_bytes(batch)
            if queued and held + size > options.decode_budget:
                break
            futures = [] if batch is None else [pool.submit(_timed_decode, plan.files[i].path, options.max_pixels) for i in batch]
            queued.append((plan, batch, futures, size))
            held += size
            staged = next(work, None)
        plan, batch, futures, size = queued.popleft()
        if batch is None:
            held -= size
            yield plan, None, None
            continue
        wait_start = time.perf_counter()
        results = [future.result() for future in futures]
        timings["waiting_for_decoding"] += time.perf_counter() - wait_start
        timings["decode"] += sum(seconds for _, seconds in results)
        yield plan, batch, [result for result, _ in results]
        held -= size


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
