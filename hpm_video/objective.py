"""The HPM objective: normalized-pixel targets, reconstruction loss and loss-prediction losses.

All functions are pure and stay on the device of their inputs (no host syncs), so the training step
can log their values only every N steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

PRED_LOSSES = ("relative", "absolute")


def _per_channel(values: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(1, C, 1, 1, 1)`` on ``like``'s device. Python numbers are copied from the host, which
    makes a CUDA device wait: a training step passes tensors already there (the model's buffers)."""
    if isinstance(values, torch.Tensor):
        return values.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
    return like.new_tensor(values).view(1, -1, 1, 1, 1)


def patchify_targets(
    videos: torch.Tensor,
    tubelet_size: int,
    patch_size: int,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """Reconstruction targets ``(B, N, tubelet * p * p * C)`` from normalised clips ``(B, C, T, H, W)``.

    Frames are first mapped back to [0, 1] with the dataset ``mean``/``std``. With ``normalize``
    every tube is standardised per channel over its ``tubelet * p * p`` pixels using the unbiased
    std plus 1e-6 (VideoMAE's target); values are flattened in ``(t, h, w, c)`` order. Computed in
    fp32 whatever the input dtype, since a bf16 variance is too coarse for the target.
    """
    x = videos.float()
    x = x * _per_channel(std, x) + _per_channel(mean, x)
    tubes = rearrange(
        x,
        "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c",
        p0=tubelet_size,
        p1=patch_size,
        p2=patch_size,
    )
    if normalize:
        tubes = (tubes - tubes.mean(dim=-2, keepdim=True)) / (
            tubes.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6
        )
    return rearrange(tubes, "b n p c -> b n (p c)")


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], tubelet_size: int, patch_size: int, channels: int = 3
) -> torch.Tensor:
    """Inverse of the token flattening: ``(B, N, tubelet*p*p*C)`` -> ``(B, C, T, H, W)``."""
    t, h, w = grid
    return rearrange(
        tokens,
        "b (t h w) (p0 p1 p2 c) -> b c (t p0) (h p1) (w p2)",
        t=t,
        h=h,
        w=w,
        p0=tubelet_size,
        p1=patch_size,
        p2=patch_size,
        c=channels,
    )


def per_token_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each token ``(B, M)`` from ``(B, M, D)`` predictions and targets."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


# Elements of one (B, rows, M) block of pairs: 2**24 fp32 values are 64 MiB per intermediate.
PAIR_BLOCK_ELEMENTS = 2**24


def _pair_blocks(batch: int, num_tokens: int, max_elements: int) -> list[tuple[int, int]]:
    rows = max(1, max_elements // max(1, batch * num_tokens))
    return [(start, min(start + rows, num_tokens)) for start in range(0, num_tokens, rows)]


def _pair_terms(pred: torch.Tensor, target: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start:stop`` of the pair matrices: ``order[b, i, j] = sign(t_j - t_i)`` and the
    logit ``z[b, i, j] = -order * (p_j - p_i)`` whose softplus is the pair's term."""
    order = torch.sign(target.unsqueeze(1) - target[:, start:stop, None])  # (B, rows, M)
    logit = -order * (pred.unsqueeze(1) - pred[:, start:stop, None])
    return order, logit


class _PairwiseLogistic(torch.autograd.Function):
    """The relative loss with memory linear in M: pairs are visited in row blocks in the forward
    and again in the backward (analytic gradient), so nothing of size B x M x M is kept."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, max_elements: int) -> torch.Tensor:
        total = pred.new_zeros(())
        pairs = pred.new_zeros(())
        for start, stop in _pair_blocks(*pred.shape, max_elements):
            order, logit = _pair_terms(pred, target, start, stop)
            counted = order.abs()  # 0 for ties
            total = total + (F.softplus(logit) * counted).sum()
            pairs = pairs + counted.sum()
        pairs = pairs.clamp(min=1)
        ctx.save_for_backward(pred, target, pairs)
        ctx.max_elements = max_elements
        return total / pairs

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pred, target, pairs = ctx.saved_tensors
        grad = torch.zeros_like(pred)
        for start, stop in _pair_blocks(*pred.shape, ctx.max_elements):
            order, logit = _pair_terms(pred, target, start, stop)
            # d softplus(z) / dz = sigmoid(z); dz/dp_j = -order, dz/dp_i = +order (0 for ties).
            weight = torch.sigmoid(logit) * order  # (B, rows, M)
            grad = grad - weight.sum(dim=1)
            grad[:, start:stop] += weight.sum(dim=2)
        return grad * (grad_out / pairs), None, None


def relative_loss(pred: torch.Tensor, target: torch.Tensor, max_pair_block: int = PAIR_BLOCK_ELEMENTS) -> torch.Tensor:
    """Pairwise logistic (RankNet-style) loss that teaches ``pred`` the order of ``target``.

    For every ordered pair (i, j) of tokens in the same sample with ``t_i != t_j`` the term is
    ``softplus(-sign(t_j - t_i) * (p_j - p_i))``; the result is the mean over all non-tie pairs of
    the batch. ``target`` is treated as a constant (no gradient). The ``B x M x M`` pairs are
    visited in blocks of at most ``max_pair_block`` elements, so memory stays linear in ``M``
    (about 3 GiB less than the dense form at ViT-B, B = 128, M = 1,408).
    """
    return _PairwiseLogistic.apply(pred.float(), target.detach().float(), max_pair_block)


def absolute_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between ``pred`` and the per-sample z-normalised ``target`` (the paper's ablation)."""
    target = target.float()
    z = (target - target.mean(dim=1, keepdim=True)) / (target.std(dim=1, keepdim=True) + 1e-6)
    return F.mse_loss(pred.float(), z)


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    if kind == "relative":
        return relative_loss(pred, target)
    if kind == "absolute":
        return absolute_loss(pred, target)
    raise ValueError(f"unknown prediction loss {kind!r}; valid: {', '.join(PRED_LOSSES)}")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=1).argsort(dim=1).float()


def rank_correlation(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation between predicted and true per-token loss, averaged over samples.

    This is how a user sees the loss predictor learning: ~0 at random, toward 1 as it learns which
    tokens are hard. Ties are broken by position, which is harmless for continuous losses.
    """
    rp = _ranks(pred.detach().float())
    rt = _ranks(target.detach().float())
    rp = rp - rp.mean(dim=1, keepdim=True)
    rt = rt - rt.mean(dim=1, keepdim=True)
    corr = (rp * rt).sum(dim=1) / (rp.norm(dim=1) * rt.norm(dim=1)).clamp(min=1e-12)
    return corr.mean()
