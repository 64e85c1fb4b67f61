"""``maskrcnn-engine predict --ray``: the same job as :mod:`engine.batch_job` as a Ray Data pipeline.

- a dataset of the job's windows (:func:`engine.batch_job.job_windows`: the in-process job's
  groups of files, those not all done), one row and one block each;
- decoding in Ray tasks (``Dataset.map``, ``compute=TaskPoolStrategy(size=workers)``), a bad
  file becoming an error row;
- ``map_batches`` with :class:`PredictActor` (``compute=ActorPoolStrategy(size=workers)``): one
  model per actor, ``num_gpus=1`` per actor on GPU nodes, one CPU per actor otherwise, each
  window's batches planned as in-process (so the results are the same); the masks are
  RLE-encoded in the actors, so only JSON lines travel back;
- the driver writes the rows block by block with :class:`engine.job_outputs.JobOutputs`, as the
  in-process job does (JSON lines or Parquet shards), so a killed driver resumes the same way.

**Windows.** With an explicit ``window`` the windows are the in-process job's. With the default
(``window=0``: 8 batches) an input of fewer than ``workers * 8`` batches is cut instead into
``workers`` windows of ``ceil(images / workers)`` images (:func:`ray_window`), so that every actor
gets one (one window of up to 8 batches would leave all but one actor idle). The windows then
depend on ``workers``: a rerun with the same ``workers`` resumes on the same windows, and the
in-process job gives the same results when given that window (``JobOptions(window=...)``); with
its own default it plans other batches, whose float rounding can differ. The run reports how
many actors predicted a window (``summary.timings["workers_used"]``, ``run.json``'s
``ray.workers_used``, next to ``ray.window``).

**Messages.** Unless ``verbose``, Ray stays quiet: :func:`init_ray` starts or joins the cluster
with the ``ray`` logger at ERROR and without the workers' output, and :func:`run_ray_job` turns
off Ray Data's progress bars and start-of-execution lines and raises its console handler to
ERROR for the run (its full log stays in the session's ``logs/ray-data`` folder). One line
remains on a first run in a process: Ray's core worker (C++, not Python logging) prints once
per process, at ERROR, that an actor "has constructor arguments in the object store and
max_restarts > 0" (Ray Data always passes its actors their function by object reference;
ray-project/ray#53727); ``RAY_BACKEND_LOG_LEVEL=fatal`` (for every Ray process) only trades it
for a line announcing that level.
A crashed actor is still reported, by two "(raylet)" lines ("A worker died or was killed ...").

A failed actor is restarted and its batch retried: Ray Data's actor pool sets ``max_restarts=-1``
and ``max_task_retries=-1`` unless told otherwise (Ray 2.60,
``ray/data/_internal/execution/operators/actor_pool_map_operator.py``), and it hands each output
block to the driver once, so no image is lost or written twice.
Ray is an optional dependency: ``pip install 'maskrcnn-engine[ray]'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.batch_job import (
    InputFile,
    JobOptions,
    JobSummary,
    OpenOutput,
    _NoProgress,
    decode_or_error,
    job_windows,
    plan_window,
    predict_batch,
    probe_image,
)
from engine.job_outputs import JobOutputs

__all__ = ["PredictActor", "PredictorSpec", "import_ray", "init_ray", "ray_window", "run_ray_job"]


def import_ray():
    """The ``ray`` module, or SystemExit saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SystemExit("error: --ray needs Ray Data: pip install 'maskrcnn-engine[ray]' (or pip install 'ray[data]')") from None
    return ray


def init_ray(address: str | None, *, verbose: bool = False):
    """The ``ray`` module, joined to the cluster at ``address`` (``"auto"``, ``ray://...``) or to
    a local one started now (``None``); a process already joined stays as it is.

    Unless ``verbose``, the driver's ``ray`` logger is set to ERROR (no "Started a local Ray
    instance", no token-authentication notice) and the workers' output is not forwarded to the
    driver (it stays in the session's log files); with ``verbose``, Ray's own INFO logging and
    the workers' output come to the terminal.
    """
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(
            address=address,
            ignore_reinit_error=True,
            logging_level=logging.INFO if verbose else logging.ERROR,
            log_to_driver=verbose,
        )
    return ray


#: the Ray Data settings :func:`run_ray_job` changes for a quiet run (and puts back after it)
_QUIET_DATA_CONTEXT = {"enable_progress_bars": False, "print_on_execution_start": False, "verbose_stats_logs": False}


@contextlib.contextmanager
def _quiet_ray(ray, verbose: bool):
    """Unless ``verbose``: no Ray Data progress bars or start-of-execution lines, Ray Data's
    console handler and the ``ray`` logger at ERROR; all put back on exit. Ray Data still logs
    everything to its file (``logs/ray-data`` in the Ray session folder)."""
    if verbose:
        yield
        return
    context = ray.data.DataContext.get_current()
    saved_context = {name: getattr(context, name) for name in _QUIET_DATA_CONTEXT}
    data_logger = logging.getLogger("ray.data")
    consoles = [h for h in data_logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved_levels = [h.level for h in consoles]
    ray_logger = logging.getLogger("ray")
    saved_ray_level = ray_logger.level
    try:
        for name, value in _QUIET_DATA_CONTEXT.items():
            setattr(context, name, value)
        for h in consoles:
            h.setLevel(max(h.level, logging.ERROR))
        ray_logger.setLevel(max(ray_logger.getEffectiveLevel(), logging.ERROR))
        yield
    finally:
        for name, value in saved_context.items():
            setattr(context, name, value)
        for h, level in zip(consoles, saved_levels):
            h.setLevel(level)
        ray_logger.setLevel(saved_ray_level)


def ray_window(images: int, *, batch_size: int, window: int, workers: int) -> int:
    """Images per window on Ray: ``window`` when given; otherwise the in-process default
    (:attr:`engine.batch_job.JobOptions.window_images`, 8 batches), cut to
    ``ceil(images / workers)`` when that is smaller, so that a small input gives every one of the
    ``workers`` actors a window. ``images`` is the whole input, done or not, so that a resumed
    run has the first run's windows."""
    default = JobOptions(batch_size=batch_size, window=window).window_images  # checks batch_size
    if window:
        return default
    return max(1, min(default, -(-images // max(1, workers))))


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
    """A Ray task: reads one window's headers (:func:`engine.batch_job.probe_image`) and decodes
    the files whose header passed; the images travel pickled (they differ in size)."""
    files = json.loads(row["files"])
    max_pixels = row["max_pixels"] if row["max_pixels"] >= 0 else None
    probes = [probe_image(Path(path), max_pixels) for path, _ in files]
    decoded = [decode_or_error(Path(path), max_pixels) if err is None else None for (path, _), (_, err) in zip(files, probes)]
    payload = pickle.dumps((probes, decoded), protocol=pickle.HIGHEST_PROTOCOL)
    return {"files": row["files"], "done": row["done"], "decoded": payload}


class PredictActor:
    """A Ray Data callable class: one predictor per actor; each input row is one decoded window,
    planned and predicted as in-process (:func:`engine.batch_job.plan_window`,
    :func:`engine.batch_job.predict_batch`), and
    comes back as the JSON lines of its images not yet done, each with the id of the actor that
    predicted it (``actor``: the driver counts the actors that did work)."""

    def __init__(self, spec: PredictorSpec, class_names: Sequence[str] | None, category_ids, batch_size: int) -> None:
        import ray

        self.predictor = spec.build()
        self.class_names = list(class_names) if class_names is not None else None
        self.category_ids = category_ids
        self.batch_size = batch_size
        self.actor_id = ray.get_runtime_context().get_actor_id() or ""

    def __call__(self, batch: dict) -> dict:
        lines, kinds = [], []

        def collect(rows, bad):
            for r in rows:
                lines.append(json.dumps(r, separators=(",", ":")))
                kinds.append("prediction")
            for r in bad:
                lines.append(json.dumps(r, separators=(",", ":")))
                kinds.append("error")

        for files_json, done_json, payload in zip(batch["files"], batch["done"], batch["decoded"]):
            files = [InputFile(Path(path), image_id) for path, image_id in json.loads(files_json)]
            done = set(json.loads(done_json))
            probes, decoded = pickle.loads(payload)
            plan = plan_window(files, probes, done, batch_size=self.batch_size, config=self.predictor.config)
            collect([], plan.error_rows)
            for b in plan.batches:
                collect(*predict_batch(
                    self.predictor, [files[i] for i in b], [decoded[i] for i in b], done,
                    class_names=self.class_names, category_ids=self.category_ids,
                ))
        actors = [self.actor_id] * len(lines)
        return {"line": np.array(lines, dtype=object), "kind": np.array(kinds, dtype=object), "actor": np.array(actors, dtype=object)}


def run_ray_job(
    spec: PredictorSpec,
    inputs: Sequence[InputFile],
    output: Path,
    *,
    address: str | None = None,
    workers: int = 1,
    options: JobOptions | None = None,
    batch_size: int = 4,
    window: int = 0,
    format: str = "jsonl",
    rows_per_shard: int = 1000,
    class_names: Sequence[str] | None = None,
    category_ids=None,
    record: dict | None = None,
    settings: dict | None = None,
    verbose: bool = False,
) -> JobSummary:
    """Runs the job on Ray: an existing cluster at ``address`` (``"auto"``, ``ray://...``), the
    one this process already joined, or a local one started for the run (by :func:`init_ray`).
    See the module docstring.

    ``options`` are the in-process job's (:class:`engine.batch_job.JobOptions`: batch size,
    window, format, shard size, ``max_pixels``, ``retry_errors``, ``force``; ``decode_workers``,
    ``decode_budget`` and ``progress`` are Ray's to decide); without it, ``batch_size``,
    ``window``, ``format`` and ``rows_per_shard`` make them. ``workers`` is the number of
    predictor actors; a ``window`` of 0 gives a small input ``workers`` smaller windows
    (:func:`ray_window`). ``class_names``, ``category_ids``, ``record`` and ``settings`` mean
    what they mean in :func:`engine.batch_job.run_job`: the output folder is locked and its
    settings checked the same way. ``verbose``: Ray's and Ray Data's own logs and progress bars
    on the terminal (``--verbose``); without it the run prints nothing (see the module
    docstring). ``summary.timings`` holds seconds by step and ``workers_used``, the number of
    actors that predicted a window.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    if options is None:
        options = JobOptions(batch_size=batch_size, window=window, progress=False, format=format, rows_per_shard=rows_per_shard)
    window_images = ray_window(len(inputs), batch_size=options.batch_size, window=options.window, workers=workers)
    ray = import_ray()
    if not ray.is_initialized():
        init_ray(address, verbose=verbose)
    with OpenOutput(output, settings=settings, options=options, record=record) as folder:
        done = folder.done
        summary = JobSummary(images=len(inputs), skipped=sum(f.image_id in done for f in inputs))
        windows = job_windows(inputs, done, window_images)
        start = time.perf_counter()
        outputs = JobOutputs(folder.output, summary, _NoProgress(), format=options.format, rows_per_shard=options.rows_per_shard)
        gpu = spec.device.startswith("cuda")
        first_block = None  # seconds to the first block of results: the actors' start and a first window
        actors_used: set[str] = set()
        try:
            if windows:
                rows = [
                    {
                        "files": json.dumps([[str(f.path), f.image_id] for f in w]),
                        "done": json.dumps([f.image_id for f in w if f.image_id in done]),
                        "max_pixels": -1 if options.max_pixels is None else options.max_pixels,
                    }
                    for w in windows
                ]
                with _quiet_ray(ray, verbose):
                    # one block per window, so that each window can go to its own actor
                    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
                    # decoding is light next to the model and must not wait for the CPUs the actors hold
                    # (on a 2-CPU node, 2 CPU actors hold them all): it asks for none
                    # Ray would otherwise run every window's decoding at once, each task in a worker
                    # process of its own that imports the engine (torch): as many such tasks as actors
                    ds = ds.map(_decode_window, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=workers))
                    ds = ds.map_batches(
                        PredictActor,
                        fn_constructor_kwargs={
                            "spec": spec, "class_names": class_names, "category_ids": category_ids, "batch_size": options.batch_size,
                        },
                        batch_size=1,  # one window per call
                        batch_format="numpy",
                        # one window at a time per actor: Ray Data would queue up to 4 on one actor, and
                        # a job of few windows would then leave the other actors idle
                        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
                        num_gpus=1 if gpu else 0,
                        num_cpus=0 if gpu else 1,
                    )
                    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
                        if first_block is None:
                            first_block = time.perf_counter() - start
                        actors_used.update(block["actor"])
                        parsed = [(json.loads(line), kind) for line, kind in zip(block["line"], block["kind"])]
                        predictions = [r for r, k in parsed if k == "prediction"]
                        errors = [r for r, k in parsed if k == "error"]
                        outputs.write(predictions, errors)
                        folder.note_written(predictions, errors)
        finally:
            outputs.close()
        summary.seconds = time.perf_counter() - start
        new = summary.predicted + summary.errors
        summary.images_per_second = new / summary.seconds if summary.seconds > 0 else 0.0
        seconds = {"to_first_block": first_block or 0.0, "write": outputs.write_seconds}
        summary.timings = {**seconds, "workers_used": len(actors_used)}
        extra = {
            "ray": {
                "address": address or "local", "workers": workers, "workers_used": len(actors_used),
                "window": window_images, "ray_version": ray.__version__,
            },
            "batch_size": options.batch_size,
            "format": options.format,
            "max_pixels": options.max_pixels,
            "seconds_by_step": seconds,
        }
        folder.finish(summary, extra)
    return summary
