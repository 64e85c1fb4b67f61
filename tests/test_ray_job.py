"""``maskrcnn-engine predict --ray`` on a local Ray cluster with 2 CPU actors (issue 13).

One cluster for the module (``ray.init(num_cpus=2)``), started with an environment that makes
one predictor actor crash once (``engine.ray_job.CRASH_ONCE_ENV``): the run must restart it,
retry its window, and still give every image once, identical to the in-process job.
"""

import json
import os

import cv2
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Data is not installed: pip install -e '.[ray]'")
pytest.importorskip("ray.data")
pytest.importorskip("pycocotools")

from engine.batch_job import JobOptions, collect_inputs, run_job  # noqa: E402
from engine.job_outputs import iter_predictions  # noqa: E402
from engine.ray_job import CRASH_ONCE_ENV, PredictorSpec, run_ray_job  # noqa: E402
from engine.bundled import shapes_model, shapes_predictor  # noqa: E402
from weights.shapes import generate  # noqa: E402

NAMES = list(shapes_model(verify=False).class_names)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    marker = tmp_path_factory.mktemp("ray") / "crashed"
    os.environ[CRASH_ONCE_ENV] = str(marker)  # inherited by the cluster's workers
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield marker
    ray.shutdown()
    os.environ.pop(CRASH_ONCE_ENV, None)


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


def test_two_actors_one_crash_same_results_as_in_process(cluster, inputs, in_process, tmp_path):
    options = OPTIONS
    on_ray = tmp_path / "ray"
    summary = run_ray_job(PredictorSpec(), inputs, on_ray, workers=2, class_names=NAMES, **options)
    assert cluster.exists(), "no actor crashed: the restart path was not exercised"
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
