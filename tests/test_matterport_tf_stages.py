"""examples/matterport_tf_stages.py: matterport's graph on TensorFlow gives the engine's detections.

TensorFlow is not a test dependency (the script's docstring says how to install it beside the
project), so this runs where it is importable and is skipped elsewhere. The script runs in a
child process: Keras picks its backend once per process, and the other matterport tests hold it
on torch.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "matterport_tf_stages.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed (see examples/matterport_tf_stages.py)"
)


def test_tensorflow_pipeline_and_engine_agree_and_report_every_stage(tmp_path):
    out = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "2", "--warmup", "0", "--repeats", "1", "--max-dim", "256",
         "--min-dim", "200", "--class-logit-scale", "1.0", "--engine-configs", "default", "nchw", "--json", str(out)],
        check=True, timeout=900,
    )
    report = json.loads(out.read_text())
    systems = [r["system"] for r in report["rows"]]
    assert systems[0].startswith("matterport on TensorFlow") and len(systems) == 3
    for row in report["rows"]:
        assert set(row["stages_s"]) == {"preprocess", "backbone+fpn", "rpn", "box head + detection", "mask head", "paste"}
        assert all(v >= 0 for v in row["stages_s"].values()) and row["total_s"] > 0
    for name, agreement in report["agreement"].items():
        assert sum(agreement["tf_detections"]) > 0, "the case must have detections to compare"
        assert agreement["matched"] >= 0.95, (name, agreement)
        assert all(abs(a - b) <= 2 for a, b in zip(agreement["tf_detections"], agreement["engine_detections"]))
