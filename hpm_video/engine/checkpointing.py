"""DeepSpeed checkpoints that survive a kill at any moment.

Layout: ``OUTPUT_DIR/checkpoints/epoch-NNNN/`` (a DeepSpeed tag). After every rank has written its
files and flushed them to disk, rank 0 writes ``COMPLETE`` (atomically, with the client state as
JSON). Resume only considers tags that have it, so a run killed mid-save falls back to the previous
checkpoint. Older complete checkpoints beyond ``keep_last`` are removed only after a newer one is
complete, marker first, so a kill mid-removal never leaves a hollow "complete" folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

from hpm_video.engine import distributed as dist_utils

MARKER = "COMPLETE"
TAG_RE = re.compile(r"^epoch-(\d{4,})$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def tag_for_epoch(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def write_json_atomic(path: str, payload: dict) -> str:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; results are for the team to read
    os.replace(tmp, path)
    return path


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(epoch, path)`` of every complete checkpoint, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = TAG_RE.match(name)
        if match and os.path.isfile(os.path.join(root, name, MARKER)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_client_state(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, MARKER)) as f:
        return json.load(f)


def checkpoint_to_resume(output_dir: str, auto_resume: bool) -> str | None:
    """The checkpoint a run continues from, or None for a fresh start.

    A fresh start (``auto_resume`` off) is refused in a folder that holds checkpoints: its own would
    be pruned against the older run's higher epochs, and a later resume would pick the older run.
    """
    latest = latest_checkpoint(output_dir)
    if latest and not auto_resume:
        raise ValueError(
            f"OUTPUT_DIR {output_dir} holds checkpoints of an earlier run (latest {latest}); with "
            "ENGINE.AUTO_RESUME False use another OUTPUT_DIR or remove its checkpoints/ folder, or "
            "continue that run with ENGINE.AUTO_RESUME True"
        )
    return latest


def _flush_to_disk(folder: str, files: bool = True) -> None:
    # The marker must not reach the disk before the files it vouches for (power loss, OS crash).
    for name in os.listdir(folder) if files else ():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the folder's entries (names of the files renamed into it)
    finally:
        os.close(fd)


def save(
    engine, output_dir: str, epoch: int, client_state: dict, keep_last: int = 2, extra_files: dict | None = None
) -> str:
    """Save a DeepSpeed checkpoint for the end of ``epoch``; every rank must call this.

    ``extra_files`` (``{file name: tensor dict}``, e.g. a model EMA) are written by rank 0 into the same
    folder before the ``COMPLETE`` marker, so a complete checkpoint always has them.
    """
    root = checkpoint_root(output_dir)
    tag = tag_for_epoch(epoch)
    tag_dir = os.path.join(root, tag)
    if dist_utils.is_main():
        stale = os.path.join(tag_dir, MARKER)
        if os.path.exists(stale):  # re-saving the same epoch: invalidate first
            os.unlink(stale)
    dist_utils.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    _flush_to_disk(tag_dir)  # every rank: its own files, wherever they are
    dist_utils.barrier()
    if dist_utils.is_main():
        from hpm_video.checkpoint import save_atomic

        for name, state in (extra_files or {}).items():
            save_atomic(state, os.path.join(tag_dir, name))  # fsyncs the file itself
        if extra_files:
            _flush_to_disk(tag_dir, files=False)
        write_json_atomic(os.path.join(tag_dir, MARKER), client_state)
        older = [path for done, path in complete_checkpoints(output_dir) if done < epoch]
        for old in older[: max(0, len(older) - keep_last)]:
            os.unlink(os.path.join(old, MARKER))
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return tag_dir


def load(engine, tag_dir: str) -> dict:
    """Load weights, optimiser state and the client state from a complete checkpoint."""
    root, tag = os.path.split(tag_dir.rstrip("/"))
    engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    return read_client_state(tag_dir)


def resolve_tag_dir(path: str) -> str:
    """A tag folder itself, or the newest complete checkpoint of a run's output folder."""
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint folder nor a run folder that holds one")
    return latest


@contextlib.contextmanager
def _deepspeed_files_as_data():
    """Make every ``torch.load`` inside the block ``weights_only=True`` (DeepSpeed's checkpoint reader
    asks for full unpickling), allowing only the few plain DeepSpeed classes its files hold."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load_as_data(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        torch.load = load_as_data
        try:
            yield
        finally:
            torch.load = original


def consolidated_state_dict(tag_dir: str) -> dict:
    """Full fp32 weights of a checkpoint saved under any ZeRO stage, on the CPU.

    The model-states file holds the whole module under ZeRO-0/1/2 (ZeRO-3 leaves placeholders);
    ZeRO-1/2/3 also keep the authoritative fp32 weights partitioned in the optimiser files, which
    DeepSpeed's ``zero_to_fp32`` reassembles and which take precedence. Frozen parameters (the EMA
    teacher) come from whichever of the two holds them. Every file is read as data.
    """
    import glob

    import torch

    root, tag = os.path.split(os.path.abspath(tag_dir))
    files = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))  # ZeRO-3: zero_pp_rank_N_...
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model-states file")
    module = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _deepspeed_files_as_data():
            state.update(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ValueError(f"{tag_dir}: could not reassemble {len(empty)} tensors, e.g. {empty[:3]}")
    return state
