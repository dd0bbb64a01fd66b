"""Process-group set-up for every way a run is started.

* plain ``python run_pretrain.py`` (one process, CPU or one GPU): the rendezvous variables are filled
  in with a single-process default, so no launcher and no mpi4py are needed;
* ``torchrun`` and the ``deepspeed`` launcher (one or many nodes): they export RANK/WORLD_SIZE/...;
* SLURM (``srun``): SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID are mapped onto the same variables.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill_rendezvous_env() -> None:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT present for any launch method."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("MASTER_PORT must be set when WORLD_SIZE > 1 (launchers set it)")
        os.environ["MASTER_PORT"] = str(_free_port())


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("ENGINE.DEVICE is 'cuda' but no CUDA device is visible")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_process(choice: str = "auto") -> torch.device:
    """Rendezvous variables, device and process group of a run's process; returns its device.

    The variables come first: under ``srun`` LOCAL_RANK exists only once SLURM_LOCALID is mapped
    onto it, and it picks this process's GPU.
    """
    fill_rendezvous_env()
    device = pick_device(choice)
    init_distributed(device)
    return device


def init_distributed(device: torch.device) -> None:
    """Join the process group through DeepSpeed (NCCL on GPUs, gloo on CPUs)."""
    import importlib

    import deepspeed

    fill_rendezvous_env()
    if device.type == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce is JIT-compiled on first use (minutes) and only
        # speeds up large CPU all-reduces; gloo is enough for CPU runs. (importlib: the attribute
        # ``deepspeed.comm.torch`` is the torch package itself, not the submodule.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); a no-op for one process."""
    t = t.clone()
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank_true(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a 0-d bool tensor) OR-ed over ranks, as a 0-d bool tensor on the same device.

    No host sync: the value stays on the device (an NCCL all-reduce is queued like a kernel).
    """
    value = flag.to(torch.int32).reshape(1)
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.reshape(()).bool()
