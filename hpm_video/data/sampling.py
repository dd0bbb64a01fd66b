"""Which frames to read: dense windows (Kinetics) and TSN-style segments (Something-Something).

All functions return int64 index arrays into ``[0, num_video_frames)`` plus, where it matters, whether
the video was too short for the request.

Short videos (documented choice): a dense window keeps its stride, so motion speed is the same as in
any other clip, and frames past the end repeat the last frame ("pad with the last frame", the
convention of the reference implementation). Segment sampling always spans the whole video; when it
has fewer frames than segments, some frames are used twice. Looping back to frame 0 was rejected
because it inserts a cut into the clip. Datasets count such clips in the ``"short"`` field.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "dense_span",
    "dense_train_indices",
    "dense_center_indices",
    "dense_test_indices",
    "segment_train_indices",
    "segment_test_indices",
    "is_short",
]


def _check(num_video_frames: int, num_frames: int, sampling_rate: int = 1) -> None:
    if num_video_frames <= 0:
        raise ValueError(f"video has {num_video_frames} frames; need at least 1")
    if num_frames <= 0 or sampling_rate <= 0:
        raise ValueError(f"num_frames ({num_frames}) and sampling_rate ({sampling_rate}) must be positive")


def dense_span(num_frames: int, sampling_rate: int) -> int:
    """Number of video frames a dense clip covers, first to last frame inclusive."""
    return (num_frames - 1) * sampling_rate + 1


def _window(num_video_frames: int, start: int, num_frames: int, sampling_rate: int) -> np.ndarray:
    idx = start + sampling_rate * np.arange(num_frames, dtype=np.int64)
    return np.minimum(idx, num_video_frames - 1)  # pad with the last frame when the video is short


def dense_train_indices(
    num_video_frames: int, num_frames: int, sampling_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """``num_frames`` frames ``sampling_rate`` apart from one uniformly random start."""
    _check(num_video_frames, num_frames, sampling_rate)
    slack = num_video_frames - dense_span(num_frames, sampling_rate)
    start = int(rng.integers(0, slack + 1)) if slack > 0 else 0
    return _window(num_video_frames, start, num_frames, sampling_rate)


def dense_center_indices(num_video_frames: int, num_frames: int, sampling_rate: int) -> np.ndarray:
    """The dense window in the middle of the video (validation view)."""
    _check(num_video_frames, num_frames, sampling_rate)
    slack = max(num_video_frames - dense_span(num_frames, sampling_rate), 0)
    return _window(num_video_frames, slack // 2, num_frames, sampling_rate)


def dense_test_indices(
    num_video_frames: int, num_frames: int, sampling_rate: int, num_views: int, view: int
) -> np.ndarray:
    """Window ``view`` of ``num_views`` windows whose starts are evenly spaced from the first possible
    start to the last (one view: the centre window)."""
    _check(num_video_frames, num_frames, sampling_rate)
    if not 0 <= view < num_views:
        raise ValueError(f"view {view} out of range for {num_views} views")
    slack = max(num_video_frames - dense_span(num_frames, sampling_rate), 0)
    start = slack // 2 if num_views == 1 else int(round(view * slack / (num_views - 1)))
    return _window(num_video_frames, start, num_frames, sampling_rate)


def _segment_bounds(num_video_frames: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(0.0, float(num_video_frames), num_frames + 1)
    return edges[:-1], edges[1:] - edges[:-1]


def segment_train_indices(num_video_frames: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Split the video into ``num_frames`` equal segments and take one random frame from each."""
    _check(num_video_frames, num_frames)
    start, length = _segment_bounds(num_video_frames, num_frames)
    idx = np.floor(start + rng.random(num_frames) * length).astype(np.int64)
    return np.clip(idx, 0, num_video_frames - 1)


def segment_test_indices(num_video_frames: int, num_frames: int, num_views: int, view: int) -> np.ndarray:
    """One frame per segment at offset ``(view + 0.5) / num_views`` of each segment.

    One view takes segment centres; ``num_views`` views are the same grid shifted inside the segments.
    """
    _check(num_video_frames, num_frames)
    if not 0 <= view < num_views:
        raise ValueError(f"view {view} out of range for {num_views} views")
    start, length = _segment_bounds(num_video_frames, num_frames)
    idx = np.floor(start + (view + 0.5) / num_views * length).astype(np.int64)
    return np.clip(idx, 0, num_video_frames - 1)


def is_short(num_video_frames: int, num_frames: int, sampling_rate: int, sampling: str) -> bool:
    """Whether a video is shorter than the sampling needs (frames get padded or reused)."""
    if sampling == "dense":
        return num_video_frames < dense_span(num_frames, sampling_rate)
    if sampling == "segment":
        return num_video_frames < num_frames
    raise ValueError(f"unknown sampling {sampling!r}; use 'dense' or 'segment'")
