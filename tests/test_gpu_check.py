"""``examples/gpu_check.py``: the dry run on CPU writes every phase's results; without CUDA it refuses.

The dry run (one subprocess, shared by the tests that read its files) takes about a minute and a
half on a busy 2-core CPU; the other tests take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "gpu_check.py"
PHASES = ["tests-kernels", "tests-cuda-other", "tests-latency", "tests-parity-gpu", "benchmark", "sync"]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    start = time.monotonic()
    # a generous limit: the default (120 s) is the target, a busy CI machine should not fail the test
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--output", str(out), "--time-limit", "300"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )
    wall = time.monotonic() - start
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    return {"proc": proc, "out": out, "results": results, "wall": wall}


@pytest.mark.slow
def test_dry_run_passes_and_prints_progress(dry_run):
    proc = dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert all(re.match(r"^\[ *\d+\.\ds\] ", line) for line in lines), lines[:5]
    for name in PHASES:
        assert any(f"phase {name}: starting" in line for line in lines)
        assert any(f"phase {name}: passed" in line for line in lines)
    assert "done: passed" in lines[-1]


@pytest.mark.slow
def test_dry_run_results_json(dry_run):
    res = dry_run["results"]
    assert res is not None, dry_run["proc"].stdout[-4000:]
    assert res["mode"] == "dry-run" and res["status"] == "passed" and res["failed_phases"] == []
    assert 0 < res["wall_s"] <= res["time_limit_s"]
    env = res["environment"]
    for key in ("date", "device", "torch", "triton", "torchvision", "cuda_version", "python"):
        assert key in env
    assert list(res["phases"]) == PHASES
    for name, phase in res["phases"].items():
        assert phase["status"] == "passed", (name, phase)
        assert phase["seconds"] > 0 and phase["timeout_s"] >= 5

    out = dry_run["out"]
    for name in PHASES[:4]:  # the test groups: pytest ran, wrote junit and a log
        result = res["phases"][name]["result"]
        assert result["returncode"] == 0
        assert result["counts"]["tests"] >= 1
        assert (out / result["junit"]).is_file() and (out / result["log"]).is_file()
    assert res["phases"]["tests-kernels"]["result"]["counts"]["passed"] >= 2
    # the GPU tests were collected and skipped, not absent
    assert res["phases"]["tests-latency"]["result"]["counts"]["skipped"] >= 1
    assert res["phases"]["tests-parity-gpu"]["result"]["counts"]["skipped"] == 1

    bench = res["phases"]["benchmark"]["result"]
    assert bench["errors"] == [] and bench["skipped"] == []
    rows = {(r["batch"], r["system"]) for r in bench["end_to_end"]}
    assert rows == {(b, s) for b in (1, 2) for s in ("torchvision fp32", "engine fp32", "engine bf16")}
    fp32 = [r for r in bench["end_to_end"] if r["system"] == "engine fp32"]
    assert all(r["agreement"]["matched_fraction"] == 1.0 for r in fp32)  # fp32 is exact parity
    assert set(bench["stages"]["median_s"]) == {"preprocess", "backbone+fpn", "rpn", "box head + detection", "mask head", "paste"}
    assert len(bench["kernels"]) == 4
    assert bench["cuda_graph"]["note"] == "skipped on CPU (CUDA graphs need a GPU)"
    assert bench["job"]["in_process"]["items_per_s"] > 0 and bench["job"]["ray"].startswith("skipped")

    sync = res["phases"]["sync"]["result"]
    assert sync["device"] == "cpu" and len(sync["first_run"]["detections"]) == 2
    assert sync["warn"][0]["status"] == "skipped-on-CPU" and sync["error"]["status"] == "skipped-on-CPU"
    for name in ("benchmark", "sync"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.log").is_file()


@pytest.mark.slow
def test_dry_run_markdown(dry_run):
    text = (dry_run["out"] / "results.md").read_text()
    assert "Overall: **passed**" in text
    for name in PHASES:
        assert f"| {name} | passed |" in text
    assert "vs torchvision" in text and "after backbone+FPN" in text and "| kernel |" in text
    assert "| predict, in-process |" in text
    assert 'set_sync_debug_mode("warn")`: skipped-on-CPU' in text


def test_without_cuda_and_without_dry_run_exits_nonzero(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out)],
        cwd=ROOT, env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no CUDA GPU is available" in proc.stderr and "--dry-run" in proc.stderr
    assert not (out / "results.json").exists()


def test_timeout_interrupts_then_kills(gpu_check, tmp_path):
    lines = []
    start = time.monotonic()
    rc, timed_out, seconds = gpu_check.run_subprocess(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        log_path=tmp_path / "a.log", timeout_s=4, grace_s=2, env=_env(), on_line=lines.append,
    )
    assert timed_out and rc != 0 and seconds < 8 and lines[0] == "started"  # SIGINT ended it
    ignores_sigint = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    rc, timed_out, seconds = gpu_check.run_subprocess(
        [sys.executable, "-c", ignores_sigint], log_path=tmp_path / "b.log", timeout_s=2.5, grace_s=1, env=_env(),
        on_line=lines.append,
    )
    assert timed_out and rc == -9 and seconds < 8  # SIGKILL after the grace period
    assert time.monotonic() - start < 20
    assert (tmp_path / "a.log").read_text().splitlines()[1] == "started"


def test_failed_phase_is_recorded_and_the_next_one_runs(gpu_check, tmp_path, monkeypatch):
    calls = []

    def fake_pytest(name, selection, **kw):
        calls.append(name)
        return {"status": "timeout" if name == "tests-kernels" else "passed", "note": None, "seconds": 1.0, "result": {}}

    def fake_child(name, **kw):
        calls.append(name)
        return {"status": "failed", "note": "boom", "seconds": 1.0, "result": {"errors": [{"section": name, "error": "x"}]}}

    monkeypatch.setattr(gpu_check, "run_pytest_phase", fake_pytest)
    monkeypatch.setattr(gpu_check, "run_child_phase", fake_child)
    assert gpu_check.main(["--dry-run", "--output", str(tmp_path)]) == 1
    assert calls == PHASES
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed" and res["failed_phases"] == ["tests-kernels", "benchmark", "sync"]
    assert "| tests-kernels | timeout |" in (tmp_path / "results.md").read_text()


def test_sync_counting_groups_warnings_by_project_frame(gpu_check, monkeypatch):
    """count_syncs and error_mode on CPU, with torch's sync debug mode stubbed and this file as the project."""
    import torch

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(gpu_check, "PROJECT_DIRS", (str(Path(__file__).parent) + os.sep,))

    def sync_here():
        if modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    class FakePredictor:
        def run(self, images):
            for _ in range(3):
                sync_here()
            sync_here()
            warnings.warn("something else", DeprecationWarning)
            return [[1, 2]] * len(images)

    res = gpu_check.count_syncs(FakePredictor(), ["a", "b"])
    assert modes == ["warn", "default"]
    assert res["syncs"] == 4 and res["batch"] == 2 and res["detections"] == [2, 2]
    assert [loc["count"] for loc in res["locations"]] == [4]
    loc = res["locations"][0]
    assert loc["where"].startswith("tests/test_gpu_check.py:") and loc["where"].endswith("in sync_here")
    assert loc["code"].startswith("warnings.warn(") and "in run" in loc["callers"][0]
    assert len(res["other_warnings"]) == 1 and "something else" in res["other_warnings"][0]

    err = gpu_check.error_mode(FakePredictor(), ["a"])
    assert err["raised"] and err["where"].endswith("in sync_here") and "synchronizing" in err["message"]
    assert modes[-1] == "default"
