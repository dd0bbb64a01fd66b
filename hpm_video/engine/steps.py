"""What the pretraining and fine-tuning loops share: run start-up, seeding, the finite-loss guard,
backward + step."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from hpm_video.engine import distributed as dist_utils

logger = logging.getLogger(__name__)


def start_run(cfg) -> tuple[torch.device, int, int]:
    """Device, process group, logging, output folder and its ``config.yaml``; returns (device, rank, world)."""
    device = dist_utils.pick_device(cfg.ENGINE.DEVICE)
    dist_utils.init_distributed(device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")  # fmt: skip
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    return device, rank, world


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of every random stream of ``epoch``: a function of the run's seed and the epoch only."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class NonFiniteGuard:
    """Skips steps whose loss is not finite on some rank, and stops the run after too many in a row."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def ok(self, loss: torch.Tensor, epoch: int, step: int) -> bool:
        """True to go on with the step. One flag per step, agreed by all ranks, so they skip together."""
        if dist_utils.all_ranks_true(torch.isfinite(loss)):
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        logger.warning("non-finite loss at epoch %d step %d: step skipped (%d in a row)", epoch, step, self.in_row)
        if self.in_row >= self.max_in_row:
            raise RuntimeError(
                f"{self.in_row} non-finite losses in a row (epoch {epoch}, step {step}); stopping. "
                "Lower SOLVER.BASE_LR, use bf16 instead of fp16, or check the data."
            )
        return False


def backward_and_step(engine, loss: torch.Tensor) -> bool:
    """DeepSpeed backward + step; True when this micro-step ended in an optimiser update."""
    engine.backward(loss)
    before = engine.global_steps
    engine.step()
    return engine.global_steps != before


def clips_per_step(cfg) -> int:
    """Clips in one process's micro-batch (videos x repeated-augmentation samples; images: 1 each)."""
    return cfg.SOLVER.BATCH_SIZE * (cfg.DATA.NUM_SAMPLE if cfg.DATA.DATASET != "image" else 1)



def epoch_steps(num_batches: int, num_samples: int, cfg, world: int) -> tuple[int, int]:
    """``(micro-steps, optimiser updates)`` per epoch: the loader's batches, capped by
    ``SOLVER.STEPS_PER_EPOCH``, cut to a whole number of accumulation rounds."""
    accum = cfg.SOLVER.ACCUM_STEPS
    steps = num_batches if cfg.SOLVER.STEPS_PER_EPOCH <= 0 else min(num_batches, cfg.SOLVER.STEPS_PER_EPOCH)
    steps -= steps % accum
    if steps < 1:
        raise ValueError(
            f"{num_samples} training samples give no full step of batch {cfg.SOLVER.BATCH_SIZE} x {world} "
            f"process(es) x {accum} accumulation; lower SOLVER.BATCH_SIZE or add data"
        )
    return steps, steps // accum


def window_means(sums: dict[str, torch.Tensor], count: int, skipped: int, device) -> tuple[dict[str, float], int]:
    """Means over every rank's steps in a log window, and the files skipped in it on all ranks.

    One collective and one read-back for everything (all ranks must log at the same steps).
    """
    names = list(sums)
    counters = torch.tensor([count, skipped], dtype=torch.float32, device=device)
    *totals, steps, skipped_all = dist_utils.all_reduce_sum(
        torch.cat([torch.stack([sums[k].float() for k in names]), counters])
    ).tolist()
    return {k: v / max(steps, 1.0) for k, v in zip(names, totals)}, int(skipped_all)


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The whole module's weights on the CPU: on rank 0 (collective) under ZeRO-3, on every rank below."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        if state is None:
            return None
    else:
        state = engine.module.state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}
