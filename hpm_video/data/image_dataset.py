"""Image dataset that yields one-frame clips ``(C, 1, H, W)``, so images train through the video model
and masking code unchanged (the degenerate case: one time slot, tubelet size 1)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from .annotations import read_list, resolve_under_root
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, seeded_globals
from .video_dataset import log_once, split_key

__all__ = ["ImageDataset", "IMAGE_EXTENSIONS", "scan_class_folders"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# What Pillow raises for a missing, truncated or damaged file. Not only OSError: a PNG whose chunk
# after the first image data is damaged fails in load() with SyntaxError ("broken PNG file").
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def scan_class_folders(
    root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[tuple[str, int]], list[str]]:
    """List ``root/<class>/**/<file>`` as ``[(path, label)]`` with classes sorted by name.

    Returns ``(samples, class_names)``. Raises ``ValueError`` when no class folder holds a file.
    """
    root = os.path.abspath(root)
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    exts = tuple(e.lower() for e in extensions)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(exts):
                    path = os.path.join(dirpath, fname)
                    samples.append((resolve_under_root(path, root), label))
    if not samples:
        raise ValueError(f"no files with extensions {exts} under class folders of {root!r}")
    return samples, classes


class ImageDataset(Dataset):
    """Images from a class-per-folder tree (ImageNet layout) or a ``path label`` list.

    Train: RandomResizedCrop (``scale``, bicubic) + horizontal flip (if ``flip``); eval: resize the short
    side to ``input_size / 0.875`` and centre-crop. ImageNet normalisation.
    Returns ``{"video": float32 (C, 1, H, W), "label": int, "skipped": int}``.

    Unreadable images are logged once, counted in ``"skipped"`` and replaced (a random image in training,
    the next one in eval); ``1 + max_retries`` consecutive failures raise ``RuntimeError``.

    Args:
        root_or_list: a directory (class folders) or a list file.
        root: base directory for relative paths of a list file (default: the list file's directory).
    """

    def __init__(
        self,
        root_or_list: str,
        input_size: int = 224,
        train: bool = True,
        scale: tuple[float, float] = (0.2, 1.0),
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        root: str | None = None,
        max_retries: int = 10,
        eval_crop_ratio: float = 0.875,
    ) -> None:
        if os.path.isdir(root_or_list):
            self.samples, self.classes = scan_class_folders(root_or_list)
        elif os.path.isfile(root_or_list):
            base = root if root is not None else os.path.dirname(os.path.abspath(root_or_list))
            self.samples = read_list(root_or_list, base)
            self.classes = None
        else:
            raise FileNotFoundError(f"{root_or_list!r} is neither a directory nor a list file")
        self.train = train
        self.max_retries = int(max_retries)
        self.num_skipped = 0
        bicubic = InterpolationMode.BICUBIC
        if train:
            steps: list[v2.Transform] = [
                v2.RandomResizedCrop(input_size, scale=scale, interpolation=bicubic, antialias=True)
            ]
            if flip:
                steps.append(v2.RandomHorizontalFlip())
        else:
            steps = [
                v2.Resize(int(round(input_size / eval_crop_ratio)), interpolation=bicubic, antialias=True),
                v2.CenterCrop(input_size),
            ]
        self.transform = v2.Compose(
            [
                *steps,
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _load(path: str) -> Image.Image:
        with Image.open(path) as img:
            img.load()  # force decoding now so truncated files fail here
            return img.convert("RGB")

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, object]:
        index, seed = split_key(key, len(self))
        rng = np.random.default_rng(seed)
        skipped = 0
        current = index
        while True:
            path, label = self.samples[current]
            try:
                img = self._load(path)
                break
            except UNREADABLE_IMAGE_ERRORS as e:
                skipped += 1
                self.num_skipped += 1
                log_once("bad", path, "skipping unreadable image %s (replaced by another sample): %s", path, e)
                if skipped > self.max_retries:
                    raise RuntimeError(
                        f"{skipped} consecutive unreadable images while loading item {index} "
                        f"(max_retries={self.max_retries}); last: {path!r}: {e}"
                    ) from e
                current = (
                    int(rng.integers(len(self.samples))) if self.train else (current + 1) % len(self.samples)
                )
        with seeded_globals(seed):
            image = self.transform(img)
        return {"video": image.unsqueeze(1), "label": label, "skipped": skipped}
