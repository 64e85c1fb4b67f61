"""``maskrcnn-engine predict --ray`` on a local Ray cluster with 2 CPU actors (issues 13, 28).

One cluster for the module (``ray.init(num_cpus=2)``). In the first test a thread kills a predictor
actor's process from outside while it predicts a window: the run must restart the actor, retry
its window, and still give every image once, identical to the in-process job.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Data is not installed: pip install -e '.[ray]'")
pytest.importorskip("ray.data")
pytest.importorskip("pycocotools")

from engine.batch_job import JobOptions, collect_inputs, run_job  # noqa: E402
from engine.job_outputs import iter_predictions  # noqa: E402
from engine.ray_job import PredictorSpec, run_ray_job  # noqa: E402
from engine.bundled import shapes_model, shapes_predictor  # noqa: E402
from weights.shapes import generate  # noqa: E402

NAMES = list(shapes_model(verify=False).class_names)


#: the process title Ray gives a predictor actor while it predicts a window
PREDICTING = b"ray::MapWorker(MapBatches(PredictActor)).submit"


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent's pid
        except (OSError, ValueError, IndexError):
            return False
    return False


def _kill_one_predictor(marker, stop: threading.Event) -> None:
    """Kills (SIGKILL, as the OOM killer would) the first predictor actor process of this
    process's cluster seen predicting a window, and writes its pid to ``marker``."""
    me = os.getpid()
    while not stop.is_set():
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0]
            except OSError:
                continue
            if title == PREDICTING and _descends_from(int(entry.name), me):
                os.kill(int(entry.name), signal.SIGKILL)
                marker.write_text(entry.name)
                return
        stop.wait(0.02)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-images")
    for i in range(10):
        cv2.imwrite(str(folder / f"img{i:02d}.png"), np.ascontiguousarray(generate(31, i).image[:, :, ::-1]))
    (folder / "broken.png").write_bytes(b"not a png")
    return collect_inputs([str(folder)])


def _rows(path):
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


OPTIONS = dict(batch_size=2, window=4)


@pytest.fixture(scope="module")
def in_process(inputs, tmp_path_factory):
    """The in-process job's rows by image_id. Ray runs a 1-CPU actor with one intra-op thread
    (OMP_NUM_THREADS=1), and the thread count changes the float rounding of convolutions: so
    the reference runs on one thread too."""
    local = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(shapes_predictor(device="cpu"), inputs, local, options=JobOptions(progress=False, **OPTIONS), class_names=NAMES)
    finally:
        torch.set_num_threads(threads)
    return {r["image_id"]: r for r in _rows(local / "predictions.jsonl")}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the actor processes in /proc")
def test_two_actors_one_crash_same_results_as_in_process(cluster, inputs, in_process, tmp_path):
    """One predictor actor killed from outside while it predicts a window: Ray restarts it and
    retries the window."""
    options = OPTIONS
    on_ray = tmp_path / "ray"
    marker, stop = tmp_path / "killed", threading.Event()
    killer = threading.Thread(target=_kill_one_predictor, args=(marker, stop), daemon=True)
    killer.start()
    try:
        summary = run_ray_job(PredictorSpec(), inputs, on_ray, workers=2, class_names=NAMES, **options)
    finally:
        stop.set()
        killer.join()
    assert marker.exists(), "no actor was killed: the restart path was not exercised"
    predictions, errors = _rows(on_ray / "predictions.jsonl"), _rows(on_ray / "errors.jsonl")
    ids = [r["image_id"] for r in predictions]
    assert len(ids) == len(set(ids)) == 10 and summary.predicted == 10
    assert [r["image_id"] for r in errors] == ["broken.png"]
    assert {r["image_id"]: r for r in predictions} == in_process
    record = json.loads((on_ray / "run.json").read_text())
    assert record["ray"]["workers"] == 2 and record["counts"]["predicted"] == 10


def test_resume_on_ray_after_lost_shards_gives_the_uninterrupted_result(cluster, inputs, in_process, tmp_path):
    """Parquet on Ray, then the last two shards deleted (what a kill before they were written
    leaves), then the same command again: every image once, equal to the in-process job."""
    pytest.importorskip("pyarrow.parquet")
    parquet = dict(format="parquet", rows_per_shard=3, class_names=NAMES, workers=2, **OPTIONS)
    run_ray_job(PredictorSpec(), inputs, tmp_path, **parquet)
    shards = sorted((tmp_path / "predictions.parquet").glob("part-*.parquet"))
    assert len(shards) == 4  # 10 images, 3 per shard
    for lost in shards[2:]:
        lost.unlink()
    summary = run_ray_job(PredictorSpec(), inputs, tmp_path, **parquet)
    rows = list(iter_predictions(tmp_path))
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 10 and summary.skipped == 7 and summary.predicted == 4  # 6 rows + the broken file
    assert {r["image_id"]: r for r in rows} == in_process


def test_small_input_gives_every_actor_a_window_quietly(cluster, inputs, tmp_path, capfd, monkeypatch):
    """11 files and the default window (8 batches: 16 images) on 2 actors: cut into 2 windows of
    6, one per actor, and the same rows as the in-process job with that window. Not verbose:
    nothing from Ray on the terminal but the core worker's once-per-process C++ line."""
    # Ray's console handlers keep the sys.stderr of their creation (here pytest's collection)
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
                monkeypatch.setattr(handler, "stream", sys.stderr)
    # both actors up before the first window: on a busy 2-CPU machine one may start seconds later
    # than the other, and Ray Data would then hand both windows to the first (this test is about
    # the windows, not about Ray's start-up times)
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    capfd.readouterr()
    summary = run_ray_job(PredictorSpec(), inputs, tmp_path, workers=2, batch_size=2, class_names=NAMES)
    printed = [line for line in "".join(capfd.readouterr()).splitlines() if line.strip() and "core_worker.cc" not in line]
    assert printed == []
    assert summary.timings["workers_used"] == 2
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["ray"]["workers_used"] == 2 and record["ray"]["window"] == 6
    assert summary.predicted == 10 and summary.errors == 1
    local = tmp_path / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = JobOptions(progress=False, batch_size=2, window=6)
        run_job(shapes_predictor(device="cpu"), inputs, local, options=options, class_names=NAMES)
    finally:
        torch.set_num_threads(threads)
    expected = {r["image_id"]: r for r in _rows(local / "predictions.jsonl")}
    assert {r["image_id"]: r for r in _rows(tmp_path / "predictions.jsonl")} == expected


def test_cli_on_ray_prints_only_its_summary(tmp_path):
    """``predict --ray`` on a local cluster of its own, started by ``init_ray(None, verbose=False)``
    (the CLI's way to start Ray) before the CLI runs: its summary line, and at most Ray's C++ line
    about actor restarts (see engine/ray_job.py)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"img{i}.png"), np.ascontiguousarray(generate(32, i).image[:, :, ::-1]))
    code = (
        "import sys; from engine.ray_job import init_ray; init_ray(None, verbose=False); "
        "from engine.cli import main; raise SystemExit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-c", code, "predict", str(folder), "--output", str(tmp_path / "out"), "--ray", "--no-progress"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    ours = [line for line in lines if "core_worker.cc" not in line]
    assert len(ours) == 1 and re.match(r"2 images predicted \(\d+ detections\), 0 errors", ours[0]), lines
    assert len(lines) - len(ours) <= 1, lines
