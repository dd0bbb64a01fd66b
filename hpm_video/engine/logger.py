"""What a user sees: a progress bar, JSON lines and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm


class RunLogger:
    """Writes ``log.jsonl`` and TensorBoard events in ``output_dir`` on the main rank."""

    def __init__(
        self, output_dir: str, enabled: bool, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        """``resume_step``: for a training run, the step of the checkpoint it resumes from (0 for a
        fresh start): what was logged after it (by a killed run, whose steps this one repeats) is
        dropped from both logs. None (a logger for a progress bar, say) leaves them as they are."""
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "log.jsonl")
        self.writer = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            if resume_step is not None:
                self._drop_after(resume_step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events of the repeated steps (TensorBoard keeps the files).
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge)

    def _drop_after(self, step: int) -> None:
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        # A line cut by the kill (no newline, not JSON) goes too.
        steps = [_step_of(line) if line.endswith("\n") else None for line in lines]
        kept = [line for line, at in zip(lines, steps) if at is not None and at <= step]
        if len(kept) == len(lines):
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.enabled, dynamic_ncols=True, leave=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
