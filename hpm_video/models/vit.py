"""Tube-patch ViT classifier for fine-tuning (VideoMAE fine-tune layout: mean pooling + fc_norm + head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn

from hpm_video.models.layers import SinCosPositionTable, TubePatchEmbed, init_vit_weights, make_blocks


class VisionTransformer(nn.Module):
    """Classifier over tube tokens.

    State-dict keys match VideoMAE's fine-tune checkpoints: ``patch_embed.proj.*``, ``blocks.N.*``,
    ``fc_norm.*``, ``head.*`` (no position table, no final ``norm`` with mean pooling).
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
        **unused,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = TubePatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, tubelet_size)
        self.pos_embed = SinCosPositionTable(self.patch_embed.num_patches, embed_dim)
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
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise lr decay: patch embed first, one group per block."""
        return {"stem": r"^patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^(norm|fc_norm)", (99999,))]}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        x = x + self.pos_embed(x.shape[1]).to(x.dtype)
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
