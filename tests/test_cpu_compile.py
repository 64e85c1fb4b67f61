"""``Predictor(cpu_compile=True)``: the opt-in CPU mode that runs the network parts through
torch.compile gives the eager detections to float32 rounding, over changing input shapes; it is
refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from agreement import assert_runs_agree
from checkpoints import photographs
from engine import Predictor
from engine.config import PRESETS
from engine.predictor import _check_cpu_compile
from tiny import TINY_CONFIG, tiny_state_dict


def _has_cpp_compiler() -> bool:
    try:
        _check_cpu_compile(torch.device("cpu"))
    except RuntimeError:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")


@needs_compiler
def test_compiled_network_gives_the_eager_detections_over_changing_shapes():
    state = tiny_state_dict()
    config = TINY_CONFIG.replace(score_threshold=0.3)
    eager = Predictor(state, device="cpu", config=config)
    compiled = Predictor(state, device="cpu", config=config, cpu_compile=True)
    assert set(compiled.model._compiled) == {"backbone", "rpn_head", "box_outputs", "mask_logits"}
    assert not eager.model._compiled
    photos = photographs(("astronaut", "chelsea", "coffee"))
    # three batches of different padded sizes and detection counts: compiled once per shape, then dynamic
    total = 0
    for batch in ([photos[0]], [photos[1], photos[2]], [photos[2]]):
        total += assert_runs_agree(eager.run(batch), compiled.run(batch), what="eager run", mask_agreement_min=0.999)
    assert total > 0, "no detections: the comparison saw nothing"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_compiled_part_is_one_graph(preset):
    """A graph break would split a part into pieces compiled (and recompiled) apart: the backbone's
    blocks, each with its own shapes, then run past dynamo's recompile limit and fall back to eager."""
    config = PRESETS[preset].replace(min_size=96, max_size=160)
    model = Predictor(tiny_state_dict(), device="cpu", config=config).model
    images = torch.randn(1, 3, 128, 192)
    if model.channels_last(torch.device("cpu")):
        images = images.contiguous(memory_format=torch.channels_last)
    channels = model.spec.fpn_channels
    with torch.inference_mode():
        features = model.backbone(images)
        parts = {
            "backbone": (model.backbone, (images,)),
            "rpn_head": (model.rpn.head, (features,)),
            "box_outputs": (model._box_outputs, (torch.randn(5, channels, config.box_pool_size, config.box_pool_size),)),
            "mask_logits": (
                model._mask_logits,
                (torch.randn(5, channels, config.mask_pool_size, config.mask_pool_size), torch.tensor([1, 0, 2, 1, 1])),
            ),
        }
        for name, (part, example) in parts.items():
            explained = torch._dynamo.explain(part)(*example)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, explained.break_reasons)


def test_cpu_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="cpu_compile must be True or False"):
        Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, cpu_compile=1)


def test_cpu_compile_is_refused_on_cuda():
    with pytest.raises(ValueError, match="cpu_compile=True .* needs device='cpu'; got device='cuda:0'"):
        _check_cpu_compile(torch.device("cuda", 0))


def test_cpu_compile_without_a_compiler_says_so(monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    with pytest.raises(RuntimeError, match="cpu_compile=True needs a C\\+\\+ compiler"):
        Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, cpu_compile=True)
