"""Interoperability with VideoMAE checkpoints: the official ``.pth`` files and Hugging Face transformers.

Three layouts of the same weights:
  * **hpm-video** (this package): state dicts whose keys equal the official VideoMAE ones, plus
    ``loss_predictor.*`` and ``teacher.*`` for HPM models;
  * **official VideoMAE** ``.pth``: ``{"model" | "module": state_dict}`` with the same keys, no model
    description (sizes are read off the tensor shapes; head counts and clip size are not stored);
  * **Hugging Face** ``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification``: split
    ``query``/``key``/``value``, ``layernorm_before``/``layernorm_after``,
    ``videomae.*`` / ``decoder.decoder_layers.*`` / ``classifier``.

Facts about the HF implementation that the conversion accounts for:
  * its attention biases changed across transformers releases: 4.x has ``q_bias``/``v_bias``
    parameters; 5.x up to at least 5.17 has ``query``/``key``/``value`` biases (config
    ``qkv_bias``); 5.24 has query and value biases only (config ``qv_bias``). Conversion follows
    the installed release: it writes the config's ``qkv_bias`` (which all of them accept), names
    the q/v biases as the built model does, and gives a model that has a key bias a zero one. A key
    bias read from HF is dropped whatever its value: it adds ``q . b_k`` to every score of a query,
    which the softmax cancels, so the outputs do not change. Folders are read from their stored
    weights, not through ``from_pretrained`` (5.17's re-initialises the ``q_bias``/``v_bias`` that
    4.x and 5.24 store, and only logs it), with the q/v biases' presence taken from the weights, so a
    folder written by one of these releases loads exactly under another;
  * its pretraining encoder has a final LayerNorm (``videomae.layernorm``) only when
    ``use_mean_pooling=False``, so pretraining configs are written with ``use_mean_pooling=False``
    and classifier configs with the classifier's own pooling choice;
  * ``layer_norm_eps`` is written as 1e-6 (ours), but HF builds ``decoder.norm`` and ``fc_norm`` with
    PyTorch's default eps 1e-5 whatever the config says, so those two norms differ from ours by an
    eps of 1e-5 vs 1e-6: outputs agree to about 1e-5, not bit for bit (weights convert exactly);
  * its loss un-normalises pixels with the ImageNet mean/std, whatever the model was trained with,
    so only models with those statistics are converted for pretraining;
  * its position tables are the same interleaved 1-D sin/cos tables as ours (not stored anywhere);
  * it has no LayerScale, no loss predictor and no teacher: LayerScale models are refused, and the
    HPM-only tensors travel next to the HF files (``hpm_video_extras.safetensors``, with the full
    model description in ``hpm_video.json``) so that hpm-video -> HF -> hpm-video is lossless;
  * ``pixel_values`` are ``(B, T, C, H, W)``; ours are ``(B, C, T, H, W)`` (``to_hf_pixel_values``).

``transformers`` is imported only by the functions that build HF objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Collection, Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from hpm_video.checkpoint import jsonable, key_prefixes, load_file, save_atomic, unwrap_state_dict
from hpm_video.models.registry import SIZES

PRETRAIN = "pretrain"
CLASSIFIER = "classifier"
HPM_JSON = "hpm_video.json"
HPM_EXTRAS = "hpm_video_extras.safetensors"
EXTRA_PREFIXES = ("loss_predictor.", "teacher.")

# Per-block renames, ours -> HF, besides the fused qkv which is split separately.
_BLOCK_RENAMES = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
    ("attn.q_bias", "attention.attention.query.bias"),
    ("attn.v_bias", "attention.attention.value.bias"),
    # transformers 4.x names (read only: writing takes the first match, the 5.x name, and
    # match_hf_keys renames it for a 4.x model).
    ("attn.q_bias", "attention.attention.q_bias"),
    ("attn.v_bias", "attention.attention.v_bias"),
)
_HF_KEY_BIAS = "attention.attention.key.bias"
_HF_QV_BIASES = ("attention.attention.q_bias", "attention.attention.query.bias")  # 4.x and 5.24 / 5.x names
_QKV_HF = ("attention.attention.query.weight", "attention.attention.key.weight", "attention.attention.value.weight")

# Block containers and plain renames for the two model kinds, ours -> HF.
_BLOCK_PREFIXES = {
    PRETRAIN: (("encoder.blocks.", "videomae.encoder.layer."), ("decoder.blocks.", "decoder.decoder_layers.")),
    CLASSIFIER: (("blocks.", "videomae.encoder.layer."),),
}
_PLAIN_RENAMES = {
    PRETRAIN: (
        ("encoder.patch_embed.proj.", "videomae.embeddings.patch_embeddings.projection."),
        ("encoder.norm.", "videomae.layernorm."),
        ("encoder_to_decoder.", "encoder_to_decoder."),
        ("mask_token", "mask_token"),
        ("decoder.norm.", "decoder.norm."),
        ("decoder.head.", "decoder.head."),
    ),
    CLASSIFIER: (
        ("patch_embed.proj.", "videomae.embeddings.patch_embeddings.projection."),
        ("norm.", "videomae.layernorm."),
        ("fc_norm.", "fc_norm."),
        ("head.", "classifier."),
    ),
}


# ------------------------------------------------------------------------------------ layouts
def detect_layout(state: Mapping[str, Any], source: str = "state dict") -> str:
    """``pretrain``/``classifier`` for our (= official VideoMAE) keys, ``hf_pretrain``/``hf_classifier``
    for HF keys; anything else is refused with the key prefixes that were found."""
    keys = list(state)
    if any(k.startswith("videomae.") for k in keys):
        return "hf_pretrain" if any(k.startswith("decoder.decoder_layers.") for k in keys) else "hf_classifier"
    if "encoder.patch_embed.proj.weight" in state and "decoder.head.weight" in state:
        return PRETRAIN
    if "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in keys):
        return CLASSIFIER
    raise ValueError(
        f"{source}: unknown checkpoint layout; expected VideoMAE pretraining keys (encoder.*, decoder.*), "
        f"fine-tuning keys (patch_embed.*, blocks.*, head.*) or Hugging Face keys (videomae.*); "
        f"found key prefixes {key_prefixes(keys, depth=2, limit=16)}"
    )


def _num_blocks(state: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _heads_for(dim: int, decoder: bool, override: int | None, source: str) -> int:
    """Head count for a width: checkpoints do not store it, so it comes from the size table."""
    if override:
        return override
    column = 4 if decoder else 2
    width = 3 if decoder else 0
    for row in SIZES.values():
        if row[width] == dim:
            return row[column]
    part = "a decoder" if decoder else "an encoder"
    raise ValueError(
        f"{source}: no known head count for {part} of width {dim}; pass it explicitly "
        f"(--{'decoder-' if decoder else ''}num-heads)"
    )


def _size_name(dim: int, depth: int) -> str:
    """The registered size with this encoder width and depth, else the one of nearest width.

    Only the name is chosen here: every size field is passed explicitly as a keyword override.
    """
    for name, row in SIZES.items():
        if row[0] == dim and row[1] == depth:
            return name
    return min(SIZES, key=lambda name: (abs(SIZES[name][0] - dim), SIZES[name][0]))


def model_config_from_state(
    state: Mapping[str, torch.Tensor],
    num_frames: int = 16,
    img_size: int = 224,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    source: str = "state dict",
) -> tuple[str, dict[str, Any]]:
    """``(model_name, model_kwargs)`` that rebuild the model of a VideoMAE-layout state dict.

    Widths, depths, patch and tubelet sizes, MLP ratio, q/v biases, LayerScale, class count and
    pooling are read off the tensors; clip length and frame size (not stored, the position tables
    being fixed) come from ``num_frames``/``img_size``, and head counts from the size table unless
    given. A ``loss_predictor`` makes an HPM-capable model; a ``teacher`` means ``masking='hpm'``.
    """
    layout = detect_layout(state, source)
    if layout not in (PRETRAIN, CLASSIFIER):
        raise ValueError(f"{source}: Hugging Face keys; load the HF folder (with config.json) instead")
    prefix = "encoder." if layout == PRETRAIN else ""
    for learned in ("pos_embed", "cls_token"):
        if prefix + learned in state:
            raise ValueError(f"{source}: {prefix + learned}: learned position tables or class tokens are unsupported")
    proj = state[prefix + "patch_embed.proj.weight"]  # (D, C, tubelet, p, p)
    dim, in_chans, tubelet, patch, _ = proj.shape
    depth = _num_blocks(state, prefix + "blocks.")
    if depth == 0:
        raise ValueError(f"{source}: no {prefix}blocks.N.* tensors")
    if num_frames % tubelet or img_size % patch:
        raise ValueError(
            f"{source}: tubelet {tubelet} x patch {patch} does not divide {num_frames} frames of {img_size} pixels"
        )
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_frames": num_frames,
        "tubelet_size": tubelet,
        "mlp_ratio": mlp_ratio_for(state[prefix + "blocks.0.mlp.fc1.weight"].shape[0], dim),
        "qkv_bias": prefix + "blocks.0.attn.q_bias" in state,
    }
    if prefix + "blocks.0.gamma_1" in state:
        kwargs["init_values"] = 0.1  # any non-zero value creates the LayerScale tensors the file fills
    heads = _heads_for(dim, False, num_heads, source)
    size = _size_name(dim, depth)
    if layout == CLASSIFIER:
        head = state.get("head.weight")
        kwargs.update(
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            num_classes=0 if head is None else head.shape[0],
            use_mean_pooling="fc_norm.weight" in state,
        )
        return f"hpm_vit_{size}_patch16", kwargs
    decoder_dim = state["decoder.norm.weight"].shape[0]
    out_dim = state["decoder.head.weight"].shape[0]
    if out_dim != in_chans * tubelet * patch * patch:
        raise ValueError(
            f"{source}: decoder.head predicts {out_dim} values per token, expected {in_chans}x{tubelet}x{patch}x{patch}"
        )
    has_predictor = any(k.startswith("loss_predictor.") for k in state)
    has_teacher = any(k.startswith("teacher.") for k in state)
    kwargs.update(
        encoder_embed_dim=dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        decoder_embed_dim=decoder_dim,
        decoder_depth=_num_blocks(state, "decoder.blocks."),
        decoder_num_heads=_heads_for(decoder_dim, True, decoder_num_heads, source),
        use_predictor=has_predictor,
        masking="hpm" if has_teacher else "random",
    )
    return f"hpm_pretrain_vit_{size}_patch16", kwargs


def build_model_from_state(
    state: Mapping[str, torch.Tensor], model_name: str, model_kwargs: Mapping[str, Any], source: str = "state dict"
) -> nn.Module:
    """Create ``model_name`` with ``model_kwargs`` and load ``state`` strictly (teacher reset if absent)."""
    from hpm_video.models import create_model

    model = create_model(model_name, **dict(model_kwargs))
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    teacher_missing = [k for k in missing if k.startswith("teacher.")]
    missing = [k for k in missing if not k.startswith("teacher.")]
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit {model_name}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if teacher_missing:
        model.reset_teacher()  # a student-only file: the teacher starts as a copy of the student
    return model


def load_videomae_checkpoint(
    path: str,
    num_frames: int = 16,
    img_size: int = 224,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> tuple[nn.Module, str, dict[str, Any]]:
    """Load an official VideoMAE ``.pth`` (pretraining or fine-tuned) as an hpm-video model.

    Returns ``(model, model_name, model_kwargs)``; see ``model_config_from_state`` for what is
    inferred and what must be passed.
    """
    state = unwrap_state_dict(load_file(path))
    name, kwargs = model_config_from_state(state, num_frames, img_size, num_heads, decoder_num_heads, source=path)
    return build_model_from_state(state, name, kwargs, source=path), name, kwargs


def save_videomae_checkpoint(model: nn.Module, path: str, drop_extras: bool = False) -> list[str]:
    """Write ``{"model": state_dict}`` in the official VideoMAE layout; returns the keys left out.

    The official layout has no place for the loss predictor or the teacher: they are refused unless
    ``drop_extras`` (the file then holds the plain masked autoencoder).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    extras = [k for k in state if k.startswith(EXTRA_PREFIXES)]
    if extras and not drop_extras:
        raise ValueError(
            f"the official VideoMAE layout cannot hold {key_prefixes(extras)} ({len(extras)} tensors); "
            "pass drop_extras=True (--drop-extras) to write the autoencoder without them"
        )
    save_atomic({"model": {k: v for k, v in state.items() if k not in extras}}, path)
    return extras


# ---------------------------------------------------------------------------- state-dict mapping
def model_kind(model: nn.Module) -> str:
    """``pretrain`` for the HPM pretraining model, ``classifier`` for the fine-tuning ViT."""
    from hpm_video.models import HPMPretrainModel, VisionTransformer

    if isinstance(model, HPMPretrainModel):
        return PRETRAIN
    if isinstance(model, VisionTransformer):
        return CLASSIFIER
    raise TypeError(f"cannot convert a {type(model).__name__}; expected HPMPretrainModel or VisionTransformer")


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our keys -> HF keys. Returns ``(hf_state, extras)``, extras being the HPM-only tensors."""
    out: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(EXTRA_PREFIXES):
            extras[key] = value
            continue
        hf_key = _rename(key, kind, to_hf=True)
        if hf_key is None:
            raise ValueError(f"no Hugging Face equivalent for {key!r} (LayerScale and others are not in HF VideoMAE)")
        if hf_key.endswith(".attn.qkv.weight"):  # placeholder produced by _rename, split below
            base = hf_key[: -len("attn.qkv.weight")]
            for name, part in zip(_QKV_HF, value.chunk(3, dim=0)):
                out[base + name] = part.clone()
        else:
            out[hf_key] = value
    return out, extras


def match_hf_keys(hf_state: Mapping[str, torch.Tensor], model_keys: Collection[str]) -> dict[str, torch.Tensor]:
    """``to_hf_state_dict``'s output in the attention-bias layout of the installed transformers
    release, whose model has ``model_keys``: 4.x ``q_bias``/``v_bias`` names, a zero key bias
    where the model has one (see the module docstring)."""
    model_keys = set(model_keys)
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        head, attention, leaf = key.rpartition("attention.attention.")
        if attention and leaf in ("query.bias", "value.bias"):
            legacy = head + attention + leaf[0] + "_bias"  # q_bias / v_bias
            if leaf == "query.bias" and head + attention + "key.bias" in model_keys:
                out[head + attention + "key.bias"] = torch.zeros_like(value)
            if key not in model_keys and legacy in model_keys:
                key = legacy
        out[key] = value
    return out


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """HF keys -> our keys, fusing query/key/value into ``qkv``; a key bias is dropped (it does not
    change the attention: see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        matched = next((name for name in _QKV_HF if key.endswith(name)), None)
        if matched is not None:
            pending.setdefault(key[: -len(matched)], {})[matched] = value
            continue
        if key.endswith(_HF_KEY_BIAS):
            continue
        ours = _rename(key, kind, to_hf=False)
        if ours is None:
            raise ValueError(f"unexpected Hugging Face key {key!r} for a {kind} model")
        out[ours] = value
    for base, parts in pending.items():
        if len(parts) != 3:
            raise ValueError(f"incomplete query/key/value under {base!r}: {sorted(parts)}")
        fused_key = _rename(base + "layernorm_before.weight", kind, to_hf=False)
        assert fused_key is not None and fused_key.endswith("norm1.weight")
        out[fused_key[: -len("norm1.weight")] + "attn.qkv.weight"] = torch.cat([parts[n] for n in _QKV_HF], dim=0)
    return out


def _rename(key: str, kind: str, to_hf: bool) -> str | None:
    """Rename one key between the layouts; the fused qkv maps to ``<hf block>.attn.qkv.weight``."""
    for ours, hf in _BLOCK_PREFIXES[kind]:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        if key.startswith(src):
            index, _, rest = key[len(src) :].partition(".")
            if to_hf and rest == "attn.qkv.weight":
                return f"{dst}{index}.attn.qkv.weight"
            for our_part, hf_part in _BLOCK_RENAMES:
                a, b = (our_part, hf_part) if to_hf else (hf_part, our_part)
                if rest.startswith(a):
                    return f"{dst}{index}.{b}{rest[len(a):]}"
            return None
    for ours, hf in _PLAIN_RENAMES[kind]:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


# ------------------------------------------------------------------------------------- configs
def _block_sizes(blocks: nn.Module) -> tuple[int, int, int, int, bool]:
    """(width, depth, heads, mlp hidden width, q/v bias) of a block stack."""
    first = blocks[0]
    if getattr(first, "gamma_1", None) is not None:
        raise ValueError("LayerScale (init_values) models have no Hugging Face VideoMAE equivalent")
    dim = first.norm1.normalized_shape[0]
    return dim, len(blocks), first.attn.num_heads, first.mlp.fc1.out_features, first.attn.q_bias is not None


def hf_config_for_model(model: nn.Module) -> Any:
    """A ``transformers.VideoMAEConfig`` describing ``model`` (an HPMPretrainModel or VisionTransformer)."""
    from transformers import VideoMAEConfig

    kind = model_kind(model)
    embed = model.encoder.patch_embed if kind == PRETRAIN else model.patch_embed
    blocks = model.encoder.blocks if kind == PRETRAIN else model.blocks
    dim, depth, heads, hidden, qv_bias = _block_sizes(blocks)
    height, width = embed.img_size
    args: dict[str, Any] = dict(
        image_size=height if height == width else [height, width],
        patch_size=embed.patch_size,
        num_channels=embed.in_chans,
        num_frames=embed.num_frames,
        tubelet_size=embed.tubelet_size,
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=hidden,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=qv_bias,  # read as qv_bias by the releases that renamed it
    )
    if kind == PRETRAIN:
        if tuple(model.mean) != tuple(IMAGENET_DEFAULT_MEAN) or tuple(model.std) != tuple(IMAGENET_DEFAULT_STD):
            raise ValueError(
                f"HF VideoMAEForPreTraining un-normalises with the ImageNet mean/std; this model uses "
                f"mean {model.mean}, std {model.std}"
            )
        ddim, ddepth, dheads, dhidden, dbias = _block_sizes(model.decoder.blocks)
        if dbias != qv_bias:
            raise ValueError("HF VideoMAE has one q/v-bias switch for encoder and decoder; this model differs")
        args.update(
            use_mean_pooling=False,  # HF keeps the encoder's final norm (videomae.layernorm) only then
            decoder_hidden_size=ddim,
            decoder_num_hidden_layers=ddepth,
            decoder_num_attention_heads=dheads,
            decoder_intermediate_size=dhidden,
            norm_pix_loss=bool(model.norm_pix_loss),
            architectures=["VideoMAEForPreTraining"],
        )
    else:
        args.update(
            use_mean_pooling=bool(model.use_mean_pooling),
            num_labels=model.num_classes,
            architectures=["VideoMAEForVideoClassification"],
        )
    return VideoMAEConfig(**args)


def model_config_from_hf(config: Any, kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(model_name, model_kwargs)`` of the hpm-video model matching a ``VideoMAEConfig``."""
    if kind is None:
        kind = hf_kind(config)
    if config.hidden_act != "gelu":
        raise ValueError(f"HF config uses activation {config.hidden_act!r}; hpm-video models use exact 'gelu'")
    image = config.image_size
    img_size = list(image) if isinstance(image, (list, tuple)) else int(image)
    patch = config.patch_size
    if isinstance(patch, (list, tuple)):
        if patch[0] != patch[1]:
            raise ValueError(f"HF config has a non-square patch {patch}")
        patch = patch[0]
    dim = config.hidden_size
    kwargs: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=int(patch),
        in_chans=config.num_channels,
        num_frames=config.num_frames,
        tubelet_size=config.tubelet_size,
        mlp_ratio=mlp_ratio_for(config.intermediate_size, dim),
        qkv_bias=hf_qv_bias(config),
    )
    size = _size_name(dim, config.num_hidden_layers)
    if kind == CLASSIFIER:
        kwargs.update(
            embed_dim=dim,
            depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_classes=config.num_labels,
            use_mean_pooling=bool(config.use_mean_pooling),
        )
        return f"hpm_vit_{size}_patch16", kwargs
    if config.decoder_intermediate_size / config.decoder_hidden_size != kwargs["mlp_ratio"]:
        raise ValueError("HF config has different MLP ratios in encoder and decoder; hpm-video uses one")
    if config.use_mean_pooling:
        raise ValueError("HF pretraining config has use_mean_pooling=True, which drops the encoder's final norm")
    kwargs.update(
        encoder_embed_dim=dim,
        encoder_depth=config.num_hidden_layers,
        encoder_num_heads=config.num_attention_heads,
        decoder_embed_dim=config.decoder_hidden_size,
        decoder_depth=config.decoder_num_hidden_layers,
        decoder_num_heads=config.decoder_num_attention_heads,
        norm_pix_loss=bool(config.norm_pix_loss),
    )
    return f"hpm_pretrain_vit_{size}_patch16", kwargs


def hf_qv_bias(config: Any) -> bool:
    """Whether a ``VideoMAEConfig`` has query/value biases (``qv_bias``, formerly ``qkv_bias``)."""
    return bool(config.qv_bias if hasattr(config, "qv_bias") else config.qkv_bias)


def hf_kind(config: Any) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    if any("PreTraining" in a for a in archs):
        return PRETRAIN
    if any("Classification" in a for a in archs):
        return CLASSIFIER
    raise ValueError(f"HF config names architectures {archs}; expected VideoMAEForPreTraining or ...Classification")


# --------------------------------------------------------------------------------- HF objects
def to_hf_model(model: nn.Module) -> nn.Module:
    """The equivalent ``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification`` (eval mode, CPU)."""
    from transformers import VideoMAEForPreTraining, VideoMAEForVideoClassification

    kind = model_kind(model)
    config = hf_config_for_model(model)
    hf_state, _ = to_hf_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, kind)
    cls = VideoMAEForPreTraining if kind == PRETRAIN else VideoMAEForVideoClassification
    hf_model = cls(config)
    hf_model.load_state_dict(match_hf_keys(hf_state, hf_model.state_dict()), strict=True)
    return hf_model.eval()


def from_hf_model(
    hf_model: nn.Module, extras: Mapping[str, torch.Tensor] | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[nn.Module, str, dict[str, Any]]:
    """Our model with the weights of an HF VideoMAE model (plus HPM ``extras``); returns (model, name, kwargs).

    ``overrides`` are model kwargs HF cannot describe (``masking``, ``mask_ratio``, ...); they may not
    contradict the architecture read from the HF config.
    """
    return from_hf_weights(hf_model.config, hf_model.state_dict(), extras, overrides, source="HF model")


def from_hf_weights(
    config: Any,
    hf_state: Mapping[str, torch.Tensor],
    extras: Mapping[str, torch.Tensor] | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: str = "HF weights",
) -> tuple[nn.Module, str, dict[str, Any]]:
    """``from_hf_model`` from a ``VideoMAEConfig`` and HF-named weights of any transformers release."""
    kind = hf_kind(config)
    name, kwargs = model_config_from_hf(config, kind)
    # Query/value biases are read off the weights: releases name the config flag differently
    # (qkv_bias, qv_bias) and each reads only its own, so the config can be wrong about them.
    kwargs["qkv_bias"] = any(key.endswith(_HF_QV_BIASES) for key in hf_state)
    if overrides:
        clashes = {k: (v, kwargs[k]) for k, v in overrides.items() if k in kwargs and _differs(v, kwargs[k])}
        if clashes:
            raise ValueError(f"hpm-video description contradicts the HF config (given, HF): {clashes}")
        kwargs = {**overrides, **kwargs}
    state = from_hf_state_dict(hf_state, kind)
    state.update(extras or {})
    if kind == PRETRAIN and "use_predictor" not in kwargs and "masking" not in kwargs:
        kwargs["use_predictor"] = any(k.startswith("loss_predictor.") for k in state)
        kwargs["masking"] = "hpm" if any(k.startswith("teacher.") for k in state) else "random"
    return build_model_from_state(state, name, kwargs, source=source), name, kwargs


def _differs(a: Any, b: Any) -> bool:
    """Whether two kwarg values disagree, a square size ``n`` being equal to ``[n, n]``."""

    def as_pair(x: Any) -> Any:
        return list(x) if isinstance(x, (list, tuple)) else [x, x]

    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return as_pair(a) != as_pair(b)
    return a != b


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """The ``mlp_ratio`` whose ``int(dim * ratio)`` (how the blocks size their MLP) gives back ``hidden``.

    ``hidden / dim`` can come back one short in floating point (dim 88, hidden 120 gives 119).
    """
    return hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim


def image_processor_for_model(model: nn.Module) -> Any:
    """A ``VideoMAEImageProcessor`` with the model's frame size and the mean/std it was trained with.

    HF's own default mean/std for this processor are 0.5/0.5, not ImageNet's, so they are always set.
    """
    from transformers import VideoMAEImageProcessor

    kind = model_kind(model)
    embed = model.encoder.patch_embed if kind == PRETRAIN else model.patch_embed
    mean = getattr(model, "mean", IMAGENET_DEFAULT_MEAN)
    std = getattr(model, "std", IMAGENET_DEFAULT_STD)
    height, width = embed.img_size
    return VideoMAEImageProcessor(
        image_mean=list(mean),
        image_std=list(std),
        size={"shortest_edge": min(height, width)},
        crop_size={"height": height, "width": width},
    )


def save_hf_folder(
    model: nn.Module, folder: str, model_name: str | None = None, model_kwargs: Mapping[str, Any] | None = None
) -> list[str]:
    """Write a folder that ``VideoMAEFor*.from_pretrained(folder)`` and ``AutoImageProcessor`` load.

    Besides config.json, the weights and preprocessor_config.json, it holds ``hpm_video.json``
    (model name, kwargs and a digest of the weights) and, for HPM models,
    ``hpm_video_extras.safetensors`` (loss predictor and teacher), which HF ignores and
    ``load_hf_folder`` uses to rebuild the exact model. The folder is written beside the target and
    renamed into place, so a failed conversion leaves the earlier folder whole, never a mix of two.
    """
    from safetensors.torch import save_file

    folder = os.path.normpath(folder)
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder}: exists and is not a model folder (no config.json); not replacing it")
    kind = model_kind(model)
    hf_model = to_hf_model(model)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(folder)}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(staging)
    try:
        hf_model.save_pretrained(staging)
        image_processor_for_model(model).save_pretrained(staging)
        _, extras = to_hf_state_dict(model.state_dict(), kind)
        if extras:
            save_file({k: v.detach().cpu().contiguous() for k, v in extras.items()}, os.path.join(staging, HPM_EXTRAS))
        description = {"model_name": model_name, "model_kwargs": jsonable(dict(model_kwargs or {})), "kind": kind,
                       "weights_sha256": _weights_digest(staging)}  # fmt: skip
        with open(os.path.join(staging, HPM_JSON), "w") as f:
            json.dump(description, f, indent=2)
        _move_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(os.listdir(folder))


def _move_into_place(staging: str, folder: str) -> None:
    # Two renames: if the process dies between them, both complete folders are still on disk.
    if not os.path.exists(folder):
        os.rename(staging, folder)
        return
    previous = staging + ".previous"
    os.rename(folder, previous)
    os.rename(staging, folder)
    shutil.rmtree(previous)


def _weights_digest(folder: str) -> str:
    """SHA-256 over the HF weight files of ``folder`` (one or sharded; safetensors or .bin)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin")):
            digest.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def _read_hf_weights(folder: str) -> dict[str, torch.Tensor]:
    """The tensors of an HF folder's weights (one file or shards; safetensors or .bin, read as data)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
    else:
        single = ("model.safetensors", "pytorch_model.bin")
        files = [name for name in single if os.path.isfile(os.path.join(folder, name))][:1]
        if not files:
            raise ValueError(f"{folder}: no {' or '.join(single)} (found {sorted(os.listdir(folder))})")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state


def load_hf_folder(folder: str) -> tuple[nn.Module, str, dict[str, Any]]:
    """Load an HF VideoMAE folder (ours or any other) as an hpm-video model: (model, name, kwargs)."""
    from transformers import VideoMAEConfig

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "not a folder"
        raise ValueError(f"{folder}: no config.json, not a Hugging Face model folder (found {found})")
    config = VideoMAEConfig.from_pretrained(folder)
    if getattr(config, "model_type", None) != "videomae":
        raise ValueError(f"{config_path}: model_type {config.model_type!r}, expected 'videomae'")
    # The weights are read as they are stored, not through ``from_pretrained``: transformers fills
    # a tensor the file lacks, or names as another release did (q_bias vs query.bias), with a fresh
    # value and only logs it. Every stored tensor must be used and every needed one present.
    hf_state = _read_hf_weights(folder)
    extras: dict[str, torch.Tensor] = {}
    overrides: dict[str, Any] = {}
    description_path = os.path.join(folder, HPM_JSON)
    description: dict[str, Any] = {}
    if os.path.isfile(description_path):
        with open(description_path) as f:
            description = json.load(f)
        overrides = dict(description.get("model_kwargs") or {})
    if os.path.isfile(os.path.join(folder, HPM_EXTRAS)):
        recorded = description.get("weights_sha256")
        if recorded and recorded != _weights_digest(folder):
            raise ValueError(
                f"{folder}: {HPM_EXTRAS} (loss predictor, teacher) was written with other weights than the "
                f"folder holds now (re-saved by another tool?); remove it and {HPM_JSON} to load the folder "
                "as a plain VideoMAE model"
            )
        extras = dict(load_file(os.path.join(folder, HPM_EXTRAS)))
    model_name = description.get("model_name")
    model, name, kwargs = from_hf_weights(config, hf_state, extras, overrides, source=folder)
    if model_name and model_name != name:
        # Same architecture under the name it was saved with (all sizes are explicit kwargs anyway).
        model = build_model_from_state(model.state_dict(), model_name, kwargs, source=folder)
        name = model_name
    return model, name, kwargs


def to_hf_pixel_values(videos: torch.Tensor) -> torch.Tensor:
    """Our clips ``(B, C, T, H, W)`` -> HF ``pixel_values`` ``(B, T, C, H, W)``."""
    return videos.permute(0, 2, 1, 3, 4)


def from_hf_pixel_values(pixel_values: torch.Tensor) -> torch.Tensor:
    """HF ``pixel_values`` ``(B, T, C, H, W)`` -> our clips ``(B, C, T, H, W)``."""
    return pixel_values.permute(0, 2, 1, 3, 4)
