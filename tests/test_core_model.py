import pytest
import timm
import torch

import hpm_video  # noqa: F401
from hpm_video.models import HPMPretrainModel, create_model, ema_decay
from hpm_video.models.layers import TubePatchEmbed, sincos_position_table

TINY = dict(
    img_size=32, patch_size=8, num_frames=4, tubelet_size=2,
    encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=3,
    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    mask_ratio=0.75,
)  # fmt: skip


def tiny(**kw) -> HPMPretrainModel:
    torch.manual_seed(0)
    return HPMPretrainModel(**{**TINY, **kw})


def clip(batch=2, frames=4, size=32, seed=0):
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def videomae_pretrain_keys(enc_depth, dec_depth):
    """Official VideoMAE pretrain checkpoint keys (DESIGN.md section 3)."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias"]  # fmt: skip
    keys = {"encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias", "encoder.norm.weight",
            "encoder.norm.bias", "encoder_to_decoder.weight", "mask_token", "decoder.norm.weight",
            "decoder.norm.bias", "decoder.head.weight", "decoder.head.bias"}  # fmt: skip
    keys |= {f"encoder.blocks.{i}.{k}" for i in range(enc_depth) for k in block}
    keys |= {f"decoder.blocks.{i}.{k}" for i in range(dec_depth) for k in block}
    return keys, block


def test_timm_registry_and_sizes():
    for size, dims in {"small": (384, 12, 192), "base": (768, 12, 384)}.items():
        model = timm.create_model(f"hpm_pretrain_vit_{size}_patch16", num_frames=2, img_size=32)
        assert model.encoder.norm.weight.shape[0] == dims[0]
        assert len(model.encoder.blocks) == dims[1]
        assert model.mask_token.shape[-1] == dims[2]
    with pytest.raises(ValueError, match="valid: hpm_pretrain_vit_tiny_patch16"):
        create_model("hpm_vit_giant_patch16")


def test_official_key_layout_pretrain_and_finetune():
    model = timm.create_model("hpm_pretrain_vit_base_patch16", num_frames=2, img_size=32)
    expected, block = videomae_pretrain_keys(12, 4)
    assert set(model.state_dict()) == expected
    # A VideoMAE-layout state dict loads strictly; shapes match ViT-B's checkpoint.
    sd = model.state_dict()
    assert sd["encoder.patch_embed.proj.weight"].shape == (768, 3, 2, 16, 16)
    assert sd["decoder.head.weight"].shape == (1536, 384)
    assert sd["encoder_to_decoder.weight"].shape == (384, 768)
    model.load_state_dict(sd, strict=True)
    hpm = timm.create_model("hpm_pretrain_vit_base_patch16", num_frames=2, img_size=32, masking="hpm")
    missing, unexpected = hpm.load_state_dict(sd, strict=False)
    assert not unexpected
    assert {k.split(".")[0] for k in missing} == {"loss_predictor", "teacher"}

    cls = timm.create_model("hpm_vit_base_patch16", num_frames=2, img_size=32, num_classes=400)
    ft = {"patch_embed.proj.weight", "patch_embed.proj.bias", "fc_norm.weight", "fc_norm.bias",
          "head.weight", "head.bias"} | {f"blocks.{i}.{k}" for i in range(12) for k in block}  # fmt: skip
    assert set(cls.state_dict()) == ft


def test_position_table_layout():
    table = sincos_position_table(5, 6)[0]
    pos, j = 3, 4
    assert table[pos, j].item() == pytest.approx(torch.sin(torch.tensor(pos / 10000 ** (2 * (j // 2) / 6))).item())
    assert table[pos, j + 1].item() == pytest.approx(torch.cos(torch.tensor(pos / 10000 ** (2 * (j // 2) / 6))).item())


def test_tube_embedding_is_the_convolution_and_embeds_chosen_tubes_alone():
    """The matrix form equals the Conv3d it keeps the weights of; with ``ids`` it gives exactly the
    rows of those tokens (the visible ones, in pretraining), for clips and images."""
    torch.manual_seed(0)
    for frames, tubelet, shape in ((8, 2, (2, 3, 8, 32, 48)), (1, 1, (2, 3, 32, 48))):
        embed = TubePatchEmbed((32, 48), 16, 3, 24, frames, tubelet)
        x = torch.randn(*shape)
        conv = embed.proj(x if x.ndim == 5 else x.unsqueeze(2)).flatten(2).transpose(1, 2)  # (B, N, D)
        every = embed(x)
        torch.testing.assert_close(every, conv, rtol=1e-5, atol=1e-5)
        ids = torch.stack([torch.randperm(every.shape[1])[:5].sort().values for _ in range(2)])
        chosen = embed(x, ids)
        assert chosen.shape == (2, 5, 24)
        torch.testing.assert_close(chosen, torch.stack([every[b, ids[b]] for b in range(2)]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masking,predictor", [("random", False), ("random", True), ("hpm", True)])
def test_forward_shapes_and_losses(masking, predictor):
    model = tiny(masking=masking, use_predictor=predictor)
    out = model(clip(), alpha=0.25)
    assert out["mask"].shape == (2, 32) and (out["mask"].sum(1) == 24).all()
    assert out["reconstruction"].shape == (2, 24, 2 * 8 * 8 * 3)
    assert torch.isfinite(out["loss"])
    assert ("loss_pred" in out) == predictor
    if predictor:
        torch.testing.assert_close(out["loss"], out["loss_rec"] + out["loss_pred"])


def test_any_grid_size_and_bad_sizes():
    model = tiny()
    out = model(clip(frames=6, size=48))  # a larger grid than the model was built for
    assert out["mask"].shape == (2, 3 * 36)
    with pytest.raises(ValueError, match="5 frames by tubelet 2"):
        model(clip(frames=5))
    with pytest.raises(ValueError, match="30x30 pixels by patch 8"):
        model(clip(size=30))
    with pytest.raises(ValueError, match="valid: random, hpm"):
        tiny(masking="hard")
    with pytest.raises(ValueError, match="needs the loss predictor"):
        tiny(masking="hpm", use_predictor=False)
    # A ratio that masks nothing (16 tubes: int(0.05 * 16) = 0) is refused when the model is built,
    # not at the first step with a shape error from the loss.
    with pytest.raises(ValueError, match="mask_ratio 0.05 masks no tube of the 2 x 16 token grid"):
        tiny(mask_ratio=0.05)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\), got 1.0"):
        tiny(mask_ratio=1.0)


def test_user_mask_is_checked():
    model = tiny()
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, :24] = True
    mask[1, :20] = True
    with pytest.raises(ValueError, match="same number of tokens"):
        model(clip(), mask=mask)
    for num_masked in (0, 32):  # nothing to reconstruct; nothing for the encoder to see
        mask = torch.zeros(2, 32, dtype=torch.bool)
        mask[:, :num_masked] = True
        with pytest.raises(ValueError, match=f"at least one token and keep one visible, got {num_masked} of 32"):
            model(clip(), mask=mask)


def test_one_frame_clip_and_image_are_the_same_path():
    model = tiny(num_frames=1, tubelet_size=1, masking="hpm")
    image = torch.randn(2, 3, 32, 32)
    a = model(image, alpha=0.5, generator=torch.Generator().manual_seed(0))
    b = model(image.unsqueeze(2), alpha=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["mask"], b["mask"])
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    # tube and token masking coincide on a one-slot grid
    assert model.mask_generator((1, 4, 4)).num_masked == 12
    cls = timm.create_model("hpm_vit_tiny_patch16", num_frames=1, tubelet_size=1, img_size=32, num_classes=3)
    torch.testing.assert_close(cls(image), cls(image.unsqueeze(2)))


def test_gradients_reach_encoder_from_both_losses():
    model = tiny(masking="random", use_predictor=True)
    videos, mask = clip(), model.generate_mask(clip(), generator=torch.Generator().manual_seed(0))
    grads = {}
    for name in ("loss_rec", "loss_pred"):
        model.zero_grad()
        model(videos, mask=mask)[name].backward()
        grads[name] = model.encoder.blocks[0].attn.qkv.weight.grad.clone()
        assert grads[name].abs().sum() > 0, f"{name} does not reach the encoder"
    assert not torch.allclose(grads["loss_rec"], grads["loss_pred"])
    # the predictor's target is detached: loss_pred gives the reconstruction head no gradient
    model.zero_grad()
    model(videos, mask=mask)["loss_pred"].backward()
    assert model.decoder.head.weight.grad is None or model.decoder.head.weight.grad.abs().sum() == 0


def test_ema_moves_toward_student_and_schedule():
    model = tiny(masking="hpm")
    teacher, student = model.ema_pairs()
    assert len(teacher) == len(student) > 0
    before = [t.clone() for t in teacher]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_teacher(0.9)
    for b, t, s in zip(before, teacher, student):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert ema_decay(0) == pytest.approx(0.999)
    assert ema_decay(50) == pytest.approx(0.99945)
    assert ema_decay(100) == ema_decay(700) == pytest.approx(0.9999)


def test_state_dict_round_trip():
    model = tiny(masking="hpm")
    videos = clip()
    mask = model.generate_mask(videos, alpha=0.3, generator=torch.Generator().manual_seed(0))
    other = HPMPretrainModel(**{**TINY, "masking": "hpm"})
    other.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(model(videos, mask=mask)["loss"], other(videos, mask=mask)["loss"])
    torch.testing.assert_close(model.score_tokens(videos), other.score_tokens(videos))


def test_hpm_masks_follow_teacher_scores():
    model = tiny(masking="hpm")
    videos = clip(batch=3)
    scores = model.score_tokens(videos)  # (B, T', S)
    mask = model.generate_mask(videos, alpha=1.0).view(3, 2, 16)[:, 0]
    hardest = scores.mean(1).topk(12, dim=1).indices
    assert mask.gather(1, hardest).all()


def test_grad_checkpointing_same_gradients():
    model = tiny(use_predictor=True)
    videos = clip()
    mask = model.generate_mask(videos, generator=torch.Generator().manual_seed(1))
    model(videos, mask=mask)["loss"].backward()
    ref = model.encoder.blocks[0].mlp.fc1.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(videos, mask=mask)["loss"].backward()
    torch.testing.assert_close(model.encoder.blocks[0].mlp.fc1.weight.grad, ref)


def test_fixed_batch_training_learns_reconstruction_and_ranking():
    torch.manual_seed(0)
    model = tiny(masking="hpm", encoder_embed_dim=64, encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=2)
    videos = clip(batch=4, seed=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(300):
        out = model(videos, alpha=0.25, generator=gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_teacher(0.99)
        history.append((out["loss_rec"].item(), out["rank_corr"].item()))
    first = torch.tensor(history[:20]).mean(0)
    last = torch.tensor(history[-20:]).mean(0)
    assert last[0] < 0.7 * first[0], (first, last)
    assert last[1] > first[1] + 0.2 and last[1] > 0.3, (first, last)
