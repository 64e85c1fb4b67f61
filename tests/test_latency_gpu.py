"""GPU latency: each kernel and the fp32 engine against a baseline measured in the same test.

Floors are loose so that noise does not fail them; the real targets live in
``examples/benchmark.py`` and BENCHMARKS.md. Skipped without CUDA.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernel_rows(bench):
    args = bench.parse_args(["--device", "cuda", "--warmup", "3", "--repeats", "15"])
    return {row["kernel"]: row for row in bench.bench_kernels(args, torch.device("cuda"))}


@pytest.mark.parametrize("kernel,baseline", [
    ("RoIAlign 7x7", "MultiScaleRoIAlign"),
    ("RoIAlign 14x14", "MultiScaleRoIAlign"),
    ("paste 100 masks into 800x1200", "torchvision paste_masks_in_image"),
    ("paste 100 masks into 800x1200", "grid_sample paste"),
    ("NMS 5000 boxes, 80 classes", "torchvision batched_nms"),
])
def test_kernel_faster_than_baseline(kernel_rows, kernel, baseline):
    assert kernel_rows[kernel][baseline]["speedup_of_engine"] > 1.0


def test_engine_fp32_no_slower_than_torchvision(bench):
    args = bench.parse_args(["--device", "cuda", "--batch-sizes", "8", "--warmup", "2", "--repeats", "7"])
    from checkpoints import make_torchvision_maskrcnn

    tv = make_torchvision_maskrcnn().cuda().eval()
    state = {k: v.cpu() for k, v in tv.state_dict().items()}
    rows = {r["system"]: r for r in bench.bench_end_to_end(args, tv, state, torch.device("cuda"))}
    assert rows["engine fp32"]["ratio_vs_torchvision"] >= 0.9
