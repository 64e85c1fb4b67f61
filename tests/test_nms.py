"""NMS reference against torchvision.ops.nms / batched_nms."""

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.nms import batched_nms_reference, nms_reference


def random_boxes(n, *, size=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("n", [0, 1, 2, 17, 300])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(n, threshold):
    boxes = random_boxes(n, seed=n)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n + 1))
    keep = nms_reference(boxes, scores, threshold)
    assert keep.dtype == torch.int64
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.parametrize("n,groups", [(0, 1), (50, 1), (200, 5), (400, 80)])
def test_batched_nms_matches_torchvision(n, groups):
    boxes = random_boxes(n, seed=n)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, groups, (n,), generator=g)
    keep = batched_nms_reference(boxes, scores, idxs, 0.5)
    assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


def test_degenerate_boxes_are_kept_and_never_suppress():
    boxes = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 5, 5], [1, 1, 5, 5]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert nms_reference(boxes, scores, 0.5).tolist() == torchvision.ops.nms(boxes, scores, 0.5).tolist()


def test_inputs_not_modified_and_errors():
    boxes = random_boxes(10)
    scores = torch.rand(10)
    b0, s0 = boxes.clone(), scores.clone()
    nms_reference(boxes, scores, 0.5)
    assert torch.equal(boxes, b0) and torch.equal(scores, s0)
    with pytest.raises(ValueError, match=r"boxes must be a float tensor \[N, 4\]"):
        nms_reference(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match="scores must be a tensor"):
        nms_reference(boxes, scores[:5], 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms_reference(boxes, scores, 1.5)


# --------------------------------------------------------------------------------------
# Triton NMS (interpreter on CPU, compiled on CUDA) against the reference and torchvision
# --------------------------------------------------------------------------------------

import kernels.nms as nms_module  # noqa: E402
from conftest import HAS_CUDA, kernel_devices, requires_cuda  # noqa: E402
from kernels import FORCE_REFERENCE_ENV, FORCE_TRITON_ENV  # noqa: E402
from kernels.nms import _NmsTiles, batched_nms, batched_nms_triton, nms_triton  # noqa: E402

# the interpreter warns on the 0 / 0 IoU of degenerate boxes (NaN, never > threshold)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEVICES = kernel_devices()


def triton_keep(boxes, scores, groups, threshold, device, tiles=None):
    """batched_nms_triton on ``device`` (or with explicit launch tiles); result on the CPU."""
    b, s, g = boxes.to(device), scores.to(device), groups.to(device)
    if tiles is None:
        keep = batched_nms_triton(b, s, g, threshold)
    else:
        flags, by_score = nms_module._keep_flags_by_score_rank(b, s, g, threshold, tiles)
        keep = by_score[torch.nonzero(flags).squeeze(1)]
    assert keep.dtype == torch.int64 and keep.device == b.device
    return keep.cpu()


def check_against_reference(boxes, scores, groups, threshold, device, *, torchvision_too=True, tiles=None):
    keep = triton_keep(boxes, scores, groups, threshold, device, tiles)
    reference = batched_nms_reference(boxes, scores, groups, threshold)
    assert torch.equal(keep, reference), (keep.tolist(), reference.tolist())
    if torchvision_too:
        assert torch.equal(keep, torchvision.ops.batched_nms(boxes.float(), scores, groups, threshold))
    return keep


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 2, 33, 100])
@pytest.mark.parametrize("num_groups", [1, 4])
def test_triton_matches_reference_and_torchvision(device, n, num_groups):
    boxes = random_boxes(n, seed=n)
    g = torch.Generator().manual_seed(n + 7)
    scores = torch.rand(n, generator=g)
    groups = torch.randint(0, num_groups, (n,), generator=g)
    check_against_reference(boxes, scores, groups, 0.5, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_triton_thresholds(device, threshold):
    boxes = random_boxes(100, seed=5, size=60.0)
    scores = torch.rand(100)
    groups = torch.randint(0, 3, (100,))
    check_against_reference(boxes, scores, groups, threshold, device)


@pytest.mark.parametrize("device", DEVICES)
def test_nms_triton_single_group(device):
    boxes = random_boxes(100, seed=11, size=50.0)
    scores = torch.rand(100)
    keep = nms_triton(boxes.to(device), scores.to(device), 0.7).cpu()
    assert torch.equal(keep, nms_reference(boxes, scores, 0.7))
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.7))
    assert nms_triton(boxes[:0].to(device), scores[:0].to(device), 0.7).shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_rpn_like_batch(device):
    """Two images x 5 FPN levels of 60 boxes in one call (group = image * 5 + level), IoU 0.7."""
    boxes = random_boxes(600, seed=21, size=80.0)
    scores = torch.rand(600)
    groups = torch.arange(10).repeat_interleave(60)[torch.randperm(600)]
    check_against_reference(boxes, scores, groups, 0.7, device)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_group_ids_and_singletons(device):
    n = 70
    boxes = random_boxes(n, seed=3, size=40.0)
    scores = torch.rand(n)
    # sparse, negative and interleaved ids, int32; ids 1000 and -5 hold a single box each
    groups = torch.tensor([7, -3, 7, 42] * 17 + [1000, -5], dtype=torch.int32)
    check_against_reference(boxes, scores, groups, 0.5, device, torchvision_too=False)
    assert torch.equal(
        triton_keep(boxes, scores, groups, 0.5, device),
        torchvision.ops.batched_nms(boxes, scores, groups.long(), 0.5),
    )
    # every box alone in its group: nothing is suppressed, all come back by score
    alone = torch.arange(n)
    keep = check_against_reference(boxes, scores, alone, 0.5, device)
    assert torch.equal(keep, torch.sort(scores, descending=True, stable=True).indices)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_identical_boxes(device):
    boxes = torch.tensor([[10.0, 10, 30, 40]]).repeat(40, 1)
    distinct = torch.rand(40)
    tied = torch.full((40,), 0.5)
    one_group = torch.zeros(40, dtype=torch.int64)
    two_groups = torch.arange(40) % 2
    assert check_against_reference(boxes, distinct, one_group, 0.5, device).tolist() == [int(distinct.argmax())]
    assert triton_keep(boxes, tied, one_group, 0.5, device).tolist() == [0]
    assert triton_keep(boxes, tied, two_groups, 0.5, device).tolist() == [0, 1]
    check_against_reference(boxes, tied, two_groups, 0.5, device, torchvision_too=False)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_tied_scores_follow_input_order(device):
    boxes = random_boxes(100, seed=8, size=40.0)
    scores = torch.randint(0, 4, (100,)).float() / 4  # many exact ties
    groups = torch.randint(0, 3, (100,))
    check_against_reference(boxes, scores, groups, 0.5, device, torchvision_too=False)
    check_against_reference(boxes, scores, torch.zeros(100, dtype=torch.int64), 0.3, device, torchvision_too=False)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_degenerate_boxes(device):
    boxes = torch.tensor(
        [
            [0.0, 0, 0, 0],  # point
            [0, 0, 0, 0],
            [1, 1, 5, 1],  # zero height
            [1, 1, 1, 5],  # zero width
            [5, 5, 1, 1],  # inverted
            [1, 1, 5, 5],
            [1, 1, 5, 5],
            [2, 2, 5, 5],
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.95, 0.85, 0.99, 0.7, 0.6, 0.65])
    groups = torch.zeros(8, dtype=torch.int64)
    keep = check_against_reference(boxes, scores, groups, 0.5, device)
    assert sorted(keep.tolist()) == [0, 1, 2, 3, 4, 5]  # only the real boxes suppress each other
    # NaN and infinite coordinates: never suppress, never suppressed (IoU is NaN), as in the reference
    odd = torch.tensor(
        [[float("nan"), 0, 4, 4], [0, 0, 4, 4], [0, 0, float("inf"), 4], [0, 0, 4, float("nan")], [0, 0, 4, 4.5]]
    )
    check_against_reference(odd, torch.rand(5), torch.zeros(5, dtype=torch.int64), 0.5, device, torchvision_too=False)


def _pairs_with_float32_iou(target: torch.Tensor, count: int, seed: int):
    """Boxes (A, B) with B inside A horizontally, whose float32 IoU (reference arithmetic) == target."""
    g = torch.Generator().manual_seed(seed)
    m = 20000
    x1, y1 = torch.rand(m, generator=g) * 50, torch.rand(m, generator=g) * 50
    w, h = 1 + torch.rand(m, generator=g) * 30, 1 + torch.rand(m, generator=g) * 30
    s = 0.5 + (torch.rand(m, generator=g) - 0.5) * 1e-6
    a = torch.stack([x1, y1, x1 + w, y1 + h], 1)
    b = torch.stack([x1, y1, x1 + w * s, y1 + h], 1)

    def area(t):
        return (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])

    inter = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0) * (
        torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])
    ).clamp(min=0)
    iou = inter / (area(a) + area(b) - inter)
    hit = torch.nonzero(iou == target).flatten()[:count]
    assert hit.numel() == count
    return a[hit], b[hit]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_iou_exactly_at_threshold(device):
    half = torch.tensor(0.5)
    above = torch.nextafter(half, torch.tensor(1.0))
    below = torch.nextafter(half, torch.tensor(0.0))
    pairs = [_pairs_with_float32_iou(t, 8, seed) for seed, t in enumerate((half, above, below))]
    # exact small constructions: intersection 1, union 2; intersection 2, union 4 (shifted, scaled)
    exact_a = torch.tensor([[0.0, 0, 2, 1], [10.5, 20.25, 14.5, 21.25]])
    exact_b = torch.tensor([[0.0, 0, 1, 1], [11.5, 20.25, 13.5, 21.25]])
    a = torch.cat([p[0] for p in pairs] + [exact_a])
    b = torch.cat([p[1] for p in pairs] + [exact_b])
    k = a.shape[0]
    boxes = torch.cat([a, b])
    scores = torch.cat([torch.full((k,), 0.9), torch.full((k,), 0.8)])
    groups = torch.cat([torch.arange(k), torch.arange(k)])  # one group per pair
    # (torchvision.ops.batched_nms offsets the boxes by group, which moves these IoUs; plain nms per pair does not)
    keep = check_against_reference(boxes, scores, groups, 0.5, device, torchvision_too=False)
    suppressed = sorted(set(range(2 * k)) - set(keep.tolist()))
    assert suppressed == [k + i for i in range(8, 16)]  # only the pairs with IoU just above 0.5
    for i in range(k):
        pair_keep = torchvision.ops.nms(torch.stack([a[i], b[i]]), torch.tensor([0.9, 0.8]), 0.5)
        assert pair_keep.tolist() == ([0] if k + i in suppressed else [0, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_triton_threshold_compared_in_float32(device):
    """IoU == float32(0.3) > 0.3: kept, like the reference (and torchvision's CUDA kernel)."""
    boxes = torch.tensor([[0.0, 0, 6, 1], [3, 0, 10, 1]])  # intersection 3, union 10
    scores = torch.tensor([0.9, 0.8])
    groups = torch.zeros(2, dtype=torch.int64)
    assert triton_keep(boxes, scores, groups, 0.3, device).tolist() == [0, 1]
    assert batched_nms_reference(boxes, scores, groups, 0.3).tolist() == [0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_other_dtypes_and_layouts(device):
    boxes = random_boxes(60, seed=4, size=40.0)
    scores = torch.rand(60)
    groups = torch.randint(0, 2, (60,))
    check_against_reference(boxes.double(), scores.double(), groups, 0.5, device, torchvision_too=False)
    check_against_reference(boxes.half(), scores.half(), groups, 0.5, device, torchvision_too=False)
    strided = torch.cat([boxes, boxes], 1)[:, ::2]  # non-contiguous [N, 4]
    check_against_reference(strided, scores, groups, 0.5, device, torchvision_too=False)


_TEST_TILES = [
    nms_module._CUDA_TILES,
    _NmsTiles(block_rows=32, block_words=2, segments_per_program=2, propagate_words=1, mask_warps=4),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles", _TEST_TILES, ids=["cuda-tiles", "small-tiles"])
def test_triton_launch_shapes(device, tiles):
    """Other tile shapes than the device's default (the GPU ones under the interpreter too),
    with a 200-box group spanning 4 words (propagation over several words) beside small groups."""
    boxes = random_boxes(260, seed=9, size=70.0)
    scores = torch.rand(260)
    groups = torch.cat([torch.zeros(200, dtype=torch.int64), torch.randint(1, 6, (60,))])[torch.randperm(260)]
    check_against_reference(boxes, scores, groups, 0.5, device, tiles=tiles)
    check_against_reference(boxes[:3], scores[:3], groups[:3], 0.5, device, tiles=tiles)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_inputs_unmodified(device):
    boxes = random_boxes(50, seed=2).to(device)
    scores = torch.rand(50).to(device)
    groups = torch.randint(0, 3, (50,)).to(device)
    copies = [t.clone() for t in (boxes, scores, groups)]
    batched_nms_triton(boxes, scores, groups, 0.5)
    nms_triton(boxes, scores, 0.5)
    for t, c in zip((boxes, scores, groups), copies):
        assert torch.equal(t, c)


def test_triton_input_errors(monkeypatch):
    boxes = random_boxes(10)
    scores = torch.rand(10)
    groups = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"boxes must be a float tensor \[N, 4\]"):
        batched_nms_triton(boxes[:, :3], scores, groups, 0.5)
    with pytest.raises(ValueError, match="scores must be a tensor"):
        batched_nms_triton(boxes, scores[:5], groups, 0.5)
    with pytest.raises(ValueError, match="groups must be a tensor"):
        batched_nms_triton(boxes, scores, groups[:5], 0.5)
    with pytest.raises(TypeError, match="boxes must be floating point"):
        nms_triton(boxes.long(), scores, 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms_triton(boxes, scores, -0.1)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="must share a device"):
            batched_nms_triton(boxes.cuda(), scores.cuda(), groups, 0.5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        batched_nms_triton(boxes, scores, groups, 0.5)


def test_dispatcher_picks_triton_only_for_cuda_or_when_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(nms_module, "batched_nms_triton", lambda *a: calls.append("triton") or "triton")
    monkeypatch.setattr(nms_module, "batched_nms_reference", lambda *a: calls.append("reference") or "reference")
    monkeypatch.delenv(FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.delenv(FORCE_TRITON_ENV, raising=False)
    boxes, scores, groups = random_boxes(4), torch.rand(4), torch.zeros(4, dtype=torch.int64)
    assert batched_nms(boxes, scores, groups, 0.5) == "reference"
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    assert batched_nms(boxes, scores, groups, 0.5) == "triton"
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    assert batched_nms(boxes, scores, groups, 0.5) == "reference"
    if HAS_CUDA:
        assert batched_nms(boxes.cuda(), scores.cuda(), groups.cuda(), 0.5) == "reference"
        monkeypatch.delenv(FORCE_REFERENCE_ENV)
        monkeypatch.delenv(FORCE_TRITON_ENV)
        assert batched_nms(boxes.cuda(), scores.cuda(), groups.cuda(), 0.5) == "triton"


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs Triton's interpreter")
def test_dispatcher_forced_triton_on_cpu_equals_reference(monkeypatch):
    monkeypatch.delenv(FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    boxes = random_boxes(80, seed=6, size=50.0)
    scores = torch.rand(80)
    groups = torch.randint(0, 4, (80,))
    assert torch.equal(batched_nms(boxes, scores, groups, 0.5), batched_nms_reference(boxes, scores, groups, 0.5))


@requires_cuda
def test_dispatcher_cuda_runs_triton_and_matches():
    boxes = random_boxes(300, seed=12).cuda()
    scores = torch.rand(300).cuda()
    groups = torch.randint(0, 5, (300,)).cuda()
    keep = batched_nms(boxes, scores, groups, 0.5)
    assert keep.is_cuda
    assert torch.equal(keep.cpu(), batched_nms_reference(boxes.cpu(), scores.cpu(), groups.cpu(), 0.5))


# --------------------------------------------------------------------------------------
# Keep-mask form (fixed size, no host read): the pipeline's NMS
# --------------------------------------------------------------------------------------

from kernels.nms import batched_nms_keep, batched_nms_keep_reference, batched_nms_keep_triton  # noqa: E402


def _expected_mask(boxes, scores, groups, threshold):
    mask = torch.zeros(boxes.shape[0], dtype=torch.bool)
    mask[torchvision.ops.batched_nms(boxes.float(), scores, groups, threshold)] = True
    return mask


@pytest.mark.parametrize("n,num_groups", [(0, 1), (1, 1), (37, 1), (100, 5), (130, 2)])
def test_keep_mask_reference_matches_torchvision(n, num_groups):
    g = torch.Generator().manual_seed(n)
    boxes = random_boxes(n, seed=n)
    scores = torch.rand(n, generator=g)
    groups = torch.randint(0, num_groups, (n,), generator=g)
    keep = batched_nms_keep_reference(boxes, scores, groups, 0.5)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    assert torch.equal(keep, _expected_mask(boxes, scores, groups, 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,num_groups", [(0, 1), (1, 1), (65, 3), (100, 5)])
def test_keep_mask_triton_matches_reference(device, n, num_groups):
    g = torch.Generator().manual_seed(n + 3)
    boxes = random_boxes(n, seed=n + 1)
    scores = torch.rand(n, generator=g)
    scores[: n // 4] = 0.5  # ties keep input order
    groups = torch.randint(0, num_groups, (n,), generator=g)
    keep = batched_nms_keep_triton(boxes.to(device), scores.to(device), groups.to(device), 0.6)
    assert keep.dtype == torch.bool and keep.device.type == device
    assert torch.equal(keep.cpu(), batched_nms_keep_reference(boxes, scores, groups, 0.6))


def test_keep_mask_dispatcher_uses_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(FORCE_TRITON_ENV, raising=False)
    boxes = random_boxes(20, seed=2)
    scores = torch.rand(20)
    groups = torch.zeros(20, dtype=torch.int64)
    assert torch.equal(batched_nms_keep(boxes, scores, groups, 0.5), batched_nms_keep_reference(boxes, scores, groups, 0.5))


# --------------------------------------------------------------------------------------
# Segmented NMS (fixed-size segments with validity masks)
# --------------------------------------------------------------------------------------

from kernels.nms import segmented_nms_keep, segmented_nms_keep_reference, segmented_nms_keep_triton  # noqa: E402


def segmented_case(num_segments, size, *, seed, valid_fraction=0.7, tie=False):
    """Clustered boxes (so that NMS suppresses), scores with optional ties, a random validity mask."""
    g = torch.Generator().manual_seed(seed)
    n = num_segments * size
    centres = torch.rand(max(n // 6, 1), 2, generator=g) * 60
    pick = torch.randint(0, len(centres), (n,), generator=g)
    xy = centres[pick] + torch.randn(n, 2, generator=g) * 3
    wh = 8 + torch.rand(n, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + wh], 1).view(num_segments, size, 4)
    scores = torch.rand(num_segments, size, generator=g)
    if tie:
        scores = (scores * 4).floor() / 4  # four distinct values: many ties
    valid = torch.rand(num_segments, size, generator=g) < valid_fraction
    return boxes, scores, valid


def segments_by_torchvision(boxes, scores, valid, threshold):
    """Oracle: torchvision's batched_nms over the valid entries, segment index as group."""
    num_segments, size = scores.shape
    index = torch.nonzero(valid.reshape(-1)).squeeze(1)
    kept = torchvision.ops.batched_nms(
        boxes.reshape(-1, 4)[index], scores.reshape(-1)[index], index // size, threshold
    )
    keep = torch.zeros(num_segments * size, dtype=torch.bool)
    keep[index[kept]] = True
    return keep.view(num_segments, size)


@pytest.mark.parametrize(
    "num_segments,size", [(0, 5), (3, 0), (1, 1), (4, 17), (2, 64), (3, 65), (5, 130)], ids=str
)
@pytest.mark.parametrize("tie", [False, True], ids=["distinct", "ties"])
def test_segmented_reference_matches_torchvision(num_segments, size, tie):
    boxes, scores, valid = segmented_case(num_segments, size, seed=size + num_segments, tie=tie)
    keep = segmented_nms_keep_reference(boxes, scores, valid, 0.5)
    assert keep.dtype == torch.bool and keep.shape == (num_segments, size)
    assert torch.equal(keep, segments_by_torchvision(boxes, scores, valid, 0.5))
    assert not (keep & ~valid).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "num_segments,size,valid_fraction",
    [(1, 1, 1.0), (3, 17, 0.7), (2, 65, 0.9), (2, 130, 0.8), (3, 40, 0.0), (1, 70, 1.0)],
    ids=str,
)
@pytest.mark.parametrize("tie", [False, True], ids=["distinct", "ties"])
def test_segmented_triton_matches_reference(device, num_segments, size, valid_fraction, tie):
    boxes, scores, valid = segmented_case(num_segments, size, seed=7 * size, valid_fraction=valid_fraction, tie=tie)
    copies = boxes.clone(), scores.clone(), valid.clone()
    keep = segmented_nms_keep_triton(boxes.to(device), scores.to(device), valid.to(device), 0.5).cpu()
    assert torch.equal(keep, segmented_nms_keep_reference(boxes, scores, valid, 0.5))
    assert all(torch.equal(a, b) for a, b in zip((boxes, scores, valid), copies))


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_triton_invalid_entries_never_suppress(device):
    """An invalid box with the top score over a valid one: the valid one stays."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]])
    scores = torch.tensor([[0.9, 0.5, 0.4]])
    valid = torch.tensor([[False, True, True]])
    keep = segmented_nms_keep_triton(boxes.to(device), scores.to(device), valid.to(device), 0.5).cpu()
    assert keep.tolist() == [[False, True, False]]


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_triton_empty_and_degenerate(device):
    assert segmented_nms_keep_triton(torch.zeros(0, 4, 4), torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), 0.5).shape == (0, 4)
    boxes = torch.tensor([[[0.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 5, 5]]])
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    keep = segmented_nms_keep_triton(boxes.to(device), scores.to(device), valid.to(device), 0.5).cpu()
    assert torch.equal(keep, segmented_nms_keep_reference(boxes, scores, valid, 0.5))
    assert keep.tolist() == [[True, True, True]]


def test_segmented_input_errors():
    boxes, scores, valid = segmented_case(2, 5, seed=0)
    with pytest.raises(ValueError, match=r"boxes must be a float tensor \[G, S, 4\]"):
        segmented_nms_keep_reference(boxes[..., :3], scores, valid, 0.5)
    with pytest.raises(ValueError, match=r"scores must be a tensor \[G, S\]"):
        segmented_nms_keep_reference(boxes, scores[:, :3], valid, 0.5)
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        segmented_nms_keep_reference(boxes, scores, valid.int(), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        segmented_nms_keep(boxes, scores, valid, -0.1)


def test_segmented_dispatcher_uses_the_cpu_path_on_cpu(monkeypatch):
    monkeypatch.delenv(FORCE_TRITON_ENV, raising=False)
    monkeypatch.delenv(FORCE_REFERENCE_ENV, raising=False)
    boxes, scores, valid = segmented_case(2, 9, seed=3)
    expected = segmented_nms_keep_reference(boxes, scores, valid, 0.5)
    called = []
    monkeypatch.setattr(nms_module, "segmented_nms_keep_triton", lambda *a: called.append("triton"))
    monkeypatch.setattr(nms_module, "segmented_nms_keep_reference", lambda *a: called.append("reference"))
    assert torch.equal(segmented_nms_keep(boxes, scores, valid, 0.5), expected)
    assert not called
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    segmented_nms_keep(boxes, scores, valid, 0.5)
    assert called == ["reference"]


# --- the CPU path: the reference's keep mask, bit for bit --------------------------------------

from kernels.nms import segmented_nms_keep_cpu  # noqa: E402


@pytest.mark.parametrize(
    "num_segments,size", [(0, 5), (3, 0), (1, 1), (4, 17), (2, 64), (3, 65), (5, 130), (1, 1500)], ids=str
)
@pytest.mark.parametrize("tie", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_segmented_cpu_path_equals_reference(num_segments, size, tie, threshold):
    boxes, scores, valid = segmented_case(num_segments, size, seed=3 * size + num_segments, tie=tie)
    copies = boxes.clone(), scores.clone(), valid.clone()
    keep = segmented_nms_keep_cpu(boxes, scores, valid, threshold)
    assert keep.dtype == torch.bool and keep.shape == (num_segments, size) and keep.device == boxes.device
    assert torch.equal(keep, segmented_nms_keep_reference(boxes, scores, valid, threshold))
    assert all(torch.equal(a, b) for a, b in zip((boxes, scores, valid), copies))


def test_segmented_cpu_path_degenerate_identical_and_invalid_boxes():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 9], [5, 5, 5, 9], [3, 3, 1, 1], [0, 0, 10, 10]]])
    scores = torch.tensor([[0.9, 0.8, 0.95, 0.95, 0.99, 1.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    keep = segmented_nms_keep_cpu(boxes, scores, valid, 0.5)
    # the invalid top box suppresses nothing, degenerate boxes are kept and suppress nothing
    assert keep.tolist() == [[True, False, True, True, True, False]]
    assert torch.equal(keep, segmented_nms_keep_reference(boxes, scores, valid, 0.5))


def test_segmented_cpu_path_threshold_compared_in_float32():
    """IoU == float32(0.3) (which rounds 0.3 upwards) is not above the threshold: both kept."""
    boxes = torch.tensor([[[0.0, 0, 6, 1], [3, 0, 10, 1]]])  # intersection 3, union 10
    scores = torch.tensor([[0.9, 0.8]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    keep = segmented_nms_keep_cpu(boxes, scores, valid, 0.3)
    assert keep.tolist() == [[True, True]]
    assert torch.equal(keep, segmented_nms_keep_reference(boxes, scores, valid, 0.3))


@settings(max_examples=60, deadline=None)
@given(
    num_segments=st.integers(0, 3),
    size=st.integers(0, 40),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 1.0]),
    data=st.data(),
)
def test_segmented_cpu_path_property(num_segments, size, threshold, data):
    """Any boxes on a coarse grid (so that equal coordinates, zero areas and exact ties are
    common), any validity mask, any scores with ties: the CPU path equals the reference."""
    n = num_segments * size
    coords = data.draw(st.lists(st.integers(0, 8), min_size=4 * n, max_size=4 * n))
    ranks = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    flags = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    boxes = torch.tensor(coords, dtype=torch.float32).view(num_segments, size, 4)
    boxes[..., 2:] += boxes[..., :2] * 0.5  # mostly proper boxes, some degenerate
    scores = torch.tensor(ranks, dtype=torch.float32).view(num_segments, size) / 4
    valid = torch.tensor(flags, dtype=torch.bool).view(num_segments, size)
    assert torch.equal(
        segmented_nms_keep_cpu(boxes, scores, valid, threshold), segmented_nms_keep_reference(boxes, scores, valid, threshold)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles", _TEST_TILES, ids=["cuda-tiles", "small-tiles"])
def test_segmented_triton_launch_shapes(device, tiles):
    boxes, scores, valid = segmented_case(3, 150, seed=11, valid_fraction=0.9)
    keep = nms_module._segmented_keep(boxes.to(device), scores.to(device), valid.to(device), 0.5, tiles).cpu()
    assert torch.equal(keep, segmented_nms_keep_reference(boxes, scores, valid, 0.5))
