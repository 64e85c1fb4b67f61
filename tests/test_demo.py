"""The demo script: overlays and COCO results for files, folders and globs; clear messages; inputs untouched."""

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tiny import tiny_state_dict

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def setup(tmp_path):
    weights = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict(), weights)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, hw in (("a.png", (60, 80)), ("b.jpg", (45, 70)), ("c.png", (33, 21))):
        cv2.imwrite(str(images / name), rng.integers(0, 256, size=hw + (3,), dtype=np.uint8))
    (images / "notes.txt").write_text("not an image")
    return weights, images


def test_demo_writes_overlays_and_coco_results(setup, tmp_path, capsys):
    demo = load_demo()
    weights, images = setup
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    out = tmp_path / "out"
    code = demo.main([str(images), "--weights", str(weights), "--output", str(out), "--device", "cpu",
                      "--score-threshold", "0.05", "--batch-size", "2", "--family", "torchvision"])
    assert code == 0
    for stem, hw in (("a", (60, 80)), ("b", (45, 70)), ("c", (33, 21))):
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert overlay is not None and overlay.shape[:2] == hw
    results = json.loads((out / "results.json").read_text())
    ids = json.loads((out / "images.json").read_text())
    assert sorted(ids) == ["0", "1", "2"] and ids["0"].endswith("a.png")
    assert results, "the tiny checkpoint should detect something at score 0.05"
    for r in results:
        assert set(r) >= {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert r["score"] > 0.05 and len(r["bbox"]) == 4 and isinstance(r["segmentation"]["counts"], str)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    assert not list(out.glob(".*tmp*")), "temporary files must be renamed away"
    captured = capsys.readouterr()
    assert "images/s" in captured.out and "3/3 images" in captured.err


def test_demo_globs_and_files(setup, tmp_path):
    demo = load_demo()
    weights, images = setup
    files = demo.collect_inputs([str(images / "*.png"), str(images / "b.jpg"), str(images / "a.png")])
    assert [f.name for f in files] == ["a.png", "c.png", "b.jpg"]
    with pytest.raises(SystemExit, match="input not found"):
        demo.collect_inputs([str(images / "missing.png")])


def test_demo_refuses_to_overwrite_inputs(setup):
    demo = load_demo()
    weights, images = setup
    victim = images / "a_overlay.png"
    cv2.imwrite(str(victim), np.zeros((5, 5, 3), np.uint8))
    before = victim.read_bytes()
    with pytest.raises(SystemExit, match="refusing to overwrite input"):
        demo.main([str(images), "--weights", str(weights), "--output", str(images), "--device", "cpu"])
    assert victim.read_bytes() == before


def test_demo_without_weights_on_an_empty_folder_says_so(tmp_path, capsys):
    # without --weights the demo runs the bundled shapes model on the given inputs (tests/test_bundled_model.py)
    demo = load_demo()
    assert demo.main([str(tmp_path)]) == 2
    assert "no images found" in capsys.readouterr().err


def test_demo_class_names_must_match_checkpoint(setup, tmp_path):
    demo = load_demo()
    weights, images = setup
    with pytest.raises(ValueError, match="3 class names given, but the checkpoint has 4 foreground classes"):
        demo.main([str(images), "--weights", str(weights), "--output", str(tmp_path / "o"), "--device", "cpu",
                   "--class-names", "cat,dog,bird"])
    assert demo.main([str(images), "--weights", str(weights), "--output", str(tmp_path / "o"), "--device", "cpu",
                      "--class-names", "cat,dog,bird,fish"]) == 0


#: files the demo cannot decode, by name: empty, not an image, a PNG cut after its signature
UNREADABLE = {"empty.png": b"", "text.jpg": b"not an image", "cut.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}


def test_demo_skips_unreadable_files(setup, tmp_path, capsys):
    """Each file that cannot be decoded is named with its reason on one line, and the others run
    (as ``maskrcnn-engine predict`` does), their image ids left out of images.json."""
    demo = load_demo()
    weights, images = setup
    for name, content in UNREADABLE.items():
        (images / name).write_bytes(content)
    out = tmp_path / "out"
    code = demo.main([str(images), "--weights", str(weights), "--output", str(out), "--device", "cpu",
                      "--score-threshold", "0.05", "--batch-size", "2", "--family", "torchvision"])
    assert code == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(lines) == len(UNREADABLE)
    for name in UNREADABLE:
        (line,) = [line for line in lines if name in line]
        assert line.split(": ", 1)[1].strip(), "a reason follows the file name"
        assert not (out / f"{Path(name).stem}_overlay.png").exists()
    ids = json.loads((out / "images.json").read_text())
    assert sorted(Path(f).name for f in ids.values()) == ["a.png", "b.jpg", "c.png"]
    assert all((out / f"{s}_overlay.png").exists() for s in "abc")
    assert "keeping detections scoring above 0.05;" in captured.out and "6/6 images" in captured.err


def test_demo_with_only_unreadable_files_says_so(tmp_path, capsys):
    demo = load_demo()
    (tmp_path / "bad.png").write_bytes(b"nothing")
    assert demo.main([str(tmp_path), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "bad.png" in err and "none of the input files" in err


def test_demo_states_its_score_threshold_and_device(setup, tmp_path, capsys):
    demo = load_demo()
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.5," in out and "0.05" in out
    assert demo.parse_args([]).device is None  # the Predictor's default: CUDA when present, as the CLI
    weights, images = setup
    assert demo.main([str(images), "--weights", str(weights), "--output", str(tmp_path / "o"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "keeping detections scoring above 0.5 (the demo's default" in printed and "device cpu" in printed
