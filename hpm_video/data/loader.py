"""DataLoader construction with reproducible order and augmentation.

The sampler hands the dataset ``(index, seed)`` pairs. Seeds are drawn in the main process from
``(seed, rank, epoch)``, and every random choice for an item derives from its seed (see
:func:`hpm_video.data.transforms.seeded_globals`), so batches are the same for a fixed seed whatever
the number of workers (0, 1, 2, ...), and a resumed run that calls ``set_epoch(e)`` sees exactly the
epoch ``e`` an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from .collate import collate_clips

__all__ = ["SeededSampler", "build_loader"]


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)``.

    Without ``inner``, it orders ``range(len(dataset))`` itself (a fresh permutation per epoch when
    ``shuffle``); with ``inner`` (e.g. a ``DistributedSampler``) it takes that sampler's order and
    passes the epoch on to it. Each iteration uses the current epoch and then advances it by one, so
    ``set_epoch`` is only needed to jump (e.g. on resume).
    """

    def __init__(
        self,
        length: int,
        seed: int,
        shuffle: bool = True,
        inner: Sampler | None = None,
        rank: int = 0,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.length = int(length)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.inner = inner
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration uses (as with ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else self.length  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1  # so a loop that never calls set_epoch still gets a new epoch each time
        if self.inner is not None and hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        if self.inner is not None:
            order = [int(i) for i in self.inner]
        elif self.shuffle:
            order = rng.permutation(self.length).tolist()
        else:
            order = list(range(self.length))
        seeds = rng.integers(0, 2**62, size=len(order))
        return iter(zip(order, (int(s) for s in seeds)))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    distributed: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    pin_memory: bool = False,
    timeout_s: float = 600.0,
    prefetch_factor: int | None = 2,
    multiprocessing_context: Any = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` that batches with :func:`collate_clips`.

    * ``distributed``: a ``DistributedSampler`` (``num_replicas``/``rank`` default to the process group)
      shards the data; it pads the last shard with repeats unless ``drop_last``, so evaluation must
      de-duplicate by ``video_id``/``view``. Call ``loader.sampler.set_epoch(epoch)`` each epoch.
    * Persistent workers when ``num_workers > 0``, and a seeded ``torch.Generator`` for worker seeds.
    * ``timeout_s`` (workers only): how long to wait for one batch before declaring a worker stuck. Slow
      or hanging files are already cut off per sample by the datasets' ``decode_timeout_s``; this only
      catches a worker wedged somewhere else, so it is set far above any healthy batch time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inner: Sampler | None = None
    rank_value = 0
    if distributed:
        inner = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        rank_value = inner.rank
    sampler = SeededSampler(len(dataset), seed, shuffle=shuffle, inner=inner, rank=rank_value)  # type: ignore[arg-type]
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1000 + rank_value)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(
            persistent_workers=True,
            timeout=float(timeout_s),
            prefetch_factor=prefetch_factor,
            multiprocessing_context=multiprocessing_context,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_clips,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        **kwargs,
    )
