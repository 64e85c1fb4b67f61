"""The benchmark script runs end to end on CPU at tiny sizes and reports every section."""

import importlib.util
import json
from pathlib import Path

import pytest

from engine.model import cpu_has_fast_kernels


pytestmark = pytest.mark.slow


BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmark.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


# oneDNN has bf16 kernels only on CPUs with AVX512-BF16 or AMX; elsewhere a bf16 convolution takes a
# reference path (seen on a 2-core AVX2 EPYC: 70 s for one 256-channel 3x3 conv at 2x64x64, against
# 0.17 s in fp32), and a smoke run's bf16 rows would take over an hour.
FAST_BF16 = cpu_has_fast_kernels("bf16")


@pytest.mark.skipif(not FAST_BF16, reason="this CPU has no oneDNN bf16 kernels (no AVX512-BF16 / AMX): "
                    "the smoke run's bf16 row would take over an hour; examples/gpu_check.py --dry-run still runs the benchmark")
def test_benchmark_smoke(tmp_path):
    bench = _load_benchmark()
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--smoke", "--device", "cpu", "--batch-sizes", "2", "--sections", "end_to_end", "profile", "kernels",
                "--profile-presets", "torchvision_maskrcnn_resnet50_fpn", "--json", str(out_json), "--markdown", str(out_md)])
    report = json.loads(out_json.read_text())
    systems = {r["system"] for r in report["end_to_end"]}
    assert systems == {"torchvision fp32", "engine fp32", "engine bf16"}
    fp32 = next(r for r in report["end_to_end"] if r["system"] == "engine fp32")
    assert fp32["agreement"]["matched_fraction"] == 1.0  # fp32 is exact parity
    assert [(r["preset"], r["precision"]) for r in report["profile"]] == [
        ("torchvision_maskrcnn_resnet50_fpn", "fp32"), ("torchvision_maskrcnn_resnet50_fpn", "bf16")]
    assert len(report["kernels"]) == 4
    table = out_md.read_text()
    assert "vs torchvision" in table and "after backbone+FPN" in table


def test_benchmark_job_section_smoke(tmp_path):
    """The predict-job section alone (no torchvision model, no bf16): plain loop, in-process job
    with its time by step, and Ray with one actor when Ray Data is installed."""
    pytest.importorskip("pycocotools")
    bench = _load_benchmark()
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--smoke", "--sections", "job", "--device", "cpu", "--job-ray-workers", "1", "--json", str(out_json), "--markdown", str(out_md)])
    job = json.loads(out_json.read_text())["job"]
    assert job["images"] == 6 and job["plain_loop"]["items_per_s"] > 0 and job["in_process"]["items_per_s"] > 0
    shares = job["in_process"]["share_of_wall"]
    assert set(shares) == {"decode", "waiting_for_decoding", "predict", "encode", "write"}
    assert 0.3 < shares["predict"] <= 1.0
    if importlib.util.find_spec("ray") is not None:
        (run,) = job["ray"]["runs"]
        assert run["workers"] == 1 and run["items_per_s"] > 0 and run["fixed_cost_s"] > 0
    table = out_md.read_text()
    assert "vs plain loop" in table and "predict, in-process" in table and "vs torchvision" not in table


def test_benchmark_profile_section_smoke(tmp_path):
    """The per-stage profile alone, fp32: one row per family preset, every stage timed, and the
    table names each preset (bf16 is left out so that it runs on any CPU)."""
    bench = _load_benchmark()
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--smoke", "--sections", "profile", "--profile-precisions", "fp32", "--stage-batch", "1",
                "--device", "cpu", "--json", str(out_json), "--markdown", str(out_md)])
    rows = json.loads(out_json.read_text())["profile"]
    assert [r["preset"] for r in rows] == list(bench.PROFILE_PRESETS)
    for r in rows:
        assert r["precision"] == "fp32" and r["batch"] == 1
        assert set(r["median_s"]) == {"preprocess", "backbone+fpn", "rpn", "box head + detection", "mask head", "paste"}
        assert all(v > 0 for v in r["median_s"].values())
        assert abs(sum(r["share"].values()) - 1) < 1e-9
    table = out_md.read_text()
    assert all(f"| {name} | fp32 | 1 |" in table for name in bench.PROFILE_PRESETS)


def test_benchmark_peers_and_scaling_sections_smoke(tmp_path):
    """Peers side by side on their own checkpoint files (mmdetection where installed) and the
    engine's scaling tables: every system timed, fp32 agreeing with each peer on every detection."""
    bench = _load_benchmark()
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--smoke", "--sections", "peers", "scaling", "--device", "cpu", "--repeats", "1", "--scaling-batches", "1", "2",
                "--scaling-sizes", "96", "--json", str(out_json), "--markdown", str(out_md)])
    report = json.loads(out_json.read_text())
    bf16 = ["engine bf16"] if FAST_BF16 else []
    untouched_malloc = ["engine fp32, reuse_host_memory=False"] if bench.host_memory.available() else []
    by_peer = {}
    for r in report["peers"]:
        by_peer.setdefault(r["peer"], []).append(r)
    assert set(by_peer) == {"torchvision", "mmdetection"}
    for peer, rows in by_peer.items():
        if "skipped" in rows[0]:
            assert peer == "mmdetection" and importlib.util.find_spec("mmdet") is None
            continue
        assert [r["system"] for r in rows] == [f"{peer} fp32", "engine fp32", *untouched_malloc, "engine fp32, channels_last", "engine fp32, channels_last + folded", *bf16]
        assert all(r["median_s"] > 0 and r["batch"] == 1 for r in rows) and rows[0]["speed_vs_peer"] == 1.0
        assert rows[1]["agreement"]["matched_fraction"] == 1.0  # the fp32 default is parity with the peer
        if untouched_malloc:
            assert rows[2]["agreement"]["matched_fraction"] == 1.0
    scaling = report["scaling"]
    precisions = ["fp32", *(["bf16"] if FAST_BF16 else [])]
    assert [(r["precision"], r["batch"]) for r in scaling["batch"]] == [(p, b) for p in precisions for b in (1, 2)]
    assert [r["min_size"] for r in scaling["size"]] == [96] * len(precisions)
    assert [r["way"] for r in scaling["padding"]][:3] == ["one padded batch", "one batch per padded size (1)", "one image per call"]
    assert [r["threads"] for r in scaling["threads"]] == sorted({1, report["environment"]["torch_threads"]})
    table = out_md.read_text()
    assert "speed vs peer" in table and "a mixed batch run as" in table


def test_benchmark_large_image_section_smoke(tmp_path):
    """One large image per mask format, each in a fresh process: the peak RSS growth is reported
    and covers at least the masks returned (full masks: detections x H x W bytes)."""
    bench = _load_benchmark()
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--smoke", "--sections", "large_image", "--device", "cpu", "--json", str(out_json), "--markdown", str(out_md)])
    rows = json.loads(out_json.read_text())["large_image"]
    if isinstance(rows, str):
        pytest.skip(rows)
    assert [r["mask_format"] for r in rows] == ["full", "box"]
    full, box = rows
    assert full["image"] == [600, 800] and full["input_bytes"] == 600 * 800 * 3
    assert full["mask_bytes"] == full["detections"] * 600 * 800
    assert full["rss_growth_bytes"] >= full["mask_bytes"] and full["cuda_peak_bytes"] is None
    assert box["detections"] == full["detections"] and box["mask_bytes"] <= full["mask_bytes"]
    assert "peak RSS growth MiB" in out_md.read_text()


def test_benchmark_serve_section_smoke(tmp_path):
    """The server started, driven at two concurrencies with batching on and off, both workloads:
    every request answered, a batch size and a latency for each row."""
    pytest.importorskip("starlette", reason="the serve extra")
    pytest.importorskip("httpx")
    bench = _load_benchmark()
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--smoke", "--sections", "serve", "--device", "cpu", "--serve-requests", "4", "--serve-concurrency", "1", "2",
                "--json", str(out_json), "--markdown", str(out_md)])
    report = json.loads(out_json.read_text())["serve"]
    assert set(report["workloads"]) == {"one_size", "mixed"}
    for workload in report["workloads"].values():
        runs = workload["runs"]
        assert [(r["server"], r["concurrency"]) for r in runs] == [("batching", 1), ("batching", 2), ("batching off", 1), ("batching off", 2)]
        assert all(r["errors"] == 0 and r["images_per_s"] > 0 and r["mean_batch"] >= 1 and r["p50_s"] > 0 for r in runs)
        assert all(r["mean_batch"] == 1 for r in runs if r["server"] == "batching off")
    assert "peak server MiB" in out_md.read_text()
