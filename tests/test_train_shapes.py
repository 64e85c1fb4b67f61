"""The bundled model's training script: schedule, batches in torchvision's target format, fp16 saving."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_shapes.py"
sys.path.insert(0, str(ROOT))

from examples.train_shapes import learning_rate, save_fp16, training_batch  # noqa: E402
from weights.shapes import TRAIN_SEED, generate  # noqa: E402


def test_readme_command_runs():
    """The README's training command points at this script, which starts from any directory."""
    assert "python examples/train_shapes.py --iterations" in (ROOT / "README.md").read_text()
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--iterations" in out.stdout and "--output" in out.stdout


def test_learning_rate_schedule():
    base, total, warmup = 0.02, 1000, 100
    rates = [learning_rate(i, base=base, total=total, warmup=warmup) for i in range(total)]
    assert rates[0] == pytest.approx(base * 0.02)
    assert max(rates) == pytest.approx(base, rel=1e-3) and rates.index(max(rates)) in (warmup, warmup + 1)
    assert all(a <= b for a, b in zip(rates[:warmup], rates[1 : warmup + 1]))  # warm-up rises
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1 :]))  # then decays
    assert rates[-1] == pytest.approx(base * 0.01, rel=0.05)


def test_training_batch_is_the_generated_data_in_torchvision_format():
    images, targets = training_batch(3, 2)
    assert len(images) == len(targets) == 2
    for k, (image, target) in enumerate(zip(images, targets)):
        sample = generate(TRAIN_SEED, 3 * 2 + k)
        assert image.dtype == torch.float32 and image.shape == (3, *sample.image.shape[:2])
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert torch.equal(target["labels"], torch.from_numpy(sample.labels))
        assert target["boxes"].shape == (len(sample.labels), 4)
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape[0] == len(sample.labels)


def test_save_fp16(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "m.pth"
    digest = save_fp16(model, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    state = torch.load(path, weights_only=True)
    assert state["0.weight"].dtype == torch.float16 and state["1.num_batches_tracked"].dtype == torch.int64
    torch.testing.assert_close(state["0.weight"].float(), model[0].weight.detach(), atol=1e-3, rtol=1e-3)
