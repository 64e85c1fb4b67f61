"""Host reads of device data in ``Predictor.run``, counted on CPU (issue 11).

Each family preset runs the tiny network on a batch under :class:`host_sync_audit.HostSyncAudit`,
with the kernel entry points (RoIAlign, NMS, paste) counted as single launches, in the
configuration a CUDA device gets (``MaskRCNN.trim_padding`` off). The checks:

- exactly one host read per run, whatever the batch size and family: the detections per image,
  read in ``engine.postprocess.padded_to_original_frame`` right before the paste;
- with the CPU's padding trims on, two more reads and nothing else (mmdetection: also the replay
  of its sorts, engine/tie_order.py);
- the kernel launches per stage do not grow with the batch size;
- the auditor itself sees the reads it is meant to see (so the checks above can fail).
"""

import numpy as np
import pytest
import torch

from host_sync_audit import HostSyncAudit
from tiny import tiny_state_dict

from engine import Predictor
from engine.config import PRESETS
from engine.predictor import padded_size_groups

OPAQUE = {
    "engine.model.multilevel_roi_align": "roi_align",
    "engine.rpn.segmented_nms_keep": "nms",
    "engine.roi_heads.segmented_nms_keep": "nms",
    "engine.postprocess.paste_masks": "paste",
}

#: the one read a run may make on CUDA: the counts, read by ``read_counts`` called from here
ALLOWED_READ = ("engine/ragged.py", "(padded_to_original_frame)")
#: the CPU's extra reads (``trim_padding``): the largest count after the RPN and after the detections
TRIM_READS = {"(padded_proposals)": 1, "(padded_detect)": 1}


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    sizes = [(120, 90), (97, 131), (64, 64), (150, 111)]
    return [rng.integers(0, 256, size=sizes[i % len(sizes)] + (3,), dtype=np.uint8) for i in range(count)]


def _predictor(preset: str, precision: str) -> Predictor:
    # one padded batch for every preset ("by_size" runs a batch, and reads once, per padded size)
    config = PRESETS[preset].replace(min_size=96, max_size=160, score_threshold=0.0, batch_padding="together")
    if preset == "matterport_mask_rcnn_fpn":
        config = config.replace(min_size=96, max_size=128, rpn_pre_nms_top_n=600, rpn_post_nms_top_n=100)
    return Predictor(tiny_state_dict(), device="cpu", config=config, precision=precision)


def _audit(predictor: Predictor, images) -> HostSyncAudit:
    predictor.run(images)  # warm: lazy initialisation stays out of the count
    with HostSyncAudit(opaque=OPAQUE) as audit:
        results = predictor.run(images)
    assert len(results) == len(images)
    return audit


@pytest.fixture(scope="module", params=[(p, prec) for p in PRESETS for prec in ("fp32", "bf16")], ids=str)
def audits(request):
    preset, precision = request.param
    predictor = _predictor(preset, precision)
    assert predictor.model.trim_padding  # the CPU default
    trimmed = _audit(predictor, _images(3))
    predictor.model.trim_padding = False  # what a CUDA device gets
    return preset, {n: _audit(predictor, _images(n)) for n in (1, 3)}, trimmed


def _is_allowed(read) -> bool:
    return read.where.startswith(ALLOWED_READ[0]) and any(f.endswith(ALLOWED_READ[1]) for f in read.callers)


def test_one_read_per_run(audits):
    _, by_batch, _ = audits
    for n, audit in by_batch.items():
        reads = audit.report.reads
        assert len(reads) == 1 and _is_allowed(reads[0]), f"batch of {n}:\n" + audit.report.format()


def test_cpu_trims_add_two_reads(audits):
    """On the CPU: the two trims, and for mmdetection (tie_order="torch_sort") the replay of its
    sorts on compacted candidates (engine/tie_order.py), which the CUDA configuration does not do."""
    preset, _, trimmed = audits
    replay = [r for r in trimmed.report.reads if r.where.startswith("engine/tie_order.py")]
    assert bool(replay) == (PRESETS[preset].tie_order == "torch_sort"), trimmed.report.format()
    extra = [r for r in trimmed.report.reads if not _is_allowed(r) and r not in replay]
    found = {name: sum(any(f.endswith(name) for f in r.callers) for r in extra) for name in TRIM_READS}
    assert found == TRIM_READS and len(extra) == sum(TRIM_READS.values()), trimmed.report.format()


def test_launches_per_stage_do_not_grow_with_the_batch(audits):
    _, by_batch, _ = audits
    assert by_batch[1].report.launches == by_batch[3].report.launches
    assert by_batch[3].report.launches == {"roi_align": 2, "nms": 2, "paste": 1}


def test_batch_padding_by_size_reads_once_per_padded_size():
    """mmdetection's default pads each image as alone: one padded batch, and one read, per padded size."""
    predictor = _predictor("mmdet_mask_rcnn_r50_fpn", "fp32")
    predictor = Predictor(tiny_state_dict(), device="cpu", config=predictor.config.replace(batch_padding="by_size"))
    predictor.model.trim_padding = False  # what a CUDA device gets
    images = _images(3)
    images.append(images[0][::-1].copy())  # another image of the first one's size
    groups = padded_size_groups(images, predictor.config)
    assert groups == [[0, 3], [1], [2]]
    reads = _audit(predictor, images).report.reads
    assert len(reads) == len(groups) and all(_is_allowed(r) for r in reads)


def test_the_audit_sees_host_reads():
    x = torch.arange(6.0)
    with HostSyncAudit() as audit:
        _ = x[x > 2]
        _ = torch.nonzero(x)
        _ = float(x[0])
        _ = x.tolist()
        _ = torch.unique(x)
        _ = torch.repeat_interleave(torch.tensor([1, 2]))
        _ = torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # sized: no read
        _ = x.topk(2)  # no read
    kinds = [r.kind for r in audit.report.reads]
    assert kinds == ["bool-mask index", "nonzero", "__float__", "item", "tolist", "unique", "repeat_interleave"]


def test_opaque_calls_are_counted_and_not_audited():
    import engine.ragged as ragged

    with HostSyncAudit(opaque={"engine.ragged.read_counts": "stage"}) as audit:
        assert ragged.read_counts(torch.tensor([2, 3])) == [2, 3]
        ragged.read_counts(torch.tensor([1]))
    assert audit.report.reads == [] and audit.report.launches == {"stage": 2}
    assert ragged.read_counts.__name__ == "read_counts"  # restored
