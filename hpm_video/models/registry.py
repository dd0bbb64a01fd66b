"""Model sizes and their timm registrations.

``timm.create_model(name, **overrides)`` works once ``hpm_video`` is imported:
  * ``hpm_pretrain_vit_{size}_patch16`` -- the pretraining model (``HPMPretrainModel``);
  * ``hpm_vit_{size}_patch16`` -- the fine-tuning classifier (``VisionTransformer``);
with ``size`` in tiny, small, base, large, huge. Keyword overrides win over the size defaults
(e.g. ``num_frames=1, tubelet_size=1`` for images, ``masking="hpm"``).
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import register_model
from torch import nn

from hpm_video.models.pretrain import HPMPretrainModel
from hpm_video.models.vit import VisionTransformer

# (encoder dim, depth, heads, decoder dim, decoder heads, decoder depth); DESIGN.md section 3.
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (192, 12, 3, 96, 3, 2),
    "small": (384, 12, 6, 192, 3, 4),
    "base": (768, 12, 12, 384, 6, 4),
    "large": (1024, 24, 16, 512, 8, 12),
    "huge": (1280, 32, 16, 640, 8, 12),
}

PRETRAIN_MODELS = tuple(f"hpm_pretrain_vit_{s}_patch16" for s in SIZES)
CLASSIFIER_MODELS = tuple(f"hpm_vit_{s}_patch16" for s in SIZES)
MODEL_NAMES = PRETRAIN_MODELS + CLASSIFIER_MODELS


def size_kwargs(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and the size keyword arguments that a registered model name stands for."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    size = name.split("_vit_")[1].split("_")[0]
    dim, depth, heads, ddim, dheads, ddepth = SIZES[size]
    if name in PRETRAIN_MODELS:
        return HPMPretrainModel, dict(
            patch_size=16, encoder_embed_dim=dim, encoder_depth=depth, encoder_num_heads=heads,
            decoder_embed_dim=ddim, decoder_num_heads=dheads, decoder_depth=ddepth,
        )  # fmt: skip
    return VisionTransformer, dict(patch_size=16, embed_dim=dim, depth=depth, num_heads=heads)


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if pretrained:
        raise ValueError("hpm-video downloads nothing; load a checkpoint file with hpm_video.checkpoint instead")
    cls, args = size_kwargs(name)
    return cls(**{**args, **kwargs})


def _register(name: str) -> None:
    # timm's registry keys on the function's __name__ and reads its module for defaults, so each
    # entry point is a real module-level function with the public name.
    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        return _build(name, pretrained, kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    globals()[name] = register_model(entry)


for _name in MODEL_NAMES:
    _register(_name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` restricted to this project's models, with the valid names on error."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    return timm.create_model(name, **kwargs)
