"""Clip transforms: one random draw per clip, applied identically to every frame.

Clips travel as uint8 tensors ``(T, C, H, W)`` until the end, where they are normalised and returned
as float ``(C, T, H, W)``. Geometry and resizing use ``torchvision.transforms.v2.functional`` on the
whole clip at once (one crop box for all frames); RandAugment and random erasing come from timm.

Randomness: our own choices use an explicit ``numpy.random.Generator``; timm and torchvision draw from
the global ``random`` / ``numpy.random`` / torch RNGs. The datasets wrap each item in
:func:`seeded_globals`, which seeds those from the item's seed and restores them afterwards, so an
item is a pure function of ``(index, seed)`` whatever process or worker produces it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop as _TVRandomResizedCrop
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "seeded_globals",
    "frames_to_clip",
    "normalize_clip",
    "MultiScaleCrop",
    "random_resized_crop",
    "VideoRandAugment",
    "TubeRandomErasing",
    "short_side_resize",
    "long_side_crop_offsets",
    "center_crop",
    "PretrainTransform",
    "FinetuneTrainTransform",
    "EvalTransform",
]

_BILINEAR = InterpolationMode.BILINEAR


@contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU RNGs from ``seed`` for the block, then restore them.

    CUDA generators are neither touched nor saved.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    seed = int(seed) % (2**63)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


def frames_to_clip(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` array -> uint8 tensor ``(T, 3, H, W)`` (a view, no copy)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def normalize_clip(clip: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (0-255) or float (0-1) ``(T, C, H, W)`` -> normalised float32 ``(C, T, H, W)``.

    Computed as one fused ``x * scale + bias`` on the transposed clip, about three times faster than
    converting, dividing, subtracting and transposing step by step.
    """
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
    scale = 1.0 / (s * 255.0) if clip.dtype == torch.uint8 else 1.0 / s
    x = clip.permute(1, 0, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)
    return torch.addcmul(-m / s, x, scale)


class MultiScaleCrop:
    """Multi-scale crop with the semantics of TSN/VideoMAE's ``GroupMultiScaleCrop``.

    Crop height and width are each picked from ``scales`` times the short side (sizes within 3 pixels of
    the output size snap to it), the two scale indices differing by at most ``max_distort``; the box
    sits at one of 13 fixed positions (corners, centre, edge midpoints and quarter points of the free
    space) or, with ``fixed_offsets=False``, anywhere. The box is resized to ``size x size``.
    """

    # (row, column) positions in quarters of the free space; the first five are corners and centre.
    _GRID = (
        (0, 0),
        (0, 4),
        (4, 0),
        (4, 4),
        (2, 2),
        (2, 0),
        (2, 4),
        (4, 2),
        (0, 2),
        (1, 1),
        (1, 3),
        (3, 1),
        (3, 3),
    )

    def __init__(
        self,
        size: int,
        scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
        max_distort: int = 1,
        fixed_offsets: bool = True,
        more_fixed_offsets: bool = True,
    ) -> None:
        if not scales or any(not 0 < s <= 1 for s in scales):
            raise ValueError(f"scales must be in (0, 1], got {scales}")
        self.size = int(size)
        self.scales = tuple(float(s) for s in scales)
        self.max_distort = int(max_distort)
        self.fixed_offsets = fixed_offsets
        self.grid = self._GRID if more_fixed_offsets else self._GRID[:5]

    def crop_sizes(self, height: int, width: int) -> list[int]:
        """Candidate crop side lengths for a frame of this size."""
        base = min(height, width)
        sizes = [max(1, int(base * s)) for s in self.scales]
        return [self.size if abs(s - self.size) < 3 else s for s in sizes]

    def sample(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Draw ``(top, left, crop_height, crop_width)``."""
        sizes = self.crop_sizes(height, width)
        pairs = [
            (min(sizes[i], height), min(sizes[j], width))
            for i in range(len(sizes))
            for j in range(len(sizes))
            if abs(i - j) <= self.max_distort
        ]
        ch, cw = pairs[int(rng.integers(len(pairs)))]
        free_h, free_w = height - ch, width - cw
        if self.fixed_offsets:
            r, c = self.grid[int(rng.integers(len(self.grid)))]
            return (free_h // 4) * r, (free_w // 4) * c, ch, cw
        return int(rng.integers(free_h + 1)), int(rng.integers(free_w + 1)), ch, cw

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        top, left, ch, cw = self.sample(clip.shape[-2], clip.shape[-1], rng)
        return F.resized_crop(
            clip, top, left, ch, cw, [self.size, self.size], interpolation=_BILINEAR, antialias=True
        )


def random_resized_crop(
    clip: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """One RandomResizedCrop box (torchvision's sampler, global torch RNG) applied to every frame."""
    top, left, h, w = _TVRandomResizedCrop.get_params(clip[0], list(scale), list(ratio))
    return F.resized_crop(clip, top, left, h, w, [size, size], interpolation=_BILINEAR, antialias=True)


class VideoRandAugment:
    """timm RandAugment with one sampled op sequence applied identically to every frame.

    timm's RandAugment draws the ops and their magnitudes from the global ``random`` and
    ``numpy.random`` RNGs on every call. Re-seeding both with the same clip seed before each frame makes
    every frame replay exactly the same draws, so the whole clip gets the same ops with the same
    magnitudes, while timm's op set stays the one doing the work. The global states are restored.
    """

    def __init__(
        self, config_str: str = "rand-m7-n4-mstd0.5-inc1", mean: Sequence[float] = IMAGENET_DEFAULT_MEAN
    ) -> None:
        hparams = {
            "translate_pct": 0.45,
            "img_mean": tuple(round(255 * m) for m in mean),
            # A fixed interpolation; timm otherwise picks bilinear or bicubic at random per call.
            "interpolation": Image.Resampling.BICUBIC,
        }
        self.config_str = config_str
        self.op = rand_augment_transform(config_str, hparams)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 ``(T, H, W, 3)`` -> uint8 ``(T, H, W, 3)``, same ops on every frame."""
        seed = int(rng.integers(2**32))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            out = np.empty_like(frames)
            for t in range(frames.shape[0]):
                random.seed(seed)
                np.random.seed(seed)
                out[t] = np.asarray(self.op(Image.fromarray(frames[t])))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out


class TubeRandomErasing:
    """timm RandomErasing with the same box, and the same fill, in every frame (a spatio-temporal tube).

    Like :class:`VideoRandAugment`, timm's eraser is replayed per frame from one clip seed (it draws from
    the global ``random`` and torch RNGs), so the box position, size and ``"pixel"``-mode noise are
    identical across frames. The reference erases each frame independently, which flickers; a tube
    keeps the erased region consistent over time.
    """

    def __init__(self, probability: float = 0.25, mode: str = "pixel", max_count: int = 1) -> None:
        self.probability = probability
        self.eraser = RandomErasing(probability=probability, mode=mode, max_count=max_count, device="cpu")

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Normalised float ``(C, T, H, W)`` -> the same tensor, erased in place with ``probability``."""
        if self.probability <= 0:
            return clip
        seed = int(rng.integers(2**62))
        for t in range(clip.shape[1]):
            with seeded_globals(seed):
                self.eraser(clip[:, t])  # a (C, H, W) view: timm erases it in place
        return clip


def short_side_resize(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(T, C, H, W)`` so the shorter side is ``size``, keeping the aspect ratio."""
    h, w = clip.shape[-2:]
    if min(h, w) == size:
        return clip
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * size / h)))
    else:
        new_h, new_w = max(size, int(round(h * size / w))), size
    return F.resize(clip, [new_h, new_w], interpolation=_BILINEAR, antialias=True)


def long_side_crop_offsets(height: int, width: int, size: int, num_crop: int) -> list[tuple[int, int]]:
    """``(top, left)`` of ``num_crop`` square crops evenly spaced along the long side, centred on the
    short side; one crop is the centre crop."""
    if size > height or size > width:
        raise ValueError(f"crop {size} does not fit a {height}x{width} frame")
    long_is_width = width >= height
    free_long = (width if long_is_width else height) - size
    free_short = (height if long_is_width else width) - size
    if num_crop == 1:
        along = [free_long // 2]
    else:
        along = [int(round(i * free_long / (num_crop - 1))) for i in range(num_crop)]
    across = free_short // 2
    return [(across, a) if long_is_width else (a, across) for a in along]


def center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Square centre crop of ``(T, C, H, W)``."""
    ((top, left),) = long_side_crop_offsets(clip.shape[-2], clip.shape[-1], size, 1)
    return F.crop(clip, top, left, size, size)


class PretrainTransform:
    """Pretraining: multi-scale crop to ``input_size``, no flip, normalisation."""

    def __init__(
        self,
        input_size: int = 224,
        scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.crop = MultiScaleCrop(input_size, scales)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> float ``(C, T, input_size, input_size)``."""
        return normalize_clip(self.crop(frames_to_clip(frames), rng), self.mean, self.std)


class FinetuneTrainTransform:
    """Fine-tuning: RandAugment (same ops on all frames) on the decoded frames, one RandomResizedCrop box,
    optional horizontal flip, normalisation, tube random erasing. Uses the global RNGs for the
    torchvision/timm draws, so call it inside :func:`seeded_globals`."""

    def __init__(
        self,
        input_size: int = 224,
        flip: bool = True,
        rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1",
        reprob: float = 0.25,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.input_size = int(input_size)
        self.flip = flip
        self.rand_augment = VideoRandAugment(rand_augment, mean) if rand_augment else None
        self.erase = TubeRandomErasing(reprob) if reprob > 0 else None
        self.scale, self.ratio = scale, ratio
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        if self.rand_augment is not None:
            frames = self.rand_augment(frames, rng)
        clip = random_resized_crop(frames_to_clip(frames), self.input_size, self.scale, self.ratio)
        if self.flip and rng.random() < 0.5:
            clip = F.horizontal_flip(clip)
        out = normalize_clip(clip, self.mean, self.std)
        if self.erase is not None:
            out = self.erase(out, rng)
        return out


class EvalTransform:
    """Evaluation: resize the short side to ``short_side_size``, then square ``input_size`` crops evenly
    spaced along the long side (one crop: the centre crop)."""

    def __init__(
        self,
        input_size: int = 224,
        short_side_size: int = 224,
        num_crop: int = 1,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if short_side_size < input_size:
            raise ValueError(f"short_side_size ({short_side_size}) must be >= input_size ({input_size})")
        self.input_size, self.short_side_size, self.num_crop = (
            int(input_size),
            int(short_side_size),
            int(num_crop),
        )
        self.mean, self.std = tuple(mean), tuple(std)

    def resize(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> uint8 ``(T, C, H', W')`` with short side ``short_side_size``."""
        return short_side_resize(frames_to_clip(frames), self.short_side_size)

    def crop(self, resized: torch.Tensor, crop_index: int) -> torch.Tensor:
        """Spatial view ``crop_index`` of a resized clip -> float ``(C, T, input_size, input_size)``."""
        offsets = long_side_crop_offsets(resized.shape[-2], resized.shape[-1], self.input_size, self.num_crop)
        top, left = offsets[crop_index]
        clip = F.crop(resized, top, left, self.input_size, self.input_size)
        return normalize_clip(clip, self.mean, self.std)
