"""Evaluation: single-view validation and multi-view testing, merged across ranks.

Protocol (VideoMAE's): every view of a video (``TEST_NUM_SEGMENT`` clips x ``TEST_NUM_CROP`` crops; one
view for validation) goes through the model, each view's logits are turned into probabilities with a
softmax, and a video's score is the mean of its views' probabilities. Averaging raw logits instead
lets one over-confident view dominate and costs accuracy.

Merging across ranks: the distributed sampler pads the last shard with items of the beginning of the
list so that every rank runs the same number of batches; those items are duplicates, and counting
them would weight some views twice. Each view is identified by ``(video_id, view)``; all ranks share
these keys (small), the first occurrence in (rank, position) order owns a key, and each rank sums the
probabilities of the views it owns into a dense per-video table that is then summed over ranks. So no
rank ever needs every other rank's probability rows, and the result does not depend on how the
sampler pads. :func:`merge_view_scores` runs the same procedure on hand-made per-rank outputs.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hpm_video.engine import distributed as dist_utils

logger = logging.getLogger(__name__)


@dataclass
class ViewRecords:
    """One rank's per-view outputs, in the order it saw them."""

    video_id: np.ndarray  # int64 (n,)
    view: np.ndarray  # int64 (n,)
    label: np.ndarray  # int64 (n,)
    probs: np.ndarray  # float32 (n, num_classes), softmax of each view's logits

    def __post_init__(self) -> None:
        self.video_id = np.asarray(self.video_id, dtype=np.int64).reshape(-1)
        self.view = np.asarray(self.view, dtype=np.int64).reshape(-1)
        self.label = np.asarray(self.label, dtype=np.int64).reshape(-1)
        self.probs = np.asarray(self.probs, dtype=np.float32)
        n = len(self.video_id)
        if not (len(self.view) == len(self.label) == n and self.probs.ndim == 2 and self.probs.shape[0] == n):
            raise ValueError(
                f"inconsistent view records: {n} video ids, {len(self.view)} views, {len(self.label)} labels, "
                f"probabilities {self.probs.shape}"
            )

    @property
    def keys(self) -> np.ndarray:
        """``(n, 2)`` int64 ``(video_id, view)`` pairs."""
        return np.stack([self.video_id, self.view], axis=1)


@dataclass
class MergedScores:
    """Per-video results: only videos with at least one view, in increasing ``video_id`` order."""

    video_id: np.ndarray  # int64 (V,)
    label: np.ndarray  # int64 (V,)
    scores: np.ndarray  # float64 (V, num_classes), mean of the views' probabilities
    num_views: np.ndarray  # int64 (V,), distinct views merged


def owned_mask(keys_per_rank: Sequence[np.ndarray], rank: int) -> np.ndarray:
    """Which of ``rank``'s records it owns: the first occurrence of each ``(video_id, view)`` key,
    scanning ranks in order and each rank's records in order."""
    if not 0 <= rank < len(keys_per_rank):
        raise ValueError(f"rank {rank} out of range for {len(keys_per_rank)} ranks")
    keys = [np.asarray(k, dtype=np.int64).reshape(-1, 2) for k in keys_per_rank]
    bounds = np.cumsum([0] + [len(k) for k in keys])
    everything = np.concatenate(keys)
    first = np.zeros(len(everything), dtype=bool)
    if len(everything):
        first[np.unique(everything, axis=0, return_index=True)[1]] = True  # index of each key's first sighting
    return first[bounds[rank] : bounds[rank + 1]]


def accumulate(records: ViewRecords, owned: np.ndarray, num_videos: int) -> tuple[np.ndarray, ...]:
    """One rank's share: per-video probability sums, view counts and labels (-1 where none)."""
    num_classes = records.probs.shape[1]
    sums = np.zeros((num_videos, num_classes), dtype=np.float64)
    counts = np.zeros(num_videos, dtype=np.int64)
    labels = np.full(num_videos, -1, dtype=np.int64)
    ids = records.video_id[owned]
    if len(ids) and (ids.min() < 0 or ids.max() >= num_videos):
        raise ValueError(f"video ids must be in [0, {num_videos}), got {ids.min()}..{ids.max()}")
    np.add.at(sums, ids, records.probs[owned].astype(np.float64))
    np.add.at(counts, ids, 1)
    labels[ids] = records.label[owned]
    return sums, counts, labels


def finalize(sums: np.ndarray, counts: np.ndarray, labels: np.ndarray) -> MergedScores:
    present = np.nonzero(counts > 0)[0]
    return MergedScores(
        video_id=present.astype(np.int64),
        label=labels[present],
        scores=sums[present] / counts[present, None],
        num_views=counts[present],
    )


def merge_view_scores(per_rank: Sequence[ViewRecords], num_videos: int | None = None) -> MergedScores:
    """Merge the per-view outputs of every rank (the distributed procedure, run in one process).

    Duplicated ``(video_id, view)`` keys, within a rank or across ranks, count once.
    """
    if not per_rank:
        raise ValueError("merge_view_scores() needs the records of at least one rank")
    if num_videos is None:
        num_videos = 1 + max((int(r.video_id.max()) for r in per_rank if len(r.video_id)), default=-1)
    keys = [r.keys for r in per_rank]
    total = None
    for rank, records in enumerate(per_rank):
        part = accumulate(records, owned_mask(keys, rank), num_videos)
        if total is None:
            total = list(part)
        else:
            total[0] += part[0]
            total[1] += part[1]
            total[2] = np.maximum(total[2], part[2])
    return finalize(*total)  # type: ignore[misc]


def gather_and_merge(records: ViewRecords, num_videos: int, device: torch.device) -> MergedScores:
    """:func:`merge_view_scores` across the real process group (every rank gets the result)."""
    world = dist_utils.world_size()
    if world == 1 or not dist.is_initialized():
        return merge_view_scores([records], num_videos)
    keys: list = [None] * world
    dist.all_gather_object(keys, records.keys)
    sums, counts, labels = accumulate(records, owned_mask(keys, dist_utils.rank()), num_videos)
    # NCCL only reduces device tensors; gloo takes CPU ones.
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t_sums = torch.from_numpy(sums).to(where)
    t_counts = torch.from_numpy(counts).to(where)
    t_labels = torch.from_numpy(labels).to(where)
    dist.all_reduce(t_sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(t_counts, op=dist.ReduceOp.SUM)
    dist.all_reduce(t_labels, op=dist.ReduceOp.MAX)
    return finalize(t_sums.cpu().numpy(), t_counts.cpu().numpy(), t_labels.cpu().numpy())


def compute_metrics(merged: MergedScores, num_classes: int, topk: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracies (percent), mean per-class accuracy, per-class accuracy and counts, NLL."""
    n = len(merged.video_id)
    out: dict = {"num_videos": int(n)}
    if n == 0:
        out.update({f"top{k}": float("nan") for k in topk})
        return out
    order = np.argsort(-merged.scores, axis=1, kind="stable")
    labels = merged.label
    for k in topk:
        kk = min(k, num_classes)
        hit = (order[:, :kk] == labels[:, None]).any(axis=1)
        out[f"top{k}"] = float(100.0 * hit.mean())
    correct = order[:, 0] == labels
    per_class: dict[str, float] = {}
    per_class_count: dict[str, int] = {}
    for c in range(num_classes):
        members = labels == c
        if members.any():
            per_class[str(c)] = float(100.0 * correct[members].mean())
            per_class_count[str(c)] = int(members.sum())
    out["mean_class_accuracy"] = float(np.mean(list(per_class.values())))
    out["per_class_accuracy"] = per_class
    out["per_class_count"] = per_class_count
    picked = merged.scores[np.arange(n), labels]
    out["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return out


# ------------------------------------------------------------------------------------ running
def autocast_for(device: torch.device, precision: str):
    """The forward-pass precision context matching training (bf16 autocast; fp16 weights need none)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def run_views(
    model: nn.Module,
    loader,
    device: torch.device,
    precision: str = "fp32",
    max_steps: int = 0,
    progress=None,
) -> tuple[ViewRecords, int]:
    """Every batch of ``loader`` through ``model``; returns this rank's records and the files skipped.

    All ranks must run the same number of batches (ZeRO-3 gathers weights collectively), which the
    padded distributed sampler guarantees.
    """
    was_training = model.training
    model.eval()
    ids, views, labels, probs = [], [], [], []
    skipped = 0
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    for step, batch in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        videos = batch["video"].to(device, non_blocking=True)
        with autocast_for(device, precision):
            logits = model(videos.to(dtype) if dtype == torch.float16 else videos)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        ids.append(batch["video_id"].numpy())
        views.append(batch["view"].numpy())
        labels.append(batch["label"].numpy())
        skipped += int(batch.get("skipped", torch.tensor(0)))
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    if not probs:
        raise ValueError("the evaluation loader yielded no batch")
    return ViewRecords(np.concatenate(ids), np.concatenate(views), np.concatenate(labels),
                       np.concatenate(probs)), skipped  # fmt: skip


def evaluate(
    model: nn.Module,
    loader,
    num_videos: int,
    num_classes: int,
    device: torch.device,
    precision: str = "fp32",
    expected_views: int = 1,
    max_steps: int = 0,
    progress=None,
) -> tuple[dict, MergedScores]:
    """Run, merge across ranks and score. Returns ``(metrics, merged)`` on every rank."""
    records, skipped = run_views(model, loader, device, precision, max_steps, progress)
    merged = gather_and_merge(records, num_videos, device)
    metrics = compute_metrics(merged, num_classes)
    skipped_all = int(dist_utils.all_reduce_sum(torch.tensor(skipped, device=device)).item())  # NCCL: device tensors
    incomplete = int((merged.num_views != expected_views).sum())
    metrics.update(
        num_videos_listed=int(num_videos), views_per_video=int(expected_views), incomplete_videos=incomplete,
        skipped_files=skipped_all,
    )  # fmt: skip
    if incomplete and not max_steps:
        logger.warning("%d of %d videos have a number of views other than %d (unreadable files are replaced by the "
                       "next video's views)", incomplete, len(merged.video_id), expected_views)  # fmt: skip
    return metrics, merged


# ------------------------------------------------------------------------------------- writing
def read_class_names(path: str) -> list[str] | None:
    """One class name per line (the line number is the label), or None without a file."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-name file not found: {path} (FINETUNE.CLASS_NAMES)")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def write_predictions(
    path: str,
    merged: MergedScores,
    video_paths: Sequence[str],
    root: str = "",
    class_names: Sequence[str] | None = None,
    top: int = 5,
) -> str:
    """One CSV row per video: id, path, label, views merged, top-``top`` classes with their scores."""
    k = min(top, merged.scores.shape[1])
    order = np.argsort(-merged.scores, axis=1, kind="stable")[:, :k]
    header = ["video_id", "path", "label", "num_views", "correct"]
    for i in range(1, k + 1):
        header += [f"pred_{i}", f"score_{i}"]
    if class_names:
        header.insert(3, "label_name")
        header += ["pred_1_name"]

    def show(p: str) -> str:
        if root:
            rel = os.path.relpath(p, os.path.abspath(root))
            if not rel.startswith(".."):
                return rel
        return p

    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row, vid in enumerate(merged.video_id.tolist()):
            label = int(merged.label[row])
            preds = order[row].tolist()
            line: list = [vid, show(video_paths[vid]), label, int(merged.num_views[row]), int(preds[0] == label)]
            for c in preds:
                line += [c, f"{merged.scores[row, c]:.6f}"]
            if class_names:
                line.insert(3, class_names[label] if label < len(class_names) else "")
                line.append(class_names[preds[0]] if preds[0] < len(class_names) else "")
            writer.writerow(line)
    os.replace(tmp, path)
    return path
