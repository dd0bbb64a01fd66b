"""All hyper-parameters in one place: fvcore ``CfgNode`` defaults, YAML files with ``_BASE_``, and
``KEY VALUE`` command-line overrides.

    cfg = load_config("configs/pretrain/k400/vit_base_hpm.yaml", ["SOLVER.EPOCHS", "10"])

YAML is read with a safe loader (fvcore's default). Unknown keys, wrong types and invalid choices
are refused with a message naming the key and the valid options.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

from fvcore.common.config import CfgNode as _FvCfgNode

from hpm_video.engine import COMPILE_MODES

# Valid values of the string options, checked by ``validate``.
CHOICES: dict[str, tuple[str, ...]] = {
    "MASK.MODE": ("random", "hpm"),
    "MASK.UNIT": ("tube", "token"),
    "MASK.PRED_LOSS": ("relative", "absolute"),
    "DATA.DATASET": ("k400", "ssv2", "image"),
    "DATA.BACKEND": ("auto", "decord", "pyav"),
    "DATA.SAMPLING": ("dense", "segment"),
    "ENGINE.PRECISION": ("fp32", "bf16", "fp16"),
    "ENGINE.DEVICE": ("auto", "cpu", "cuda"),
    "ENGINE.COMPILE_MODE": COMPILE_MODES,
    "FINETUNE.POS_EMBED": ("auto", "sincos1d", "learned"),
    "FINETUNE.MIXUP_MODE": ("batch", "pair", "elem"),
    "FINETUNE.PROBE_OPTIMIZER": ("lars", "adamw"),
    "FINETUNE.TEST_WEIGHTS": ("last", "best"),
}


class CfgNode(_FvCfgNode):
    """fvcore's CfgNode with error messages that name the valid keys."""

    def merge_from_list(self, cfg_list: list) -> CfgNode:
        if len(cfg_list) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd list: {cfg_list}")
        for key in cfg_list[0::2]:
            _check_key_exists(self, key)
        return _with_clear_type_errors(lambda: super(CfgNode, self).merge_from_list(cfg_list))

    def merge_from_other_cfg(self, cfg_other: _FvCfgNode) -> CfgNode:
        _check_tree(self, cfg_other, "")
        return _with_clear_type_errors(lambda: super(CfgNode, self).merge_from_other_cfg(cfg_other))


def _check_key_exists(root: _FvCfgNode, dotted: str) -> None:
    node = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, _FvCfgNode) or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            valid = sorted(node.keys()) if isinstance(node, _FvCfgNode) else []
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise KeyError(f"unknown config key {dotted!r}{hint}; valid keys under {where}: {', '.join(valid)}")
        node = node[part]


def _check_tree(defaults: _FvCfgNode, other: _FvCfgNode, prefix: str) -> None:
    for key, value in other.items():
        dotted = f"{prefix}{key}"
        if key == "_BASE_":
            continue
        _check_key_exists(defaults, dotted)
        if isinstance(value, dict):
            target = defaults
            for part in dotted.split("."):
                target = target[part]
            if not isinstance(target, _FvCfgNode):
                raise ValueError(f"config key {dotted!r} is a value, not a section")
            _check_tree(defaults, value, dotted + ".")


def _with_clear_type_errors(merge):
    try:
        return merge()
    except ValueError as err:
        raise ValueError(f"bad config value: {err}") from err


_C = CfgNode()
_C.OUTPUT_DIR = "output/run"
_C.SEED = 0

# ------------------------------------------------------------------------------------------ model
_C.MODEL = CfgNode()
_C.MODEL.NAME = "hpm_pretrain_vit_base_patch16"  # see hpm_video.models.MODEL_NAMES
_C.MODEL.INPUT_SIZE = 224
_C.MODEL.NUM_FRAMES = 16
_C.MODEL.TUBELET_SIZE = 2
# Size overrides for small experiments; 0 keeps the named size's value.
_C.MODEL.EMBED_DIM = 0
_C.MODEL.DEPTH = 0
_C.MODEL.NUM_HEADS = 0
_C.MODEL.DECODER_EMBED_DIM = 0
_C.MODEL.DECODER_DEPTH = 0
_C.MODEL.DECODER_NUM_HEADS = 0
_C.MODEL.DROP_PATH = 0.0
_C.MODEL.GRAD_CHECKPOINTING = False

# ---------------------------------------------------------------------------------------- masking
_C.MASK = CfgNode()
_C.MASK.MODE = "random"  # random: VideoMAE/MAE; hpm: EMA teacher picks hard tubes
_C.MASK.RATIO = 0.9
_C.MASK.UNIT = "tube"
_C.MASK.PREDICTOR = False  # forced on for hpm; random + predictor = "loss prediction only"
_C.MASK.PRED_LOSS = "relative"
_C.MASK.ALPHA_MAX = 0.5  # easy-to-hard: alpha = ALPHA_MAX * (epoch + 1) / EPOCHS
_C.MASK.NORM_PIX_LOSS = True

# ------------------------------------------------------------------------------------------- data
_C.DATA = CfgNode()
_C.DATA.DATASET = "k400"
_C.DATA.ROOT = ""
_C.DATA.TRAIN_LIST = ""
_C.DATA.VAL_LIST = ""
_C.DATA.TEST_LIST = ""
_C.DATA.SAMPLING_RATE = 4  # frame stride: 4 Kinetics, 2 Something-Something
_C.DATA.SAMPLING = "dense"  # fine-tuning: dense (Kinetics) or segment (SSv2)
_C.DATA.NUM_SAMPLE = 1  # repeated augmentation: clips per decoded video
_C.DATA.BACKEND = "auto"
_C.DATA.DECODE_TIMEOUT = 30.0
_C.DATA.NUM_WORKERS = 8
_C.DATA.MEAN = (0.485, 0.456, 0.406)
_C.DATA.STD = (0.229, 0.224, 0.225)
_C.DATA.SHORT_SIDE_SIZE = 224
_C.DATA.FLIP = True  # fine-tuning only; SSv2 configs turn it off
_C.DATA.TEST_NUM_SEGMENT = 5
_C.DATA.TEST_NUM_CROP = 3

# ----------------------------------------------------------------------------------------- solver
_C.SOLVER = CfgNode()
_C.SOLVER.EPOCHS = 800
_C.SOLVER.WARMUP_EPOCHS = 40
_C.SOLVER.BATCH_SIZE = 32  # per process
_C.SOLVER.ACCUM_STEPS = 1
_C.SOLVER.BASE_LR = 1.5e-4  # per 256 clips: lr = BASE_LR * global_batch / 256
_C.SOLVER.MIN_LR = 1e-5
_C.SOLVER.WARMUP_LR = 1e-6
_C.SOLVER.WEIGHT_DECAY = 0.05
_C.SOLVER.WEIGHT_DECAY_END = -1.0  # < 0: constant weight decay
_C.SOLVER.BETAS = (0.9, 0.95)
_C.SOLVER.EPS = 1e-8
_C.SOLVER.CLIP_GRAD = 0.0  # 0 disables
_C.SOLVER.LAYER_DECAY = 1.0  # fine-tuning: 0.75 video, 0.8 images
_C.SOLVER.STEPS_PER_EPOCH = 0  # > 0 caps an epoch (tests, demo); 0 = the whole loader

# ----------------------------------------------------------------------------------------- engine
_C.ENGINE = CfgNode()
_C.ENGINE.DEVICE = "auto"
_C.ENGINE.ZERO_STAGE = 0
_C.ENGINE.PRECISION = "bf16"  # bf16: autocast with fp32 weights; fp16: DeepSpeed loss scaling
_C.ENGINE.MAX_BAD_STEPS = 20  # stop after this many non-finite losses in a row (seen at log steps)
_C.ENGINE.COMPILE = False
_C.ENGINE.COMPILE_MODE = "default"  # torch.compile mode when ENGINE.COMPILE is on
_C.ENGINE.AUTO_RESUME = True
_C.ENGINE.SAVE_EVERY_EPOCHS = 20
_C.ENGINE.KEEP_LAST = 2  # checkpoints kept besides the newest (older ones are deleted)
_C.ENGINE.LOG_EVERY_STEPS = 20
_C.ENGINE.VIS_EVERY_EPOCHS = 20
_C.ENGINE.VIS_NUM_CLIPS = 4
_C.ENGINE.TENSORBOARD = True

# ------------------------------------------------------------------------------------ fine-tuning
_C.FINETUNE = CfgNode()
_C.FINETUNE.NUM_CLASSES = 400
_C.FINETUNE.INIT = ""  # pretraining checkpoint / exported encoder / official .pth
_C.FINETUNE.INIT_SCALE = 0.001
_C.FINETUNE.HEAD_DROP = 0.0
_C.FINETUNE.RAND_AUGMENT = "rand-m7-n4-mstd0.5-inc1"
_C.FINETUNE.REPROB = 0.25
_C.FINETUNE.MIXUP = 0.8
_C.FINETUNE.CUTMIX = 1.0
_C.FINETUNE.MIXUP_PROB = 1.0
_C.FINETUNE.MIXUP_SWITCH_PROB = 0.5
_C.FINETUNE.SMOOTHING = 0.1
_C.FINETUNE.MODEL_EMA = False
_C.FINETUNE.MODEL_EMA_DECAY = 0.9999
_C.FINETUNE.LINEAR_PROBE = False
_C.FINETUNE.EVAL_EVERY_EPOCHS = 5
# Position table: auto = a learned (trainable) table when FINETUNE.INIT stores one (MAE image
# checkpoints), else VideoMAE's fixed 1-D sin/cos table (not in the state dict).
_C.FINETUNE.POS_EMBED = "auto"
# T H W token grid of FINETUNE.INIT's stored position table when the checkpoint does not say it
# (this project's own checkpoints do) and the row count alone is ambiguous; [] = infer it.
_C.FINETUNE.INIT_POS_GRID = []
# Initialise fc_norm from the pretrained encoder's final norm (VideoMAE and MAE start fc_norm fresh).
_C.FINETUNE.FC_NORM_FROM_NORM = True
_C.FINETUNE.MIXUP_MODE = "batch"  # timm: one lambda/box per batch, per pair or per element
_C.FINETUNE.PROBE_OPTIMIZER = "lars"  # linear probe optimiser (MAE: LARS, momentum 0.9)
_C.FINETUNE.EVAL_BATCH_SIZE = 0  # per process, for validation and test; 0 = SOLVER.BATCH_SIZE
_C.FINETUNE.FINAL_TEST = True  # multi-view test after training
# Weights the final test uses. last: VideoMAE's protocol (its K400/SSv2 test lists are the validation
# videos, so picking the best epoch on them would flatter the result); best: model_best.pth.
_C.FINETUNE.TEST_WEIGHTS = "last"
_C.FINETUNE.CLASS_NAMES = ""  # optional file, one class name per line, for eval.json / predictions.csv


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults."""
    return _C.clone()


def validate(cfg: CfgNode) -> None:
    """Refuse invalid choices and inconsistent settings, naming the key and the valid values."""
    for dotted, choices in CHOICES.items():
        node = cfg
        for part in dotted.split(".")[:-1]:
            node = node[part]
        value = node[dotted.split(".")[-1]]
        if value not in choices:
            raise ValueError(f"config {dotted} = {value!r} is not valid; choose one of: {', '.join(choices)}")
    if cfg.ENGINE.ZERO_STAGE not in (0, 1, 2, 3):
        raise ValueError(f"config ENGINE.ZERO_STAGE = {cfg.ENGINE.ZERO_STAGE} is not valid; choose 0, 1, 2 or 3")
    if not 0.0 <= cfg.MASK.RATIO < 1.0:
        raise ValueError(f"config MASK.RATIO = {cfg.MASK.RATIO} must be in [0, 1)")
    if not 0.0 <= cfg.MASK.ALPHA_MAX <= 1.0:  # a compiled step does not check alpha itself
        raise ValueError(f"config MASK.ALPHA_MAX = {cfg.MASK.ALPHA_MAX} must be in [0, 1]")
    if cfg.ENGINE.COMPILE and cfg.ENGINE.ZERO_STAGE == 3:
        raise ValueError(
            "config ENGINE.COMPILE = True does not work with ENGINE.ZERO_STAGE = 3: DeepSpeed's per-module "
            "parameter gathering breaks the compiled graph and leaves the fused qkv weight unfetched; "
            "compile with ZERO_STAGE 0, 1 or 2, or run ZeRO-3 without ENGINE.COMPILE"
        )
    counts = ["SOLVER.EPOCHS", "SOLVER.BATCH_SIZE", "SOLVER.ACCUM_STEPS", "ENGINE.SAVE_EVERY_EPOCHS",
              "ENGINE.LOG_EVERY_STEPS", "ENGINE.VIS_EVERY_EPOCHS", "FINETUNE.EVAL_EVERY_EPOCHS"]  # fmt: skip
    for dotted in counts:
        section, key = dotted.split(".")
        if cfg[section][key] < 1:
            raise ValueError(f"config {dotted} = {cfg[section][key]} must be >= 1")
    from hpm_video.models import MODEL_NAMES

    if cfg.MODEL.NAME not in MODEL_NAMES:
        names = ", ".join(MODEL_NAMES)
        raise ValueError(f"config MODEL.NAME = {cfg.MODEL.NAME!r} is not valid; choose one of: {names}")


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> CfgNode:
    """Defaults, then the YAML file (with its ``_BASE_`` chain), then ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            cfg.merge_from_file(path)
        except (KeyError, ValueError) as err:
            raise type(err)(f"{path}: {err.args[0] if err.args else err}") from err
    cfg.merge_from_list(list(overrides))
    validate(cfg)
    cfg.freeze()
    return cfg


def model_kwargs(cfg: CfgNode) -> dict:
    """Keyword arguments for ``create_model(cfg.MODEL.NAME, ...)`` from the config."""
    m = cfg.MODEL
    kwargs: dict = dict(img_size=m.INPUT_SIZE, num_frames=m.NUM_FRAMES, tubelet_size=m.TUBELET_SIZE,
                        drop_path_rate=m.DROP_PATH, grad_checkpointing=m.GRAD_CHECKPOINTING)  # fmt: skip
    pretrain = m.NAME.startswith("hpm_pretrain_")
    sizes = {"EMBED_DIM": "embed_dim", "DEPTH": "depth", "NUM_HEADS": "num_heads"}
    for key, arg in sizes.items():
        if m[key]:
            kwargs[f"encoder_{arg}" if pretrain else arg] = m[key]
    if pretrain:
        for key in ("DECODER_EMBED_DIM", "DECODER_DEPTH", "DECODER_NUM_HEADS"):
            if m[key]:
                kwargs[key.lower()] = m[key]
        kwargs.update(
            mask_ratio=cfg.MASK.RATIO, masking=cfg.MASK.MODE, mask_unit=cfg.MASK.UNIT,
            use_predictor=cfg.MASK.PREDICTOR or cfg.MASK.MODE == "hpm", pred_loss=cfg.MASK.PRED_LOSS,
            norm_pix_loss=cfg.MASK.NORM_PIX_LOSS, mean=tuple(cfg.DATA.MEAN), std=tuple(cfg.DATA.STD),
        )  # fmt: skip
    else:
        kwargs.update(num_classes=cfg.FINETUNE.NUM_CLASSES, init_scale=cfg.FINETUNE.INIT_SCALE,
                      head_drop_rate=cfg.FINETUNE.HEAD_DROP)  # fmt: skip
    return kwargs
