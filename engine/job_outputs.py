"""What the ``predict`` job writes in its output folder, and how it reads it back to resume.

- ``predictions.jsonl`` (``format="jsonl"``): one JSON line per image, appended and made durable
  (flush + fsync) after each batch. A run killed mid-write leaves at most a torn last line,
  which the next writer cuts off (:func:`repair_for_append`) and every reader leaves out.
- ``predictions.parquet/`` (``format="parquet"``): the same rows as Parquet shards
  ``part-NNNNNN.parquet`` (pyarrow), a shard per ``rows_per_shard`` images and one at the end,
  each written to a hidden ``.part-NNNNNN.parquet.tmp`` and renamed into place, so a shard is
  whole or absent. A killed run loses at most the rows not yet in a shard; the rerun predicts
  them again. The folder reads as one data set (``pyarrow.parquet.read_table``,
  ``pandas.read_parquet``, ``ray.data.read_parquet``): hidden files are skipped.
- ``errors.jsonl``: one JSON line per input that could not be read, decoded or predicted:
  ``image_id``, ``file``, ``error`` (for a person), ``reason`` and ``kind`` (``"permanent"`` or
  ``"transient"``; see :func:`engine.batch_job.error_fields`).
- ``run.json``: the settings that decide the rows, checked by a resume (:func:`check_settings`),
  written by rename at the start of a run and at its end with the counts and the folder's totals.
- ``.lock`` and ``.lock.holder.json``: one writer at a time (:class:`OutputLock`).

Writers hold the lock; readers (:func:`read_index`, :func:`iter_predictions`) never modify the
folder, so ``to-coco`` can run beside a live job.

Rows (both formats): ``image_id`` (str), ``file`` (str), ``height``, ``width`` (int) and
``detections``, a list of ``bbox`` (COCO ``[x, y, w, h]`` float64), ``score`` (float64),
``category_id`` (int64, the checkpoint's label), ``category_name`` (str) and ``segmentation``
(COCO compressed RLE ``{"size": [H, W], "counts": str}``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ERRORS",
    "FORMATS",
    "PARQUET_DIR",
    "PREDICTIONS",
    "RUN_RECORD",
    "JobOutputs",
    "OutputBusyError",
    "OutputLock",
    "RunIndex",
    "SettingsMismatchError",
    "check_settings",
    "import_pyarrow",
    "iter_predictions",
    "read_done_ids",
    "read_index",
    "repair_for_append",
    "write_atomically",
]

PREDICTIONS = "predictions.jsonl"
PARQUET_DIR = "predictions.parquet"
ERRORS = "errors.jsonl"
RUN_RECORD = "run.json"
FORMATS = ("jsonl", "parquet")


def import_pyarrow():
    """``(pyarrow, pyarrow.parquet)``, or ImportError saying what to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("--format parquet writes with pyarrow: pip install 'maskrcnn-engine[parquet]'") from None
    return pa, pq


def parquet_schema():
    """The pyarrow schema of a prediction row (see the module docstring)."""
    pa, _ = import_pyarrow()
    detection = pa.struct(
        [
            ("category_id", pa.int64()),
            ("bbox", pa.list_(pa.float64())),
            ("score", pa.float64()),
            ("segmentation", pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])),
            ("category_name", pa.string()),
        ]
    )
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("file", pa.string()),
            ("height", pa.int64()),
            ("width", pa.int64()),
            ("detections", pa.list_(detection)),
        ]
    )


def _sync_directory(folder: Path) -> None:
    """fsync a folder, so that a rename or a new file in it survives a power cut (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform whose folders cannot be opened (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all: a temporary file beside it, fsynced, renamed over it,
    and the folder fsynced (the rename is durable too). The temporary name holds the process
    id, so two processes never write one temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _whole_lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path`` that end in a newline, one at a time, without the newline; a torn
    last line (a run killed mid-write, or one still writing it) is left out, and the file is
    never modified."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            if line.strip():
                yield line


def _torn_tail_start(path: Path) -> int | None:
    """The offset where a torn last line of ``path`` starts, or None when the file ends in a
    newline (or is empty or absent). Reads backwards from the end: a few kilobytes, not the file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        position, block = end, 1 << 16
        while position > 0:
            start = max(0, position - block)
            f.seek(start)
            chunk = f.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                cut = start + newline + 1
                return cut if cut != end else None
            position = start
        return 0 if end else None


_ID_PREFIX = b'{"image_id":'
_DECODER = json.JSONDecoder()


def _row_image_id(line: bytes, where: str) -> str:
    """The ``image_id`` of a JSON line whose object starts with it, as this job writes them,
    decoded from the line's first bytes only (the masks are not parsed); any other line is
    parsed whole."""
    if line.startswith(_ID_PREFIX):
        head = line[len(_ID_PREFIX) : len(_ID_PREFIX) + 16384].decode("utf-8", errors="ignore")
        try:
            value, _ = _DECODER.raw_decode(head)
        except ValueError:
            value = None
        if isinstance(value, str):
            return value
    try:
        row = json.loads(line)
        return str(row["image_id"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{where} holds a line that is not a row of this job: {line[:80]!r}...") from None


def _shards(output: Path) -> list[Path]:
    folder = output / PARQUET_DIR
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def _formats_present(output: Path) -> set[str]:
    present = set()
    if (output / PREDICTIONS).exists():
        present.add("jsonl")
    if _shards(output):
        present.add("parquet")
    return present


@dataclass
class RunIndex:
    """What an output folder already holds, for a resume: the ``predicted`` image ids (either
    format) and the ``errors`` (image id -> its last line in ``errors.jsonl``). Memory grows
    with the number of images, not with their detections: the prediction rows are not parsed."""

    predicted: set[str] = field(default_factory=set)
    errors: dict[str, dict] = field(default_factory=dict)

    def done(self, *, retry_errors: bool = False, max_pixels: int | None = None) -> set[str]:
        """The image ids a resumed run skips: every predicted image, and every error but those
        worth another try: with ``retry_errors``, the transient ones (a file that could not be
        read); and always the images refused as too large whose size ``max_pixels`` now admits."""
        done = set(self.predicted)
        for image_id, row in self.errors.items():
            if image_id in done:
                continue
            if retry_errors and row.get("kind") == "transient":
                continue
            pixels = row.get("pixels")
            if row.get("reason") == "too_large" and pixels is not None and (max_pixels is None or pixels <= max_pixels):
                continue
            done.add(image_id)
        return done

    def totals(self) -> dict:
        """Counts of the whole folder: images ``predicted``, and images in ``errors`` (not
        predicted since)."""
        return {"predicted": len(self.predicted), "errors": sum(i not in self.predicted for i in self.errors)}


def read_index(output: Path) -> RunIndex:
    """The :class:`RunIndex` of ``output``, read without modifying anything (a torn last line
    is left out; unfinished Parquet shards are hidden files, never read)."""
    output = Path(output)
    index = RunIndex()
    for line in _whole_lines(output / PREDICTIONS):
        index.predicted.add(_row_image_id(line, PREDICTIONS))
    for line in _whole_lines(output / ERRORS):
        try:
            row = json.loads(line)
            index.errors[str(row["image_id"])] = row
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{output / ERRORS} holds a line that is not an error row: {line[:80]!r}...") from None
    shards = _shards(output)
    if shards:
        _, pq = import_pyarrow()
        for shard in shards:
            index.predicted.update(pq.read_table(shard, columns=["image_id"]).column("image_id").to_pylist())
    return index


def read_done_ids(output: Path) -> set[str]:
    """``image_id`` of every image already written in ``output`` (either format) or in
    ``errors.jsonl``: :meth:`RunIndex.done` with no retries."""
    return read_index(output).done()


def repair_for_append(output: Path) -> None:
    """What only the writer holding the folder's lock may do before appending: cut a torn last
    line off ``predictions.jsonl`` and ``errors.jsonl`` (a killed run's), and delete unfinished
    Parquet shards (hidden ``.part-*.tmp`` files)."""
    output = Path(output)
    for name in (PREDICTIONS, ERRORS):
        cut = _torn_tail_start(output / name)
        if cut is not None:
            with open(output / name, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
    folder = output / PARQUET_DIR
    if folder.is_dir():
        for leftover in folder.glob(".part-*.tmp"):
            leftover.unlink()


def iter_predictions(output: Path) -> Iterator[dict]:
    """The prediction rows of a finished, interrupted or running job, in the order written, from
    ``predictions.jsonl`` or the Parquet shards, whichever the folder holds. A reader: it never
    modifies the folder, and leaves out a torn last line.

    Raises:
        FileNotFoundError: the folder holds no predictions.
    """
    output = Path(output)
    present = _formats_present(output)
    if not present:
        raise FileNotFoundError(f"no {PREDICTIONS} or {PARQUET_DIR}/ in {output}: not the output folder of a predict run")
    if "jsonl" in present:
        for line in _whole_lines(output / PREDICTIONS):
            yield json.loads(line)
    if "parquet" in present:
        _, pq = import_pyarrow()
        for shard in _shards(output):
            yield from pq.read_table(shard).to_pylist()


class OutputBusyError(RuntimeError):
    """Another process holds the output folder's lock."""


class SettingsMismatchError(ValueError):
    """The output folder was written with other settings (``run.json``)."""


LOCK = ".lock"
LOCK_HOLDER = ".lock.holder.json"


class OutputLock:
    """One writer per output folder: an exclusive lock on ``DIR/.lock`` (``filelock``, an
    ``fcntl.flock`` on POSIX, which the system releases when the holder dies, SIGKILL
    included, so a killed run never leaves a stale lock), taken without waiting. The holder
    writes who it is (host, process id, command, start time) to ``DIR/.lock.holder.json``, which
    a refused process names. On network file systems ``flock`` is only as good as the server's
    lock support (NFSv4 supports it; keep one job per output folder there by other means).

    Raises:
        OutputBusyError: on entry, when another process holds the lock.
    """

    def __init__(self, output: Path) -> None:
        from filelock import FileLock

        self.output = Path(output)
        self.lock = FileLock(str(self.output / LOCK), timeout=0)

    def __enter__(self) -> "OutputLock":
        from filelock import Timeout

        self.output.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            raise OutputBusyError(
                f"{self.output} is being written by another run ({self._holder()}); wait for it to finish, "
                "or use another --output"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_atomically(self.output / LOCK_HOLDER, json.dumps(holder) + "\n")
        return self

    def _holder(self) -> str:
        try:
            holder = json.loads((self.output / LOCK_HOLDER).read_text())
            return f"process {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not said who it is yet"

    def __exit__(self, *exc) -> None:
        (self.output / LOCK_HOLDER).unlink(missing_ok=True)
        self.lock.release()


def check_settings(output: Path, settings: Mapping, *, force: bool = False) -> None:
    """Refuses to add to ``output`` with other settings than it was written with.

    ``settings`` is what decides the rows (weights by sha256, family, thresholds, precision,
    mask format, class names, ...); ``run.json``'s ``settings`` holds those of the runs before.
    A folder with predictions but no ``run.json`` (written by an older version) is accepted.

    Raises:
        SettingsMismatchError: a setting differs and ``force`` is not set; the message names
            each difference and what to do.
    """
    try:
        previous = json.loads((Path(output) / RUN_RECORD).read_text()).get("settings")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError) as exc:
        raise SettingsMismatchError(f"{Path(output) / RUN_RECORD} cannot be read ({exc}); use another --output") from None
    if previous is None or force:
        return
    before, now = _flat(previous), _flat(settings)
    differ = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {_short(before.get(k))} before, {_short(now.get(k))} now" for k in differ)
        raise SettingsMismatchError(
            f"{output} holds predictions made with other settings ({shown}); use another --output for these settings, "
            "or --force to add to this folder anyway"
        )


def _flat(settings: Mapping, prefix: str = "") -> dict:
    """``{"thresholds": {"score": 0.5}}`` as ``{"thresholds.score": 0.5}``, so a message names the leaf."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _LineWriter:
    """Appends whole lines and makes them durable (flush + fsync) at each :meth:`commit`."""

    def __init__(self, path: Path) -> None:
        new = not path.exists()
        self.file = open(path, "ab")
        if new:
            _sync_directory(path.parent)

    def write(self, rows: Iterable[dict]) -> None:
        payload = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows)
        if payload:
            self.file.write(payload)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.commit()
        self.file.close()


class _ParquetShards:
    """Buffers rows and writes them as whole shards: one per ``rows_per_shard`` rows, by rename."""

    def __init__(self, folder: Path, rows_per_shard: int) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1; got {rows_per_shard}")
        self.pa, self.pq = import_pyarrow()
        self.schema = parquet_schema()
        self.folder, self.rows_per_shard = folder, rows_per_shard
        folder.mkdir(parents=True, exist_ok=True)
        existing = [int(p.name[len("part-") : -len(".parquet")]) for p in folder.glob("part-*.parquet")]
        self.next_index = max(existing, default=-1) + 1
        self.buffer: list[dict] = []

    def write(self, rows: Iterable[dict]) -> None:
        self.buffer.extend(rows)

    def commit(self) -> None:
        while len(self.buffer) >= self.rows_per_shard:
            self._write_shard(self.buffer[: self.rows_per_shard])
            self.buffer = self.buffer[self.rows_per_shard :]

    def close(self) -> None:
        self.commit()
        if self.buffer:
            self._write_shard(self.buffer)
            self.buffer = []

    def _write_shard(self, rows: list[dict]) -> None:
        name = f"part-{self.next_index:06d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        self.pq.write_table(self.pa.Table.from_pylist(rows, schema=self.schema), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        _sync_directory(self.folder)
        self.next_index += 1


class JobOutputs:
    """The predictions and error lines of a job, with the counts of what was written.

    Args:
        output: the output folder.
        summary: a :class:`engine.batch_job.JobSummary` whose counts are kept up to date.
        bar: a progress bar (``update(n)``, ``close()``).
        format: ``"jsonl"`` or ``"parquet"`` (see the module docstring).
        rows_per_shard: images per Parquet shard.

    Raises:
        ValueError: an unknown format, or a folder that already holds predictions in the other
            format (a resumed run keeps its format).
    """

    def __init__(self, output: Path, summary, bar, *, format: str = "jsonl", rows_per_shard: int = 1000) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
        other = _formats_present(output) - {format}
        if other:
            (kind,) = other
            raise ValueError(f"{output} already holds {kind} predictions; resume it with --format {kind}, or use another --output")
        if format == "jsonl":
            self.predictions = _LineWriter(output / PREDICTIONS)
        else:
            self.predictions = _ParquetShards(output / PARQUET_DIR, rows_per_shard)
        self.errors = _LineWriter(output / ERRORS)
        self.summary, self.bar = summary, bar
        self.write_seconds = 0.0

    def write(self, rows: list[dict], bad: list[dict]) -> None:
        start = time.perf_counter()
        if bad:
            self.errors.write(bad)
            self.errors.commit()
        if rows:
            self.predictions.write(rows)
            self.predictions.commit()
        self.write_seconds += time.perf_counter() - start
        self.summary.predicted += len(rows)
        self.summary.errors += len(bad)
        self.summary.detections += sum(len(r["detections"]) for r in rows)
        self.bar.update(len(rows) + len(bad))

    def close(self) -> None:
        start = time.perf_counter()
        self.predictions.close()
        self.errors.close()
        self.write_seconds += time.perf_counter() - start
        self.bar.close()
