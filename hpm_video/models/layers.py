"""Building blocks of the tube-patch ViT.

Parameter names follow the released VideoMAE checkpoints (``patch_embed.proj``, fused ``attn.qkv``
with separate ``q_bias``/``v_bias``, ``mlp.fc1``/``mlp.fc2``) so that those checkpoints load with
``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, to_2tuple
from torch import nn
from torch.utils.checkpoint import checkpoint


def sincos_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin/cos table over the flattened token index, ``(1, num_positions, dim)``.

    Channel ``j`` uses frequency ``10000 ** (-2 * (j // 2) / dim)``; even channels hold the sine and
    odd channels the cosine (interleaved, the layout VideoMAE's released weights were trained with).
    Because the table only depends on the flat index, the table for N tokens is the first N rows of
    any longer one.
    """
    # Explicitly on the CPU so that building a model under ``torch.device("meta")`` still works.
    position = torch.arange(num_positions, dtype=torch.float64, device="cpu")[:, None]
    exponent = 2 * (torch.arange(dim, dtype=torch.float64, device="cpu") // 2) / dim
    angles = position / torch.pow(10000.0, exponent)[None, :]  # (N, dim)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float().unsqueeze(0)


class SinCosPositionTable(nn.Module):
    """Holds the fixed table as a non-persistent buffer (never in a state_dict, follows ``.to()``).

    ``forward(n)`` returns ``(1, n, dim)`` for any token count; counts above the cached size (a
    larger grid than the model was built for) are computed on the fly.
    """

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("table", sincos_position_table(num_positions, dim), persistent=False)

    def forward(self, num_tokens: int) -> torch.Tensor:
        if num_tokens <= self.table.shape[1]:
            return self.table[:, :num_tokens]
        return sincos_position_table(num_tokens, self.dim).to(self.table.device)


class TubePatchEmbed(nn.Module):
    """Cuts a clip ``(B, C, T, H, W)`` into ``tubelet x patch x patch`` tubes and embeds each.

    Tokens come out flattened in ``(t, h, w)`` order. An image is a one-frame clip with
    ``tubelet_size=1``.

    The weight is a ``Conv3d``'s (checkpoint keys ``proj.weight``/``proj.bias``), but the forward is
    a matrix product of each tube's pixels with it viewed as ``(D, C*t*p*p)``: a convolution whose
    stride equals its kernel computes exactly that, and cuDNN's kernels for such convolutions are
    slow in some bf16 configurations (transformers #45750, sglang #21014). The matrix form can also
    embed only chosen tubes (``ids``): the pretraining encoder embeds the visible 10% of the clip.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        num_frames: int = 16,
        tubelet_size: int = 2,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        self.num_frames = num_frames
        self.grid_size = (
            num_frames // tubelet_size,
            self.img_size[0] // patch_size,
            self.img_size[1] // patch_size,
        )
        check_divisible(num_frames, self.img_size[0], self.img_size[1], tubelet_size, patch_size)
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=(tubelet_size, patch_size, patch_size),
            stride=(tubelet_size, patch_size, patch_size),
        )

    def token_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """``(T', H', W')`` token grid of a clip (or a ``(B, C, H, W)`` image), after checking its shape."""
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise ValueError(f"expected a clip (B, C, T, H, W) or an image (B, C, H, W), got {tuple(x.shape)}")
        _, c, t, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"clip {tuple(x.shape)} has {c} channels, the model expects {self.in_chans}")
        check_divisible(t, h, w, self.tubelet_size, self.patch_size)
        return t // self.tubelet_size, h // self.patch_size, w // self.patch_size

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Clip -> every token ``(B, N, D)``; with ``ids`` ``(B, M)``, only those tokens ``(B, M, D)``."""
        _, grid_h, grid_w = self.token_grid(x)
        t, p = self.tubelet_size, self.patch_size
        # A view, no copy: each tube's pixels in the weight's (C, t, p, p) order.
        tubes = rearrange(as_clip(x), "b c (gt t) (gh p) (gw q) -> b gt gh gw c t p q", t=t, p=p, q=p)
        if ids is None:
            tubes = tubes.flatten(1, 3)  # (B, N, C, t, p, p)
        else:
            # Flat index -> (t, h, w) by hand: torch.unravel_index copies the shape to the device.
            rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)  # (B, 1)
            tubes = tubes[rows, ids // (grid_h * grid_w), ids // grid_w % grid_h, ids % grid_w]  # (B, M, C, t, p, p)
        return F.linear(tubes.flatten(2), self.proj.weight.flatten(1), self.proj.bias)  # (B, N or M, D)


def as_clip(x: torch.Tensor) -> torch.Tensor:
    """An image batch ``(B, C, H, W)`` is a batch of one-frame clips ``(B, C, 1, H, W)``."""
    return x.unsqueeze(2) if x.ndim == 4 else x


def check_divisible(frames: int, height: int, width: int, tubelet: int, patch: int) -> None:
    """Refuse clip sizes the tube does not tile exactly, naming the offending sizes."""
    bad = []
    if frames % tubelet:
        bad.append(f"{frames} frames by tubelet {tubelet}")
    if height % patch or width % patch:
        bad.append(f"{height}x{width} pixels by patch {patch}")
    if bad:
        raise ValueError("clip size not divisible: " + "; ".join(bad))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and learned q/v biases only.

    The key bias is fixed at zero (it cancels in the softmax), which is why released checkpoints
    store ``q_bias`` and ``v_bias`` separately instead of a ``qkv.bias``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())  # (B, N, 3D)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = rearrange(x, "b h n d -> b n (h d)")
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-LN transformer block; optional LayerScale (``gamma_1``/``gamma_2``) for compatibility."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        if init_values:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = None
            self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class BlockStack(nn.Sequential):
    """``nn.Sequential`` of blocks (keys ``blocks.N.*``) with optional activation checkpointing."""

    grad_checkpointing: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def make_blocks(
    depth: int,
    dim: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    init_values: float | None = None,
) -> BlockStack:
    """``depth`` blocks with stochastic depth rising linearly from 0 to ``drop_path_rate``."""
    rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    return BlockStack(
        *[
            Block(dim, num_heads, mlp_ratio, qkv_bias, drop_rate, rate, init_values)
            for rate in rates
        ]
    )


def init_vit_weights(module: nn.Module) -> None:
    """Xavier-uniform linears with zero bias, unit LayerNorms (the MAE/VideoMAE initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
