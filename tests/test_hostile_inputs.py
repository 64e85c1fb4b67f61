"""Hostile and unlucky input to the predict job (issue 28): no file stops a run, one writer per
output folder, a resume checks the settings, readers never write, errors have kinds, stable ids,
durable renames, bounded decoding, and command-line mistakes as one line.

The bundled shapes model on generated shape images (``weights.shapes``).
"""

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pycocotools", reason="predict writes COCO RLE masks with pycocotools")

from engine import batch_job  # noqa: E402
from engine.batch_job import JobOptions, collect_inputs, run_job  # noqa: E402
from engine.bundled import shapes_predictor  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.image_files import ImageDecodeError, decode_image_bytes, read_image_header  # noqa: E402
from engine.job_outputs import OutputBusyError, OutputLock, SettingsMismatchError, iter_predictions, read_index, write_atomically  # noqa: E402
from weights.shapes import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~60-byte PNG whose header claims ``width x height`` RGB pixels (one empty IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


def _rows(path: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


@pytest.fixture(scope="module")
def predictor():
    return shapes_predictor(device="cpu")


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    """Four good shape images, a header-bomb PNG and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("hostile") / "images"
    folder.mkdir()
    for i in range(4):
        _write_rgb(folder / f"good{i}.png", generate(21, i).image)
    (folder / "bomb.png").write_bytes(header_bomb_png())
    ok, jpeg = cv2.imencode(".jpg", generate(21, 9).image)
    (folder / "truncated.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    return folder


# --- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp"])
@pytest.mark.parametrize("size", [(1, 1), (37, 5), (200, 301)])
def test_header_size_equals_decoded_size(ext, size):
    image = (np.random.default_rng(0).random((*size, 3)) * 255).astype(np.uint8)
    ok, data = cv2.imencode(ext, image)
    header = read_image_header(data.tobytes())
    assert (header.height, header.width) == size
    assert decode_image_bytes(data.tobytes()).shape == (*size, 3)


@pytest.mark.parametrize(
    "data, reason",
    [
        (header_bomb_png(), "too_large"),
        (header_bomb_png(40_000, 40_000), "too_large"),
        (b"", "not_an_image"),
        (b"GIF89a....", "not_an_image"),
        (b"\xff\xd8\xff\xe0\x00", "corrupt"),  # a JPEG cut inside its first segment
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "corrupt"),
        (header_bomb_png(0, 10), "corrupt"),
    ],
    ids=["bomb-100k", "bomb-40k", "empty", "gif", "jpeg-cut-header", "png-no-ihdr", "png-zero-width"],
)
def test_bad_bytes_give_a_decode_error_with_its_reason(data, reason):
    with pytest.raises(ImageDecodeError) as caught:
        decode_image_bytes(data)
    assert caught.value.reason == reason


def test_truncated_jpeg_is_refused_whole_or_cut():
    ok, jpeg = cv2.imencode(".jpg", generate(21, 1).image)
    data = jpeg.tobytes()
    decode_image_bytes(data + b"appended after the image")  # a motion photo's trailer is fine
    for cut in (len(data) // 3, len(data) - 2):
        with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
            decode_image_bytes(data[:cut])


def test_bomb_and_truncated_file_are_errors_and_not_redone(hostile_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", str(hostile_dir), "-o", str(out), "--no-progress"]) == 0
    errors = _rows(out / "errors.jsonl")
    assert set(errors) == {"bomb.png", "truncated.jpg"}
    assert errors["bomb.png"]["reason"] == "too_large" and "10,000,000,000 pixels" in errors["bomb.png"]["error"]
    assert errors["truncated.jpg"]["reason"] == "corrupt" and "truncated" in errors["truncated.jpg"]["error"]
    assert {e["kind"] for e in errors.values()} == {"permanent"}
    assert set(_rows(out / "predictions.jsonl")) == {f"good{i}.png" for i in range(4)}
    before = {name: (out / name).read_bytes() for name in ("predictions.jsonl", "errors.jsonl")}
    assert main(["predict", str(hostile_dir), "-o", str(out), "--no-progress"]) == 0
    assert {name: (out / name).read_bytes() for name in before} == before
    record = json.loads((out / "run.json").read_text())
    assert record["counts"]["skipped"] == 6 and record["totals"] == {"predicted": 4, "errors": 2}


def test_a_higher_max_pixels_retries_the_images_refused_as_too_large(predictor, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _write_rgb(folder / "a.png", generate(21, 0).image)
    small_limit = JobOptions(progress=False, max_pixels=100)
    run_job(predictor, collect_inputs([str(folder)]), tmp_path / "out", options=small_limit)
    assert _rows(tmp_path / "out" / "errors.jsonl")["a.png"]["reason"] == "too_large"
    summary = run_job(predictor, collect_inputs([str(folder)]), tmp_path / "out", options=JobOptions(progress=False))
    assert summary.predicted == 1 and set(_rows(tmp_path / "out" / "predictions.jsonl")) == {"a.png"}


def test_transient_errors_are_retried_on_request(predictor, tmp_path):
    """A list entry that cannot be read (gone for now) is a transient error: skipped on a plain
    resume, tried again with retry_errors."""
    folder = tmp_path / "images"
    folder.mkdir()
    listing = folder / "list.txt"
    listing.write_text("a.png\nlater.png\n")
    _write_rgb(folder / "a.png", generate(21, 0).image)
    out = tmp_path / "out"
    run_job(predictor, collect_inputs([f"@{listing}"]), out, options=JobOptions(progress=False))
    error = _rows(out / "errors.jsonl")["later.png"]
    assert (error["reason"], error["kind"]) == ("unreadable", "transient")
    _write_rgb(folder / "later.png", generate(21, 1).image)
    assert run_job(predictor, collect_inputs([f"@{listing}"]), out, options=JobOptions(progress=False)).predicted == 0
    summary = run_job(predictor, collect_inputs([f"@{listing}"]), out, options=JobOptions(progress=False, retry_errors=True))
    assert summary.predicted == 1 and set(_rows(out / "predictions.jsonl")) == {"a.png", "later.png"}
    assert json.loads((out / "run.json").read_text())["totals"] == {"predicted": 2, "errors": 0}


class _FailsOnWidth:
    """A predictor that raises on any batch holding an image of one width (as a model bug on one
    odd image would), and otherwise runs the real one."""

    def __init__(self, predictor, width: int) -> None:
        self.predictor, self.width, self.config = predictor, width, predictor.config

    def run(self, images):
        if any(im.shape[1] == self.width for im in images):
            raise RuntimeError("this shape breaks the model")
        return self.predictor.run(images)


def test_an_image_the_predictor_fails_on_is_an_error_and_its_companions_are_predicted(predictor, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        _write_rgb(folder / f"{i}.png", generate(21, i).image)
    odd = generate(21, 5).image[:, :-3]
    _write_rgb(folder / "odd.png", odd)
    summary = run_job(_FailsOnWidth(predictor, odd.shape[1]), collect_inputs([str(folder)]), tmp_path / "out", options=JobOptions(progress=False, batch_size=4))
    errors = _rows(tmp_path / "out" / "errors.jsonl")
    assert set(errors) == {"odd.png"} and errors["odd.png"]["reason"] == "predict_failed"
    assert summary.predicted == 3 and set(_rows(tmp_path / "out" / "predictions.jsonl")) == {"0.png", "1.png", "2.png"}


# --- bounded decoding ----------------------------------------------------------------------------


def test_decoded_bytes_held_never_exceed_the_budget(predictor, tmp_path, monkeypatch):
    """Eight 150x150 images (67 500 bytes decoded each), one per batch, a budget of two: the
    decoded images submitted and not yet released never pass 135 000 bytes."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        _write_rgb(folder / f"{i}.png", cv2.resize(generate(21, i).image, (150, 150)))
    live = {"now": 0, "peak": 0}
    real_decode = batch_job._timed_decode

    def counting_decode(path, max_pixels):
        result = real_decode(path, max_pixels)
        live["now"] += result[0][0].nbytes
        live["peak"] = max(live["peak"], live["now"])
        return result

    class Releasing:
        config = predictor.config

        def run(self, images):
            out = predictor.run(images)
            live["now"] -= sum(im.nbytes for im in images)
            return out

    monkeypatch.setattr(batch_job, "_timed_decode", counting_decode)
    options = JobOptions(progress=False, batch_size=1, decode_budget=2 * 150 * 150 * 3, decode_workers=4)
    summary = run_job(Releasing(), collect_inputs([str(folder)]), tmp_path / "out", options=options)
    assert summary.predicted == 8
    assert 0 < live["peak"] <= 2 * 150 * 150 * 3
    reference = run_job(predictor, collect_inputs([str(folder)]), tmp_path / "reference", options=JobOptions(progress=False, batch_size=1))
    assert reference.predicted == 8
    assert _rows(tmp_path / "out" / "predictions.jsonl") == _rows(tmp_path / "reference" / "predictions.jsonl")


# --- one writer, settings, readers -------------------------------------------------------------


def test_a_second_writer_is_refused_and_names_the_holder(hostile_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with OutputLock(out):
        assert main(["predict", str(hostile_dir / "good0.png"), "-o", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "being written by another run" in err and f"process {os.getpid()}" in err
        with pytest.raises(OutputBusyError):
            OutputLock(out).__enter__()
    assert not (out / "predictions.jsonl").exists()
    assert main(["predict", str(hostile_dir / "good0.png"), "-o", str(out), "--no-progress"]) == 0


def test_two_processes_on_one_output_give_a_single_runs_output(hostile_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "engine.cli", "predict", str(hostile_dir), "--batch-size", "1", "--no-progress", "-o"]
    shared = tmp_path / "shared"
    first = subprocess.Popen([*command, str(shared)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (shared / ".lock.holder.json").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run([*command, str(shared)], env=env, cwd=ROOT, capture_output=True, text=True)
    first.communicate(timeout=600)
    assert first.returncode == 0
    assert second.returncode == 2 and "being written by another run" in second.stderr and "Traceback" not in second.stderr
    single = tmp_path / "single"
    subprocess.run([*command, str(single)], env=env, cwd=ROOT, check=True, capture_output=True)
    for name in ("predictions.jsonl", "errors.jsonl"):
        lines = (shared / name).read_text().splitlines()
        assert len(lines) == len(set(lines)) and _rows(shared / name) == _rows(single / name)


def test_a_resume_with_other_settings_refuses(hostile_dir, tmp_path, capsys):
    out = tmp_path / "out"
    good = str(hostile_dir / "good0.png")
    assert main(["predict", good, "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["predict", good, "-o", str(out), "--no-progress", "--score-threshold", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err and "thresholds" in err and "--force" in err
    assert main(["predict", str(hostile_dir / "good1.png"), "-o", str(out), "--no-progress", "--score-threshold", "0.5", "--force"]) == 0
    settings = {"weights_sha256": "0" * 64}
    with pytest.raises(SettingsMismatchError, match="weights_sha256"):
        run_job(shapes_predictor(device="cpu"), collect_inputs([good]), out, options=JobOptions(progress=False), settings=settings)


def test_readers_never_write_and_skip_a_torn_line(hostile_dir, tmp_path):
    """to-coco beside a run that is writing (a torn last line): the folder stays byte for byte
    as it was, the torn row is left out, and the run then resumes and completes."""
    out = tmp_path / "out"
    assert main(["predict", str(hostile_dir / "good0.png"), "-o", str(out), "--no-progress"]) == 0
    with open(out / "predictions.jsonl", "ab") as f:
        f.write(b'{"image_id":"good1.png","file":"x","detections":[{"bb')  # a line being written
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["to-coco", str(out), "-o", str(tmp_path / "coco.json")]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [r["image_id"] for r in iter_predictions(out)] == ["good0.png"]
    assert read_index(out).predicted == {"good0.png"}
    assert main(["predict", str(hostile_dir / "good0.png"), str(hostile_dir / "good1.png"), "-o", str(out), "--no-progress"]) == 0
    assert [json.loads(line)["image_id"] for line in (out / "predictions.jsonl").read_text().splitlines()] == ["good0.png", "good1.png"]


def test_the_resume_index_reads_ids_without_parsing_the_rows(tmp_path):
    """A row whose detections are not even JSON still gives its id: only the id is decoded."""
    rows = [b'{"image_id":"a \\"quoted\\" name.png","detections":[not json at all]}', b'{"image_id":"b/\\u00e9.png","file":"x"}']
    (tmp_path / "predictions.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    assert read_index(tmp_path).predicted == {'a "quoted" name.png', "b/\u00e9.png"}
    (tmp_path / "predictions.jsonl").write_bytes(b'{"file":"x"}\n')
    with pytest.raises(ValueError, match="not a row of this job"):
        read_index(tmp_path)


def test_atomic_writes_fsync_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_atomically(tmp_path / "run.json", "{}\n")
    assert (tmp_path / "run.json").read_text() == "{}\n"
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# --- stable ids ----------------------------------------------------------------------------------


def test_image_ids_do_not_depend_on_how_the_input_was_spelled(tmp_path, monkeypatch):
    real = tmp_path / "data" / "images"
    (real / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        (real / name).write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"x")
    (real / "link.png").symlink_to(elsewhere)
    (tmp_path / "linked").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    spellings = ["data/images", str(real), "./data/../data/images/", "linked", str(tmp_path / "linked")]
    ids = [[f.image_id for f in collect_inputs([s])] for s in spellings]
    assert all(i == ["a.png", "link.png", "sub/b.png"] for i in ids), ids
    listing = tmp_path / "data" / "list.txt"
    listing.write_text("images/a.png\n" + str(real / "sub" / "b.png") + "\n")
    assert [f.image_id for f in collect_inputs([f"@{listing}"])] == ["images/a.png", "images/sub/b.png"]


# --- messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--device", "cuda"], "CUDA is not available"),
        (["--weights", "missing.pth"], "no such file"),
        (["--weights", "{garbage}"], "checkpoint"),
        (["--batch-size", "0"], "must be >= 1"),
        (["--score-threshold", "high"], "expected a number"),
        (["--precision", "fp8"], "invalid choice"),
        (["--output", "{file}"], "File exists"),
    ],
    ids=["no-cuda", "missing-weights", "unknown-checkpoint", "batch-size", "score", "precision", "output-is-a-file"],
)
def test_command_line_mistakes_print_one_line(hostile_dir, tmp_path, extra, expected):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(300))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    extra = [{"{garbage}": str(garbage), "{file}": str(a_file)}.get(e, e) for e in extra]
    command = [sys.executable, "-m", "engine.cli", "predict", str(hostile_dir / "good0.png"), "-o", str(tmp_path / "out"), *extra]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr and expected in done.stderr, done.stderr


def test_help_shows_every_default():
    from engine.cli import _parser

    predict = next(a for a in _parser()._actions if a.dest == "command").choices["predict"]
    text = " ".join(predict.format_help().split())
    for action in predict._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and not action.required:
            assert f"(default: {action.default})" in text or "default:" in (action.help or ""), action.dest
        if action.option_strings and action.dest != "help":
            assert action.help, f"--{action.dest} has no description"


def test_family_choices_are_the_known_families():
    from engine.cli import _parser
    from weights import FAMILIES

    predict = next(a for a in _parser()._actions if a.dest == "command").choices["predict"]
    assert tuple(next(a for a in predict._actions if a.dest == "family").choices) == FAMILIES
