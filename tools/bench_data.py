#!/usr/bin/env python
"""Data-pipeline throughput on the bundled sample clips; prints one JSON object.

Measured, each for about ``--seconds`` of wall time:

* ``decode``: decoding one pretraining clip (``--num-frames`` frames, stride ``--sampling-rate``, random
  start) per video with each backend, in this process (= one worker).
* ``pretrain_item``: a full ``VideoPretrainDataset`` item (decode + multi-scale crop + normalise) for
  each ``--num-sample`` value, in this process. ``clips_per_s`` counts the clips (an item holds
  ``num_sample`` of them, decoded once).
* ``loader``: the same through ``build_loader`` with ``--workers`` worker processes (start-up excluded);
  ``clips_per_s_per_worker`` divides by the worker count.

``cpu_ms_per_clip`` (CPU time of this process per clip) is the number to compare across runs on a busy
machine; the per-second rates are wall-clock. ``cores_needed`` sizes the data workers of a GPU run:
``--target-clips-per-s`` (default 1,400, the GPU-speed issue's ViT-B rate) times the CPU time per
clip, for every backend and ``num_sample`` (repeated augmentation decodes once for ``num_sample``
clips). The default run takes under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpm_video.data import VideoPretrainDataset, build_loader, decord_available, read_list  # noqa: E402
from hpm_video.data.decoding import read_clips  # noqa: E402
from hpm_video.data.sampling import dense_train_indices  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "datasets", "samples")


def _timed(step, seconds: float, min_iters: int = 3) -> tuple[int, float, float]:
    """Call ``step()`` until ``seconds`` have passed (at least ``min_iters`` times).

    Returns ``(calls, wall seconds, CPU seconds of this process)``. The CPU time (all threads, decoder
    helper threads included) is much less sensitive than wall time to other load on the machine.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    n = 0
    while n < min_iters or time.perf_counter() - start < seconds:
        step()
        n += 1
    return n, time.perf_counter() - start, time.process_time() - cpu_start


def bench_decode(paths: list[str], backend: str, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(0)
    counter = {"i": 0}

    def step() -> None:
        path = paths[counter["i"] % len(paths)]
        counter["i"] += 1
        read_clips(
            path,
            lambda n, fps: [dense_train_indices(n, args.num_frames, args.sampling_rate, rng)],
            backend=backend,
            timeout_s=30.0,
        )

    step()  # warm-up: imports, first file open
    n, wall, cpu = _timed(step, args.seconds)
    return {
        "clips_per_s": round(n / wall, 2),
        "ms_per_clip": round(1000 * wall / n, 2),
        "cpu_ms_per_clip": round(1000 * cpu / n, 2),
    }


def bench_items(ds: VideoPretrainDataset, seconds: float) -> dict[str, float]:
    counter = {"i": 0}

    def step() -> None:
        ds[(counter["i"] % len(ds), counter["i"])]
        counter["i"] += 1

    step()
    n, wall, cpu = _timed(step, seconds)
    return {
        "items_per_s": round(n / wall, 2),
        "clips_per_s": round(n * ds.num_sample / wall, 2),
        "cpu_ms_per_clip": round(1000 * cpu / (n * ds.num_sample), 2),
    }


def bench_loader(ds: VideoPretrainDataset, workers: int, batch_size: int, seconds: float) -> dict[str, float]:
    loader = build_loader(
        ds, batch_size=batch_size, num_workers=workers, shuffle=True, seed=0, drop_last=False
    )
    it = iter(loader)
    next(it)  # worker start-up is not counted
    start, clips = time.perf_counter(), 0
    epoch = 1
    while time.perf_counter() - start < seconds:
        try:
            batch = next(it)
        except StopIteration:
            it, epoch = iter(loader), epoch + 1
            continue
        clips += batch["video"].shape[0]
    wall = time.perf_counter() - start
    del it, loader
    rate = clips / wall
    return {
        "workers": workers,
        "clips_per_s": round(rate, 2),
        "clips_per_s_per_worker": round(rate / max(workers, 1), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", default=os.path.join(SAMPLES, "train.csv"), help="annotation list")
    parser.add_argument("--root", default=SAMPLES, help="data root of the list")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--sampling-rate", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-sample", default="1,2,4", help="comma-separated num_sample values")
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for the loader run (0: skip)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="wall time per measurement")
    parser.add_argument("--target-clips-per-s", type=float, default=1400.0,
                        help="training rate the data side must feed (for cores_needed)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # what a DataLoader worker gets; makes per-worker numbers honest

    paths = [p for p, _ in read_list(args.list, args.root)]
    backends = ["pyav"] + (["decord"] if decord_available() else [])
    num_samples = [int(x) for x in args.num_sample.split(",") if x]
    result: dict[str, object] = {
        "videos": len(paths),
        "clip": {
            "num_frames": args.num_frames,
            "sampling_rate": args.sampling_rate,
            "input_size": args.input_size,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "decode": {b: bench_decode(paths, b, args) for b in backends},
    }

    def dataset(num_sample: int, backend: str = "auto") -> VideoPretrainDataset:
        return VideoPretrainDataset(
            args.list, args.root, num_frames=args.num_frames, sampling_rate=args.sampling_rate,
            input_size=args.input_size, num_sample=num_sample, backend=backend,
        )  # fmt: skip

    result["pretrain_item"] = {
        f"{backend}/num_sample={k}": bench_items(dataset(k, backend), args.seconds)
        for backend in backends
        for k in num_samples
    }
    result["cores_needed"] = {
        "target_clips_per_s": args.target_clips_per_s,
        **{key: round(args.target_clips_per_s * item["cpu_ms_per_clip"] / 1000, 1)
           for key, item in result["pretrain_item"].items()},
    }  # fmt: skip
    if args.workers > 0:
        result["loader"] = {
            f"auto/num_sample={k}": bench_loader(dataset(k), args.workers, args.batch_size, args.seconds)
            for k in sorted({1, max(num_samples)})
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
