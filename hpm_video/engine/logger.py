"""What a user sees: a progress bar, JSON lines and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm


class RunLogger:
    """Writes ``log.jsonl`` and TensorBoard events in ``output_dir`` on the main rank."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "log.jsonl")
        self.writer = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

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
