"""Batch assembly for the dataset dicts."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["collate_clips"]

_PER_CLIP = ("label", "video_id", "view")  # repeated for every clip of an item
_SUMMED = ("skipped", "short")  # per-batch totals


def collate_clips(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Merge dataset items into one batch.

    * ``video``: items holding ``(num_sample, C, T, H, W)`` are concatenated along the first axis, so
      the batch is ``(B * num_sample, C, T, H, W)`` with an item's clips next to each other; items
      holding ``(C, T, H, W)`` are stacked.
    * ``label``, ``video_id``, ``view``: int64 tensors, each value repeated ``num_sample`` times to line
      up with the clips.
    * ``skipped``, ``short``: summed into one 0-d int64 tensor for the batch.

    Raises ``ValueError`` for an empty batch, items with different keys or clip shapes, or unknown keys.
    """
    if not batch:
        raise ValueError("collate_clips() got an empty batch")
    keys = set(batch[0])
    if "video" not in keys:
        raise ValueError(f"items need a 'video' entry, got keys {sorted(keys)}")
    unknown = keys - {"video", *_PER_CLIP, *_SUMMED}
    if unknown:
        raise ValueError(f"collate_clips() does not know how to batch {sorted(unknown)}")
    for i, item in enumerate(batch):
        if set(item) != keys:
            raise ValueError(f"item {i} has keys {sorted(item)}, item 0 has {sorted(keys)}")

    # A (C, T, H, W) item is one clip: give it the num_sample axis so every item concatenates alike.
    videos = [item["video"] if item["video"].dim() == 5 else item["video"].unsqueeze(0) for item in batch]
    repeats = [v.shape[0] for v in videos]
    try:
        video = torch.cat(videos, dim=0)
    except RuntimeError as e:
        raise ValueError(f"clips of different shapes in one batch: {[tuple(v.shape) for v in videos]}") from e

    out: dict[str, torch.Tensor] = {"video": video}
    counts = torch.tensor(repeats, dtype=torch.long)
    for key in _PER_CLIP:
        if key in keys:
            values = torch.tensor([int(item[key]) for item in batch], dtype=torch.long)
            out[key] = torch.repeat_interleave(values, counts)
    for key in _SUMMED:
        if key in keys:
            out[key] = torch.tensor(sum(int(item[key]) for item in batch), dtype=torch.long)
    return out
