"""Tube-patch ViT classifier for fine-tuning (VideoMAE fine-tune layout: mean pooling + fc_norm + head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn

from hpm_video.models.layers import (
    SinCosPositionTable,
    TubePatchEmbed,
    init_vit_weights,
    make_blocks,
    sincos_position_table,
)

POS_EMBED_KINDS = ("sincos1d", "learned")


class VisionTransformer(nn.Module):
    """Classifier over tube tokens.

    State-dict keys match VideoMAE's fine-tune checkpoints: ``patch_embed.proj.*``, ``blocks.N.*``,
    ``fc_norm.*``, ``head.*`` (no position table, no final ``norm`` with mean pooling).

    ``pos_embed="learned"`` replaces the fixed 1-D table by a trainable ``pos_embed`` parameter
    ``(1, N, D)`` (stored in the state dict, timm/MAE name), for checkpoints that carry their own table
    such as MAE's 2-D sin/cos one. It starts as the 1-D table, so an unloaded model computes the same
    function as the default. The default keeps the state dict free of any position table.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        head_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        use_mean_pooling: bool = True,
        init_scale: float = 0.001,
        num_frames: int = 16,
        tubelet_size: int = 2,
        grad_checkpointing: bool = False,
        pos_embed: str = "sincos1d",
        **unused,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = TubePatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, tubelet_size)
        if pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_KINDS}, got {pos_embed!r}")
        self.pos_embed_kind = pos_embed
        num_patches = self.patch_embed.num_patches
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(sincos_position_table(num_patches, embed_dim))
        else:
            self.pos_embed = SinCosPositionTable(num_patches, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = make_blocks(
            depth, embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, drop_path_rate, init_values
        )
        self.use_mean_pooling = use_mean_pooling
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_mean_pooling else None
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(init_vit_weights)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)
        self.set_grad_checkpointing(grad_checkpointing)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blocks.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # A learned table is 3-D, so the "1-D params take no decay" rule would miss it.
        return {"pos_embed"} if self.pos_embed_kind == "learned" else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise lr decay: patch embed (and a learned position table) first,
        one group per block. Whatever follows the blocks (norm, fc_norm, head) falls into the last group
        with lr scale 1, as in VideoMAE/BEiT (timm would merge an explicit norm group into the last block)."""
        return {"stem": r"^(?:patch_embed|pos_embed)", "blocks": [(r"^blocks\.(\d+)", None)]}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def position_table(self, num_tokens: int) -> torch.Tensor:
        """``(1, num_tokens, D)`` table added to the tokens."""
        if self.pos_embed_kind == "sincos1d":
            return self.pos_embed(num_tokens)
        if num_tokens != self.pos_embed.shape[1]:
            raise ValueError(
                f"the clip gives {num_tokens} tokens but the learned position table has {self.pos_embed.shape[1]}; "
                "build the model for this clip size (the loader resizes stored tables to it)"
            )
        return self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        x = x + self.position_table(x.shape[1]).to(x.dtype)
        x = self.pos_drop(x)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(x.mean(dim=1)) if self.use_mean_pooling else x[:, 0]  # (B, D)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` clip -> ``(B, num_classes)`` logits."""
        return self.forward_head(self.forward_features(x))
