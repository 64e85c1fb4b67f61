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
from engine.ray_job import CRASH_ONCE_ENV, PredictorSpec, run_ray_job  # noqa: E402
from weights.bundled import shapes_model, shapes_predictor  # noqa: E402
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


def test_two_actors_one_crash_same_results_as_in_process(cluster, inputs, tmp_path):
    options = dict(batch_size=2, window=4)
    local = tmp_path / "local"
    # Ray runs a 1-CPU actor with one intra-op thread (OMP_NUM_THREADS=1), and the thread count
    # changes the float rounding of convolutions: compare with the in-process job on one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(shapes_predictor(device="cpu"), inputs, local, options=JobOptions(progress=False, **options), class_names=NAMES)
    finally:
        torch.set_num_threads(threads)
    on_ray = tmp_path / "ray"
    summary = run_ray_job(PredictorSpec(), inputs, on_ray, workers=2, class_names=NAMES, **options)
    assert cluster.exists(), "no actor crashed: the restart path was not exercised"
    predictions, errors = _rows(on_ray / "predictions.jsonl"), _rows(on_ray / "errors.jsonl")
    ids = [r["image_id"] for r in predictions]
    assert len(ids) == len(set(ids)) == 10 and summary.predicted == 10
    assert [r["image_id"] for r in errors] == ["broken.png"]
    by_id = {r["image_id"]: r for r in _rows(local / "predictions.jsonl")}
    assert {r["image_id"]: r for r in predictions} == by_id
    record = json.loads((on_ray / "run.json").read_text())
    assert record["ray"]["workers"] == 2 and record["counts"]["predicted"] == 10


def test_resume_on_ray_skips_what_is_done(cluster, inputs, tmp_path):
    first = inputs[:5]
    run_ray_job(PredictorSpec(), first, tmp_path, workers=2, batch_size=2, window=4, class_names=NAMES)
    summary = run_ray_job(PredictorSpec(), inputs, tmp_path, workers=2, batch_size=2, window=4, class_names=NAMES)
    ids = [r["image_id"] for r in _rows(tmp_path / "predictions.jsonl")]
    assert len(ids) == len(set(ids)) == 10 and summary.skipped == 5
