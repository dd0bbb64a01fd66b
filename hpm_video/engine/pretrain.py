"""The pretraining loop: thin on purpose. The model owns its losses, masking and teacher; this file
feeds it data, schedules lr / weight decay / alpha / EMA decay by step and epoch, and handles
checkpoints, logging and pictures.

Reproducibility and resume: every random stream is a function of ``(SEED, epoch)`` (and the rank for
the data sampler's shard), re-derived at the start of each epoch, so resuming at an epoch boundary
replays exactly what an uninterrupted run does; nothing is repeated or skipped.
"""

from __future__ import annotations

import logging
import os

import torch

from hpm_video.checkpoint import jsonable
from hpm_video.config import CfgNode, model_kwargs
from hpm_video.engine import checkpointing
from hpm_video.engine import distributed as dist_utils
from hpm_video.engine.deepspeed_setup import initialize
from hpm_video.engine.logger import RunLogger
from hpm_video.engine.optim import StepSchedules
from hpm_video.engine.steps import (
    MASK_STREAM,
    PROCESS_STREAM,
    LogWindow,
    NonFiniteGuard,
    backward_and_step,
    clips_per_step,
    epoch_seed,
    epoch_steps,
    full_state_dict,
    seed_all,
    start_run,
)
from hpm_video.masking import alpha_tensor, easy_to_hard_alpha
from hpm_video.models import create_model, ema_decay

logger = logging.getLogger("hpm_video.pretrain")

# Values accumulated on the device between log steps (no host sync per step).
TRACKED = ("loss", "loss_rec", "loss_pred", "rank_corr")




def build_pretrain_dataset(cfg: CfgNode):
    from hpm_video.data import ImageDataset, VideoPretrainDataset

    data = cfg.DATA
    if not data.TRAIN_LIST and data.DATASET != "image":
        raise ValueError("config DATA.TRAIN_LIST is empty: point it at a 'path label' list file")
    if data.DATASET == "image":
        source = data.TRAIN_LIST or data.ROOT
        return ImageDataset(source, input_size=cfg.MODEL.INPUT_SIZE, train=True, mean=data.MEAN, std=data.STD,
                            root=data.ROOT or None)  # fmt: skip
    return VideoPretrainDataset(
        data.TRAIN_LIST, data.ROOT, num_frames=cfg.MODEL.NUM_FRAMES, sampling_rate=data.SAMPLING_RATE,
        input_size=cfg.MODEL.INPUT_SIZE, num_sample=data.NUM_SAMPLE, mean=data.MEAN, std=data.STD,
        backend=data.BACKEND, decode_timeout_s=data.DECODE_TIMEOUT,
    )  # fmt: skip



def pretrain_step(
    engine,
    videos: torch.Tensor,
    alpha: float,
    ema_decay_value: float,
    mask_gen: torch.Generator,
    shard: tuple[int, int],
    guard: NonFiniteGuard,
) -> dict[str, torch.Tensor]:
    """One micro-step of the loop: mask noise, forward, the finite-loss flag, backward + DeepSpeed
    step and, after an optimiser update, the teacher's EMA. No host sync.

    ``out["finite"]`` is the step's all-rank flag: a non-finite step's update is skipped on the
    device (``NonFiniteGuard``) and its values must not be averaged.

    The noise is drawn here, outside the engine's forward: a ``torch.Generator`` argument would
    break a compiled graph; alpha goes in as a device tensor, which a compiled graph does not
    specialise on (``masking.alpha_tensor``).
    """
    module = engine.module
    noise = module.mask_noise(videos, mask_gen, shard=shard)
    out = engine(videos, alpha=alpha_tensor(alpha, videos.device), noise=noise)
    out["finite"] = guard.observe(out["loss"])
    applied = backward_and_step(engine, out["loss"], guard)
    if applied is not None:
        module.update_teacher(ema_decay_value, applied)
    return out


def train(cfg: CfgNode) -> dict[str, str]:
    """Run (or resume) pretraining; returns the paths of what it wrote."""
    from hpm_video.data import build_loader

    latest = checkpointing.checkpoint_to_resume(cfg.OUTPUT_DIR, cfg.ENGINE.AUTO_RESUME)  # before writing anything
    device, rank, world = start_run(cfg)
    main = rank == 0

    seed_all(cfg.SEED)  # same initial weights on every rank
    kwargs = model_kwargs(cfg)
    model = create_model(cfg.MODEL.NAME, **kwargs)
    dataset = build_pretrain_dataset(cfg)
    loader = build_loader(
        dataset, cfg.SOLVER.BATCH_SIZE, cfg.DATA.NUM_WORKERS, shuffle=True, seed=cfg.SEED, drop_last=True,
        distributed=True, num_replicas=world, rank=rank, pin_memory=device.type == "cuda",
    )  # fmt: skip
    accum = cfg.SOLVER.ACCUM_STEPS
    steps_per_epoch, updates_per_epoch = epoch_steps(len(loader), len(dataset), cfg, world)
    total_updates = updates_per_epoch * cfg.SOLVER.EPOCHS
    warmup_updates = updates_per_epoch * cfg.SOLVER.WARMUP_EPOCHS
    global_clips = clips_per_step(cfg) * accum * world
    base_lr = cfg.SOLVER.BASE_LR * global_clips / 256

    engine, optimizer = initialize(model, cfg, device, clips_per_step(cfg))
    module = engine.module
    state = checkpointing.load(engine, latest) if latest else {}
    run_log = RunLogger(cfg.OUTPUT_DIR, enabled=main, tensorboard=cfg.ENGINE.TENSORBOARD,
                        resume_step=state.get("global_step", 0))  # fmt: skip
    start_epoch, skipped_total = state.get("epoch", -1) + 1, state.get("skipped_samples", 0)
    if latest:
        logger.info("resumed from %s: epoch %d, step %d", latest, start_epoch, engine.global_steps)
    if main:
        logger.info(
            "model %s (%.1fM params), %d process(es) on %s, %d clips per step, lr %.3g, %d steps/epoch, "
            "masking %s", cfg.MODEL.NAME, sum(p.numel() for p in module.parameters()) / 1e6, world, device,
            global_clips, base_lr, updates_per_epoch, cfg.MASK.MODE,
        )  # fmt: skip

    paths: dict[str, str] = {"log": run_log.path, "output_dir": cfg.OUTPUT_DIR}
    if latest:
        paths["checkpoint"] = latest
    guard = NonFiniteGuard(cfg.ENGINE.MAX_BAD_STEPS, engine)
    if "nonfinite" in state:
        guard.load_state_dict(state["nonfinite"])
    schedules = StepSchedules(cfg.SOLVER, base_lr, total_updates, warmup_updates)
    for epoch in range(start_epoch, cfg.SOLVER.EPOCHS):
        loader.sampler.set_epoch(epoch)
        seed_all(epoch_seed(cfg.SEED, epoch, PROCESS_STREAM, rank))
        # Shared by all ranks: each takes its slice of the global batch's mask noise.
        mask_gen = torch.Generator(device=device).manual_seed(epoch_seed(cfg.SEED, epoch, MASK_STREAM))
        alpha = easy_to_hard_alpha(epoch, cfg.SOLVER.EPOCHS, cfg.MASK.ALPHA_MAX)
        decay = ema_decay(epoch)
        engine.train()
        window = LogWindow(TRACKED, device)
        vis_batch = None
        bar = run_log.progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.SOLVER.EPOCHS}")
        for step, batch in enumerate(loader):
            if step >= steps_per_epoch:
                break
            lr, wd = schedules.apply(optimizer, engine.global_steps)
            videos = batch["video"].to(device, non_blocking=True)
            if vis_batch is None:
                vis_batch = videos[: cfg.ENGINE.VIS_NUM_CLIPS].detach().clone()

            out = pretrain_step(engine, videos, alpha, decay, mask_gen, (rank, world), guard)
            window.add({k: out[k] for k in TRACKED if k in out}, out["finite"], int(batch["skipped"]))
            bar.update(1)

            if (step + 1) % cfg.ENGINE.LOG_EVERY_STEPS == 0 or step + 1 == steps_per_epoch:
                nonfinite_total = guard.check(epoch, step)  # stops the run before anything is saved
                means, skipped_now, steps, elapsed = window.close()
                skipped_total += skipped_now
                stats = {k: v for k, v in means.items() if k in out or k == "loss"}
                grad_norm = engine.get_global_grad_norm()
                stats.update(
                    epoch=epoch, alpha=alpha, lr=lr, weight_decay=wd, ema_decay=decay,
                    grad_norm=float(grad_norm) if grad_norm is not None else None,
                    clips_per_s=steps * clips_per_step(cfg) * world / max(elapsed, 1e-9),
                    skipped_samples=skipped_total, nonfinite_steps=nonfinite_total,
                )  # fmt: skip
                run_log.log(engine.global_steps, stats)
                bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("loss_rec", "loss_pred", "rank_corr") if k in stats}
                                | {"alpha": f"{alpha:.3f}", "lr": f"{lr:.2e}", "clips/s": f"{stats['clips_per_s']:.1f}",
                                   "skipped": skipped_total})  # fmt: skip
        bar.close()

        last = epoch + 1 == cfg.SOLVER.EPOCHS
        if last or (epoch + 1) % cfg.ENGINE.SAVE_EVERY_EPOCHS == 0:
            client_state = {
                "epoch": epoch, "global_step": int(engine.global_steps), "skipped_samples": skipped_total,
                "seed": cfg.SEED, "model_name": cfg.MODEL.NAME, "model_kwargs": jsonable(kwargs),
                "nonfinite": guard.state_dict(),
            }  # fmt: skip
            paths["checkpoint"] = checkpointing.save(engine, cfg.OUTPUT_DIR, epoch, client_state, cfg.ENGINE.KEEP_LAST)
        if vis_batch is not None and (last or (epoch + 1) % cfg.ENGINE.VIS_EVERY_EPOCHS == 0):
            paths["picture"] = _visualize(module, vis_batch, alpha, cfg, epoch, main)

    paths["model"] = _save_final_model(engine, cfg, kwargs, main)
    run_log.close()
    dist_utils.barrier()
    return paths


def _visualize(module, videos: torch.Tensor, alpha: float, cfg: CfgNode, epoch: int, main: bool) -> str:
    """Every rank runs the forward (ZeRO-3 gathers weights collectively); rank 0 writes the PNG."""
    from hpm_video.visualize import render_pretrain_grid

    was_training = module.training
    module.eval()
    with torch.no_grad():
        image = render_pretrain_grid(module, videos, alpha=alpha, mean=cfg.DATA.MEAN, std=cfg.DATA.STD)
    module.train(was_training)
    path = os.path.join(cfg.OUTPUT_DIR, f"hard_tubes_epoch{epoch + 1:04d}.png")
    if main:
        image.save(path)
    return path


def _save_final_model(engine, cfg: CfgNode, kwargs: dict, main: bool) -> str:
    """A consolidated, self-describing weights file of the whole pretraining model (any ZeRO stage)."""
    from hpm_video.checkpoint import save_model_file

    state = full_state_dict(engine, cfg.ENGINE.ZERO_STAGE)  # collective under ZeRO-3
    path = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if main:
        save_model_file(path, state, cfg.MODEL.NAME, **kwargs)
    return path
