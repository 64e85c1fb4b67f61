"""Host reads in the Triton launchers' own host code (issue 11), counted on CPU.

Each launcher runs its real host path (validation, sorting, tables, allocation, the grid) on
CPU tensors under :class:`host_sync_audit.HostSyncAudit`, with its ``@triton.jit`` kernels
replaced by stand-ins that record the launch and do nothing: the kernels themselves are
compiled for sm_80 / sm_90 in ``tests/test_aot_compile.py`` and run under the interpreter in
the kernel tests. The checks:

- RoIAlign (both modes), both NMS keep masks and the full-plane paste read nothing on the
  host and upload nothing in a blocking way;
- the documented reads are the only ones: ``batched_nms_triton``'s final ``nonzero`` (it
  returns indices, whose number the host must know) and the crop-mode paste's copy of the
  integer boxes to the host, to size the crops (``mask_format="box"``: a second read per run);
- a whole ``Predictor.run`` with every launcher's host code audited (``ENGINE_FORCE_TRITON``)
  makes exactly the one read of a run.
"""

import os

import numpy as np
import pytest
import torch

from host_sync_audit import HostSyncAudit
from tiny import tiny_state_dict

import kernels.nms as nms
import kernels.paste_masks as paste
import kernels.roi_align as roi_align
from engine import Predictor
from engine.config import PRESETS
from kernels import FORCE_TRITON_ENV

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="drives the launchers on CPU tensors (Triton's interpreter mode)"
)

KERNELS = {
    roi_align: ["_multilevel_roi_align_kernel"],
    paste: ["_paste_masks_kernel"],
    nms: ["_nms_suppression_mask_kernel", "_nms_greedy_kernel", "_segmented_nms_mask_kernel", "_segmented_nms_greedy_kernel"],
}


def _zero_pooled(args):  # RoIAlign: defined features, so that the heads give finite scores
    args[4].zero_()


def _keep_every_valid(args):  # segmented greedy pass: keep each segment's valid entries
    counts, keep_sorted = args[1], args[3]
    positions = torch.arange(keep_sorted.shape[1], device=keep_sorted.device)
    keep_sorted.copy_((positions[None, :] < counts[:, None]).to(torch.int8))


#: what a stand-in writes so that the stages after it see plausible data (device ops only)
EFFECTS = {"_multilevel_roi_align_kernel": _zero_pooled, "_segmented_nms_greedy_kernel": _keep_every_valid}


class StandInKernel:
    """``kernel[grid](*args, **kwargs)`` records the launch and runs nothing (or a device-side
    stand-in of its output, :data:`EFFECTS`)."""

    def __init__(self, name: str, launches: list) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert all(isinstance(g, int) for g in grid), f"{self.name}: grid {grid} is not host ints"
            self.launches.append(self.name)
            if self.name in EFFECTS:
                EFFECTS[self.name](args)

        return launch


@pytest.fixture
def launches(monkeypatch):
    recorded: list[str] = []
    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, StandInKernel(name, recorded))
    return recorded


def _features(batch=2, channels=8):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(batch, channels, 64 // 2**i, 80 // 2**i, generator=g) for i in range(4)]


def _rois(n=7, batch=2):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = 4 + torch.rand(n, 2, generator=g) * 100
    return torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(), xy, xy + wh], dim=1)


def _reads(audit):
    return [(r.kind, r.where) for r in audit.report.reads]


@pytest.mark.parametrize("mode", ["roi_align", "crop_and_resize"])
def test_roi_align_launcher_reads_nothing(launches, mode):
    features, rois = _features(), _rois()
    if mode == "crop_and_resize":
        rois = torch.cat([rois[:, :1], rois[:, 1:] / 300.0], dim=1)
    rule = roi_align.LevelRule(canonical_size=224.0, canonical_level=4, min_level=2, max_level=5)
    kwargs = dict(output_size=7, spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=2, aligned=False)
    roi_align.multilevel_roi_align_triton(features, rois, level_rule=rule, mode=mode, **kwargs)  # warm the caches
    launches.clear()
    with HostSyncAudit() as audit:
        out = roi_align.multilevel_roi_align_triton(features, rois, level_rule=rule, mode=mode, **kwargs)
    assert out.shape == (7, 8, 7, 7)
    assert _reads(audit) == [] and launches == ["_multilevel_roi_align_kernel"]


def test_segmented_nms_launcher_reads_nothing(launches):
    g = torch.Generator().manual_seed(2)
    boxes = torch.rand(6, 130, 4, generator=g).cumsum(-1)
    scores, valid = torch.rand(6, 130, generator=g), torch.rand(6, 130, generator=g) > 0.3
    with HostSyncAudit() as audit:
        keep = nms.segmented_nms_keep_triton(boxes, scores, valid, 0.5)
    assert keep.shape == (6, 130) and keep.dtype == torch.bool
    assert _reads(audit) == [] and launches == ["_segmented_nms_mask_kernel", "_segmented_nms_greedy_kernel"]


def test_flat_nms_launchers(launches):
    g = torch.Generator().manual_seed(3)
    boxes = torch.rand(90, 4, generator=g).cumsum(-1)
    scores, groups = torch.rand(90, generator=g), torch.randint(0, 4, (90,), generator=g)
    with HostSyncAudit() as audit:
        nms.batched_nms_keep_triton(boxes, scores, groups, 0.5)
    assert _reads(audit) == [] and launches == ["_nms_suppression_mask_kernel", "_nms_greedy_kernel"]
    with HostSyncAudit() as audit:
        nms.batched_nms_triton(boxes, scores, groups, 0.5)
    assert [kind for kind, _ in _reads(audit)] == ["nonzero"]  # documented: indices need their count


def _paste_inputs():
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(5, 28, 28, generator=g)
    xy = torch.rand(5, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(5, 2, generator=g) * 30], dim=1)
    return masks, boxes, [2, 3], [(60, 70), (50, 45)]


@pytest.mark.parametrize("method", ["torchvision", "grid_sample"])
def test_full_paste_launcher_reads_nothing(launches, method):
    masks, boxes, counts, sizes = _paste_inputs()
    with HostSyncAudit() as audit:
        outs = paste.paste_masks_triton(masks, boxes, counts, sizes, threshold=0.5, method=method)
    assert [tuple(o.shape) for o in outs] == [(2, 60, 70), (3, 50, 45)]
    assert _reads(audit) == [] and launches == ["_paste_masks_kernel"]


def test_crop_paste_launcher_reads_the_box_table_once(launches):
    masks, boxes, counts, sizes = _paste_inputs()
    with HostSyncAudit() as audit:
        paste.paste_masks_triton(masks, boxes, counts, sizes, threshold=0.5, crop=True)
    reads = audit.report.reads
    # sizing the crops needs the boxes on the host: one device -> host copy in _regions; what
    # follows works on that host copy (on a CPU the audit cannot tell host tables from device data)
    assert reads and (reads[0].kind, reads[0].where.split(":")[0]) == ("cpu", "kernels/paste_masks.py")
    assert reads[0].where.endswith("(_regions)"), audit.report.format()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_predictor_run_through_the_launchers_reads_once(launches, monkeypatch, preset):
    # one padded batch for every preset (mmdetection's "by_size" reads once per padded size)
    config = PRESETS[preset].replace(min_size=96, max_size=160, score_threshold=0.0, batch_padding="together")
    if preset == "matterport_mask_rcnn_fpn":
        config = config.replace(min_size=96, max_size=128, rpn_pre_nms_top_n=600, rpn_post_nms_top_n=100)
    predictor = Predictor(tiny_state_dict(), device="cpu", config=config)
    predictor.model.trim_padding = False  # what a CUDA device gets
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=s + (3,), dtype=np.uint8) for s in [(120, 90), (97, 131), (64, 64)]]
    predictor.run(images)  # warm: lazy tables (level thresholds) stay out of the count
    launches.clear()
    with HostSyncAudit() as audit:
        results = predictor.run(images)
    assert len(results) == 3
    reads = audit.report.reads
    assert len(reads) == 1 and any(f.endswith("(padded_to_original_frame)") for f in reads[0].callers), (
        audit.report.format()
    )
    per_kernel = {name: launches.count(name) for name in set(launches)}
    assert per_kernel == {
        "_multilevel_roi_align_kernel": 2,
        "_segmented_nms_mask_kernel": 2,
        "_segmented_nms_greedy_kernel": 2,
        "_paste_masks_kernel": 1,
    }
