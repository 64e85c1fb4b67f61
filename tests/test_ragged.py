"""Fixed-size ranking of ragged sets (engine/ragged.py) against a per-image loop with boolean masks."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine.ragged import image_of_row, rank_kept, read_counts, segment_rank_kept, segment_sizes, upload


def _loop_reference(scores, keep, k):
    """What the frameworks do per image: filter, then the stable descending order, cut at k."""
    idx = torch.nonzero(keep).squeeze(1)
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    return idx[order][:k]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    n=st.integers(0, 40),
    k=st.integers(1, 50),
    levels=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_rank_kept_equals_the_per_image_loop(batch, n, k, levels, seed):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(0, levels * 3, (batch, n), generator=g) / (levels * 3.0))  # many ties
    keep = torch.rand(batch, n, generator=g) > 0.4
    order, counts = rank_kept(scores, keep, k)
    assert order.shape == (batch, min(k, n))
    for i in range(batch):
        expected = _loop_reference(scores[i], keep[i], k)
        assert int(counts[i]) == len(expected)
        assert torch.equal(order[i, : len(expected)], expected)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=5), k=st.integers(1, 15), seed=st.integers(0, 10_000))
def test_segment_rank_kept_equals_the_per_image_loop(sizes, k, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    segments = image_of_row(sizes, torch.device("cpu"))
    scores = torch.randint(0, 5, (n,), generator=g) / 5.0
    keep = torch.rand(n, generator=g) > 0.3
    order, counts = segment_rank_kept(scores, keep, segments, len(sizes), k)
    assert torch.equal(segment_sizes(segments, len(sizes)), torch.tensor(sizes))
    start = 0
    for i, size in enumerate(sizes):
        rows = torch.arange(start, start + size)
        expected = rows[_loop_reference(scores[rows], keep[rows], k)]
        assert int(counts[i]) == len(expected)
        assert torch.equal(order[start : start + len(expected)], expected)
        start += size


@pytest.mark.parametrize("counts", [[0], [3], [2, 0, 4], [0, 0]])
def test_image_of_row(counts):
    rows = image_of_row(counts, torch.device("cpu"))
    assert rows.tolist() == [i for i, c in enumerate(counts) for _ in range(c)]


def test_upload_and_read_counts():
    t = upload([[1, 2], [3, 4]], dtype=torch.float32, device=torch.device("cpu"))
    assert t.dtype == torch.float32 and t.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert read_counts(torch.tensor([5, 0, 2])) == [5, 0, 2]
