"""What the ``predict`` job writes in its output folder, and how it reads it back to resume.

- ``predictions.jsonl`` (``format="jsonl"``): one JSON line per image, appended and made durable
  (flush + fsync) after each batch. A run killed mid-write leaves at most a torn last line,
  which :func:`read_done_ids` cuts off.
- ``predictions.parquet/`` (``format="parquet"``): the same rows as Parquet shards
  ``part-NNNNNN.parquet`` (pyarrow), a shard per ``rows_per_shard`` images and one at the end,
  each written to a hidden ``.part-NNNNNN.parquet.tmp`` and renamed into place, so a shard is
  whole or absent. A killed run loses at most the rows not yet in a shard; the rerun predicts
  them again. The folder reads as one data set (``pyarrow.parquet.read_table``,
  ``pandas.read_parquet``, ``ray.data.read_parquet``): hidden files are skipped.
- ``errors.jsonl``: one JSON line per input that could not be read or decoded.
- ``run.json``: written by rename at the end of a run.

Rows (both formats): ``image_id`` (str), ``file`` (str), ``height``, ``width`` (int) and
``detections``, a list of ``bbox`` (COCO ``[x, y, w, h]`` float64), ``score`` (float64),
``category_id`` (int64, the checkpoint's label), ``category_name`` (str) and ``segmentation``
(COCO compressed RLE ``{"size": [H, W], "counts": str}``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "ERRORS",
    "FORMATS",
    "PARQUET_DIR",
    "PREDICTIONS",
    "RUN_RECORD",
    "JobOutputs",
    "import_pyarrow",
    "iter_predictions",
    "read_done_ids",
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


def _complete_lines(path: Path) -> list[dict]:
    """The whole JSON lines of ``path``; a torn last line (a run killed while writing) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return rows


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


def read_done_ids(output: Path) -> set[str]:
    """``image_id`` of every image already written in ``output`` (either format) or in
    ``errors.jsonl``. Torn JSON lines are dropped from their files, unfinished shards deleted."""
    output = Path(output)
    done = {row["image_id"] for name in (PREDICTIONS, ERRORS) for row in _complete_lines(output / name)}
    folder = output / PARQUET_DIR
    if folder.is_dir():
        for leftover in folder.glob(".part-*.tmp"):
            leftover.unlink()
        shards = _shards(output)
        if shards:
            _, pq = import_pyarrow()
            for shard in shards:
                done.update(pq.read_table(shard, columns=["image_id"]).column("image_id").to_pylist())
    return done


def iter_predictions(output: Path) -> Iterator[dict]:
    """The prediction rows of a finished (or interrupted) run, in the order written, from
    ``predictions.jsonl`` or the Parquet shards, whichever the folder holds.

    Raises:
        FileNotFoundError: the folder holds no predictions.
    """
    output = Path(output)
    present = _formats_present(output)
    if not present:
        raise FileNotFoundError(f"no {PREDICTIONS} or {PARQUET_DIR}/ in {output}: not the output folder of a predict run")
    if "jsonl" in present:
        yield from _complete_lines(output / PREDICTIONS)
    if "parquet" in present:
        _, pq = import_pyarrow()
        for shard in _shards(output):
            yield from pq.read_table(shard).to_pylist()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _LineWriter:
    """Appends whole lines and makes them durable (flush + fsync) at each :meth:`commit`."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "ab")

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
