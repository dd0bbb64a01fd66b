"""DeepSpeed engine from the config: ZeRO stage, precision, clipping and accumulation in one place."""

from __future__ import annotations

import logging

import torch
from torch import nn

from hpm_video.config import CfgNode
from hpm_video.engine import distributed as dist_utils
from hpm_video.engine.optim import param_groups

logger = logging.getLogger(__name__)


def deepspeed_config(cfg: CfgNode, device: torch.device, micro_batch: int | None = None) -> dict:
    """The DeepSpeed JSON config implied by ``cfg.SOLVER`` and ``cfg.ENGINE``.

    Precision:
      * ``fp32``: plain fp32 (the CPU default; DeepSpeed refuses fp16 on the CPU);
      * ``bf16``: torch autocast to bf16 with fp32 weights, so the EMA teacher keeps full precision
        (a bf16-stored teacher would freeze: an EMA step of 1e-4 is below bf16's resolution);
      * ``fp16``: DeepSpeed's fp16 with dynamic loss scaling (overflowing steps are skipped by it).
    """
    precision = cfg.ENGINE.PRECISION
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("ENGINE.PRECISION fp16 needs a GPU; use fp32 (or bf16) on the CPU")
    config: dict = {
        "train_micro_batch_size_per_gpu": micro_batch or cfg.SOLVER.BATCH_SIZE,
        "gradient_accumulation_steps": cfg.SOLVER.ACCUM_STEPS,
        "gradient_clipping": float(cfg.SOLVER.CLIP_GRAD),
        "zero_optimization": {"stage": cfg.ENGINE.ZERO_STAGE},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronises the device at the start of
        # every forward and in every step (two whole-GPU waits per step); our log measures clips/s.
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.ENGINE.ZERO_STAGE in (1, 2) and cfg.SOLVER.CLIP_GRAD <= 0 and precision != "fp16":
        # Without clipping nothing needs the gradient norm, and ZeRO-1/2 would compute it every step
        # (a pass over all gradients) and read its validity back to the host. The finite-loss guard
        # already skips bad updates on the device. (fp16's loss scaler needs DeepSpeed's check.)
        config["zero_optimization"]["compute_grad_norm"] = False
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return config


def make_optimizer(model: nn.Module, cfg: CfgNode, num_layers: int | None = None) -> torch.optim.Optimizer:
    """torch AdamW over decay / no-decay (and layer-decay) groups.

    Fused (one kernel for all tensors, CPU and CUDA alike): its step counters stay on the device,
    where the foreach form reads them back on the host every step.
    """
    groups = param_groups(model, cfg.SOLVER.WEIGHT_DECAY, layer_decay=cfg.SOLVER.LAYER_DECAY, num_layers=num_layers)
    return torch.optim.AdamW(
        groups,
        lr=cfg.SOLVER.BASE_LR,
        betas=tuple(cfg.SOLVER.BETAS),
        eps=cfg.SOLVER.EPS,
        fused=True,
    )


def compile_kwargs(cfg: CfgNode) -> dict:
    """``torch.compile`` keyword arguments from ``ENGINE.COMPILE_MODE`` (``default``: none)."""
    mode = cfg.ENGINE.COMPILE_MODE
    return {} if mode == "default" else {"mode": mode}


def initialize(
    model: nn.Module,
    cfg: CfgNode,
    device: torch.device,
    micro_batch: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
):
    """``deepspeed.initialize`` with a client optimiser (default: AdamW from ``make_optimizer``);
    returns ``(engine, optimizer)``.

    ``micro_batch``: clips per process per step (``SOLVER.BATCH_SIZE`` times repeated augmentation).
    """
    import deepspeed

    model.to(device)
    if cfg.ENGINE.PRECISION == "fp16" and getattr(model, "teacher", None) is not None:
        logger.warning("fp16 stores the EMA teacher in fp16, which loses small EMA steps; prefer bf16 for hpm")
    if optimizer is None:
        optimizer = make_optimizer(model, cfg)
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, device, micro_batch),
        dist_init_required=False,
    )
    if cfg.ENGINE.ZERO_STAGE == 0 and dist_utils.world_size() == 1:
        # One process has nothing to average, but DeepSpeed would still flatten every gradient into
        # one buffer, all-reduce it with itself and copy it back after each backward.
        engine.enable_backward_allreduce = False
    if cfg.ENGINE.COMPILE:
        # torch.compile of the wrapped module, through DeepSpeed so ZeRO hooks still apply.
        engine.compile(compile_kwargs=compile_kwargs(cfg))
    return engine, ds_optimizer
