"""Pieces of the fine-tuning loop: layer-decay groups, mixup/cutmix on clips, losses, linear probing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from hpm_video.config import load_config
from hpm_video.engine.finetune import (
    VideoMixup,
    build_criterion,
    build_mixup,
    fold_probe_head,
    make_linear_probe,
    make_probe_optimizer,
)
from hpm_video.engine.optim import param_groups
from hpm_video.models import VisionTransformer

TINY = dict(img_size=32, patch_size=8, num_frames=4, tubelet_size=2, embed_dim=48, num_heads=3, num_classes=5)


def model(depth: int = 4, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY, "depth": depth, **kw})


# ---------------------------------------------------------------------------------- layer decay
@pytest.mark.parametrize("pos_embed", ["sincos1d", "learned"])
def test_layer_decay_groups(pos_embed):
    depth, decay = 4, 0.75
    net = model(depth, pos_embed=pos_embed)
    groups = param_groups(net, 0.05, layer_decay=decay)
    scale_of, wd_of = {}, {}
    names = {id(p): n for n, p in net.named_parameters()}
    for group in groups:
        for p in group["params"]:
            scale_of[names[id(p)]] = group["lr_scale"]
            wd_of[names[id(p)]] = group["weight_decay"]
    assert set(scale_of) == set(names.values())  # every trainable tensor is in exactly one group
    # patch embedding (and a learned table): the smallest scale, decay^(depth + 1)
    assert scale_of["patch_embed.proj.weight"] == pytest.approx(decay ** (depth + 1))
    assert scale_of["patch_embed.proj.weight"] == min(scale_of.values())
    block_scales = [scale_of[f"blocks.{i}.attn.qkv.weight"] for i in range(depth)]
    assert block_scales == pytest.approx([decay ** (depth - i) for i in range(depth)])
    assert all(a < b for a, b in zip(block_scales, block_scales[1:]))  # strictly rising with depth
    for name in ("fc_norm.weight", "head.weight", "head.bias"):
        assert scale_of[name] == 1.0
    # every tensor of a block shares the block's scale
    assert {scale_of[n] for n in scale_of if n.startswith("blocks.2.")} == {decay**2}
    # no weight decay on biases, norms, q/v biases (and a learned position table); decay on matrices
    assert wd_of["blocks.0.attn.q_bias"] == 0 and wd_of["fc_norm.weight"] == 0 and wd_of["head.bias"] == 0
    assert wd_of["blocks.0.mlp.fc1.weight"] == 0.05 and wd_of["head.weight"] == 0.05
    if pos_embed == "learned":
        assert scale_of["pos_embed"] == scale_of["patch_embed.proj.weight"]
        assert wd_of["pos_embed"] == 0


# ------------------------------------------------------------------------------------- mixing
def frames_batch(b: int = 4, t: int = 5, h: int = 16, w: int = 16) -> torch.Tensor:
    """Clip i is filled with i + 1 everywhere, so every pasted pixel reveals its source clip."""
    return (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1, 1).expand(b, 3, t, h, w).clone()


def check_box(changed: torch.Tensor) -> tuple[int, int, int, int]:
    """``changed`` (C, T, H, W) bool: the same H x W rectangle on every channel and frame; returns it."""
    first = changed[0, 0]
    assert first.any(), "nothing was cut"
    assert (changed == first).all(), "the box differs between frames or channels (T was cut)"
    rows = torch.nonzero(first.any(1)).flatten()
    cols = torch.nonzero(first.any(0)).flatten()
    y0, y1, x0, x1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
    assert first[y0:y1, x0:x1].all() and first.sum() == (y1 - y0) * (x1 - x0), "not a rectangle"
    return y0, y1, x0, x1


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_cutmix_on_clips_cuts_height_and_width_on_every_frame(mode):
    mixup = VideoMixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode=mode, label_smoothing=0.0, num_classes=4)
    labels = torch.arange(4)
    for seed in range(20):
        np.random.seed(seed)
        x = frames_batch()
        out, target = mixup(x.clone(), labels)
        assert out.shape == x.shape
        cut_any = False
        for i in range(4):
            changed = out[i] != x[i]
            if not changed.any():
                continue
            cut_any = True
            y0, y1, x0, x1 = check_box(changed)
            partner = 3 - i  # timm mixes clip i with clip B - 1 - i
            assert (out[i][changed] == partner + 1).all()
            # the label weight of the partner is the pasted area's share of H x W (T untouched)
            area = (y1 - y0) * (x1 - x0) / (16 * 16)
            assert target[i, partner].item() == pytest.approx(area, abs=1e-6)
            assert target[i, i].item() == pytest.approx(1 - area, abs=1e-6)
        if cut_any:
            break
    assert cut_any


def test_mixup_blend_on_clips_and_odd_batch_refused():
    mixup = VideoMixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.1, num_classes=4)
    np.random.seed(3)
    x = frames_batch()
    out, target = mixup(x.clone(), torch.arange(4))
    lam = (4 - out[0, 0, 0, 0, 0].item()) / 3  # clip 0 (all 1) blended with clip 3 (all 4)
    assert 0 < lam < 1
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    off, on = 0.1 / 4, 0.9 + 0.1 / 4  # label smoothing folded into the mixed targets
    assert target[0, 0].item() == pytest.approx(lam * on + (1 - lam) * off, abs=1e-5)
    assert target[0, 3].item() == pytest.approx(lam * off + (1 - lam) * on, abs=1e-5)
    with pytest.raises(ValueError, match="batch must be even"):
        mixup(frames_batch(b=3), torch.arange(3))


def test_config_builds_mixup_and_losses():
    cfg = load_config(None, ["FINETUNE.NUM_CLASSES", "7"])
    mixup = build_mixup(cfg)
    assert mixup is not None and mixup.mixup.num_classes == 7 and mixup.mixup.label_smoothing == 0.1
    assert isinstance(build_criterion(cfg, True), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(cfg, False), LabelSmoothingCrossEntropy)
    off = load_config(None, ["FINETUNE.MIXUP", "0.0", "FINETUNE.CUTMIX", "0.0", "FINETUNE.SMOOTHING", "0.0"])
    assert build_mixup(off) is None
    assert isinstance(build_criterion(off, False), torch.nn.CrossEntropyLoss)


# -------------------------------------------------------------------------------- linear probe
def test_linear_probe_freezes_encoder_and_folds_batchnorm():
    net = make_linear_probe(model(depth=2))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    bn = net.head[0]
    assert not bn.affine and bn.eps == 1e-6
    groups = param_groups(net, 0.0)
    assert sum(len(g["params"]) for g in groups) == 2
    opt = make_probe_optimizer(net, load_config(None, ["SOLVER.WEIGHT_DECAY", "0.0"]))
    assert type(opt).__name__ == "Lars"
    # MAE probes at weight decay 0: the head's matrix still takes LARS's trust ratio, its bias not.
    adapts = {id(p): g["always_adapt"] for g in opt.param_groups for p in g["params"]}
    assert adapts == {id(net.head[1].weight): True, id(net.head[1].bias): False}
    with torch.no_grad():  # realistic running statistics
        bn.running_mean.copy_(torch.randn(48))
        bn.running_var.copy_(torch.rand(48) + 0.5)
        net.head[1].weight.copy_(torch.randn(5, 48))
    net.eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = net(x)
    plain = model(depth=2)
    plain.load_state_dict(fold_probe_head(net.state_dict()), strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), expected, atol=1e-5)
