"""Initialising the classifier from every supported checkpoint kind, built here from random models
with the official key layouts (no download)."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from torch import nn

from hpm_video.checkpoint import save_model_file
from hpm_video.finetune_init import (
    infer_pos_grid,
    load_pretrained,
    read_checkpoint,
    resize_pos_embed,
    to_classifier_layout,
)
from hpm_video.models import HPMPretrainModel, VisionTransformer

GEOM = dict(img_size=32, patch_size=8, num_frames=4, tubelet_size=2)
DIMS = dict(embed_dim=48, depth=2, num_heads=3)


def classifier(num_classes: int = 5, seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = {**GEOM, **DIMS, "num_classes": num_classes, "init_scale": 1.0, **kw}
    return VisionTransformer(**args).eval()


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values everywhere (fresh LayerNorms and zero biases would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def pretrain_model(**kw) -> HPMPretrainModel:
    torch.manual_seed(1)
    return HPMPretrainModel(
        **GEOM, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=3, decoder_embed_dim=32,
        decoder_depth=1, decoder_num_heads=2, **kw,
    )  # fmt: skip


def clip(batch: int = 2, frames: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(7))


def save(tmp_path, name: str, obj) -> str:
    path = os.path.join(tmp_path, name)
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------- VideoMAE
@pytest.mark.parametrize("wrap", ["model", "module", "backbone", "orig_mod", "ddp_of_compiled"])
def test_videomae_finetune_layouts_give_identical_logits(tmp_path, wrap):
    source = randomize(classifier(seed=1), seed=11)
    state = source.state_dict()
    if wrap == "backbone":  # VideoMAE-v2 style: module wrapper and backbone. prefix
        obj = {"module": {f"backbone.{k}": v for k, v in state.items()}}
    elif wrap == "orig_mod":  # saved from a torch.compile'd model
        obj = {"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "epoch": 3}
    elif wrap == "ddp_of_compiled":  # DistributedDataParallel around a compiled model
        obj = {"model": {f"module._orig_mod.{k}": v for k, v in state.items()}}
    else:
        obj = {wrap: state}
    target = classifier(seed=2)
    report = load_pretrained(target, save(tmp_path, "ft.pth", obj))
    direct = classifier(seed=3)
    direct.load_state_dict(state, strict=True)
    x = clip()
    with torch.no_grad():
        assert torch.equal(target(x), direct(x))
        assert torch.equal(target(x), source(x))
    assert report.missing == [] and report.unexpected == []
    assert report.head.startswith("loaded")
    assert report.kind == "videomae-finetune"


def test_videomae_pretrain_drops_decoder_and_keeps_encoder(tmp_path):
    pre = randomize(pretrain_model(), seed=5)
    path = save(tmp_path, "pt.pth", {"model": pre.state_dict()})
    model = classifier()
    head_before = model.head.weight.detach().clone()
    report = load_pretrained(model, path, fc_norm_from_norm=False)
    assert report.kind == "videomae-pretrain"
    assert {k.split(".")[0] for k in report.dropped} >= {"decoder", "encoder_to_decoder", "mask_token", "norm"}
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert torch.equal(model.head.weight, head_before)  # fresh head kept
    # The classifier's tokens before pooling equal the pretraining encoder's (without its final norm).
    x = clip()
    pre.encoder.norm = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), pre.encoder(x), atol=1e-6)


def test_norm_initialises_fc_norm_when_asked(tmp_path):
    pre = randomize(pretrain_model(), seed=5)
    model = classifier()
    report = load_pretrained(model, to_classifier_layout(pre.state_dict()), fc_norm_from_norm=True)
    assert "norm -> fc_norm (mean pooling)" in report.renamed
    assert torch.equal(model.fc_norm.weight, pre.encoder.norm.weight)
    assert set(report.missing) == {"head.weight", "head.bias"}


def test_hpm_model_file_uses_student_not_teacher(tmp_path):
    pre = randomize(pretrain_model(masking="hpm", use_predictor=True), seed=9)
    with torch.no_grad():  # a teacher that differs from the student
        for p in pre.teacher.parameters():
            p.add_(1.0)
    path = os.path.join(tmp_path, "model_final.pth")
    save_model_file(path, pre, "hpm_pretrain_vit_tiny_patch16", **GEOM)
    ckpt = read_checkpoint(str(tmp_path))  # a run folder resolves to its model_final.pth
    assert ckpt.kind.startswith("hpm-model-file")
    assert any(k.startswith("teacher.") for k in ckpt.dropped)
    assert any(k.startswith("loss_predictor.") for k in ckpt.dropped)
    model = classifier()
    load_pretrained(model, ckpt)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, pre.encoder.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.patch_embed.proj.weight, pre.encoder.patch_embed.proj.weight)


def test_our_finetuned_model_file_and_deepspeed_folder(tmp_path):
    source = randomize(classifier(seed=1), seed=4)
    path = os.path.join(tmp_path, "model_best.pth")
    save_model_file(path, source, "hpm_vit_tiny_patch16", **GEOM)
    x = clip()
    model = classifier(seed=2)
    load_pretrained(model, path)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    # A ZeRO 0-2 DeepSpeed tag folder holds the whole module under "module".
    tag = tmp_path / "checkpoints" / "epoch-0003"
    tag.mkdir(parents=True)
    torch.save({"module": source.state_dict(), "global_steps": 7}, tag / "mp_rank_00_model_states.pt")
    model = classifier(seed=3)
    report = load_pretrained(model, str(tag))
    assert report.kind.startswith("deepspeed")
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    # Files are read as data: one that needs unpickling of arbitrary objects is refused with the way out.
    torch.save({"module": source.state_dict(), "extra": object}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="(?s)as plain data.*tools/export_encoder.py"):
        read_checkpoint(str(tag))


def test_exported_encoder_layout(tmp_path):
    """tools/export_encoder.py's output: the encoder in the fine-tune layout plus provenance fields."""
    pre = randomize(pretrain_model(), seed=8)
    encoder = {k[len("encoder.") :]: v for k, v in pre.state_dict().items() if k.startswith("encoder.")}
    path = save(tmp_path, "encoder.pth", {
        "model": encoder, "source": {"checkpoint": "/runs/x/checkpoints/epoch-0799", "epoch": 799, "teacher": False},
        "pretrain_model_name": "hpm_pretrain_vit_tiny_patch16", "pretrain_model_kwargs": {"img_size": 32},
    })  # fmt: skip
    model = classifier()
    report = load_pretrained(model, path)
    assert report.kind == "encoder" and not report.unexpected
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert torch.equal(model.blocks[0].attn.q_bias, pre.encoder.blocks[0].attn.q_bias)


def test_hugging_face_keys_load_exactly():
    from hpm_video.hf import to_hf_state_dict

    source = randomize(classifier(seed=1), seed=6)
    hf_state, _ = to_hf_state_dict(source.state_dict(), "classifier")
    model = classifier(seed=2)
    report = load_pretrained(model, to_classifier_layout(hf_state, "hf"))
    assert report.kind == "hf-classifier" and not report.missing
    x = clip()
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_head_of_another_class_count_is_reset(tmp_path):
    source = randomize(classifier(num_classes=400, seed=1), seed=3)
    model = classifier(num_classes=5)
    head = model.head.weight.detach().clone()
    report = load_pretrained(model, to_classifier_layout({"module": source.state_dict()}["module"]))
    assert report.head.startswith("reset: checkpoint has 400 classes")
    assert "head.weight" in report.dropped and set(report.missing) == {"head.weight", "head.bias"}
    assert torch.equal(model.head.weight, head)


# ------------------------------------------------------------------------------------ refusals
def test_nothing_matching_is_refused_with_key_prefixes(tmp_path):
    junk = {"state_dict": {"resnet.layer1.conv.weight": torch.zeros(3), "fc.weight": torch.zeros(2, 2)}}
    path = save(tmp_path, "resnet.pth", junk)
    with pytest.raises(ValueError, match=r"nothing in this checkpoint fits.*resnet\.layer1.*fc\.weight"):
        load_pretrained(classifier(), path)


def test_wrong_size_is_refused_naming_the_tensor():
    wide = classifier(embed_dim=96, num_heads=3)
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight: checkpoint \(96, 3, 2, 8, 8\)"):
        load_pretrained(classifier(), to_classifier_layout(wide.state_dict()))


# --------------------------------------------------------------------------------- MAE (images)
def timm_vit(class_token: bool, global_pool: str, seed: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(seed)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, qkv_bias=True,
                    class_token=class_token, global_pool=global_pool)  # fmt: skip
    return randomize(model, seed).eval()


def image_classifier(img_size: int = 32, **kw) -> VisionTransformer:
    return classifier(img_size=img_size, num_frames=1, tubelet_size=1, pos_embed="learned", **kw)


def test_mae_style_image_weights_give_identical_logits(tmp_path):
    """Conv2d patch -> Conv3d (tubelet 1), fused qkv.bias split (a non-zero key bias dropped exactly), the
    stored position table used as the learned one: same logits as the timm/MAE model itself."""
    source = timm_vit(class_token=False, global_pool="avg", seed=3)
    state = source.state_dict()
    assert state["blocks.0.attn.qkv.bias"][48:96].abs().sum() > 0  # a real key bias
    path = save(tmp_path, "mae_ft.pth", {"model": state})
    ckpt = read_checkpoint(path)
    assert ckpt.kind == "mae-image" and ckpt.has_pos_embed
    model = image_classifier()
    report = load_pretrained(model, ckpt)
    assert not report.missing and not report.unexpected, report.summary()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x.unsqueeze(2)), source(x), atol=1e-5)


def test_mae_pretrain_checkpoint_with_cls_slot(tmp_path):
    """MAE pretraining layout: cls_token, pos_embed with a class slot, final norm, decoder_* parts."""
    source = timm_vit(class_token=True, global_pool="token", seed=4)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    state.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 48),
                  "decoder_pos_embed": torch.zeros(1, 17, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
                  "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.zeros(192, 32)})  # fmt: skip
    path = save(tmp_path, "mae_pt.pth", {"model": state})
    model = image_classifier(img_size=64)  # another resolution: the table must be resized 4x4 -> 8x8
    report = load_pretrained(model, path)
    assert {"cls_token", "mask_token", "decoder_embed.weight", "decoder_pred.weight"} <= set(report.dropped)
    assert "norm -> fc_norm (mean pooling)" in report.renamed
    assert any("pos_embed: grid 1x4x4 -> 1x8x8" in a for a in report.adapted)
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert torch.equal(model.fc_norm.weight, state["norm.weight"])
    expected = resize_pos_embed(state["pos_embed"][:, 1:], (1, 4, 4), (1, 8, 8))
    assert torch.equal(model.pos_embed.data, expected)
    assert torch.equal(model.blocks[0].attn.v_bias, state["blocks.0.attn.qkv.bias"][96:])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 1, 64, 64)).shape == (1, 5)


def test_image_weights_inflate_into_a_video_model():
    """An image checkpoint into a clip model: kernel spread over the tubelet, table copied over time.
    On a still clip the tokens then equal the image model's tokens of that frame, slot by slot."""
    source = timm_vit(class_token=False, global_pool="avg", seed=5)
    model = classifier(pos_embed="learned")  # 4 frames, tubelet 2
    report = load_pretrained(model, to_classifier_layout(source.state_dict()))
    assert any("tubelet 1 -> 2" in a for a in report.adapted)
    assert any("grid 1x4x4 -> 2x4x4" in a for a in report.adapted)
    image = torch.randn(1, 3, 32, 32)
    still = image.unsqueeze(2).expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        tokens = model.patch_embed(still) + model.pos_embed
        image_tokens = source.patch_embed(image) + source.pos_embed
        assert torch.allclose(tokens[:, :16], image_tokens, atol=1e-5)
        assert torch.allclose(tokens[:, 16:], image_tokens, atol=1e-5)


def test_learned_pos_embed_keeps_default_unchanged():
    default = classifier()
    assert not any("pos_embed" in k for k in default.state_dict())
    learned = classifier(pos_embed="learned")
    assert set(learned.state_dict()) == set(default.state_dict()) | {"pos_embed"}
    learned.load_state_dict(default.state_dict(), strict=False)
    x = clip()
    with torch.no_grad():  # the learned table starts as the fixed one
        assert torch.allclose(learned(x), default(x), atol=1e-6)
    assert learned.no_weight_decay() == {"pos_embed"}
    with pytest.raises(ValueError, match="learned position table has 32"):
        learned(clip(frames=8))


# --------------------------------------------------------------------------- position tables
def test_resize_identity_time_and_order():
    grid = (2, 3, 3)
    t, h, w = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), torch.arange(3.0), indexing="ij")
    table = torch.stack([t * 100 + h * 10 + w, torch.ones_like(t)], dim=-1).reshape(1, 18, 2)
    assert torch.equal(resize_pos_embed(table, grid, grid), table)
    # Time only, 2 -> 4 slots, linear with half-pixel centres: source coords -0.25, 0.25, 0.75, 1.25.
    out = resize_pos_embed(table, grid, (4, 3, 3)).reshape(4, 3, 3, 2)
    assert torch.allclose(out[:, 1, 2, 0], torch.tensor([12.0, 37.0, 87.0, 112.0]))
    assert torch.allclose(out[..., 1], torch.ones(4, 3, 3))
    # Space only: every time slot resized on its own, the time offset preserved.
    out = resize_pos_embed(table, grid, (2, 6, 6)).reshape(2, 6, 6, 2)
    assert torch.allclose(out[1, ..., 0] - out[0, ..., 0], torch.full((6, 6), 100.0), atol=1e-4)
    assert torch.allclose(out[..., 1], torch.ones(2, 6, 6), atol=1e-6)
    # A function of the row only stays a function of the row (bicubic is separable).
    rows = (h * 10).expand(2, 3, 3).reshape(1, 18, 1)
    out = resize_pos_embed(rows, grid, (2, 5, 7)).reshape(2, 5, 7)
    assert torch.allclose(out, out[:, :, :1].expand(-1, -1, 7), atol=1e-5)


def test_infer_pos_grid():
    assert infer_pos_grid(32, (2, 4, 4)) == (2, 4, 4)
    assert infer_pos_grid(196, (8, 14, 14), image_source=True) == (1, 14, 14)
    assert infer_pos_grid(1568, (8, 7, 7)) == (8, 14, 14)  # same time extent, other frame size
    assert infer_pos_grid(1568, (16, 14, 14)) == (8, 14, 14)  # same frame size, other clip length
    with pytest.raises(ValueError, match="cannot tell the token grid.*set FINETUNE.INIT_POS_GRID T H W"):
        infer_pos_grid(30, (2, 4, 4))


@pytest.mark.parametrize(
    "src, dst",
    [
        (GEOM, dict(img_size=16, patch_size=8, num_frames=8, tubelet_size=2)),  # 2x4x4 -> 4x2x2: both differ
        (dict(img_size=32, patch_size=8, num_frames=1, tubelet_size=1),  # a one-frame model (1x4x4) ...
         dict(img_size=16, patch_size=8, num_frames=4, tubelet_size=1)),  # ... into 4x2x2: the same 16 rows
    ],
)  # fmt: skip
def test_own_model_file_says_the_grid_of_its_table(tmp_path, src, dst):
    """Row counts alone would read these tables wrongly (as 8x2x2, and as already fitting)."""
    source = randomize(classifier(pos_embed="learned", **{**src, "num_classes": 5}), 3)
    path = os.path.join(tmp_path, "learned.pth")
    save_model_file(path, source, "hpm_vit_tiny_patch16", **src)
    src_grid = (src["num_frames"] // src["tubelet_size"], 4, 4)
    assert read_checkpoint(path).pos_grid == src_grid
    model = classifier(pos_embed="learned", **dst)
    report = load_pretrained(model, path)
    assert f"pos_embed: grid {'x'.join(map(str, src_grid))} -> 4x2x2" in report.adapted
    expected = resize_pos_embed(source.pos_embed.detach(), src_grid, (4, 2, 2))
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    # A foreign file without the arguments: inferred (here wrongly), or told by FINETUNE.INIT_POS_GRID.
    bare = save(tmp_path, "bare.pth", {"model": source.state_dict()})
    assert read_checkpoint(bare).pos_grid is None
    told = classifier(pos_embed="learned", **dst)
    load_pretrained(told, bare, src_grid=src_grid)
    torch.testing.assert_close(told.pos_embed.detach(), expected)


def test_timm_create_with_pos_embed_option():
    model = timm.create_model("hpm_vit_tiny_patch16", num_frames=1, tubelet_size=1, img_size=32,
                              pos_embed="learned", num_classes=3)  # fmt: skip
    assert model.pos_embed.shape == (1, 4, 192)
