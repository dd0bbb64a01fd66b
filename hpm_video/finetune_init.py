"""Initialise a fine-tuning classifier (:class:`hpm_video.models.VisionTransformer`) from a checkpoint.

Accepted sources (the layout is detected from the keys, never from the file name):

* this project's files: a pretraining model file (``model_final.pth``: ``encoder.*`` plus decoder,
  loss predictor and teacher), a fine-tuned model file (``model_best.pth``; a linear probe's
  BatchNorm head is folded into a plain linear head), an encoder written by ``tools/export_encoder.py``
  (fine-tune layout: ``patch_embed.*``, ``blocks.*``, ``norm.*``), a complete DeepSpeed checkpoint
  folder (``.../checkpoints/epoch-NNNN``, any ZeRO stage, every file read as data), or a run's
  ``OUTPUT_DIR`` (its ``model_final.pth``, else its newest checkpoint);
* official VideoMAE / VideoMAE-v2 ``.pth`` files, pretraining or fine-tuned: tensors under ``model``
  or ``module``, prefixes ``encoder.``, ``backbone.``, ``module.`` and ``_orig_mod.`` removed, no stored
  position table;
* official image MAE / HPM checkpoints (the image path: one frame, tubelet 1): the 2-D patch
  convolution becomes a 3-D one, the fused ``qkv.bias`` is split into ``q_bias``/``v_bias`` (the key
  bias adds the same amount to every logit of a query row, so the softmax cancels it: dropping it is
  exact), ``cls_token`` is dropped (mean pooling), and the stored 2-D sin/cos ``pos_embed`` (with its
  class-token slot removed) is kept, which needs a model built with ``pos_embed="learned"``;
* Hugging Face ``VideoMAE*`` weights (``videomae.*`` keys, or a folder with ``config.json``).

Always dropped: the reconstruction decoder (``decoder.*``, ``encoder_to_decoder``, ``mask_token``,
MAE's ``decoder_*``), HPM's ``loss_predictor.*`` and ``teacher.*``, and the classifier ``head`` when
its class count differs from the model's. A pretrained final ``norm`` initialises ``fc_norm`` when
the model pools by mean and the checkpoint has no ``fc_norm`` (``fc_norm_from_norm``; VideoMAE and
MAE start ``fc_norm`` fresh instead, pass ``False`` to do the same).

Stored position tables are resized to the model's token grid (bicubic over space, linear over time).
Every load returns (and logs) an :class:`InitReport` of what was loaded, renamed, adapted, dropped,
missing and unexpected; a checkpoint of which nothing fits the backbone is refused with the key
prefixes it holds.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import nn

from hpm_video.checkpoint import key_prefixes, load_file, unwrap_state_dict

logger = logging.getLogger(__name__)

# Keys of pretraining-only parts, by leading component (after wrapper/prefix stripping).
DROPPED_PREFIXES = (
    "decoder.",
    "decoder_",  # MAE: decoder_embed, decoder_blocks, decoder_norm, decoder_pred, decoder_pos_embed
    "encoder_to_decoder.",
    "mask_token",
    "loss_predictor.",
    "teacher.",
)
# Prefixes under which official checkpoints keep the encoder.
ENCODER_PREFIXES = ("encoder.", "backbone.")
# Tokens the classifier does not have (mean pooling, no class/distillation token).
EXTRA_TOKENS = ("cls_token", "dist_token")


@dataclass
class Checkpoint:
    """A checkpoint read and rewritten into the classifier's key layout, not yet fitted to a model."""

    state: dict[str, torch.Tensor]
    source: str
    kind: str  # hpm-model-file, videomae-pretrain, videomae-finetune, mae-image, hf, deepspeed, ...
    dropped: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)
    raw_prefixes: list[str] = field(default_factory=list)
    image_source: bool = False  # the patch embedding was 2-D (one frame per token)
    # (T, H, W) token grid of the stored position table, where the checkpoint says it (this
    # project's model files and run checkpoints keep the model's arguments); else it is inferred.
    pos_grid: tuple[int, int, int] | None = None

    @property
    def has_pos_embed(self) -> bool:
        return "pos_embed" in self.state


@dataclass
class InitReport:
    """What ``load_pretrained`` did, for the log and for ``init_report.json``."""

    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    head: str = "absent"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            if not keys:
                return "none"
            shown = ", ".join(key_prefixes(keys, depth=2, limit=8))
            return f"{len(keys)} ({shown})"

        lines = [
            f"initialised from {self.source} [{self.kind}]: {len(self.loaded)} tensors loaded",
            f"  missing (left at their initialisation): {short(self.missing)}",
            f"  unexpected (ignored): {short(self.unexpected)}",
            f"  dropped (pretraining-only): {short(self.dropped)}",
            f"  head: {self.head}",
        ]
        lines += [f"  renamed: {r}" for r in self.renamed[:6]]
        if len(self.renamed) > 6:
            lines.append(f"  renamed: ... {len(self.renamed) - 6} more")
        lines += [f"  adapted: {a}" for a in self.adapted]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str) -> Checkpoint:
    """Read any supported source (file or folder) into the classifier layout."""
    if os.path.isdir(path):
        return _read_folder(path)
    obj = load_file(path)
    if "model_name" in obj:  # this project's self-describing model file
        name = str(obj["model_name"])
        ckpt = to_classifier_layout(unwrap_state_dict(obj), source=path)
        ckpt.kind = f"hpm-model-file ({name})"
        ckpt.pos_grid = _saved_pos_grid(ckpt, obj.get("model_kwargs") or {})
        return ckpt
    return to_classifier_layout(unwrap_state_dict(obj), source=path)


def _read_folder(path: str) -> Checkpoint:
    if os.path.isfile(os.path.join(path, "config.json")):
        from hpm_video.hf import load_hf_folder

        model, name, _ = load_hf_folder(path)
        ckpt = to_classifier_layout(model.state_dict(), source=path)
        ckpt.kind = f"hf-folder ({name})"
        return ckpt
    if glob.glob(os.path.join(path, "*model_states.pt")):  # ZeRO-3 names them zero_pp_rank_N_...
        return _read_deepspeed_tag(path)
    final = os.path.join(path, "model_final.pth")
    if os.path.isfile(final):
        return read_checkpoint(final)
    from hpm_video.engine.checkpointing import latest_checkpoint

    latest = latest_checkpoint(path)
    if latest:
        return _read_folder(latest)
    raise ValueError(
        f"{path}: a folder that is neither a DeepSpeed checkpoint (*model_states.pt), a run folder "
        f"(model_final.pth or checkpoints/epoch-NNNN) nor a Hugging Face folder (config.json); "
        f"it holds {sorted(os.listdir(path))[:12]}"
    )


def _read_deepspeed_tag(tag_dir: str) -> Checkpoint:
    """The full weights of a DeepSpeed checkpoint folder of any ZeRO stage, every file read as data
    (see ``hpm_video.engine.checkpointing.consolidated_state_dict``)."""
    from hpm_video.engine import checkpointing

    try:
        state = checkpointing.consolidated_state_dict(tag_dir)
    except Exception as err:
        raise ValueError(
            f"{tag_dir}: cannot read this DeepSpeed checkpoint as plain data ({err}); consolidate it "
            "with tools/export_encoder.py and pass its output instead"
        ) from err
    ckpt = to_classifier_layout(unwrap_state_dict(state), source=tag_dir)
    ckpt.kind = f"deepspeed ({ckpt.kind})"
    if os.path.isfile(os.path.join(tag_dir, checkpointing.MARKER)):
        ckpt.pos_grid = _saved_pos_grid(ckpt, checkpointing.read_client_state(tag_dir).get("model_kwargs") or {})
    return ckpt


def _saved_pos_grid(ckpt: Checkpoint, model_kwargs: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """The grid of ``ckpt``'s position table from the arguments its model was built with."""
    proj = ckpt.state.get("patch_embed.proj.weight")
    table = ckpt.state.get("pos_embed")
    if proj is None or table is None or "num_frames" not in model_kwargs or "img_size" not in model_kwargs:
        return None
    height, width = to_2tuple(model_kwargs["img_size"])
    tubelet, patch_h, patch_w = proj.shape[2:]  # (D, C, t, p, p)
    grid = (int(model_kwargs["num_frames"]) // tubelet, int(height) // patch_h, int(width) // patch_w)
    return grid if math.prod(grid) == table.shape[1] else None


# ------------------------------------------------------------------------------------ key layout
def fold_probe_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold a probe head's BatchNorm (eval mode: a fixed affine map) into its linear layer.

    ``W (x - mean) / s + b == (W / s) x + (b - (W / s) mean)`` with ``s = sqrt(var + eps)``, so the
    result is an ordinary ``head.weight``/``head.bias`` that computes the same logits.
    """
    if "head.0.running_mean" not in state:
        return state
    out = {k: v for k, v in state.items() if not k.startswith("head.")}
    mean = state["head.0.running_mean"].double()
    scale = torch.sqrt(state["head.0.running_var"].double() + 1e-6)
    weight = state["head.1.weight"].double() / scale[None, :]
    out["head.weight"] = weight.to(state["head.1.weight"].dtype)
    out["head.bias"] = (state["head.1.bias"].double() - weight @ mean).to(state["head.1.bias"].dtype)
    return out


def to_classifier_layout(raw: Mapping[str, torch.Tensor], source: str = "state dict") -> Checkpoint:
    """Rewrite an unwrapped state dict into the classifier's key layout (model-independent steps).

    Drops pretraining-only parts, strips ``encoder.``/``backbone.``, converts Hugging Face keys, turns
    a 2-D patch convolution into a 3-D one with one frame, splits fused ``qkv.bias`` and drops
    class/distillation tokens (and the matching slot of a stored position table).
    """
    raw = fold_probe_head(dict(raw))
    raw_prefixes = key_prefixes(list(raw), depth=2, limit=16)
    if any(k.startswith("videomae.") for k in raw):
        return _from_hf(raw, source, raw_prefixes)

    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    renamed: list[str] = []
    encoder_style = False
    for key, value in raw.items():
        if key.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            continue
        new = key
        for prefix in ENCODER_PREFIXES:
            if key.startswith(prefix):
                new = key[len(prefix) :]
                encoder_style = True
                break
        if new in state:
            raise ValueError(f"{source}: both {key!r} and another key map to {new!r}; which one is the encoder?")
        state[new] = value

    image_source = False
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:  # Conv2d (D, C, p, p): an image model
        state["patch_embed.proj.weight"] = proj.unsqueeze(2)
        image_source = True
        renamed.append("patch_embed.proj.weight: Conv2d -> Conv3d with tubelet 1")

    for key in [k for k in state if k.endswith(".attn.qkv.bias")]:
        bias = state.pop(key)
        dim = bias.shape[0] // 3
        base = key[: -len("qkv.bias")]
        state[base + "q_bias"] = bias[:dim].clone()
        state[base + "v_bias"] = bias[2 * dim :].clone()
        renamed.append(f"{key} -> q_bias, v_bias (key bias dropped: it cancels in the softmax)")

    extra = 0
    for token in EXTRA_TOKENS:
        if token in state:
            dropped.append(token)
            del state[token]
            extra += 1
    if "pos_embed" in state:
        table = state["pos_embed"]
        if table.ndim == 2:
            table = table.unsqueeze(0)
        if table.ndim != 3:
            raise ValueError(f"{source}: pos_embed has shape {tuple(table.shape)}, expected (1, N, D)")
        if extra:
            table = table[:, extra:]
            renamed.append(f"pos_embed: {extra} class-token slot(s) removed")
        state["pos_embed"] = table

    if image_source:
        kind = "mae-image"
    elif "head.weight" in state:
        kind = "videomae-finetune"
    elif encoder_style:
        kind = "videomae-pretrain"
    else:
        kind = "encoder"
    return Checkpoint(state, source, kind, dropped, renamed, raw_prefixes, image_source)


def _from_hf(raw: dict[str, torch.Tensor], source: str, raw_prefixes: list[str]) -> Checkpoint:
    from hpm_video.hf import detect_layout, from_hf_state_dict

    layout = detect_layout(raw, source)
    kind = "pretrain" if layout == "hf_pretrain" else "classifier"
    if kind == "pretrain":
        # The HF pretraining model's own keys cover encoder + decoder; keep only what the classifier uses.
        ours = from_hf_state_dict({k: v for k, v in raw.items() if k.startswith("videomae.")}, "pretrain")
        dropped = [k for k in raw if not k.startswith("videomae.")]
        state = {k[len("encoder.") :]: v for k, v in ours.items() if k.startswith("encoder.")}
        dropped += [k for k in ours if not k.startswith("encoder.")]
    else:
        state, dropped = from_hf_state_dict(raw, "classifier"), []
    return Checkpoint(state, source, f"hf-{kind}", dropped, ["Hugging Face keys -> ours"], raw_prefixes)


# ------------------------------------------------------------------------------- position tables
def infer_pos_grid(
    num_positions: int, target_grid: Sequence[int], image_source: bool = False
) -> tuple[int, int, int]:
    """The ``(T, H, W)`` token grid a stored table of ``num_positions`` rows was made for.

    Tables do not store their grid (this project's checkpoints say it beside them, see
    ``Checkpoint.pos_grid``). Tried in order: the target grid itself; one frame for image
    checkpoints; the target's time extent with a square frame; the target's frame with another time
    extent; one square frame. Refused when none fits. A table whose clip length and frame size both
    differ from the target's is read with the target's frame; ``FINETUNE.INIT_POS_GRID`` says otherwise.
    """
    t, h, w = (int(x) for x in target_grid)
    n = int(num_positions)
    if n == t * h * w and not (image_source and t != 1):
        return t, h, w

    def square(m: int) -> int | None:
        s = math.isqrt(m)
        return s if s * s == m else None

    candidates: list[tuple[int, int, int]] = []
    if image_source and square(n):
        candidates.append((1, square(n), square(n)))  # type: ignore[arg-type]
    if n % t == 0 and square(n // t):
        s = square(n // t)
        candidates.append((t, s, s))  # type: ignore[arg-type]
    if n % (h * w) == 0:
        candidates.append((n // (h * w), h, w))
    if square(n):
        candidates.append((1, square(n), square(n)))  # type: ignore[arg-type]
    if not candidates:
        raise ValueError(
            f"cannot tell the token grid of a stored position table with {n} rows (target grid {t}x{h}x{w}); "
            "set FINETUNE.INIT_POS_GRID T H W (src_grid)"
        )
    return candidates[0]


def resize_pos_embed(
    table: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]
) -> torch.Tensor:
    """Interpolate a ``(1, T*H*W, D)`` table (tokens in ``(t, h, w)`` order) to another grid.

    Space is resized bicubically per time slot, then time linearly per position (a one-frame table
    becomes the same table for every time slot). Computed in float32, returned in the input dtype.
    """
    if table.ndim == 2:
        table = table.unsqueeze(0)
    ts, hs, ws = (int(x) for x in src_grid)
    td, hd, wd = (int(x) for x in dst_grid)
    if table.shape[1] != ts * hs * ws:
        raise ValueError(f"position table has {table.shape[1]} rows, source grid {ts}x{hs}x{ws} needs {ts * hs * ws}")
    if (ts, hs, ws) == (td, hd, wd):
        return table
    dim = table.shape[-1]
    x = table[0].float().reshape(ts, hs, ws, dim)
    if (hs, ws) != (hd, wd):
        x = x.permute(0, 3, 1, 2)  # (T, D, H, W)
        x = F.interpolate(x, size=(hd, wd), mode="bicubic", align_corners=False)
        x = x.permute(0, 2, 3, 1)  # (T, H', W', D)
    if ts != td:
        x = x.permute(1, 2, 3, 0).reshape(hd * wd, dim, ts)  # (H'W', D, T)
        x = F.interpolate(x, size=td, mode="linear", align_corners=False)
        x = x.reshape(hd, wd, dim, td).permute(3, 0, 1, 2)  # (T', H', W', D)
    return x.reshape(1, td * hd * wd, dim).to(table.dtype)


# ------------------------------------------------------------------------------------- fitting
def _token_grid(model: nn.Module) -> tuple[int, int, int]:
    return tuple(int(x) for x in model.patch_embed.grid_size)  # type: ignore[return-value]


def _adapt_patch_embed(weight: torch.Tensor, tubelet: int) -> tuple[torch.Tensor, str | None]:
    """Fit a ``(D, C, t, p, p)`` kernel to the model's tubelet when the change is exact for static input."""
    src = weight.shape[2]
    if src == tubelet:
        return weight, None
    if src == 1:
        # Spread one frame's kernel evenly over the tubelet: a still clip then gives the image response.
        return weight.repeat(1, 1, tubelet, 1, 1) / tubelet, f"patch_embed.proj.weight: tubelet 1 -> {tubelet}"
    if tubelet == 1:
        # Sum over the tubelet: one frame then gives the response to that frame repeated over time.
        return weight.sum(dim=2, keepdim=True), f"patch_embed.proj.weight: tubelet {src} -> 1 (summed)"
    raise ValueError(f"patch_embed.proj.weight has tubelet {src}, the model {tubelet}; only 1 <-> t is supported")


def fit_to_model(
    ckpt: Checkpoint,
    model: nn.Module,
    fc_norm_from_norm: bool = True,
    src_grid: Sequence[int] | None = None,
) -> tuple[dict[str, torch.Tensor], InitReport]:
    """The subset of ``ckpt.state`` that ``model`` takes (renamed, resized), and the report."""
    target = model.state_dict()
    state = dict(ckpt.state)
    report = InitReport(ckpt.source, ckpt.kind, dropped=list(ckpt.dropped), renamed=list(ckpt.renamed))

    pooled = getattr(model, "use_mean_pooling", False)
    if pooled and "fc_norm.weight" not in state and "norm.weight" in state:
        if fc_norm_from_norm:
            for part in ("weight", "bias"):
                if f"norm.{part}" in state:
                    state[f"fc_norm.{part}"] = state.pop(f"norm.{part}")
            report.renamed.append("norm -> fc_norm (mean pooling)")
        else:
            report.dropped += [k for k in ("norm.weight", "norm.bias") if k in state]
            state.pop("norm.weight", None)
            state.pop("norm.bias", None)

    proj = state.get("patch_embed.proj.weight")
    if proj is not None and "patch_embed.proj.weight" in target:
        state["patch_embed.proj.weight"], note = _adapt_patch_embed(proj, model.patch_embed.tubelet_size)
        if note:
            report.adapted.append(note)

    if "pos_embed" in state:
        if "pos_embed" in target:
            table = state["pos_embed"]
            dst = _token_grid(model)
            src = tuple(src_grid or ckpt.pos_grid or infer_pos_grid(table.shape[1], dst, ckpt.image_source))
            if tuple(src) != dst or table.shape[1] != target["pos_embed"].shape[1]:
                state["pos_embed"] = resize_pos_embed(table, src, dst)
                report.adapted.append(f"pos_embed: grid {'x'.join(map(str, src))} -> {'x'.join(map(str, dst))}")
        else:
            logger.warning(
                "%s stores a position table but the model uses the fixed 1-D one; build the model with "
                "pos_embed='learned' (FINETUNE.POS_EMBED auto) to use it", ckpt.source,
            )  # fmt: skip

    head_keys = [k for k in ("head.weight", "head.bias") if k in state]
    if head_keys:
        fits = all(k in target and target[k].shape == state[k].shape for k in head_keys)
        if fits:
            report.head = f"loaded ({state['head.weight'].shape[0]} classes)" if "head.weight" in state else "loaded"
        else:
            classes = state["head.weight"].shape[0] if "head.weight" in state else "?"
            report.head = f"reset: checkpoint has {classes} classes, the model {getattr(model, 'num_classes', '?')}"
            for k in head_keys:
                report.dropped.append(k)
                del state[k]

    fitted: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif target[key].shape != value.shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(target[key].shape)}")
        else:
            fitted[key] = value
    if mismatched:
        raise ValueError(
            f"{ckpt.source}: {len(mismatched)} tensor(s) do not fit the model (is MODEL.NAME / EMBED_DIM / DEPTH / "
            f"patch or tubelet size the checkpoint's?): " + "; ".join(mismatched[:6])
        )
    backbone = [k for k in fitted if k.startswith(("blocks.", "patch_embed."))]
    if not backbone:
        raise ValueError(
            f"{ckpt.source}: nothing in this checkpoint fits the classifier's backbone (patch_embed.*, blocks.*); "
            f"key prefixes seen: {', '.join(ckpt.raw_prefixes) or 'none'}"
        )
    report.loaded = sorted(fitted)
    report.missing = sorted(k for k in target if k not in fitted)
    report.unexpected = sorted(report.unexpected)
    return fitted, report


def load_pretrained(
    model: nn.Module,
    source: str | Checkpoint,
    fc_norm_from_norm: bool = True,
    src_grid: Sequence[int] | None = None,
    log: bool = True,
) -> InitReport:
    """Load ``source`` (a path or a :class:`Checkpoint`) into ``model``; returns the report.

    Refuses checkpoints of which nothing fits the backbone and tensors whose shapes differ from the
    model's (other than a position table, which is resized, and a head of another class count).
    """
    ckpt = read_checkpoint(source) if isinstance(source, str) else source
    fitted, report = fit_to_model(ckpt, model, fc_norm_from_norm=fc_norm_from_norm, src_grid=src_grid)
    with torch.no_grad():
        result = model.load_state_dict(fitted, strict=False)
    # load_state_dict agrees with our own bookkeeping; trust it for what is really missing.
    report.missing = sorted(result.missing_keys)
    if log:
        logger.info("%s", report.summary())
    return report


def pos_embed_kind_for(ckpt: Checkpoint | None, setting: str) -> str:
    """Resolve ``FINETUNE.POS_EMBED``: ``auto`` is ``learned`` exactly when the checkpoint stores a table."""
    if setting != "auto":
        return setting
    return "learned" if ckpt is not None and ckpt.has_pos_embed else "sincos1d"


def write_report(report: InitReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.to_dict(), f, indent=1)
