"""``maskrcnn-engine predict --ray``: the same job as :mod:`engine.batch_job` as a Ray Data pipeline.

- a dataset of the job's windows (:func:`engine.batch_job.job_windows`: the in-process job's
  groups of files, those not all done), one row each;
- decoding in Ray tasks (``Dataset.map``), a bad file becoming an error row;
- ``map_batches`` with :class:`PredictActor`: one model per actor, ``num_gpus=1`` per actor on
  GPU nodes, one CPU per actor otherwise, ``workers`` actors, each window's batches planned as
  in-process (so the results are the same); the masks are RLE-encoded in the actors, so only
  JSON lines travel back;
- the driver writes the rows block by block with :class:`engine.job_outputs.JobOutputs`, as the
  in-process job does (JSON lines or Parquet shards), so a killed driver resumes the same way.

A failed actor is restarted and its batch retried: Ray Data's actor pool sets ``max_restarts=-1``
and ``max_task_retries=-1`` unless told otherwise (Ray 2.60,
``ray/data/_internal/execution/operators/actor_pool_map_operator.py``), and it hands each output
block to the driver once, so no image is lost or written twice.
Ray is an optional dependency: ``pip install 'maskrcnn-engine[ray]'``.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.batch_job import InputFile, JobOptions, JobSummary, _NoProgress, decode_or_error, job_record, job_windows, predict_window
from engine.job_outputs import RUN_RECORD, JobOutputs, read_done_ids, write_atomically

__all__ = ["PredictActor", "PredictorSpec", "import_ray", "run_ray_job"]

#: an environment variable the tests set to make one actor crash once (a marker file records it)
CRASH_ONCE_ENV = "MASKRCNN_ENGINE_TEST_CRASH_ONCE"


def import_ray():
    """The ``ray`` module, or SystemExit saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SystemExit("error: --ray needs Ray Data: pip install 'maskrcnn-engine[ray]' (or pip install 'ray[data]')") from None
    return ray


@dataclass(frozen=True)
class PredictorSpec:
    """What an actor needs to build its own :class:`engine.Predictor` (picklable)."""

    weights: str | None = None  # None: the bundled shapes model
    family: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    score_threshold: float | None = None
    mask_format: str = "full"

    def build(self):
        options = dict(device=self.device, precision=self.precision, score_threshold=self.score_threshold, mask_format=self.mask_format)
        if self.weights is None:
            from engine.bundled import shapes_predictor

            return shapes_predictor(**options)
        from engine import Predictor

        return Predictor(self.weights, family=self.family, **options)


def _decode_window(row: dict) -> dict:
    """A Ray task: decodes one window's files; the images travel pickled (they differ in size)."""
    files = json.loads(row["files"])
    decoded = [decode_or_error(Path(path)) for path, _ in files]
    return {"files": row["files"], "done": row["done"], "decoded": pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)}


class PredictActor:
    """A Ray Data callable class: one predictor per actor; each input row is one decoded window,
    predicted by :func:`engine.batch_job.predict_window` (the in-process job's batches), and
    comes back as the JSON lines of its images not yet done."""

    def __init__(self, spec: PredictorSpec, class_names: Sequence[str] | None, batch_size: int) -> None:
        self.predictor = spec.build()
        self.class_names = list(class_names) if class_names is not None else None
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        self._maybe_crash()
        lines, kinds = [], []

        def collect(rows, bad):
            for r in rows:
                lines.append(json.dumps(r, separators=(",", ":")))
                kinds.append("prediction")
            for r in bad:
                lines.append(json.dumps(r, separators=(",", ":")))
                kinds.append("error")

        for files_json, done_json, decoded in zip(batch["files"], batch["done"], batch["decoded"]):
            files = [InputFile(Path(path), image_id) for path, image_id in json.loads(files_json)]
            done = set(json.loads(done_json))
            predict_window(
                self.predictor, files, pickle.loads(decoded), done,
                batch_size=self.batch_size, class_names=self.class_names, on_batch=collect,
            )
        return {"line": np.array(lines, dtype=object), "kind": np.array(kinds, dtype=object)}

    @staticmethod
    def _maybe_crash() -> None:
        marker = os.environ.get(CRASH_ONCE_ENV)
        if marker and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # the actor process dies as a crash would


def run_ray_job(
    spec: PredictorSpec,
    inputs: Sequence[InputFile],
    output: Path,
    *,
    address: str | None = None,
    workers: int = 1,
    batch_size: int = 4,
    window: int = 0,
    class_names: Sequence[str] | None = None,
    record: dict | None = None,
    format: str = "jsonl",
    rows_per_shard: int = 1000,
) -> JobSummary:
    """Runs the job on Ray: an existing cluster at ``address`` (``"auto"``, ``ray://...``), the
    one this process already joined, or a local one started for the run. See the module docstring.

    ``batch_size``, ``window``, ``format`` and ``rows_per_shard`` mean what they mean in
    :class:`engine.batch_job.JobOptions`; ``workers`` is the number of predictor actors.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    options = JobOptions(batch_size=batch_size, window=window, progress=False, format=format, rows_per_shard=rows_per_shard)
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    done = read_done_ids(output)
    summary = JobSummary(images=len(inputs), skipped=sum(f.image_id in done for f in inputs))
    windows = job_windows(inputs, done, options.window_images)
    start = time.perf_counter()
    outputs = JobOutputs(output, summary, _NoProgress(), format=format, rows_per_shard=rows_per_shard)
    gpu = spec.device.startswith("cuda")
    first_block = None  # seconds to the first block of results: the actors' start and a first window
    try:
        if windows:
            rows = [
                {
                    "files": json.dumps([[str(f.path), f.image_id] for f in w]),
                    "done": json.dumps([f.image_id for f in w if f.image_id in done]),
                }
                for w in windows
            ]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            # decoding is light next to the model and must not wait for the CPUs the actors hold
            # (on a 2-CPU node, 2 CPU actors hold them all): it asks for none
            # Ray would otherwise run every window's decoding at once, each task in a worker
            # process of its own that imports the engine (torch): as many such tasks as actors
            ds = ds.map(_decode_window, num_cpus=0, concurrency=max(1, workers))
            ds = ds.map_batches(
                PredictActor,
                fn_constructor_kwargs={"spec": spec, "class_names": class_names, "batch_size": batch_size},
                batch_size=1,  # one window per call
                batch_format="numpy",
                # one window at a time per actor: Ray Data would queue up to 4 on one actor, and
                # a job of few windows would then leave the other actors idle
                compute=ray.data.ActorPoolStrategy(size=max(1, workers), max_tasks_in_flight_per_actor=1),
                num_gpus=1 if gpu else 0,
                num_cpus=0 if gpu else 1,
            )
            for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if first_block is None:
                    first_block = time.perf_counter() - start
                parsed = [(json.loads(line), kind) for line, kind in zip(block["line"], block["kind"])]
                outputs.write([r for r, k in parsed if k == "prediction"], [r for r, k in parsed if k == "error"])
    finally:
        outputs.close()
    summary.seconds = time.perf_counter() - start
    new = summary.predicted + summary.errors
    summary.images_per_second = new / summary.seconds if summary.seconds > 0 else 0.0
    summary.timings = {"to_first_block": first_block or 0.0, "write": outputs.write_seconds}
    extra = {
        "ray": {"address": address or "local", "workers": workers, "ray_version": ray.__version__},
        "batch_size": batch_size,
        "format": format,
        "seconds_by_step": summary.timings,
    }
    write_atomically(output / RUN_RECORD, job_record(summary, record, extra))
    return summary
