"""The fine-tuning loop (action recognition, and image classification through one-frame clips).

Structure and guarantees follow :mod:`hpm_video.engine.pretrain`: DeepSpeed (ZeRO stage and precision
from the config), per-step warm-up + cosine lr and weight decay, every random stream re-derived from
``(SEED, epoch)`` at the start of each epoch (so resuming at an epoch boundary replays exactly what an
uninterrupted run does), non-finite steps skipped and counted, kill-safe checkpoints with auto-resume,
the same progress bar, ``log.jsonl`` and TensorBoard scalars.

Fine-tuning specifics:
  * initialisation from ``FINETUNE.INIT`` (see :mod:`hpm_video.finetune_init`), report in
    ``init_report.json``;
  * layer-wise lr decay (``SOLVER.LAYER_DECAY``), drop path (``MODEL.DROP_PATH``);
  * mixup / cutmix on clips (:class:`VideoMixup`: timm's Mixup with the cut box on H and W, the same
    box on every frame), soft-target cross entropy with label smoothing folded into the targets, or
    label-smoothing / plain cross entropy without mixing;
  * optional EMA of the weights (``FINETUNE.MODEL_EMA``, timm's ModelEmaV3, evaluated alongside);
  * single-view validation every ``FINETUNE.EVAL_EVERY_EPOCHS``; the best top-1 weights (model or
    EMA) go to ``model_best.pth``, the last to ``model_final.pth`` (both self-describing model files);
  * multi-view test at the end (``DATA.TEST_NUM_SEGMENT`` x ``DATA.TEST_NUM_CROP``) of the last
    (default, VideoMAE's protocol) or best weights (``FINETUNE.TEST_WEIGHTS``): ``eval.json`` and
    ``predictions.csv`` (see :mod:`hpm_video.engine.evaluation`);
  * linear probing (``FINETUNE.LINEAR_PROBE``): frozen encoder, BatchNorm without affine + linear head
    (MAE's protocol), LARS by default. Saved model files fold the BatchNorm into the linear layer, so
    they load as ordinary classifiers.

Learning rate: ``SOLVER.BASE_LR`` is per 256 *videos* (``BATCH_SIZE x ACCUM_STEPS x world``; the
repeated-augmentation clips of ``DATA.NUM_SAMPLE`` do not count), VideoMAE's fine-tuning convention,
so its published learning rates carry over unchanged. ``SOLVER.MIN_LR``/``WARMUP_LR`` are absolute.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from hpm_video.checkpoint import jsonable
from hpm_video.config import CfgNode, model_kwargs
from hpm_video.engine import checkpointing, evaluation
from hpm_video.engine import distributed as dist_utils
from hpm_video.engine.logger import RunLogger
from hpm_video.engine.optim import StepSchedules
from hpm_video.engine.steps import (
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
from hpm_video.finetune_init import fold_probe_head

logger = logging.getLogger("hpm_video.finetune")

EMA_FILE = "model_ema.pth"
BEST_FILE = "model_best.pth"
FINAL_FILE = "model_final.pth"


# ----------------------------------------------------------------------------------- mixing
class VideoMixup:
    """timm's ``Mixup`` for clips ``(B, C, T, H, W)`` as well as images ``(B, C, H, W)``.

    timm's cutmix draws its box from the last two dimensions but pastes it with ``x[:, :, y, x]``,
    which on a 5-D clip cuts T and H. Folding channels and time into one axis, ``(B, C*T, H, W)``,
    makes every variant (batch, pair, elem) cut H and W with the same box on every frame and channel;
    mixup's blend does not care about the shape. Needs an even batch, as timm's does.
    """

    def __init__(self, **mixup_kwargs) -> None:
        from timm.data import Mixup

        self.mixup = Mixup(**mixup_kwargs)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:
            raise ValueError(f"mixup/cutmix pairs clips, so the batch must be even; got {len(x)} clips")
        if x.ndim == 5:
            b, c, t, h, w = x.shape
            flat, target = self.mixup(x.reshape(b, c * t, h, w), target)
            return flat.reshape(b, c, t, h, w), target
        return self.mixup(x, target)


def build_mixup(cfg: CfgNode) -> VideoMixup | None:
    ft = cfg.FINETUNE
    if ft.MIXUP <= 0 and ft.CUTMIX <= 0:
        return None
    return VideoMixup(
        mixup_alpha=ft.MIXUP, cutmix_alpha=ft.CUTMIX, prob=ft.MIXUP_PROB, switch_prob=ft.MIXUP_SWITCH_PROB,
        mode=ft.MIXUP_MODE, label_smoothing=ft.SMOOTHING, num_classes=ft.NUM_CLASSES,
    )  # fmt: skip


def build_criterion(cfg: CfgNode, mixing: bool) -> nn.Module:
    """Soft-target CE when targets are mixed (smoothing is already in them), else smoothing or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:
        return SoftTargetCrossEntropy()
    if cfg.FINETUNE.SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.FINETUNE.SMOOTHING)
    return nn.CrossEntropyLoss()


# ------------------------------------------------------------------------------ linear probe
def make_linear_probe(model: nn.Module) -> nn.Module:
    """Freeze everything, then put a BatchNorm1d without affine in front of a fresh linear head (MAE)."""
    for p in model.parameters():
        p.requires_grad = False
    head = model.head
    if not isinstance(head, nn.Linear):
        raise ValueError("linear probing needs a model with a linear head (FINETUNE.NUM_CLASSES > 0)")
    from timm.layers import trunc_normal_

    trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    model.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
    for p in model.head.parameters():
        p.requires_grad = True
    return model


def make_probe_optimizer(model: nn.Module, cfg: CfgNode) -> torch.optim.Optimizer:
    """LARS as in MAE's linear probe: trust-ratio scaling for weight matrices, plain momentum for biases."""
    from timm.optim import Lars

    from hpm_video.engine.optim import param_groups

    groups = param_groups(model, cfg.SOLVER.WEIGHT_DECAY)
    for group in groups:
        # Weight matrices adapt (trust ratio) whatever the weight decay, also at MAE's probing decay 0;
        # biases and norms do not (MAE's LARS skips 1-D parameters).
        group["always_adapt"] = group["wd_scale"] > 0
    return Lars(groups, lr=cfg.SOLVER.BASE_LR, momentum=0.9, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


# ----------------------------------------------------------------------------------- data
class _IndexedImages(torch.utils.data.Dataset):
    """Adds ``video_id``/``view`` to an image dataset so evaluation treats each image as a one-view video."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.samples = dataset.samples
        self.num_views = 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        item = dict(self.dataset[key])
        index = key[0] if isinstance(key, (tuple, list)) else int(key)
        item.update(video_id=int(index) % len(self.dataset), view=0)
        return item


def build_dataset(cfg: CfgNode, mode: str):
    """``mode`` train / val / test dataset for the config (video lists or images)."""
    data, ft = cfg.DATA, cfg.FINETUNE
    list_file = {"train": data.TRAIN_LIST, "val": data.VAL_LIST, "test": data.TEST_LIST or data.VAL_LIST}[mode]
    key = {"train": "DATA.TRAIN_LIST", "val": "DATA.VAL_LIST", "test": "DATA.TEST_LIST (or DATA.VAL_LIST)"}[mode]
    if data.DATASET == "image":
        from hpm_video.data import ImageDataset

        source = list_file or (data.ROOT if mode == "train" else "")
        if not source:
            raise ValueError(f"config {key} is empty: point it at an image folder or a 'path label' list")
        if mode == "train":
            from timm.data import create_transform

            dataset = ImageDataset(source, input_size=cfg.MODEL.INPUT_SIZE, train=True, scale=(0.08, 1.0),
                                   flip=data.FLIP, mean=data.MEAN, std=data.STD, root=data.ROOT or None)  # fmt: skip
            # MAE's fine-tuning pipeline (RandAugment, random erasing) replaces the plain crop + flip.
            dataset.transform = create_transform(
                cfg.MODEL.INPUT_SIZE, is_training=True, auto_augment=ft.RAND_AUGMENT or None,
                interpolation="bicubic", re_prob=ft.REPROB, re_mode="pixel", re_count=1,
                hflip=0.5 if data.FLIP else 0.0, mean=tuple(data.MEAN), std=tuple(data.STD),
            )  # fmt: skip
            return dataset
        return _IndexedImages(ImageDataset(source, input_size=cfg.MODEL.INPUT_SIZE, train=False, mean=data.MEAN,
                                           std=data.STD, root=data.ROOT or None))  # fmt: skip

    from hpm_video.data import VideoFinetuneDataset

    if not list_file:
        raise ValueError(f"config {key} is empty: point it at a 'path label' list file")
    return VideoFinetuneDataset(
        list_file, data.ROOT, mode=mode, sampling=data.SAMPLING, num_frames=cfg.MODEL.NUM_FRAMES,
        sampling_rate=data.SAMPLING_RATE, input_size=cfg.MODEL.INPUT_SIZE, short_side_size=data.SHORT_SIDE_SIZE,
        num_segment=data.TEST_NUM_SEGMENT, num_crop=data.TEST_NUM_CROP, flip=data.FLIP,
        rand_augment=ft.RAND_AUGMENT or None, reprob=ft.REPROB, num_sample=data.NUM_SAMPLE if mode == "train" else 1,
        mean=data.MEAN, std=data.STD, backend=data.BACKEND, decode_timeout_s=data.DECODE_TIMEOUT,
    )  # fmt: skip


def eval_batch_size(cfg: CfgNode) -> int:
    return cfg.FINETUNE.EVAL_BATCH_SIZE or cfg.SOLVER.BATCH_SIZE


def _eval_loader(cfg: CfgNode, dataset, device: torch.device):
    from hpm_video.data import build_loader

    return build_loader(
        dataset, eval_batch_size(cfg), cfg.DATA.NUM_WORKERS, shuffle=False, seed=cfg.SEED, drop_last=False,
        distributed=True, num_replicas=dist_utils.world_size(), rank=dist_utils.rank(),
        pin_memory=device.type == "cuda",
    )  # fmt: skip


def _check_labels(cfg: CfgNode, dataset, where: str) -> None:
    labels = [label for _, label in dataset.samples]
    if labels and max(labels) >= cfg.FINETUNE.NUM_CLASSES:
        raise ValueError(
            f"{where} has label {max(labels)} but FINETUNE.NUM_CLASSES is {cfg.FINETUNE.NUM_CLASSES}; "
            "labels must be 0 .. NUM_CLASSES - 1"
        )


# ----------------------------------------------------------------------------------- model
def build_model(cfg: CfgNode, init_state=None, kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """The classifier for the config (``kwargs`` given: rebuild exactly those, e.g. on resume)."""
    from hpm_video.finetune_init import pos_embed_kind_for
    from hpm_video.models import create_model

    if kwargs is None:
        kwargs = model_kwargs(cfg)
        kwargs["pos_embed"] = pos_embed_kind_for(init_state, cfg.FINETUNE.POS_EMBED)
        if cfg.FINETUNE.LINEAR_PROBE:
            kwargs["drop_path_rate"] = 0.0  # a frozen encoder must be deterministic
    return create_model(cfg.MODEL.NAME, **kwargs), kwargs


def _initialize_engine(model: nn.Module, cfg: CfgNode, device: torch.device):
    """DeepSpeed engine: the shared set-up (AdamW with layer decay), or LARS for a linear probe."""
    from hpm_video.engine.deepspeed_setup import initialize

    probe_lars = cfg.FINETUNE.LINEAR_PROBE and cfg.FINETUNE.PROBE_OPTIMIZER == "lars"
    return initialize(model, cfg, device, clips_per_step(cfg), make_probe_optimizer(model, cfg) if probe_lars else None)


def export_state(engine, cfg: CfgNode) -> dict[str, torch.Tensor] | None:
    """Full weights as a plain fp32 classifier state dict (probe head folded); collective under ZeRO-3.

    Returns the dict on rank 0 (and on every rank below ZeRO-3), None elsewhere.
    """
    state = full_state_dict(engine, cfg.ENGINE.ZERO_STAGE)
    return None if state is None else fold_probe_head({k: v.float() for k, v in state.items()})


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return fold_probe_head({k: v.detach().float().cpu() for k, v in module.state_dict().items()})


def _save_model(path: str, state: dict, cfg: CfgNode, kwargs: dict, meta: dict | None = None) -> str:
    from hpm_video.checkpoint import save_model_file

    save_model_file(path, state, cfg.MODEL.NAME, **jsonable(kwargs))
    if meta is not None:
        checkpointing.write_json_atomic(os.path.splitext(path)[0] + ".json", meta)
    return path


# ------------------------------------------------------------------------------------ train
def check_settings(cfg: CfgNode) -> None:
    """Refuse settings that cannot work, before anything is started or written."""
    from hpm_video.models import CLASSIFIER_MODELS

    if cfg.MODEL.NAME not in CLASSIFIER_MODELS:
        raise ValueError(
            f"config MODEL.NAME = {cfg.MODEL.NAME!r} is a pretraining model; fine-tuning needs a classifier: "
            f"{', '.join(CLASSIFIER_MODELS)}"
        )
    if cfg.FINETUNE.MODEL_EMA and cfg.ENGINE.ZERO_STAGE == 3:
        raise ValueError("FINETUNE.MODEL_EMA needs whole weights on every rank; use ENGINE.ZERO_STAGE <= 2 with it")
    if cfg.DATA.DATASET == "ssv2" and cfg.DATA.FLIP:
        raise ValueError(
            "config DATA.FLIP is on for Something-Something-v2, whose labels name directions (e.g. 'pushing "
            "something from left to right'); set DATA.FLIP False"
        )
    if cfg.FINETUNE.NUM_CLASSES < 1:
        raise ValueError(f"config FINETUNE.NUM_CLASSES = {cfg.FINETUNE.NUM_CLASSES} must be >= 1")
    grid = list(cfg.FINETUNE.INIT_POS_GRID)
    if grid and (len(grid) != 3 or not all(isinstance(x, int) and x >= 1 for x in grid)):
        raise ValueError(f"config FINETUNE.INIT_POS_GRID = {grid} must be empty or three positive integers T H W")


def train(cfg: CfgNode) -> dict[str, str]:
    """Run (or resume) fine-tuning, then the multi-view test; returns the paths of what it wrote."""
    from hpm_video.data import build_loader
    from hpm_video.finetune_init import load_pretrained, read_checkpoint, write_report

    check_settings(cfg)
    latest = checkpointing.checkpoint_to_resume(cfg.OUTPUT_DIR, cfg.ENGINE.AUTO_RESUME)  # before writing anything
    device, rank, world = start_run(cfg)
    main = rank == 0

    resume_state = checkpointing.read_client_state(latest) if latest else None

    seed_all(cfg.SEED)  # same initial weights on every rank
    paths: dict[str, str] = {"output_dir": cfg.OUTPUT_DIR}
    if resume_state is not None:
        # The checkpoint holds every weight; rebuild the exact model it was saved from.
        model, kwargs = build_model(cfg, kwargs=resume_state["model_kwargs"])
    else:
        init_ckpt = read_checkpoint(cfg.FINETUNE.INIT) if cfg.FINETUNE.INIT else None
        model, kwargs = build_model(cfg, init_ckpt)
        if init_ckpt is not None:
            report = load_pretrained(model, init_ckpt, fc_norm_from_norm=cfg.FINETUNE.FC_NORM_FROM_NORM,
                                     src_grid=cfg.FINETUNE.INIT_POS_GRID or None, log=main)  # fmt: skip
            if main:
                paths["init_report"] = os.path.join(cfg.OUTPUT_DIR, "init_report.json")
                write_report(report, paths["init_report"])
        elif main:
            logger.warning("FINETUNE.INIT is empty: fine-tuning from random weights")
    if cfg.FINETUNE.LINEAR_PROBE:
        make_linear_probe(model)

    train_set = build_dataset(cfg, "train")
    _check_labels(cfg, train_set, cfg.DATA.TRAIN_LIST or cfg.DATA.ROOT)
    loader = build_loader(
        train_set, cfg.SOLVER.BATCH_SIZE, cfg.DATA.NUM_WORKERS, shuffle=True, seed=cfg.SEED, drop_last=True,
        distributed=True, num_replicas=world, rank=rank, pin_memory=device.type == "cuda",
    )  # fmt: skip
    val_set = build_dataset(cfg, "val") if cfg.DATA.VAL_LIST else None
    val_loader = _eval_loader(cfg, val_set, device) if val_set is not None else None

    accum = cfg.SOLVER.ACCUM_STEPS
    steps_per_epoch, updates_per_epoch = epoch_steps(len(loader), len(train_set), cfg, world)
    mixup = build_mixup(cfg)
    if mixup is not None and clips_per_step(cfg) % 2:
        raise ValueError(
            f"mixup/cutmix needs an even number of clips per step, got {clips_per_step(cfg)} "
            "(SOLVER.BATCH_SIZE x DATA.NUM_SAMPLE); change one, or set FINETUNE.MIXUP 0 and FINETUNE.CUTMIX 0"
        )
    criterion = build_criterion(cfg, mixup is not None)
    total_updates = updates_per_epoch * cfg.SOLVER.EPOCHS
    warmup_updates = updates_per_epoch * cfg.SOLVER.WARMUP_EPOCHS
    global_videos = cfg.SOLVER.BATCH_SIZE * accum * world
    base_lr = cfg.SOLVER.BASE_LR * global_videos / 256

    ema = None
    if cfg.FINETUNE.MODEL_EMA:
        from timm.utils import ModelEmaV3

        model.to(device)
        ema = ModelEmaV3(model, decay=cfg.FINETUNE.MODEL_EMA_DECAY, dtype=torch.float32)
        ema.module.requires_grad_(False)
    engine, optimizer = _initialize_engine(model, cfg, device)
    module = engine.module
    fp16 = cfg.ENGINE.PRECISION == "fp16"
    run_log = RunLogger(cfg.OUTPUT_DIR, enabled=main, tensorboard=cfg.ENGINE.TENSORBOARD,
                        resume_step=resume_state["global_step"] if resume_state else 0)  # fmt: skip
    paths["log"] = run_log.path
    start_epoch, skipped_total = 0, 0
    best: dict = {"top1": None, "epoch": None, "weights": None}  # JSON-safe: it goes into the checkpoint marker
    if latest:
        state = checkpointing.load(engine, latest)
        start_epoch, skipped_total = state["epoch"] + 1, state.get("skipped_samples", 0)
        best.update(state.get("best") or {})
        if ema is not None:
            ema_path = os.path.join(latest, EMA_FILE)
            if os.path.isfile(ema_path):
                from hpm_video.checkpoint import load_file

                ema.module.load_state_dict(load_file(ema_path))
            else:
                logger.warning("%s has no %s: the EMA restarts from the current weights", latest, EMA_FILE)
                ema.module.load_state_dict(module.state_dict())
        logger.info("resumed from %s: epoch %d, step %d", latest, start_epoch, engine.global_steps)
        paths["checkpoint"] = latest
    if main:
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        logger.info(
            "model %s (%.1fM params, %.2fM trainable), %d process(es) on %s, %d videos (%d clips) per step, "
            "lr %.3g, %d steps/epoch, mixup %s, EMA %s, linear probe %s", cfg.MODEL.NAME,
            sum(p.numel() for p in module.parameters()) / 1e6, trainable / 1e6, world, device, global_videos,
            clips_per_step(cfg) * accum * world, base_lr, updates_per_epoch, mixup is not None, ema is not None,
            cfg.FINETUNE.LINEAR_PROBE,
        )  # fmt: skip

    guard = NonFiniteGuard(cfg.ENGINE.MAX_BAD_STEPS, engine)
    if resume_state and "nonfinite" in resume_state:
        guard.load_state_dict(resume_state["nonfinite"])
    schedules = StepSchedules(cfg.SOLVER, base_lr, total_updates, warmup_updates)
    for epoch in range(start_epoch, cfg.SOLVER.EPOCHS):
        loader.sampler.set_epoch(epoch)
        seed_all(epoch_seed(cfg.SEED, epoch, PROCESS_STREAM, rank))  # mixup draws from numpy's global RNG
        engine.train()
        window = LogWindow(("loss", "acc1"), device)
        bar = run_log.progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.SOLVER.EPOCHS}")
        for step, batch in enumerate(loader):
            if step >= steps_per_epoch:
                break
            lr, wd = schedules.apply(optimizer, engine.global_steps)
            videos = batch["video"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            targets = labels
            if mixup is not None:
                videos, targets = mixup(videos, labels)
            logits = engine(videos.half() if fp16 else videos)
            loss = criterion(logits.float(), targets)
            finite = guard.observe(loss)
            # timm's EMA takes a float decay (a device weight would need a host read), so after an
            # update the guard skipped, the EMA still takes its step toward the unchanged weights.
            if backward_and_step(engine, loss, guard) is not None and ema is not None:
                ema.update(module)
            # Accuracy against the unmixed labels (with mixing it is only a rough signal).
            acc1 = (logits.detach().argmax(-1) == labels).float().mean() * 100
            window.add({"loss": loss, "acc1": acc1}, finite, int(batch["skipped"]))
            bar.update(1)

            if (step + 1) % cfg.ENGINE.LOG_EVERY_STEPS == 0 or step + 1 == steps_per_epoch:
                nonfinite_total = guard.check(epoch, step)  # stops the run before anything is saved
                stats, skipped_now, steps, elapsed = window.close()
                skipped_total += skipped_now
                grad_norm = engine.get_global_grad_norm()
                stats.update(
                    epoch=epoch, lr=lr, weight_decay=wd,
                    grad_norm=float(grad_norm) if grad_norm is not None else None,
                    clips_per_s=steps * clips_per_step(cfg) * world / max(elapsed, 1e-9),
                    skipped_samples=skipped_total, nonfinite_steps=nonfinite_total,
                )  # fmt: skip
                run_log.log(engine.global_steps, stats)
                bar.set_postfix({"loss": f"{stats['loss']:.4g}", "acc1": f"{stats['acc1']:.1f}", "lr": f"{lr:.2e}",
                                 "clips/s": f"{stats['clips_per_s']:.1f}", "skipped": skipped_total})  # fmt: skip
        bar.close()

        last = epoch + 1 == cfg.SOLVER.EPOCHS
        if val_loader is not None and (last or (epoch + 1) % cfg.FINETUNE.EVAL_EVERY_EPOCHS == 0):
            candidates = [("model", module)] + ([("ema", ema.module)] if ema is not None else [])
            for name, net in candidates:
                bar = run_log.progress(len(val_loader), f"val {name} {epoch + 1}")
                metrics, _ = evaluation.evaluate(
                    net, val_loader, val_set.num_videos if hasattr(val_set, "num_videos") else len(val_set),
                    cfg.FINETUNE.NUM_CLASSES, device, cfg.ENGINE.PRECISION, expected_views=1, progress=bar,
                )  # fmt: skip
                bar.close()
                summary = {k: metrics[k] for k in ("top1", "top5", "mean_class_accuracy", "loss", "num_videos")
                           if k in metrics}  # fmt: skip
                run_log.log(engine.global_steps, {"epoch": epoch, **summary}, kind=f"val_{name}")
                if main:
                    logger.info("epoch %d val (%s): top-1 %.2f, top-5 %.2f, loss %.4f on %d videos", epoch + 1, name,
                                metrics["top1"], metrics["top5"], metrics.get("loss", float("nan")),
                                metrics["num_videos"])  # fmt: skip
                if best["top1"] is None or metrics["top1"] > best["top1"]:
                    best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch, "weights": name}
                    state = export_state(engine, cfg) if name == "model" else _module_state(net)
                    if main:
                        paths["best"] = _save_model(os.path.join(cfg.OUTPUT_DIR, BEST_FILE), state, cfg, kwargs,
                                                    meta=dict(best))  # fmt: skip
                    dist_utils.barrier()

        if last or (epoch + 1) % cfg.ENGINE.SAVE_EVERY_EPOCHS == 0:
            client_state = {
                "epoch": epoch, "global_step": int(engine.global_steps), "skipped_samples": skipped_total,
                "seed": cfg.SEED, "model_name": cfg.MODEL.NAME, "model_kwargs": jsonable(kwargs), "best": best,
                "nonfinite": guard.state_dict(),
            }  # fmt: skip
            extra = None
            if ema is not None:
                extra = {EMA_FILE: {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}}
            paths["checkpoint"] = checkpointing.save(engine, cfg.OUTPUT_DIR, epoch, client_state, cfg.ENGINE.KEEP_LAST,
                                                     extra_files=extra)  # fmt: skip

    final_state = export_state(engine, cfg)
    if main:
        paths["model"] = _save_model(os.path.join(cfg.OUTPUT_DIR, FINAL_FILE), final_state, cfg, kwargs)
    if "best" not in paths and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, BEST_FILE)):
        paths["best"] = os.path.join(cfg.OUTPUT_DIR, BEST_FILE)
    run_log.close()
    dist_utils.barrier()

    if cfg.FINETUNE.FINAL_TEST and (cfg.DATA.TEST_LIST or cfg.DATA.VAL_LIST):
        final = os.path.join(cfg.OUTPUT_DIR, FINAL_FILE)
        weights = paths.get("best", final) if cfg.FINETUNE.TEST_WEIGHTS == "best" else final
        paths.update(final_test(cfg, weights, device))
    dist_utils.barrier()
    return paths


# ------------------------------------------------------------------------------------- test
def final_test(cfg: CfgNode, weights: str, device: torch.device | None = None) -> dict[str, str]:
    """Multi-view test of a model file on ``DATA.TEST_LIST`` (else ``VAL_LIST``); writes eval.json and
    predictions.csv in ``OUTPUT_DIR``. Every rank evaluates a plain (non-DeepSpeed) copy of the model."""
    from hpm_video.finetune_init import load_pretrained, read_checkpoint

    device = device or dist_utils.pick_device(cfg.ENGINE.DEVICE)
    ckpt = read_checkpoint(weights)
    model, _ = build_model(cfg, ckpt)
    report = load_pretrained(model, ckpt, fc_norm_from_norm=False, log=False)
    if not report.head.startswith("loaded"):
        raise ValueError(
            f"{weights}: no classifier head for {cfg.FINETUNE.NUM_CLASSES} classes ({report.head}); "
            "evaluate a fine-tuned checkpoint, not a pretrained encoder"
        )
    if report.missing:
        raise ValueError(f"{weights}: the model is missing {report.missing[:8]} after loading; wrong MODEL.* settings?")
    return _run_test(cfg, model.to(device), device, weights)


def _run_test(cfg: CfgNode, model: nn.Module, device: torch.device, weights: str) -> dict[str, str]:
    dataset = build_dataset(cfg, "test")
    _check_labels(cfg, dataset, cfg.DATA.TEST_LIST or cfg.DATA.VAL_LIST)
    loader = _eval_loader(cfg, dataset, device)
    views = getattr(dataset, "num_views", 1)
    main = dist_utils.is_main()
    bar = RunLogger(cfg.OUTPUT_DIR, enabled=main, tensorboard=False).progress(len(loader), f"test {views} views")
    num_videos = dataset.num_videos if hasattr(dataset, "num_videos") else len(dataset)
    metrics, merged = evaluation.evaluate(model, loader, num_videos, cfg.FINETUNE.NUM_CLASSES, device,
                                          cfg.ENGINE.PRECISION, expected_views=views, progress=bar)  # fmt: skip
    bar.close()
    out: dict[str, str] = {}
    if main:
        class_names = evaluation.read_class_names(cfg.FINETUNE.CLASS_NAMES)
        if class_names:
            metrics["class_names"] = class_names
        metrics.update(
            checkpoint=weights, split=cfg.DATA.TEST_LIST or cfg.DATA.VAL_LIST,
            num_segments=cfg.DATA.TEST_NUM_SEGMENT if cfg.DATA.DATASET != "image" else 1,
            num_crops=cfg.DATA.TEST_NUM_CROP if cfg.DATA.DATASET != "image" else 1,
            topk_note=f"top5 is top-{min(5, cfg.FINETUNE.NUM_CLASSES)} with {cfg.FINETUNE.NUM_CLASSES} classes",
        )  # fmt: skip
        out["eval"] = checkpointing.write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "eval.json"), metrics)
        out["predictions"] = evaluation.write_predictions(
            os.path.join(cfg.OUTPUT_DIR, "predictions.csv"), merged, [p for p, _ in dataset.samples],
            root=cfg.DATA.ROOT, class_names=class_names,
        )  # fmt: skip
        logger.info("test (%d views per video) of %s: top-1 %.2f, top-5 %.2f, mean class accuracy %.2f on %d videos",
                    views, weights, metrics["top1"], metrics["top5"], metrics.get("mean_class_accuracy", float("nan")),
                    metrics["num_videos"])  # fmt: skip
    dist_utils.barrier()
    return out


def evaluate_only(cfg: CfgNode, checkpoint: str | None = None) -> dict[str, str]:
    """``--eval``: multi-view test of ``checkpoint``, else of this run's final model and best model (in the
    order ``FINETUNE.TEST_WEIGHTS`` prefers), else its latest DeepSpeed checkpoint (any ZeRO stage), else
    ``FINETUNE.INIT`` (which then must hold a trained head)."""
    check_settings(cfg)
    device = dist_utils.start_process(cfg.ENGINE.DEVICE)
    logging.basicConfig(level=logging.INFO if dist_utils.is_main() else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")  # fmt: skip
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    if checkpoint is None:
        run_files = [os.path.join(cfg.OUTPUT_DIR, FINAL_FILE), os.path.join(cfg.OUTPUT_DIR, BEST_FILE)]
        if cfg.FINETUNE.TEST_WEIGHTS == "best":
            run_files.reverse()
        for candidate in (*run_files, checkpointing.latest_checkpoint(cfg.OUTPUT_DIR), cfg.FINETUNE.INIT):
            if candidate and os.path.exists(candidate):
                checkpoint = candidate
                break
    if checkpoint is None:
        raise FileNotFoundError(
            f"nothing to evaluate: no {BEST_FILE}, {FINAL_FILE} or checkpoint in {cfg.OUTPUT_DIR} and FINETUNE.INIT "
            "is empty; pass --checkpoint PATH"
        )
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    logger.info("evaluating %s", checkpoint)
    return final_test(cfg, checkpoint, device)
