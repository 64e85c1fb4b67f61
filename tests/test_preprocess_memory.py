"""Pre-processing of a large image holds one float copy of it at most, and leaves the caller's array alone.

torchvision normalises before it resizes, so the engine needs the whole image in float32 once
(4 bytes a pixel and channel); the normalisation then runs in place. Before, ``(x / 255 - mean) / std``
held three such copies at once (an 8000x6000 photograph: 1.65 GB for a 137 MB input).
"""

import os

import numpy as np
import pytest
import torch

from engine.config import DETECTRON2_MASK_RCNN_R50_FPN, TORCHVISION_MASKRCNN_R50_FPN
from engine.preprocess import normalize_and_resize, preprocess
from fresh_process import run_probe

# Peak resident memory is read from /proc (VmHWM, reset by writing 5 to clear_refs): Linux only.
can_reset_peak = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs to reset the peak RSS"
)

# A fresh interpreter: in a long pytest process freed heap memory would hide the growth.
PEAK_PROBE = """
import json, sys, numpy as np, torch
from engine import config as presets
from engine.preprocess import preprocess

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

config = getattr(presets, sys.argv[1]).replace(channel_order=sys.argv[2])
image = np.random.default_rng(0).integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
preprocess([image[:64, :96]], config=config, device=torch.device("cpu"))  # load the kernels first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = kib("VmRSS")
batch = preprocess([image], config=config, device=torch.device("cpu"))
print(json.dumps({"growth": (kib("VmHWM") - start) * 1024, "float_copy": image.size * 4}))
"""


@can_reset_peak
@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_torchvision_order_holds_one_float_copy(channel_order):
    peak = run_probe(PEAK_PROBE, "TORCHVISION_MASKRCNN_R50_FPN", channel_order)
    # one float copy (and, for BGR, a uint8 one); three copies before the in-place normalisation
    assert peak["growth"] < 1.5 * peak["float_copy"], peak


@pytest.mark.parametrize("config", [TORCHVISION_MASKRCNN_R50_FPN, DETECTRON2_MASK_RCNN_R50_FPN], ids=["torchvision", "detectron2"])
def test_caller_image_untouched(config):
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    before = image.copy()
    preprocess([image], config=config, device=torch.device("cpu"))
    np.testing.assert_array_equal(image, before)


def test_float_image_to_normalize_and_resize_is_copied():
    # the public one-image step converts "to float32": a float32 image must still be copied
    image = torch.rand(37, 53, 3) * 255
    before = image.clone()
    out = normalize_and_resize(image, config=TORCHVISION_MASKRCNN_R50_FPN)
    assert torch.equal(image, before) and out.shape[0] == 3
