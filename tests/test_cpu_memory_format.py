"""``cpu_memory_format="channels_last"``: the opt-in CPU layout runs the convolutions
channels-last and gives the NCHW path's detections to float32 rounding; bad values are refused."""

from __future__ import annotations

import pytest
import torch

from agreement import assert_runs_agree
from checkpoints import photographs
from engine import Predictor
from engine.backbone import stem_max_pool
from engine.config import PRESETS
from engine.model import cpu_has_fast_kernels
from tiny import TINY_CONFIG, tiny_state_dict


def test_every_preset_defaults_to_the_frameworks_arithmetic():
    """The PyTorch families run NCHW convolutions and unfolded norms, as their frameworks do (the
    fp32 speed modes change roundings); matterport's framework is TensorFlow, whose NHWC
    convolutions the faster layout is closer to, so its preset runs channels-last and folded."""
    torch_families = {name: p for name, p in PRESETS.items() if not name.startswith("matterport")}
    assert {name: p.cpu_memory_format for name, p in torch_families.items()} == dict.fromkeys(torch_families, "contiguous")
    assert {name: p.fold_batch_norms for name, p in torch_families.items()} == dict.fromkeys(torch_families, False)
    matterport = PRESETS["matterport_mask_rcnn_fpn"]
    assert matterport.cpu_memory_format == "channels_last" and matterport.fold_batch_norms


def test_channels_last_runs_channels_last_and_agrees_with_nchw():
    state = tiny_state_dict()
    config = TINY_CONFIG.replace(score_threshold=0.3)
    nchw = Predictor(state, device="cpu", config=config)
    fast = Predictor(state, device="cpu", config=config.replace(cpu_memory_format="channels_last"))
    conv = fast.model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert not nchw.model.channels_last(torch.device("cpu")) and fast.model.channels_last(torch.device("cpu"))
    images = photographs(("astronaut", "chelsea"))
    batch = fast.preprocess(images)
    with torch.inference_mode():
        features = fast.model.features(batch)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)
    total = assert_runs_agree(nchw.run(images), fast.run(images), what="NCHW path")
    assert total > 0, "no detections: the comparison saw nothing"


def test_reduced_precision_runs_channels_last_on_the_cpu():
    """bf16 is no parity mode, and oneDNN's bf16 kernels want channels-last: whatever the config says."""
    if not cpu_has_fast_kernels("bf16"):
        pytest.skip("no oneDNN bf16 kernels on this CPU: the predictor falls back to fp32")
    fast = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, precision="bf16")
    assert TINY_CONFIG.cpu_memory_format == "contiguous" and fast.model.channels_last(torch.device("cpu"))
    assert fast.model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_bad_memory_format_is_refused():
    with pytest.raises(ValueError, match="cpu_memory_format.*channels_last.*contiguous"):
        TINY_CONFIG.replace(cpu_memory_format="nhwc")


def test_channels_last_is_torchvision_run_channels_last_to_the_bit():
    """The opt-in layout reproduces torchvision's own model run channels-last exactly: the same
    oneDNN kernels, so the same roundings. (Against torchvision in its default NCHW layout it
    differs by float32 rounding: up to 5e-5 in score on a ResNet-50, 4.3e-4 on a ResNet-101, where
    torchvision itself moves by 2.8e-4 between 1 and 2 CPU threads; BENCHMARKS.md.)"""
    from checkpoints import make_torchvision_maskrcnn, to_torchvision_input
    from engine.loading import checkpoint_config
    from weights import load_checkpoint

    tv = make_torchvision_maskrcnn(min_size=320, max_size=533)
    state = {k: v.clone() for k, v in tv.state_dict().items()}
    config = checkpoint_config(load_checkpoint(state)).replace(min_size=320, max_size=533, cpu_memory_format="channels_last")
    images = photographs(("astronaut", "coffee"))
    ours = Predictor(state, device="cpu", config=config).run(images)
    tv = tv.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        theirs = tv([to_torchvision_input(im) for im in images])
    assert sum(len(o) for o in ours) > 0
    for o, t in zip(ours, theirs):
        assert torch.equal(o.boxes, t["boxes"]) and torch.equal(o.scores, t["scores"]) and torch.equal(o.labels, t["labels"])
        assert torch.equal(o.masks, t["masks"][:, 0] > 0.5)


@pytest.mark.parametrize("shape", [(1, 64, 40, 61), (2, 8, 7, 9), (1, 3, 1, 1), (3, 16, 2, 5), (1, 1, 5, 5), (0, 4, 6, 6)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_stem_max_pool_is_the_plain_max_pool_to_the_bit(shape, layout, seed):
    x = torch.randn(shape)
    x[..., ::3, ::4] = float("-inf")
    if x.numel():
        x.view(-1)[:: max(1, x.numel() // 5)] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[:3] + (2 * shape[3],))[..., ::2]
    before = x.clone()
    expected = torch.nn.functional.max_pool2d(x.contiguous(), kernel_size=3, stride=2, padding=1)
    got = stem_max_pool(x)
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    assert torch.equal(got.isnan(), expected.isnan())
    plain = torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    assert got.stride() == plain.stride()  # the layout the plain pool would give
    assert torch.equal(x.nan_to_num(7.0), before.nan_to_num(7.0))
