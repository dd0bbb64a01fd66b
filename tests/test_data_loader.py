"""Batching: collate_clips, and build_loader's shapes, determinism, sharding and skip counts."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_fixtures import SAMPLES, TRAIN_LIST, copy_samples, make_bad_files, sample_entries, write_list  # noqa: E402

from hpm_video.data import (  # noqa: E402
    SeededSampler,
    VideoFinetuneDataset,
    VideoPretrainDataset,
    build_loader,
    collate_clips,
)
from hpm_video.data.loader import item_seeds  # noqa: E402


def test_collate_flattens_num_sample_and_sums_counts() -> None:
    items = [
        {"video": torch.full((2, 3, 4, 8, 8), float(i)), "label": 10 + i, "skipped": i, "short": 1}
        for i in range(3)
    ]
    batch = collate_clips(items)
    assert batch["video"].shape == (6, 3, 4, 8, 8)
    assert batch["video"][:, 0, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]  # an item's clips stay together
    assert batch["label"].tolist() == [10, 10, 11, 11, 12, 12] and batch["label"].dtype == torch.long
    assert batch["skipped"].dim() == 0 and batch["skipped"].item() == 3
    assert batch["short"].item() == 3

    views = [
        {"video": torch.zeros(3, 2, 4, 4), "label": 1, "video_id": 7, "view": v, "skipped": 0}
        for v in range(4)
    ]
    batch = collate_clips(views)
    assert batch["video"].shape == (4, 3, 2, 4, 4)
    assert batch["view"].tolist() == [0, 1, 2, 3] and batch["video_id"].tolist() == [7] * 4


def test_collate_rejects_inconsistent_items() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate_clips([])
    with pytest.raises(ValueError, match="keys"):
        collate_clips([{"video": torch.zeros(1), "skipped": 0}, {"video": torch.zeros(1)}])
    with pytest.raises(ValueError, match="does not know"):
        collate_clips([{"video": torch.zeros(1), "mystery": 1}])
    with pytest.raises(ValueError, match="different shapes"):
        collate_clips([{"video": torch.zeros(3, 2, 4, 4)}, {"video": torch.zeros(3, 2, 5, 4)}])


def _pretrain() -> VideoPretrainDataset:
    return VideoPretrainDataset(
        TRAIN_LIST, SAMPLES, num_frames=4, sampling_rate=2, input_size=32, num_sample=2
    )


def _epoch(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_two_worker_loader_shapes_and_determinism() -> None:
    ds = _pretrain()
    loader_a = build_loader(ds, batch_size=3, num_workers=2, shuffle=True, seed=5, drop_last=False)
    loader_b = build_loader(ds, batch_size=3, num_workers=2, shuffle=True, seed=5, drop_last=False)
    assert loader_a.persistent_workers and loader_a.timeout > 0
    a0, b0 = _epoch(loader_a), _epoch(loader_b)
    assert [tuple(b["video"].shape) for b in a0] == [(6, 3, 4, 32, 32), (6, 3, 4, 32, 32), (4, 3, 4, 32, 32)]
    assert all(b["skipped"].item() == 0 for b in a0)
    assert _same(a0, b0)  # same seed, same batches

    a1 = _epoch(loader_a)
    assert not _same(a0, a1)  # the next epoch reshuffles and re-augments
    loader_a.sampler.set_epoch(0)
    assert _same(_epoch(loader_a), a0)  # resuming at epoch 0 reproduces it exactly

    other = _epoch(build_loader(ds, batch_size=3, num_workers=2, shuffle=True, seed=6, drop_last=False))
    assert not _same(a0, other)
    # Worker count does not change the data: items depend only on (index, seed).
    single = _epoch(build_loader(ds, batch_size=3, num_workers=0, shuffle=True, seed=5, drop_last=False))
    assert _same(a0, single)


def test_finetune_loader_labels_follow_the_clips() -> None:
    ds = VideoFinetuneDataset(
        TRAIN_LIST,
        SAMPLES,
        mode="train",
        sampling="segment",
        flip=False,
        num_frames=4,
        input_size=32,
        num_sample=2,
    )
    labels = dict(enumerate(label for _, label in sample_entries()))
    loader = build_loader(ds, batch_size=4, num_workers=2, shuffle=False, seed=0, drop_last=True)
    batches = _epoch(loader)
    assert len(batches) == len(ds) // 4
    got = torch.cat([b["label"] for b in batches]).tolist()
    assert got == [labels[i] for i in range(len(batches) * 4) for _ in range(2)]


def test_distributed_sampler_shards_without_overlap() -> None:
    ds = _pretrain()
    shards = []
    for rank in range(2):
        loader = build_loader(
            ds,
            batch_size=2,
            num_workers=0,
            shuffle=True,
            seed=3,
            drop_last=False,
            distributed=True,
            num_replicas=2,
            rank=rank,
        )
        assert isinstance(loader.sampler, SeededSampler)
        shards.append([i for i, _ in loader.sampler])
    assert len(shards[0]) == len(shards[1]) == len(ds) // 2
    assert sorted(shards[0] + shards[1]) == list(range(len(ds)))


def test_same_data_whatever_the_number_of_processes() -> None:
    # 1 process x batch 4 and 2 processes x batch 2 see the same clips with the same augmentation.
    ds = VideoPretrainDataset(TRAIN_LIST, SAMPLES, num_frames=4, sampling_rate=2, input_size=32)
    kwargs = dict(num_workers=0, shuffle=True, seed=11, drop_last=True, distributed=True)
    single = _epoch(build_loader(ds, batch_size=4, num_replicas=1, rank=0, **kwargs))
    ranks = [_epoch(build_loader(ds, batch_size=2, num_replicas=2, rank=r, **kwargs)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 2
    for step, whole in enumerate(single):
        # DistributedSampler deals the shared permutation out round-robin: rank r gets positions r, r+2.
        interleaved = torch.stack([ranks[k % 2][step]["video"][k // 2] for k in range(4)])
        assert torch.equal(whole["video"], interleaved)


def test_item_seeds_are_a_fixed_hash() -> None:
    a = item_seeds(3, 0, np.arange(1000))
    assert a.dtype == np.uint64 and int(a.max()) < 2**62
    assert len(set(a.tolist())) == 1000  # no collisions among neighbours
    assert np.array_equal(item_seeds(3, 0, np.array([7, 500])), a[[7, 500]])  # independent of position
    assert not np.array_equal(item_seeds(3, 1, np.arange(1000)), a)  # a new epoch re-augments
    assert not np.array_equal(item_seeds(4, 0, np.arange(1000)), a)


def test_skipped_counts_reach_the_batches_from_workers(tmp_path) -> None:
    root = copy_samples(str(tmp_path / "root"))
    bad = make_bad_files(os.path.join(root, "bad"))
    entries = sample_entries()[:4] + [(os.path.relpath(bad[k], root), 0) for k in ("missing", "garbage")]
    lst = write_list(str(tmp_path / "mixed.csv"), entries)
    ds = VideoPretrainDataset(lst, root, num_frames=4, sampling_rate=2, input_size=32)
    loader = build_loader(ds, batch_size=2, num_workers=2, shuffle=True, seed=1, drop_last=False)
    batches = _epoch(loader)
    assert sum(b["video"].shape[0] for b in batches) == len(entries)
    assert sum(int(b["skipped"]) for b in batches) >= 2  # both bad files were hit and replaced
    assert ds.num_skipped == 0  # the main-process copy saw nothing: the counts came from the items
