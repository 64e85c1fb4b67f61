"""The benchmark script runs end to end on CPU at tiny sizes and reports every section."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmark.py"


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--smoke", "--device", "cpu", "--batch-sizes", "2", "--json", str(out_json), "--markdown", str(out_md)])
    report = json.loads(out_json.read_text())
    systems = {r["system"] for r in report["end_to_end"]}
    assert systems == {"torchvision fp32", "engine fp32", "engine bf16"}
    fp32 = next(r for r in report["end_to_end"] if r["system"] == "engine fp32")
    assert fp32["agreement"]["matched_fraction"] == 1.0  # fp32 is exact parity
    assert set(report["stages"]["median_s"]) == {"preprocess", "backbone+fpn", "rpn", "box head + detection", "mask head", "paste"}
    assert len(report["kernels"]) == 4
    table = out_md.read_text()
    assert "vs torchvision" in table and "after backbone+FPN" in table
