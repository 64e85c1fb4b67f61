"""Predictor behaviour on the tiny network: input forms, empty results, thresholds, bad input."""

import numpy as np
import pytest
import torch

from engine import Predictor
from engine.model import cpu_has_fast_kernels
from tiny import TINY_CONFIG, tiny_state_dict


@pytest.fixture(scope="module")
def predictor():
    return Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)


def image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def check_result(r, hw):
    n = len(r)
    assert r.boxes.shape == (n, 4) and r.boxes.dtype == torch.float32
    assert r.scores.shape == (n,) and r.scores.dtype == torch.float32
    assert r.labels.shape == (n,) and r.labels.dtype == torch.int64
    assert r.masks.shape == (n,) + hw and r.masks.dtype == torch.bool
    assert r.image_size == hw
    assert torch.all(r.scores[:-1] >= r.scores[1:])


def test_mixed_sizes_batch(predictor):
    images = [image(60, 80), image(97, 45, 1), image(33, 33, 2)]
    before = [im.copy() for im in images]
    results = predictor.run(images)
    assert len(results) == 3
    for r, im in zip(results, images):
        check_result(r, im.shape[:2])
    assert sum(len(r) for r in results) > 0, "the tiny checkpoint should detect something"
    for a, b in zip(before, images):
        np.testing.assert_array_equal(a, b)


def test_single_array_and_batch_agree(predictor):
    im = image(70, 50, 3)
    single = predictor.run(im)
    assert len(single) == 1
    batched = predictor.run([im])[0]
    torch.testing.assert_close(single[0].boxes, batched.boxes)


def test_non_contiguous_input(predictor):
    im = image(64, 48, 4)
    flipped = im[:, ::-1]
    r1 = predictor.run([flipped])[0]
    r2 = predictor.run([np.ascontiguousarray(flipped)])[0]
    torch.testing.assert_close(r1.boxes, r2.boxes)


def test_empty_list(predictor):
    assert predictor.run([]) == []
    assert Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG.replace(batch_padding="by_size")).run([]) == []


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.boxes, b.boxes), (a.scores, b.scores), (a.labels, b.labels), (a.masks, b.masks)))


@pytest.mark.parametrize("sizes", [[(60, 80)], [(60, 80), (97, 45), (61, 79)], [(97, 45), (60, 80), (33, 33), (96, 44)]], ids=len)
def test_batch_padding_by_size_gives_each_image_its_result_alone(sizes):
    """``batch_padding="by_size"``: one padded batch per padded size, results in the input order,
    each what the image gives alone; "together" pads everything to the largest image."""
    from engine.predictor import padded_size_groups

    images = [image(h, w, i) for i, (h, w) in enumerate(sizes)]
    by_size = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG.replace(batch_padding="by_size", score_threshold=0.0))
    groups = padded_size_groups(images, by_size.config)
    assert sorted(i for g in groups for i in g) == list(range(len(images)))
    for group in groups:  # every image gets the very input tensor it gets alone
        batch = by_size.preprocess([images[i] for i in group]).tensor
        for row, i in enumerate(group):
            assert torch.equal(batch[row], by_size.preprocess([images[i]]).tensor[0])
    results = by_size.run(images)
    assert [r.image_size for r in results] == [im.shape[:2] for im in images]
    assert sum(len(r) for r in results) > 0
    for im, r in zip(images, results):
        # the same result; bit for bit only where the CPU's convolutions do not depend on the
        # batch size (oneDNN does here at 16 channels, by ~1e-7)
        alone = by_size.run([im])[0]
        assert len(r) == len(alone) and torch.equal(r.labels, alone.labels)
        torch.testing.assert_close(r.scores, alone.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(r.boxes, alone.boxes, rtol=0, atol=1e-3)
    together = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG.replace(score_threshold=0.0)).run(images)
    if len(groups) == 1:
        assert all(_same(a, b) for a, b in zip(together, results))
    else:  # padding the small images to the largest changes their features
        assert not all(_same(a, b) for a, b in zip(together, results))


def test_bad_batch_padding_is_refused():
    with pytest.raises(ValueError, match="batch_padding='largest' is not supported; accepted: 'together', 'by_size'"):
        TINY_CONFIG.replace(batch_padding="largest")


def test_zero_detections_are_well_formed():
    p = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, score_threshold=1.0)
    results = p.run([image(40, 50), image(20, 30, 1)])
    for r, hw in zip(results, [(40, 50), (20, 30)]):
        assert len(r) == 0
        check_result(r, hw)


def test_threshold_overrides():
    p = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, detections_per_image=3, mask_threshold=0.9, nms_threshold=0.3)
    assert p.config.detections_per_image == 3 and p.config.mask_threshold == 0.9 and p.config.nms_threshold == 0.3
    assert all(len(r) <= 3 for r in p.run([image(60, 60)]))
    with pytest.raises(ValueError, match="score_threshold must lie in"):
        Predictor(tiny_state_dict(), device="cpu", score_threshold=2.0)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (b"not an image", TypeError, "bytes"),
        ("no/such/file.png", FileNotFoundError, "no/such/file.png"),  # a str is a path (tests/test_api.py)
        ([np.zeros((10, 10, 2), np.uint8)], ValueError, "channels"),
        ([np.zeros((0, 10, 3), np.uint8)], ValueError, "at least 1"),
        ([np.full((4, 4, 3), np.nan, np.float32)], ValueError, "NaN"),
    ],
)
def test_bad_input(predictor, bad, exc, match):
    with pytest.raises(exc, match=match):
        predictor.run(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Predictor(tiny_state_dict(), device="cuda")


def test_bad_device():
    with pytest.raises(ValueError, match="device must be"):
        Predictor(tiny_state_dict(), device="tpu")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_mode(precision):
    """Fast mode runs the network in reduced precision; its features stay close to fp32's."""
    if not cpu_has_fast_kernels(precision):
        pytest.skip(f"no oneDNN {precision} kernels on this CPU: the predictor falls back to fp32")
    images = [image(60, 80), image(47, 33, 1)]
    exact = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)
    fast = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, precision=precision)
    batch = exact.preprocess(images)
    with torch.inference_mode():
        f32 = exact.model.features(batch)
        low = fast.model.features(batch)
    assert low[0].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    for a, b in zip(f32, low):
        assert (b.float() - a).abs().max() <= 0.05 * a.abs().max() + 1e-3
    for r, im in zip(fast.run(images), images):
        check_result(r, im.shape[:2])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_without_cpu_kernels_warns_and_runs_fp32(precision, monkeypatch):
    import engine.predictor

    monkeypatch.setattr(engine.predictor, "cpu_has_fast_kernels", lambda p: p == "fp32")
    with pytest.warns(RuntimeWarning, match=f"no oneDNN {precision} kernels.*running fp32 instead"):
        fast = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, precision=precision)
    exact = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)
    assert fast.model.precision == "fp32"
    images = [image(60, 80)]
    (a,), (b,) = exact.run(images), fast.run(images)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def test_batch_norms_fold_into_convolutions_in_reduced_precision():
    """bf16 / fp16 fold every frozen batch norm into the convolution before it, and fp32 does
    where ``config.fold_batch_norms`` asks (the opt-in speed mode): the folded network gives the
    unfolded one's features up to rounding."""
    from engine.backbone import FrozenBatchNorm2d, fold_frozen_batch_norms

    exact = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)
    by_hand = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)
    norms = [m for m in by_hand.model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert fold_frozen_batch_norms(by_hand.model) == len(norms) > 0
    assert all(m.folded for m in norms) and fold_frozen_batch_norms(by_hand.model) == 0
    folded = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG.replace(fold_batch_norms=True))
    assert folded.model.precision == "fp32"
    assert all(m.folded for m in folded.model.modules() if isinstance(m, FrozenBatchNorm2d))
    for a, b in zip(by_hand.model.state_dict().values(), folded.model.state_dict().values()):
        assert torch.equal(a, b)
    batch = exact.preprocess([image(60, 80), image(47, 33, 1)])
    with torch.inference_mode():
        for a, b in zip(exact.model.features(batch), folded.model.features(batch)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    if cpu_has_fast_kernels("bf16"):
        fast = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, precision="bf16")
        assert all(m.folded for m in fast.model.modules() if isinstance(m, FrozenBatchNorm2d))
    assert not any(m.folded for m in exact.model.modules() if isinstance(m, FrozenBatchNorm2d))


def test_fold_batch_norms_must_be_a_bool():
    with pytest.raises(TypeError, match="fold_batch_norms must be True or False; got 'yes'"):
        TINY_CONFIG.replace(fold_batch_norms="yes")


def test_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Predictor(tiny_state_dict(), device="cpu", precision="int8")


def test_box_mask_format_equals_full_masks():
    from engine.results import BoxMasks

    images = [image(60, 80), image(47, 33, 1)]
    full = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG).run(images)
    compact = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, mask_format="box").run(images)
    for f, c in zip(full, compact):
        assert isinstance(c.masks, BoxMasks)
        assert torch.equal(c.masks.to_full(), f.masks)
        assert c.to_coco(7) == f.to_coco(7)
    with pytest.raises(ValueError, match="mask_format must be one of"):
        Predictor(tiny_state_dict(), device="cpu", mask_format="rle")
