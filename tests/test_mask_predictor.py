"""MaskPredictor.selected_logits (the deconvolution as one matrix product, the logits of the RoI's
own class only) against the module's own forward pass computed in float64."""

from __future__ import annotations

import pytest
import torch

from engine.roi_heads import MaskPredictor

# largest |difference| from the float64 forward pass, relative to the largest |logit|
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


def _predictor(in_channels: int, channels: int, num_classes: int) -> MaskPredictor:
    predictor = MaskPredictor(in_channels=in_channels, channels=channels, num_mask_classes=num_classes)
    with torch.no_grad():
        for parameter in predictor.parameters():
            parameter.normal_(0.0, 0.1)
    return predictor.eval()


@pytest.mark.parametrize(
    ("rois", "in_channels", "channels", "height", "width", "num_classes"),
    [
        (5, 16, 16, 14, 14, 7),  # the usual square
        (3, 8, 12, 5, 9, 4),  # odd, non-square sizes; in and out widths differ
        (1, 4, 4, 1, 1, 1),  # one pixel, one class
        (0, 8, 8, 14, 14, 3),  # no RoI
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_selected_logits_equal_the_forward_pass_of_each_label(rois, in_channels, channels, height, width, num_classes, channels_last):
    predictor = _predictor(in_channels, channels, num_classes)
    x = torch.randn(rois, in_channels, height, width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (rois,))
    before = x.clone()
    with torch.no_grad():
        ours = predictor.selected_logits(x, labels)
        exact = predictor.double()(x.double())[torch.arange(rois), labels]
    assert ours.shape == (rois, 2 * height, 2 * width) and ours.dtype == torch.float32
    assert torch.equal(x, before)
    if rois:
        scale = max(exact.abs().max().item(), 1.0)
        assert (ours.double() - exact).abs().max().item() <= TOLERANCE[torch.float32] * scale


def test_selected_logits_under_bf16_autocast():
    predictor = _predictor(32, 32, 5)
    x = torch.randn(6, 32, 14, 14)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = predictor.selected_logits(x, labels)
    with torch.no_grad():
        exact = predictor.double()(x.double())[torch.arange(6), labels]
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - exact).abs().max().item() <= TOLERANCE[torch.bfloat16] * max(exact.abs().max().item(), 1.0)


def test_each_output_pixel_comes_from_its_own_input_pixel():
    """A single non-zero input pixel (h, w) changes only the output block rows 2h..2h+1, columns
    2w..2w+1: the reshape puts every product where the transposed convolution puts it."""
    predictor = _predictor(4, 4, 2)
    with torch.no_grad():
        zero = predictor.selected_logits(torch.zeros(1, 4, 3, 5), torch.tensor([1]))
        x = torch.zeros(1, 4, 3, 5)
        x[0, :, 1, 3] = 5.0
        changed = (predictor.selected_logits(x, torch.tensor([1])) != zero)[0]
    assert changed[2:4, 6:8].all()
    changed[2:4, 6:8] = False
    assert not changed.any()
