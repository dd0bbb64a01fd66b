"""Hard-mask speed: the vectorised ``hpm_video.masking.hard_mask`` against per-sample loops.

Prints JSON. Two baselines, both written here:
  * ``reference_loop``: the per-sample Python loop of the image HPM reference's structure: per
    sample, sort the predicted losses, take the hard units, remove them from the candidate list
    and shuffle the rest on the host with NumPy, then write the order back and build the mask
    from the restored order;
  * ``torch_loop``: the same rule per sample but staying in torch on the scores' device (a fairer,
    already tuned loop).
All three produce masks with the same per-sample count (checked).

    python tools/bench_masking.py [--batch 64] [--frames 8] [--spatial 196] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from hpm_video.masking import hard_mask, num_masked_per_unit_row


def reference_loop_hard_mask(scores: torch.Tensor, mask_ratio: float, alpha: float) -> torch.Tensor:
    """Baseline in the reference's shape: a per-sample loop with a host round trip, tube unit."""
    batch, time_slots, spatial = scores.shape
    unit_scores = scores.mean(1)
    n_mask = num_masked_per_unit_row(spatial, mask_ratio)
    n_keep = spatial - n_mask
    n_hard = int(n_mask * alpha)
    by_loss = torch.argsort(unit_scores, dim=1)  # ascending: hardest last
    order = torch.zeros_like(by_loss)
    for b in range(batch):
        order[b, spatial - n_hard :] = by_loss[b, spatial - n_hard :]
        others = np.delete(np.arange(spatial), by_loss[b, spatial - n_hard :].cpu().numpy())
        np.random.shuffle(others)
        order[b, : spatial - n_hard] = torch.from_numpy(others).to(scores.device)
    restore = torch.argsort(order, dim=1)
    unit_mask = torch.ones(batch, spatial, device=scores.device)
    unit_mask[:, :n_keep] = 0
    unit_mask = torch.gather(unit_mask, 1, restore).bool()
    return unit_mask.repeat(1, time_slots)


def torch_loop_hard_mask(scores: torch.Tensor, mask_ratio: float, alpha: float) -> torch.Tensor:
    """Baseline: one sample at a time in torch, tube unit."""
    batch, time_slots, spatial = scores.shape
    n_mask = num_masked_per_unit_row(spatial, mask_ratio)
    n_hard = int(n_mask * alpha)
    masks = []
    for b in range(batch):
        unit_scores = scores[b].mean(0)
        order = torch.argsort(unit_scores, descending=True)
        hard, rest = order[:n_hard], order[n_hard:]
        drawn = rest[torch.randperm(rest.numel(), device=scores.device)[: n_mask - n_hard]]
        unit_mask = torch.zeros(spatial, dtype=torch.bool, device=scores.device)
        unit_mask[hard] = True
        unit_mask[drawn] = True
        masks.append(unit_mask.repeat(time_slots))
    return torch.stack(masks)


def timeit(fn, repeats: int, device: torch.device, rounds: int = 5) -> float:
    """Best of ``rounds`` mean times: robust to another process sharing the cores."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8, help="time slots T' (16 frames / tubelet 2)")
    parser.add_argument("--spatial", type=int, default=196, help="spatial positions S (14 x 14)")
    parser.add_argument("--mask-ratio", type=float, default=0.9)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    scores = torch.randn(args.batch, args.frames, args.spatial, device=device)

    vectorised = timeit(lambda: hard_mask(scores, args.mask_ratio, args.alpha, "tube"), args.repeats, device)
    loops = {
        "reference_loop": reference_loop_hard_mask,
        "torch_loop": torch_loop_hard_mask,
    }
    mask = hard_mask(scores, args.mask_ratio, args.alpha, "tube")
    results = {}
    for name, fn in loops.items():
        other = fn(scores, args.mask_ratio, args.alpha)
        assert torch.equal(mask.sum(1), other.sum(1)), f"{name} must mask the same count"
        results[name] = timeit(lambda fn=fn: fn(scores, args.mask_ratio, args.alpha), max(2, args.repeats // 4), device)
    print(
        json.dumps(
            {
                "device": str(device),
                "batch": args.batch,
                "tokens": args.frames * args.spatial,
                "masked_per_clip": int(mask[0].sum()),
                "vectorised_ms": round(vectorised * 1e3, 4),
                **{f"{name}_ms": round(t * 1e3, 4) for name, t in results.items()},
                **{f"speedup_vs_{name}": round(t / vectorised, 1) for name, t in results.items()},
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
