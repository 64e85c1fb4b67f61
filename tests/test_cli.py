"""``maskrcnn-engine predict`` in-process (issue 13): results, bad files, inputs, resume after SIGKILL,
Parquet shards, ``to-coco``, and bounded memory with box masks on a large image.

The bundled shapes model on generated shape images (``weights.shapes``), written as PNG files.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools", reason="predict writes COCO RLE masks with pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from engine.batch_job import JobOptions, collect_inputs, decode_image, plan_batches, read_done_ids, run_job  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.job_outputs import iter_predictions  # noqa: E402
from engine.preprocess import resized_canvas  # noqa: E402
from engine.bundled import shapes_predictor  # noqa: E402
from weights.shapes import HELD_OUT_SEED, generate, write_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor():
    return shapes_predictor(device="cpu")


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """Eight shape images, some in a subfolder, plus three bad files."""
    folder = tmp_path_factory.mktemp("cli") / "images"
    (folder / "day2").mkdir(parents=True)
    for i in range(8):
        rgb = generate(21, i).image
        cv2.imwrite(str(folder / ("day2" if i % 3 == 0 else ".") / f"img{i}.png"), np.ascontiguousarray(rgb[:, :, ::-1]))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (folder / "notes.txt").write_text("not an image")  # skipped in folders: not an image name
    return folder


def _rows(path: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def _assert_row_equals(row: dict, det, image: np.ndarray) -> None:
    assert (row["height"], row["width"]) == image.shape[:2]
    assert len(row["detections"]) == len(det)
    boxes = det.boxes.cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    for d, bbox, score, label, mask in zip(row["detections"], xywh, det.scores.tolist(), det.labels.tolist(), det.full_masks()):
        assert d["bbox"] == bbox and d["score"] == score and d["category_id"] == label
        assert d["category_name"] in ("circle", "square", "triangle")
        decoded = mask_utils.decode({"size": d["segmentation"]["size"], "counts": d["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask.cpu().numpy())


def test_collect_inputs(images_dir, tmp_path):
    found = collect_inputs([str(images_dir)])
    ids = [f.image_id for f in found]
    assert ids == sorted(ids) and "day2/img0.png" in ids and "img1.png" in ids
    assert "notes.txt" not in ids and "empty.jpg" in ids  # folders take image names, bad or not
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images_dir / 'img1.png'}\n# a comment\n\n{images_dir / 'day2' / 'img3.png'}\n")
    assert [f.path.name for f in collect_inputs([f"@{listing}"])] == ["img1.png", "img3.png"]
    globbed = collect_inputs([str(images_dir / "day2" / "*.png")])
    assert [f.image_id for f in globbed] == ["img0.png", "img3.png", "img6.png"]
    assert [f.image_id for f in collect_inputs([str(images_dir / "notes.txt")])] == ["notes.txt"]  # a file is taken as given
    with pytest.raises(FileNotFoundError, match="input not found"):
        collect_inputs([str(images_dir / "missing.png")])
    twin = tmp_path / "img1.png"
    twin.write_bytes((images_dir / "img1.png").read_bytes())
    with pytest.raises(ValueError, match="two inputs have the image_id 'img1.png'"):
        collect_inputs([str(images_dir / "img1.png"), str(twin)])


def test_results_equal_predictor_run(predictor, images_dir, tmp_path):
    """One image per batch: each line is Predictor.run of that image, boxes, scores, labels and masks."""
    inputs = [f for f in collect_inputs([str(images_dir)]) if f.path.suffix == ".png" and "corrupt" not in f.path.name]
    summary = run_job(predictor, inputs, tmp_path, options=JobOptions(batch_size=1, progress=False), class_names=["bg", "circle", "square", "triangle"])
    assert summary.predicted == len(inputs) == 8 and summary.errors == 0
    rows = _rows(tmp_path / "predictions.jsonl")
    for f in inputs:
        image = decode_image(f.path)
        _assert_row_equals(rows[f.image_id], predictor.run([image])[0], image)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["counts"]["predicted"] == 8 and record["images_per_second"] > 0


def test_batches_by_size_equal_predictor_run_of_those_batches(predictor, images_dir, tmp_path):
    inputs = [f for f in collect_inputs([str(images_dir)]) if f.path.suffix == ".png" and "corrupt" not in f.path.name]
    run_job(predictor, inputs, tmp_path, options=JobOptions(batch_size=3, progress=False), class_names=["bg", "circle", "square", "triangle"])
    rows = _rows(tmp_path / "predictions.jsonl")
    images = [decode_image(f.path) for f in inputs]
    plan = plan_batches([im.shape[:2] for im in images], 3, lambda h, w: resized_canvas((h, w), predictor.config))
    assert sorted(i for b in plan for i in b) == list(range(8)) and max(len(b) for b in plan) == 3
    for batch in plan:
        for i, det in zip(batch, predictor.run([images[i] for i in batch])):
            _assert_row_equals(rows[inputs[i].image_id], det, images[i])


def test_plan_batches_groups_equal_canvases():
    sizes = [(100, 100), (300, 200), (100, 100), (300, 200), (100, 100)]
    plan = plan_batches(sizes, 2, lambda h, w: (h, w))
    assert plan == [[0, 2], [4, 1], [3]]


def test_bad_files_are_errors_and_the_rest_is_there(images_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["predict", str(images_dir), str(images_dir / "notes.txt"), "--output", str(out), "--batch-size", "4", "--no-progress"])
    assert code == 0
    errors = _rows(out / "errors.jsonl")
    assert set(errors) == {"empty.jpg", "corrupt.png", "notes.txt"}
    assert "empty" in errors["empty.jpg"]["error"] and "corrupt" in errors["corrupt.png"]["error"]
    assert {e["kind"] for e in errors.values()} == {"permanent"}
    assert set(_rows(out / "predictions.jsonl")) == {f.image_id for f in collect_inputs([str(images_dir)]) if f.path.name.startswith("img")}
    # a rerun has nothing left to do
    before = (out / "predictions.jsonl").read_bytes()
    assert main(["predict", str(images_dir), str(images_dir / "notes.txt"), "--output", str(out), "--no-progress"]) == 0
    assert (out / "predictions.jsonl").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["counts"]["skipped"] == 11


def test_torn_last_line_is_dropped_and_redone(predictor, images_dir, tmp_path):
    inputs = [f for f in collect_inputs([str(images_dir)]) if f.image_id in ("img1.png", "img2.png")]
    run_job(predictor, inputs[:1], tmp_path, options=JobOptions(progress=False))
    with open(tmp_path / "predictions.jsonl", "ab") as f:
        f.write(b'{"image_id":"img2.png","file":"x","det')  # a run killed mid-write
    assert read_done_ids(tmp_path) == {"img1.png"}
    run_job(predictor, inputs, tmp_path, options=JobOptions(progress=False))
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["image_id"] for line in lines] == ["img1.png", "img2.png"]


def _predict_command(images_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "predict", str(images_dir), "--output", str(out), "--batch-size", "2", "--no-progress"]


def test_killed_run_resumes_to_the_uninterrupted_result(images_dir, tmp_path):
    """SIGKILL once the first batch is on disk, rerun: every image once, equal to an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = tmp_path / "reference"
    subprocess.run(_predict_command(images_dir, reference), check=True, env=env, cwd=ROOT, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_predict_command(images_dir, killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    predictions = killed / "predictions.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if predictions.exists() and predictions.stat().st_size > 0:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_rows(predictions))
    assert 0 < partial < 8
    subprocess.run(_predict_command(images_dir, killed), check=True, env=env, cwd=ROOT, capture_output=True)
    lines = predictions.read_text().splitlines()
    ids = [json.loads(line)["image_id"] for line in lines]
    assert len(ids) == len(set(ids)) == 8
    assert _rows(predictions) == _rows(reference / "predictions.jsonl")
    assert _rows(killed / "errors.jsonl") == _rows(reference / "errors.jsonl")


def test_box_masks_give_the_same_rles(images_dir, tmp_path):
    common = [str(images_dir / "img1.png"), "--no-progress", "--output"]
    assert main(["predict", *common, str(tmp_path / "full")]) == 0
    assert main(["predict", *common, str(tmp_path / "box"), "--mask-format", "box"]) == 0
    assert _rows(tmp_path / "full" / "predictions.jsonl") == _rows(tmp_path / "box" / "predictions.jsonl")


def test_console_script_and_module():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["maskrcnn-engine"] == "engine.cli:main"
    out = subprocess.run([sys.executable, "-m", "engine.cli", "predict", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--output" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "engine.cli", "predict", "missing.png", "-o", "x"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "input not found" in bad.stderr


# --- Parquet ---------------------------------------------------------------------------------


def test_parquet_shards_hold_the_same_rows_as_json_lines(images_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    common = [str(images_dir), "--batch-size", "2", "--no-progress", "--output"]
    assert main(["predict", *common, str(tmp_path / "jsonl")]) == 0
    assert main(["predict", *common, str(tmp_path / "parquet"), "--format", "parquet", "--rows-per-shard", "3"]) == 0
    shards = sorted((tmp_path / "parquet" / "predictions.parquet").glob("*"))
    assert [p.name for p in shards] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert not (tmp_path / "parquet" / "predictions.jsonl").exists()
    expected = _rows(tmp_path / "jsonl" / "predictions.jsonl")
    assert {r["image_id"]: r for r in iter_predictions(tmp_path / "parquet")} == expected
    table = pq.read_table(tmp_path / "parquet" / "predictions.parquet")  # the folder reads as one data set
    assert sorted(table.column("image_id").to_pylist()) == sorted(expected) and table.num_rows == 8
    assert _rows(tmp_path / "parquet" / "errors.jsonl") == _rows(tmp_path / "jsonl" / "errors.jsonl")
    assert json.loads((tmp_path / "parquet" / "run.json").read_text())["format"] == "parquet"


def test_parquet_resume_drops_an_unfinished_shard_and_keeps_one_format(predictor, images_dir, tmp_path):
    pytest.importorskip("pyarrow.parquet")
    inputs = [f for f in collect_inputs([str(images_dir)]) if f.image_id.endswith(".png") and "corrupt" not in f.image_id]
    options = dict(batch_size=2, progress=False, format="parquet", rows_per_shard=2)
    run_job(predictor, inputs[:3], tmp_path, options=JobOptions(**options))
    folder = tmp_path / "predictions.parquet"
    (folder / ".part-000007.parquet.tmp").write_bytes(b"PAR1 a shard cut off by a kill")
    run_job(predictor, inputs, tmp_path, options=JobOptions(**options))
    assert not list(folder.glob(".*"))
    ids = [r["image_id"] for r in iter_predictions(tmp_path)]
    assert len(ids) == len(set(ids)) == 8
    reference = tmp_path / "reference"
    run_job(predictor, inputs, reference, options=JobOptions(batch_size=2, progress=False))
    assert {r["image_id"]: r for r in iter_predictions(tmp_path)} == _rows(reference / "predictions.jsonl")
    with pytest.raises(ValueError, match="already holds parquet predictions; resume it with --format parquet"):
        run_job(predictor, inputs, tmp_path, options=JobOptions(batch_size=2, progress=False))


# --- to-coco -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    return folder, write_dataset(folder, seed=HELD_OUT_SEED, count=6)


def test_to_coco_with_annotations_equals_detections_to_coco_and_evaluates(predictor, shapes_dataset, tmp_path):
    from pycocotools.coco import COCO

    from examples.evaluate_coco import coco_evaluate

    folder, annotations = shapes_dataset
    run = tmp_path / "run"
    assert main(["predict", str(folder), "--output", str(run), "--batch-size", "1", "--no-progress"]) == 0
    results_path = tmp_path / "results.json"
    assert main(["to-coco", str(run), "--output", str(results_path), "--annotations", str(annotations)]) == 0
    results = json.loads(results_path.read_text())
    dataset = json.loads(annotations.read_text())
    expected = []
    for image in sorted(dataset["images"], key=lambda im: im["file_name"]):
        rgb = decode_image(folder / image["file_name"])
        expected.extend(predictor.run([rgb])[0].to_coco(image["id"]))
    assert results == expected and len(results) > 0
    gt = COCO(str(annotations))
    report = coco_evaluate(gt, results, [im["id"] for im in dataset["images"]])
    assert report["bbox"]["AP"] > 0.5 and report["segm"]["AP"] > 0.5


def test_to_coco_without_annotations_numbers_images_and_keeps_labels(images_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["predict", str(images_dir / "img1.png"), str(images_dir / "img2.png"), "-o", str(run), "--no-progress"]) == 0
    assert main(["to-coco", str(run)]) == 0
    results = json.loads((run / "coco_results.json").read_text())
    index = json.loads((run / "coco_results.images.json").read_text())["images"]
    assert [(im["id"], im["file_name"]) for im in index] == [(1, "img1.png"), (2, "img2.png")]
    rows = _rows(run / "predictions.jsonl")
    for im in index:
        dets = [r for r in results if r["image_id"] == im["id"]]
        assert [d["category_id"] for d in dets] == [d["category_id"] for d in rows[im["file_name"]]["detections"]]
        assert [d["segmentation"] for d in dets] == [d["segmentation"] for d in rows[im["file_name"]]["detections"]]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"1": 11, "2": 12, "3": 13}))
    assert main(["to-coco", str(run), "-o", str(tmp_path / "mapped.json"), "--category-map", str(mapping)]) == 0
    mapped = json.loads((tmp_path / "mapped.json").read_text())
    assert [r["category_id"] for r in mapped] == [r["category_id"] + 10 for r in results]


def test_to_coco_says_what_is_wrong(images_dir, shapes_dataset, tmp_path, capsys):
    assert main(["to-coco", str(tmp_path)]) == 2
    assert "not the output folder of a predict run" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["predict", str(images_dir / "img1.png"), "-o", str(run), "--no-progress"]) == 0
    _, annotations = shapes_dataset
    assert main(["to-coco", str(run), "--annotations", str(annotations)]) == 2
    assert "1 predicted images have no entry in the annotation file (matched by file_name): img1.png" in capsys.readouterr().err
    assert not (run / "coco_results.json").exists()


# --- memory --------------------------------------------------------------------------------------

# VmHWM is this process's own peak resident set. getrusage's ru_maxrss is not: Linux carries the
# parent's peak across fork and exec, so under a big pytest process every child read the same.
_PEAK_RSS = """
import sys
from engine.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as status:
    print("PEAK_RSS_KIB", next(line.split()[1] for line in status if line.startswith("VmHWM:")))
raise SystemExit(code)
"""


def _peak_rss_bytes(image: Path, out: Path, mask_format: str) -> int:
    command = [sys.executable, "-c", _PEAK_RSS, "predict", str(image), "-o", str(out), "--mask-format", mask_format,
               "--score-threshold", "0", "--no-progress", "--decode-workers", "1"]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    return int(done.stdout.split("PEAK_RSS_KIB")[1].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident set from /proc (Linux)")
def test_box_masks_keep_memory_bounded_on_a_large_image(tmp_path):
    """A 2952 x 3048 image with 100 detections: 100 full masks alone take 900 MB. With box masks
    the run's peak grows, over the same run on the small image, by less than 40 bytes per input
    pixel (it measured 16.6 here: the decoded image and its pre-processing); with full masks it
    grows by more (89.7 here: the check can fail)."""
    small = generate(21, 3).image
    big = cv2.resize(small, (small.shape[1] * 12, small.shape[0] * 12), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(tmp_path / "small.png"), small[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "big.png"), big[:, :, ::-1])
    baseline = _peak_rss_bytes(tmp_path / "small.png", tmp_path / "small", "box")
    box = _peak_rss_bytes(tmp_path / "big.png", tmp_path / "box", "box")
    full = _peak_rss_bytes(tmp_path / "big.png", tmp_path / "full", "full")
    (row,) = _rows(tmp_path / "box" / "predictions.jsonl").values()
    assert len(row["detections"]) == 100
    assert _rows(tmp_path / "box" / "predictions.jsonl") == _rows(tmp_path / "full" / "predictions.jsonl")
    pixels = big.shape[0] * big.shape[1]
    assert (box - baseline) / pixels < 40, f"box masks: {(box - baseline) / 2**20:.0f} MiB over the small image's run"
    assert (full - baseline) / pixels > 40, "full masks did not cost more than the bound: the check cannot tell them apart"
