"""Multi-view evaluation: softmax per view, average per video, merge across ranks without the padded
duplicates of the distributed sampler, metrics and the written files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from hpm_video.engine.evaluation import (
    MergedScores,
    ViewRecords,
    compute_metrics,
    evaluate,
    gather_and_merge,
    merge_view_scores,
    owned_mask,
    write_predictions,
)

# 3 videos x 3 views = 9 items, view index = segment * crops + crop; per-view probabilities by hand.
PROBS = {
    (0, 0): [0.7, 0.2, 0.1],  # item 0: the sampler pads with it, so it is seen twice
    (0, 1): [0.1, 0.5, 0.4],
    (0, 2): [0.1, 0.5, 0.4],
    (1, 0): [0.2, 0.2, 0.6],
    (1, 1): [0.3, 0.3, 0.4],
    (1, 2): [0.1, 0.1, 0.8],
    (2, 0): [0.5, 0.4, 0.1],
    (2, 1): [0.6, 0.3, 0.1],
    (2, 2): [0.1, 0.8, 0.1],
}
LABELS = {0: 1, 1: 2, 2: 0}


def rank_records(rank: int, world: int = 2) -> ViewRecords:
    """What one rank sees with the real DistributedSampler (shuffle off, padding on, as in evaluation)."""
    sampler = DistributedSampler(range(9), num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    items = [divmod(i, 3) for i in sampler]
    return ViewRecords(
        video_id=[v for v, _ in items], view=[w for _, w in items], label=[LABELS[v] for v, _ in items],
        probs=[PROBS[k] for k in items],
    )  # fmt: skip


def test_merge_two_ranks_drops_the_padded_duplicate():
    ranks = [rank_records(0), rank_records(1)]
    assert len(ranks[0].video_id) == len(ranks[1].video_id) == 5  # 9 items padded to 10
    assert (0, 0) in {tuple(k) for k in ranks[1].keys.tolist()}  # the pad is video 0, view 0, on rank 1
    merged = merge_view_scores(ranks, num_videos=3)
    # Hand-computed means over the three distinct views of each video.
    expected = np.array([[0.3, 0.4, 0.3], [0.2, 0.2, 0.6], [0.4, 0.5, 0.1]])
    assert merged.video_id.tolist() == [0, 1, 2]
    assert merged.label.tolist() == [1, 2, 0]
    assert merged.num_views.tolist() == [3, 3, 3]
    assert np.allclose(merged.scores, expected)
    metrics = compute_metrics(merged, num_classes=3)
    # Counting the duplicate would give video 0 [0.4, 0.35, 0.25] -> class 0, a wrong answer.
    assert metrics["top1"] == pytest.approx(200 / 3)  # videos 0, 1 right; video 2 predicts 1, label 0
    assert metrics["top5"] == 100.0
    assert metrics["per_class_accuracy"] == {"0": 0.0, "1": 100.0, "2": 100.0}
    assert metrics["per_class_count"] == {"0": 1, "1": 1, "2": 1}
    assert metrics["mean_class_accuracy"] == pytest.approx(200 / 3)
    # Which rank reports the key does not matter: same result with the ranks swapped.
    swapped = merge_view_scores([ranks[1], ranks[0]], num_videos=3)
    assert np.allclose(swapped.scores, expected)


def test_owned_mask_first_occurrence_wins_within_and_across_ranks():
    a = np.array([[0, 0], [1, 0], [0, 0]])  # a duplicate inside rank 0
    b = np.array([[1, 0], [2, 0]])  # a duplicate of rank 0's key
    assert owned_mask([a, b], 0).tolist() == [True, True, False]
    assert owned_mask([a, b], 1).tolist() == [False, True]
    with pytest.raises(ValueError, match="rank 2 out of range"):
        owned_mask([a, b], 2)


def test_world_of_one_matches_pure_merge():
    records = ViewRecords([0, 0, 1], [0, 1, 0], [1, 1, 0], [[0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    merged = gather_and_merge(records, num_videos=3, device=torch.device("cpu"))
    assert merged.video_id.tolist() == [0, 1]  # video 2 had no view: absent, not scored as wrong
    assert np.allclose(merged.scores, [[0.4, 0.6], [0.9, 0.1]])


class FixedLogits(nn.Module):
    """Returns the logits stored for each input's first value (the index of the view)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.flatten(1)[:, 0].long()]


def test_softmax_per_view_then_average():
    """One over-confident view must not outvote two confident ones: averaging logits would pick
    class 0 here, averaging probabilities picks the labelled class 1."""
    logits = torch.tensor([[20.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    def view(i: int) -> torch.Tensor:
        return torch.full((3, 2, 4, 4), float(i))

    def batch(views: list[int]) -> dict:
        n = len(views)
        return {"video": torch.stack([view(i) for i in views]), "video_id": torch.zeros(n, dtype=torch.long),
                "view": torch.tensor(views), "label": torch.ones(n, dtype=torch.long), "skipped": torch.tensor(0)}

    batches = [batch([0, 1]), batch([2])]
    assert logits.mean(0).argmax().item() == 0
    metrics, merged = evaluate(FixedLogits(logits), batches, num_videos=1, num_classes=3,
                               device=torch.device("cpu"), expected_views=3)  # fmt: skip
    assert merged.num_views.tolist() == [3]
    assert np.allclose(merged.scores[0], torch.softmax(logits, -1).mean(0).numpy(), atol=1e-6)
    assert metrics["top1"] == 100.0
    assert metrics["incomplete_videos"] == 0


def test_predictions_file(tmp_path):
    merged = MergedScores(
        video_id=np.array([0, 2]), label=np.array([1, 0]), scores=np.array([[0.1, 0.7, 0.2], [0.3, 0.6, 0.1]]),
        num_views=np.array([15, 15]),
    )  # fmt: skip
    paths = [str(tmp_path / "a" / "x.mp4"), str(tmp_path / "y.mp4"), str(tmp_path / "z.webm")]
    out = write_predictions(str(tmp_path / "predictions.csv"), merged, paths, root=str(tmp_path),
                            class_names=["run", "jump", "swim"])  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["a/x.mp4", "z.webm"]
    assert rows[0]["correct"] == "1" and rows[1]["correct"] == "0"
    assert [rows[0][f"pred_{i}"] for i in (1, 2, 3)] == ["1", "2", "0"]  # top-k capped at 3 classes
    assert float(rows[1]["score_1"]) == pytest.approx(0.6)
    assert rows[1]["label_name"] == "run" and rows[1]["pred_1_name"] == "jump"
