"""The demo script: overlays written for files and folders, a clear message without --weights."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import torch

from tiny import tiny_state_dict

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_writes_overlays(tmp_path, capsys):
    demo = load_demo()
    weights = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict(), weights)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, hw in (("a.png", (60, 80)), ("b.jpg", (45, 70))):
        cv2.imwrite(str(images / name), rng.integers(0, 256, size=hw + (3,), dtype=np.uint8))
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    out = tmp_path / "out"
    code = demo.main([str(images), "--weights", str(weights), "--output", str(out), "--device", "cpu",
                      "--score-threshold", "0.05"])
    assert code == 0
    for stem, hw in (("a", (60, 80)), ("b", (45, 70))):
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert overlay is not None and overlay.shape[:2] == hw
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    assert "images/s" in capsys.readouterr().out


def test_demo_without_weights_says_what_to_pass(tmp_path, capsys):
    demo = load_demo()
    code = demo.main([str(tmp_path)])
    assert code == 2
    assert "--weights PATH is required" in capsys.readouterr().err


def test_class_names():
    demo = load_demo()
    names = demo.class_names(91)
    assert names[1] == "person" and names[10] == "traffic light" and names[12] == "N/A" and names[90] == "toothbrush"
    assert demo.class_names(3) == ["class 0", "class 1", "class 2"]
