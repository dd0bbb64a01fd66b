"""What the pretraining and fine-tuning loops share: run start-up, seeding, the finite-loss guard,
backward + step."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from hpm_video.engine import distributed as dist_utils

logger = logging.getLogger(__name__)


def start_run(cfg) -> tuple[torch.device, int, int]:
    """Device, process group, logging, output folder and its ``config.yaml``; returns (device, rank, world)."""
    device = dist_utils.start_process(cfg.ENGINE.DEVICE)
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


# Ids of the random streams an epoch draws from, so that no two share a seed.
MASK_STREAM = 1  # the mask noise, shared by all ranks
PROCESS_STREAM = 2  # a rank's global RNGs (drop path, mixup), with the rank as a further id


def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """The seed of a random stream of ``epoch``: a function of the run's seed, the epoch and the
    stream's ids only, so a resumed epoch draws what it drew before."""
    return int(np.random.SeedSequence([seed, epoch, *stream]).generate_state(1)[0])


class NonFiniteGuard:
    """Skips the optimiser updates of steps whose loss is not finite on some rank, and stops the run
    after ``max_in_row`` such steps in a row, without a host sync per step.

    Everything per step stays on the device:

    * ``observe`` turns the loss into an all-rank "finite" flag and ORs it into ``found_inf``, which
      is attached to the torch optimiser: a fused torch optimiser then leaves weights, moments and
      its step count untouched for the whole accumulation round (the hook ``torch.amp.GradScaler``
      uses, marked by ``_step_supports_amp_scaling``);
    * the loop masks the values it averages with the flag, and the teacher's EMA step with the
      update's ``applied`` weight from ``backward_and_step``;
    * the counters (total, current run, longest run since the last read) are read by ``check`` at
      log steps, which warns and stops the run, so a stop comes at the first log step after the
      ``max_in_row``-th bad step.

    An optimiser without that hook (timm's LARS for the linear probe) cannot skip on the device:
    there ``observe`` reads the flag back (one host sync per step) and ``backward_and_step`` drops
    a bad micro-step before its backward.

    DeepSpeed's step counter still advances on an update skipped on the device, so the lr schedule
    (a function of ``engine.global_steps``) moves on as after any other step.
    """

    def __init__(self, max_in_row: int, engine) -> None:
        self.max_in_row = max_in_row
        self.total = 0  # host copy, refreshed by ``check``
        device = next(engine.module.parameters()).device
        # 1.0 while the current accumulation round has seen a non-finite loss.
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._counts = torch.zeros(3, dtype=torch.int64, device=device)  # total, in a row, longest run
        self._reported = 0
        # The client (torch) optimiser does the update at every ZeRO stage and precision; DeepSpeed's
        # wrappers call its ``step``, which reads this attribute.
        optimizer = engine.client_optimizer
        self.on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        if self.on_device:
            optimizer.found_inf = self.found_inf
        self.drop_on_host = False  # host mode: the last observed micro-step was not finite

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """The micro-step's flag: a 0-d bool tensor, True when the loss is finite on every rank."""
        bad = dist_utils.any_rank_true(~torch.isfinite(loss.detach()))
        total, in_row, longest = self._counts.unbind()
        bad_long = bad.long()
        in_row = (in_row + 1) * bad_long
        self._counts.copy_(torch.stack([total + bad_long, in_row, torch.maximum(longest, in_row)]))
        if self.on_device:
            torch.maximum(self.found_inf, bad.float(), out=self.found_inf)
        else:
            self.drop_on_host = bool(bad)
        return ~bad

    def state_dict(self) -> dict[str, int]:
        """The counters, for a checkpoint (one read-back; checkpoints follow a log step anyway)."""
        total, in_row, _ = self._counts.tolist()
        return {"total": total, "in_row": in_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the counts of a resumed run: its total, and a run of bad steps across the kill."""
        self.total = self._reported = int(state["total"])
        in_row = int(state["in_row"])
        self._counts.copy_(torch.tensor([self.total, in_row, in_row], dtype=torch.int64))

    def end_round(self) -> None:
        """After the optimiser step of an accumulation round: the next round starts clean."""
        self.found_inf.zero_()

    def check(self, epoch: int, step: int) -> int:
        """At a log step (one read-back): warn about new skipped steps, stop after too many in a
        row; returns the run's total of non-finite steps."""
        self.total, in_row, longest = self._counts.tolist()
        self._counts[2] = in_row  # the longest run is counted again from the current one
        new = self.total - self._reported
        self._reported = self.total
        if new:
            logger.warning("non-finite loss on %d step(s) up to epoch %d step %d: their updates were skipped "
                           "(%d in a row at most)", new, epoch, step, longest)  # fmt: skip
        if longest >= self.max_in_row:
            raise RuntimeError(
                f"{longest} non-finite losses in a row (by epoch {epoch}, step {step}); stopping. "
                "Lower SOLVER.BASE_LR, use bf16 instead of fp16, or check the data."
            )
        return self.total


def backward_and_step(engine, loss: torch.Tensor, guard: NonFiniteGuard) -> torch.Tensor | None:
    """DeepSpeed backward + step. ``None`` when this micro-step ended no accumulation round (or was
    dropped by a host-mode guard); else a 0-d float tensor on the device, 1.0 when the round's
    update was applied and 0.0 when it was skipped (by the guard's ``found_inf``, or by DeepSpeed:
    fp16 overflow, ZeRO-3's non-finite norm).
    """
    if guard.drop_on_host:
        return None
    engine.backward(loss)
    before = engine.global_steps
    engine.step()
    if engine.global_steps == before:
        return None
    # DeepSpeed's own verdict is a host bool it has already read; the guard's stays on the device.
    applied = 1.0 - guard.found_inf if engine.was_step_applied() else torch.zeros_like(guard.found_inf)
    guard.end_round()
    return applied


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


class LogWindow:
    """What a training loop sums between two log steps, kept on the device.

    ``add`` accumulates a step's values where its all-rank ``finite`` flag holds (a skipped step
    adds nothing) and counts it; ``close`` reads the window with one collective and one read-back
    (all ranks must log at the same steps), then starts the next window.
    """

    def __init__(self, names: Sequence[str], device) -> None:
        self.names = list(names)
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.sums = {k: torch.zeros((), device=self.device) for k in self.names}
        self.finite_steps = torch.zeros((), device=self.device)
        self.steps = 0
        self.skipped_files = 0
        self.start = time.perf_counter()

    def add(self, values: Mapping[str, torch.Tensor], finite: torch.Tensor, skipped_files: int = 0) -> None:
        for key, value in values.items():
            self.sums[key] += torch.where(finite, value.detach().float(), 0.0)
        self.finite_steps += finite
        self.steps += 1
        self.skipped_files += skipped_files

    def close(self) -> tuple[dict[str, float], int, int, float]:
        """``(means over every rank's finite steps, files skipped on all ranks, this rank's steps,
        seconds)`` of the window; the next window starts now."""
        seconds = time.perf_counter() - self.start
        counters = torch.stack([self.finite_steps, torch.tensor(float(self.skipped_files), device=self.device)])
        *totals, finite, skipped_all = dist_utils.all_reduce_sum(
            torch.cat([torch.stack([self.sums[k] for k in self.names]), counters])
        ).tolist()
        means = {k: v / max(finite, 1.0) for k, v in zip(self.names, totals)}
        steps = self.steps
        self._reset()
        return means, int(skipped_all), steps, seconds


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The whole module's weights on the CPU: on rank 0 (collective) under ZeRO-3, on every rank below."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        if state is None:
            return None
    else:
        state = engine.module.state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}
