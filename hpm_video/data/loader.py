"""DataLoader construction with reproducible order and augmentation.

The sampler hands the dataset ``(index, item_seed)`` pairs, and every random choice for an item derives
from its seed (see :func:`hpm_video.data.transforms.seeded_globals`). The item seed is a hash of
``(seed, epoch, index)`` only, so a sample gets the same clip and augmentation in a given epoch whatever
the number of DataLoader workers (0, 1, 2, ...), the number of processes it is sharded over, or its
position in the batch; and a resumed run that calls ``set_epoch(e)`` sees exactly the epoch ``e`` an
uninterrupted run would.
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


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def item_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """One seed in ``[0, 2**62)`` per dataset index, a fixed hash of ``(seed, epoch, index)``.

    A keyed splitmix64 finaliser, vectorised: cheap for a whole epoch at once and well mixed, so
    neighbouring indices and epochs get unrelated seeds.
    """
    k0, k1 = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.asarray(indices, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + k0
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        x ^= k1
    return (x & _MASK64) >> np.uint64(2)


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)`` with ``item_seed = item_seeds(seed, epoch, index)``.

    Without ``inner``, it orders ``range(length)`` itself (a fresh permutation per epoch when
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
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.length = int(length)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.inner = inner
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration uses (as with ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else self.length  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1  # so a loop that never calls set_epoch still gets a new epoch each time
        if self.inner is not None:
            if hasattr(self.inner, "set_epoch"):
                self.inner.set_epoch(epoch)
            order = np.fromiter((int(i) for i in self.inner), dtype=np.int64)
        elif self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
        else:
            order = np.arange(self.length)
        seeds = item_seeds(self.seed, epoch, order)
        return iter(zip(order.tolist(), seeds.tolist()))


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
    sampler = SeededSampler(len(dataset), seed, shuffle=shuffle, inner=inner)  # type: ignore[arg-type]
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
