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


def jsonable(kwargs: dict) -> dict:
    """Model kwargs as JSON values (tuples become lists), for checkpoints' client state."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
