"""Video datasets for pretraining and fine-tuning (Kinetics-400 dense sampling, SSv2 segment sampling).

Every item is a dict. Besides the clip it carries ``"skipped"``: how many unreadable files were passed
over to produce it, and ``"short"``: how many of its clips came from a video shorter than the sampling
needs (padded with the last frame, see :mod:`hpm_video.data.sampling`). Counts live in the items, not
only on the dataset object, because with DataLoader workers the dataset copies sit in other processes;
:func:`hpm_video.data.collate.collate_clips` sums them per batch.

Bad input: a file that cannot be decoded (missing, empty, truncated, corrupt, unknown codec, or over the
decode time limit) is logged once per process with its path and replaced by another sample: a random
one in training, the next one in the list for ``val``/``test`` (deterministic, and since every view of a
bad video is replaced by the same view of the next video, the merged per-video scores stay correct).
After ``1 + max_retries`` consecutive failures the item raises ``RuntimeError``.

Indexing: ``dataset[i]`` draws the item's seed from torch's global RNG; ``dataset[(i, seed)]`` (what
:func:`hpm_video.data.build_loader`'s sampler passes) makes the item a pure function of ``(i, seed)``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import read_list
from .decoding import BACKENDS, VideoDecodeError, read_clips
from .sampling import (
    dense_center_indices,
    dense_test_indices,
    dense_train_indices,
    is_short,
    segment_test_indices,
    segment_train_indices,
)
from .transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EvalTransform,
    FinetuneTrainTransform,
    PretrainTransform,
    seeded_globals,
)

__all__ = ["VideoPretrainDataset", "VideoFinetuneDataset", "split_key"]

logger = logging.getLogger(__name__)

_reported_lock = threading.Lock()
_reported: set[tuple[str, str]] = set()


def log_once(kind: str, path: str, message: str, *args: object) -> None:
    """Log a problem with ``path`` once per process (workers each log their own first sighting)."""
    with _reported_lock:
        if (kind, path) in _reported:
            return
        _reported.add((kind, path))
    logger.warning(message, *args)


def split_key(key: int | tuple[int, int] | Sequence[int], length: int) -> tuple[int, int]:
    """``i`` or ``(i, seed)`` -> ``(i, seed)``; a bare index takes its seed from torch's global RNG."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"dataset key must be an index or (index, seed), got {key!r}")
        index, seed = int(key[0]), int(key[1])
    else:
        index = int(key)
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index, seed


class _VideoListDataset(Dataset):
    """List reading, decoding under a time limit, and the skip-and-replace policy."""

    def __init__(
        self,
        list_file: str,
        root: str,
        backend: str,
        decode_timeout_s: float | None,
        max_retries: int,
        num_threads: int = 1,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.list_file = list_file
        self.root = root
        self.samples = read_list(list_file, root)
        self.backend = backend
        self.decode_timeout_s = decode_timeout_s
        self.max_retries = int(max_retries)
        self.num_threads = num_threads
        # Per-process tallies, for single-process use and debugging; items carry the real counts.
        self.num_skipped = 0
        self.num_short = 0

    @property
    def num_videos(self) -> int:
        return len(self.samples)

    def _decode(
        self,
        index: int,
        rng: np.random.Generator,
        plan: Callable[[int, np.random.Generator], list[np.ndarray]],
        short_check: Callable[[int], bool],
        replace_randomly: bool,
    ) -> tuple[int, list[np.ndarray], int, bool]:
        """Decode the clips ``plan(num_video_frames, rng)`` asks for, replacing unreadable videos.

        Returns ``(index actually used, clips, files skipped, video was short)``.
        """
        skipped = 0
        errors: list[str] = []
        current = index
        while True:
            path = self.samples[current][0]
            # A fresh generator per attempt: an abandoned (timed-out) decode thread may still hold the
            # previous one.
            attempt_rng = np.random.default_rng(int(rng.integers(2**63)))
            seen: dict[str, int] = {}

            def planner(
                n: int,
                fps: float,
                _r: np.random.Generator = attempt_rng,
                _seen: dict[str, int] = seen,
                _path: str = path,
            ) -> list[np.ndarray]:
                if n <= 0:
                    raise VideoDecodeError(_path, "the video has no frames")
                _seen["n"] = n
                return plan(n, _r)

            try:
                clips = read_clips(
                    path,
                    planner,
                    backend=self.backend,
                    timeout_s=self.decode_timeout_s,
                    num_threads=self.num_threads,
                )
            except VideoDecodeError as e:
                skipped += 1
                self.num_skipped += 1
                errors.append(str(e))
                log_once(
                    "bad", e.path, "skipping unreadable video (it is replaced by another sample): %s", e
                )
                if skipped > self.max_retries:
                    shown = "\n  ".join(errors[-3:])
                    raise RuntimeError(
                        f"{skipped} consecutive unreadable videos while loading item {index} of "
                        f"{self.list_file!r} (max_retries={self.max_retries}); the data is probably "
                        f"missing or broken. Last errors:\n  {shown}"
                    ) from e
                if replace_randomly:
                    current = int(rng.integers(len(self.samples)))
                else:
                    current = (current + 1) % len(self.samples)
                continue
            n = seen["n"]
            short = short_check(n)
            if short:
                self.num_short += 1
                log_once(
                    "short",
                    path,
                    "video %s has only %d frames, fewer than the sampling needs; padding with its last frame",
                    path,
                    n,
                )
            return current, clips, skipped, short


class VideoPretrainDataset(_VideoListDataset):
    """Clips for masked pretraining.

    Each item decodes one video once and cuts ``num_sample`` clips from it (repeated augmentation), each
    with its own random start (``num_frames`` frames, ``sampling_rate`` apart: 4 for Kinetics, 2 for
    SSv2) and its own multi-scale crop to ``input_size``; no flip; ImageNet normalisation.

    Returns ``{"video": float32 (num_sample, C, T, H, W), "skipped": int, "short": int}``.
    """

    def __init__(
        self,
        list_file: str,
        root: str,
        num_frames: int = 16,
        sampling_rate: int = 4,
        input_size: int = 224,
        num_sample: int = 1,
        scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        backend: str = "auto",
        decode_timeout_s: float | None = 30.0,
        max_retries: int = 10,
    ) -> None:
        super().__init__(list_file, root, backend, decode_timeout_s, max_retries)
        if num_sample < 1:
            raise ValueError(f"num_sample must be >= 1, got {num_sample}")
        self.num_frames, self.sampling_rate, self.num_sample = (
            int(num_frames),
            int(sampling_rate),
            int(num_sample),
        )
        self.transform = PretrainTransform(input_size, scales, mean, std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, object]:
        index, seed = split_key(key, len(self))
        rng = np.random.default_rng(seed)
        with seeded_globals(seed):
            _, clips, skipped, short = self._decode(
                index,
                rng,
                lambda n, r: [
                    dense_train_indices(n, self.num_frames, self.sampling_rate, r)
                    for _ in range(self.num_sample)
                ],
                lambda n: is_short(n, self.num_frames, self.sampling_rate, "dense"),
                replace_randomly=True,
            )
            video = torch.stack([self.transform(c, rng) for c in clips])
        return {"video": video, "skipped": skipped, "short": int(short) * self.num_sample}


class VideoFinetuneDataset(_VideoListDataset):
    """Labelled clips for fine-tuning and evaluation.

    ``sampling="dense"`` (Kinetics): ``num_frames`` frames ``sampling_rate`` apart, from one random window
    in training, the centre window in ``val``, ``num_segment`` evenly spaced windows in ``test``.
    ``sampling="segment"`` (SSv2, TSN style): one frame from each of ``num_frames`` equal segments, at a
    random offset in training, the centre in ``val``, and ``num_segment`` shifted offsets in ``test``.

    * ``mode="train"``: ``{"video": (num_sample, C, T, H, W), "label", "skipped", "short"}`` with video
      RandAugment (one op sequence for all frames), random resized crop, horizontal flip if ``flip``
      (SSv2 configs pass ``flip=False``: left/right matters there), tube random erasing (``reprob``).
    * ``mode="val"``: one view per video, short side resized to ``short_side_size`` and centre-cropped:
      ``{"video": (C, T, H, W), "label", "video_id", "view": 0, "skipped", "short"}``.
    * ``mode="test"``: one item per (video, view), ``len == num_videos * num_segment * num_crop``; view
      ``= segment * num_crop + crop``; short-side resize then ``num_crop`` crops evenly spaced along the
      long side. Same keys as ``val``. Consecutive crops of one temporal view reuse one decode.
    """

    MODES = ("train", "val", "test")
    SAMPLINGS = ("dense", "segment")

    def __init__(
        self,
        list_file: str,
        root: str,
        mode: str = "train",
        sampling: str = "dense",
        num_frames: int = 16,
        sampling_rate: int = 4,
        input_size: int = 224,
        short_side_size: int = 224,
        num_segment: int = 5,
        num_crop: int = 3,
        flip: bool = True,
        rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1",
        reprob: float = 0.25,
        num_sample: int = 1,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        backend: str = "auto",
        decode_timeout_s: float | None = 30.0,
        max_retries: int = 10,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__(list_file, root, backend, decode_timeout_s, max_retries)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if sampling not in self.SAMPLINGS:
            raise ValueError(f"sampling must be one of {self.SAMPLINGS}, got {sampling!r}")
        if num_sample < 1 or num_segment < 1 or num_crop < 1:
            raise ValueError("num_sample, num_segment and num_crop must be >= 1")
        self.mode, self.sampling = mode, sampling
        self.num_frames, self.sampling_rate = int(num_frames), int(sampling_rate)
        self.num_sample = int(num_sample)
        self.num_segment = int(num_segment) if mode == "test" else 1
        self.num_crop = int(num_crop) if mode == "test" else 1
        if mode == "train":
            self.train_transform = FinetuneTrainTransform(
                input_size,
                flip=flip,
                rand_augment=rand_augment,
                reprob=reprob,
                scale=scale,
                ratio=ratio,
                mean=mean,
                std=std,
            )
        self.eval_transform = EvalTransform(input_size, short_side_size, self.num_crop, mean, std)
        # (requested video, temporal view) -> (video used, resized clip, skipped, short); per process.
        self._cache: tuple[tuple[int, int], tuple[int, torch.Tensor, int, bool]] | None = None

    @property
    def num_views(self) -> int:
        return self.num_segment * self.num_crop

    def __len__(self) -> int:
        return len(self.samples) * (self.num_views if self.mode == "test" else 1)

    def _short(self, n: int) -> bool:
        return is_short(n, self.num_frames, self.sampling_rate, self.sampling)

    def _train_indices(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.sampling == "dense":
            return dense_train_indices(n, self.num_frames, self.sampling_rate, rng)
        return segment_train_indices(n, self.num_frames, rng)

    def _view_indices(self, n: int, segment: int, num_segment: int) -> np.ndarray:
        if self.sampling == "dense":
            if num_segment == 1:
                return dense_center_indices(n, self.num_frames, self.sampling_rate)
            return dense_test_indices(n, self.num_frames, self.sampling_rate, num_segment, segment)
        return segment_test_indices(n, self.num_frames, num_segment, segment)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, object]:
        index, seed = split_key(key, len(self))
        rng = np.random.default_rng(seed)
        if self.mode == "train":
            with seeded_globals(seed):
                used, clips, skipped, short = self._decode(
                    index,
                    rng,
                    lambda n, r: [self._train_indices(n, r) for _ in range(self.num_sample)],
                    self._short,
                    replace_randomly=True,
                )
                video = torch.stack([self.train_transform(c, rng) for c in clips])
            return {
                "video": video,
                "label": self.samples[used][1],
                "skipped": skipped,
                "short": int(short) * self.num_sample,
            }

        # val / test: no randomness at all.
        video_index, view = divmod(index, self.num_views)
        segment, crop = divmod(view, self.num_crop)
        cache_key = (video_index, segment)
        if self._cache is not None and self._cache[0] == cache_key:
            # A cache hit skipped no file for this item (the decode that filled the cache reported it).
            used, resized, _, short = self._cache[1]
            skipped = 0
        else:
            used, clips, skipped, short = self._decode(
                video_index,
                rng,
                lambda n, r: [self._view_indices(n, segment, self.num_segment)],
                self._short,
                replace_randomly=False,
            )
            resized = self.eval_transform.resize(clips[0])
            self._cache = (cache_key, (used, resized, skipped, short))
        return {
            "video": self.eval_transform.crop(resized, crop),
            "label": self.samples[used][1],
            "video_id": used,
            "view": view,
            "skipped": skipped,
            "short": int(short),
        }
