"""Frame index sampling for dense (Kinetics) and segment (SSv2) clips, train and test phases."""

from __future__ import annotations

import numpy as np
import pytest

from hpm_video.data.sampling import (
    dense_center_indices,
    dense_span,
    dense_test_indices,
    dense_train_indices,
    is_short,
    segment_test_indices,
    segment_train_indices,
)


def test_dense_train_stride_and_range() -> None:
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(300):
        idx = dense_train_indices(100, 16, 4, rng)
        assert idx.shape == (16,) and idx.dtype == np.int64
        assert np.all(np.diff(idx) == 4)
        assert idx[0] >= 0 and idx[-1] <= 99
        starts.add(int(idx[0]))
    # Every start from 0 to 100 - 61 = 39 is possible and reached.
    assert starts == set(range(0, 40))


def test_dense_short_video_pads_with_last_frame() -> None:
    idx = dense_train_indices(30, 16, 4, np.random.default_rng(0))
    assert idx.tolist() == [0, 4, 8, 12, 16, 20, 24, 28] + [29] * 8
    assert is_short(30, 16, 4, "dense") and not is_short(61, 16, 4, "dense")
    assert dense_span(16, 4) == 61
    assert dense_train_indices(1, 4, 2, np.random.default_rng(0)).tolist() == [0, 0, 0, 0]


def test_dense_center_and_test_views() -> None:
    assert dense_center_indices(101, 4, 2).tolist() == [47, 49, 51, 53]  # slack 94 -> start 47
    views = [dense_test_indices(101, 4, 2, 5, v) for v in range(5)]
    starts = [int(v[0]) for v in views]
    assert starts == [0, 24, 47, 70, 94]  # evenly spaced from first to last possible start
    assert views[-1][-1] == 100
    assert all(np.all(np.diff(v) == 2) for v in views)
    assert dense_test_indices(101, 4, 2, 1, 0).tolist() == dense_center_indices(101, 4, 2).tolist()
    with pytest.raises(ValueError):
        dense_test_indices(101, 4, 2, 5, 5)


def test_segment_train_one_frame_per_segment() -> None:
    rng = np.random.default_rng(1)
    hits = np.zeros(64, dtype=int)
    for _ in range(400):
        idx = segment_train_indices(64, 16, rng)
        assert idx.shape == (16,)
        # Segment k covers frames [4k, 4k + 4): exactly one pick in each.
        assert np.array_equal(idx // 4, np.arange(16))
        hits[idx] += 1
    assert np.all(hits > 0)  # the random offset reaches every frame of every segment


def test_segment_test_views_are_shifted_offsets() -> None:
    center = segment_test_indices(64, 16, 1, 0)
    assert center.tolist() == [4 * k + 2 for k in range(16)]
    v0, v1 = segment_test_indices(64, 16, 2, 0), segment_test_indices(64, 16, 2, 1)
    assert v0.tolist() == [4 * k + 1 for k in range(16)]
    assert v1.tolist() == [4 * k + 3 for k in range(16)]
    # Uneven segment length still gives one frame inside each segment.
    idx = segment_test_indices(50, 16, 2, 1)
    edges = np.linspace(0, 50, 17)
    assert np.all((idx >= np.floor(edges[:-1])) & (idx < edges[1:]))


def test_segment_short_video_reuses_frames() -> None:
    idx = segment_test_indices(8, 16, 1, 0)
    assert idx.min() == 0 and idx.max() == 7
    assert np.all(np.diff(idx) >= 0) and len(set(idx.tolist())) == 8
    assert is_short(8, 16, 1, "segment") and not is_short(16, 16, 1, "segment")
    with pytest.raises(ValueError):
        segment_train_indices(0, 16, np.random.default_rng(0))
