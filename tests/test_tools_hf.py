"""Conversion to and from Hugging Face VideoMAE and the official VideoMAE layout.

Tolerances: weights convert bit-exactly; outputs agree to ATOL = 1e-4 (observed ~5e-6). They are not
bit-identical because HF builds ``decoder.norm`` and ``fc_norm`` with eps 1e-5 where VideoMAE (and
hpm-video) use 1e-6, and because attention is computed in a different order.
"""

import json
import os

import pytest
import torch
from tool_helpers import load_tool

import hpm_video  # noqa: F401
from hpm_video import hf
from hpm_video.checkpoint import save_model_file
from hpm_video.models import create_model

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoImageProcessor,
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
)

ATOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "hpm_pretrain_vit_tiny_patch16"
CLASSIFIER = "hpm_vit_tiny_patch16"
PRETRAIN_KW = dict(
    img_size=32, patch_size=8, num_frames=4, tubelet_size=2,
    encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
    decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, mask_ratio=0.75,
)  # fmt: skip
CLASSIFIER_KW = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=64, depth=2, num_heads=2, num_classes=5)


def perturbed(model, seed=0):
    """Every tensor moved off its initial value (zero biases, unit norms) so that a mapping error shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def clips(batch=2, seed=1):
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_pretrain_outputs_match(ours, theirs, videos, mask):
    with torch.no_grad():
        out = ours(videos, mask=mask)
        hf_out = theirs(hf.to_hf_pixel_values(videos), bool_masked_pos=mask)
    assert hf_out.logits.shape == out["reconstruction"].shape
    torch.testing.assert_close(hf_out.logits, out["reconstruction"], atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_out.loss, out["loss_rec"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_pretraining_ours_to_hf_same_logits_and_loss(norm_pix_loss):
    torch.manual_seed(0)
    ours = perturbed(create_model(PRETRAIN, **PRETRAIN_KW, norm_pix_loss=norm_pix_loss))
    theirs = hf.to_hf_model(ours)
    assert theirs.config.norm_pix_loss is norm_pix_loss and theirs.config.use_mean_pooling is False
    videos = clips()
    assert_pretrain_outputs_match(ours, theirs, videos, ours.generate_mask(videos))


def test_pretraining_hf_to_ours_same_logits_and_loss():
    config = VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2, decoder_intermediate_size=128, use_mean_pooling=False, layer_norm_eps=1e-6,
        architectures=["VideoMAEForPreTraining"],
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = perturbed(VideoMAEForPreTraining(config))
    ours, name, kwargs = hf.from_hf_model(theirs)
    assert name == PRETRAIN and kwargs["masking"] == "random" and not kwargs["use_predictor"]
    assert kwargs["encoder_embed_dim"] == 64 and kwargs["decoder_depth"] == 2 and kwargs["patch_size"] == 8
    videos = clips()
    assert_pretrain_outputs_match(ours.eval(), theirs, videos, ours.generate_mask(videos))
    # and back: the HF weights are reproduced exactly, but for a key bias (transformers releases
    # that have one), which comes back as zero: it never changed the outputs compared above.
    again = hf.to_hf_model(ours).state_dict()
    for key, value in theirs.state_dict().items():
        expected = torch.zeros_like(value) if key.endswith("attention.attention.key.bias") else value
        assert torch.equal(again[key], expected), key


def test_hpm_model_converts_with_predictor_and_teacher_kept_aside(tmp_path):
    torch.manual_seed(0)
    ours = perturbed(create_model(PRETRAIN, **PRETRAIN_KW, masking="hpm"))
    ours.update_teacher(0.5)  # teacher differs from the student, as during training
    folder = str(tmp_path / "hf")
    files = hf.save_hf_folder(ours, folder, PRETRAIN, {**PRETRAIN_KW, "masking": "hpm"})
    assert {"config.json", "preprocessor_config.json", hf.HPM_JSON, hf.HPM_EXTRAS} <= set(files)
    # Plain transformers loads the folder (ignoring the extras) and matches the reconstruction.
    theirs = VideoMAEForPreTraining.from_pretrained(folder).eval()
    videos = clips()
    assert_pretrain_outputs_match(ours, theirs, videos, ours.generate_mask(videos, alpha=0.5))
    processor = AutoImageProcessor.from_pretrained(folder)
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(processor.image_std) == pytest.approx([0.229, 0.224, 0.225])
    assert processor.crop_size["height"] == 32
    # ... and hpm-video gets every tensor back, teacher included.
    back, name, kwargs = hf.load_hf_folder(folder)
    assert name == PRETRAIN and kwargs["masking"] == "hpm" and back.teacher is not None
    state, back_state = ours.state_dict(), back.state_dict()
    assert set(state) == set(back_state)
    assert all(torch.equal(state[k], back_state[k]) for k in state)


def test_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import safetensors.torch

    folder = str(tmp_path / "hf")
    first = perturbed(create_model(PRETRAIN, **PRETRAIN_KW, masking="hpm"), seed=1)
    hf.save_hf_folder(first, folder, PRETRAIN, {**PRETRAIN_KW, "masking": "hpm"})
    second = perturbed(create_model(PRETRAIN, **PRETRAIN_KW, masking="hpm"), seed=2)

    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # fails after the HF weights are written
    with pytest.raises(OSError, match="no space"):
        hf.save_hf_folder(second, folder, PRETRAIN, {**PRETRAIN_KW, "masking": "hpm"})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["hf"]  # no staging folder left behind
    back, _, _ = hf.load_hf_folder(folder)  # still the first model, every tensor
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in first.state_dict().items())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a model folder .no config.json.; not replacing it"):
        hf.save_hf_folder(second, str(tmp_path / "notes"))


def test_weights_that_do_not_fit_the_folder_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / "hf")
    hf.save_hf_folder(perturbed(create_model(PRETRAIN, **PRETRAIN_KW, masking="hpm")), folder, PRETRAIN,
                      {**PRETRAIN_KW, "masking": "hpm"})  # fmt: skip
    weights = os.path.join(folder, "model.safetensors")
    state = load_file(weights)
    # Re-saved by another tool: the loss predictor and teacher beside them belong to other weights.
    save_file({k: v + 1 for k, v in state.items()}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="was written with other weights than the folder holds now"):
        hf.load_hf_folder(folder)
    # A tensor the config needs is missing: transformers would make it up; we refuse.
    os.unlink(os.path.join(folder, hf.HPM_EXTRAS))
    save_file({k: v for k, v in state.items() if "fc_norm" not in k and "decoder.norm" not in k}, weights,
              metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(ValueError, match=r"hf: does not fit hpm_pretrain_vit_tiny_patch16: missing \['decoder.norm"):
        hf.load_hf_folder(folder)


def test_folder_written_by_another_transformers_release_loads_exactly(tmp_path):
    """4.x and 5.24 store q_bias/v_bias (config qv_bias), 5.17 query/key/value biases (config qkv_bias);
    each release's from_pretrained fills the other's names with fresh values, so the folder is read as stored."""
    from safetensors.torch import load_file, save_file

    ours = perturbed(create_model(CLASSIFIER, **CLASSIFIER_KW))
    folder = str(tmp_path / "hf")
    hf.save_hf_folder(ours, folder, CLASSIFIER, CLASSIFIER_KW)
    weights = os.path.join(folder, "model.safetensors")
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    state = load_file(weights)
    other = {}
    for key, value in state.items():  # to the other naming, whichever this release wrote
        for legacy, modern in (("q_bias", "query.bias"), ("v_bias", "value.bias")):
            if key.endswith("attention.attention." + legacy):
                key = key[: -len(legacy)] + modern
                if modern == "query.bias":
                    other[key[: -len("query.bias")] + "key.bias"] = torch.zeros_like(value)
            elif key.endswith("attention.attention." + modern):
                key = key[: -len(modern)] + legacy
        if not key.endswith("attention.attention.key.bias"):
            other[key] = value
    assert set(other) != set(state)
    save_file(other, weights, metadata={"format": "pt"})
    config.pop("qv_bias", None), config.pop("qkv_bias", None)
    json.dump({**config, "qkv_bias" if "q_bias" not in str(list(other)) else "qv_bias": True}, open(config_path, "w"))
    back, _, _ = hf.load_hf_folder(folder)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_mlp_width_comes_back_exactly():
    """int(88 * (120 / 88)) is 119: the ratio read from a file must rebuild a 120-wide MLP."""
    ratio = hf.mlp_ratio_for(120, 88)
    ours = perturbed(create_model(CLASSIFIER, **{**CLASSIFIER_KW, "embed_dim": 88, "mlp_ratio": ratio}))
    assert ours.blocks[0].mlp.fc1.out_features == 120
    back, _, _ = hf.from_hf_model(hf.to_hf_model(ours))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("use_mean_pooling, qkv_bias", [(True, True), (False, True), (True, False)])
def test_classification_both_directions(use_mean_pooling, qkv_bias):
    torch.manual_seed(0)
    ours = perturbed(create_model(CLASSIFIER, **CLASSIFIER_KW, use_mean_pooling=use_mean_pooling, qkv_bias=qkv_bias))
    theirs = hf.to_hf_model(ours)
    assert isinstance(theirs, VideoMAEForVideoClassification)
    assert theirs.config.use_mean_pooling is use_mean_pooling and hf.hf_qv_bias(theirs.config) is qkv_bias
    videos = clips(batch=3)
    with torch.no_grad():
        expected = ours(videos)
        torch.testing.assert_close(theirs(hf.to_hf_pixel_values(videos)).logits, expected, atol=ATOL, rtol=0)
    # HF -> ours from an independently initialised HF model
    torch.manual_seed(1)
    independent = perturbed(VideoMAEForVideoClassification(theirs.config), seed=3)
    back, name, kwargs = hf.from_hf_model(independent)
    assert name == CLASSIFIER and kwargs["num_classes"] == 5 and kwargs["use_mean_pooling"] is use_mean_pooling
    with torch.no_grad():
        torch.testing.assert_close(
            back.eval()(videos), independent(hf.to_hf_pixel_values(videos)).logits, atol=ATOL, rtol=0
        )


def test_qkv_split_and_fuse_are_inverse_and_a_key_bias_is_dropped():
    torch.manual_seed(0)
    state = perturbed(create_model(CLASSIFIER, **CLASSIFIER_KW)).state_dict()
    hf_state, extras = hf.to_hf_state_dict(state, hf.CLASSIFIER)
    assert not extras
    q = hf_state["videomae.encoder.layer.1.attention.attention.query.weight"]
    assert torch.equal(q, state["blocks.1.attn.qkv.weight"][:64])
    v_bias = hf_state["videomae.encoder.layer.1.attention.attention.value.bias"]
    assert torch.equal(v_bias, state["blocks.1.attn.v_bias"])
    assert "videomae.encoder.layer.0.attention.attention.key.bias" not in hf_state
    back = hf.from_hf_state_dict(hf_state, hf.CLASSIFIER)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    # A key bias (transformers 5.0-5.17 build one) is dropped whatever its value: it shifts every
    # score of a query by the same q . b_k, which the softmax cancels.
    hf_state["videomae.encoder.layer.0.attention.attention.key.bias"] = torch.ones(64)
    back = hf.from_hf_state_dict(hf_state, hf.CLASSIFIER)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
    shifted = torch.nn.functional.scaled_dot_product_attention(q, k + torch.randn(16), v)
    torch.testing.assert_close(shifted, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_bias_names_follow_the_installed_transformers_layout():
    """4.x ``q_bias``/``v_bias`` names and a zero key bias where the HF model has one."""
    hf_state = {"videomae.encoder.layer.0.attention.attention.query.bias": torch.ones(4),
                "videomae.encoder.layer.0.attention.attention.value.bias": torch.full((4,), 2.0)}  # fmt: skip
    base = "videomae.encoder.layer.0.attention.attention."
    old = hf.match_hf_keys(hf_state, {base + "q_bias", base + "v_bias"})
    assert set(old) == {base + "q_bias", base + "v_bias"}
    assert torch.equal(old[base + "v_bias"], hf_state[base + "value.bias"])
    with_key = hf.match_hf_keys(hf_state, {base + "query.bias", base + "key.bias", base + "value.bias"})
    assert torch.equal(with_key[base + "key.bias"], torch.zeros(4)) and len(with_key) == 3
    assert hf.match_hf_keys(hf_state, {base + "query.bias", base + "value.bias"}) == hf_state
    assert set(hf.from_hf_state_dict(old, hf.CLASSIFIER)) == {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"}


def test_refuses_what_hf_cannot_hold():
    with pytest.raises(ValueError, match="LayerScale"):
        hf.hf_config_for_model(create_model(CLASSIFIER, **CLASSIFIER_KW, init_values=0.1))
    with pytest.raises(ValueError, match="ImageNet mean/std"):
        hf.hf_config_for_model(create_model(PRETRAIN, **PRETRAIN_KW, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    with pytest.raises(ValueError, match=r"unknown checkpoint layout.*'backbone\.conv1'"):
        hf.detect_layout({"backbone.conv1.weight": torch.zeros(1)}, source="x.pth")


# ---------------------------------------------------------------------------------------------- CLI
def _cli():
    return load_tool("convert_checkpoint")


def _run(cli, capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_cli_round_trips_are_lossless(tmp_path, capsys):
    cli = _cli()
    torch.manual_seed(0)
    model = perturbed(create_model(PRETRAIN, **PRETRAIN_KW, masking="hpm"))
    source = tmp_path / "hpm.pth"
    save_model_file(str(source), model, PRETRAIN, **PRETRAIN_KW, masking="hpm")

    code, summary = _run(cli, capsys, source, tmp_path / "hf", "--to", "hf")
    assert code == 0 and summary["verify"]["identical"] and summary["src_format"] == "hpm"
    code, summary = _run(cli, capsys, tmp_path / "hf", tmp_path / "back.pth", "--to", "hpm")
    assert code == 0 and summary["src_format"] == "hf"
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back["model_kwargs"]["masking"] == "hpm"
    original = model.state_dict()
    assert set(back["model"]) == set(original) and all(torch.equal(back["model"][k], original[k]) for k in original)

    # The official layout cannot hold predictor and teacher: refused unless dropped explicitly.
    code, err = _run(cli, capsys, source, tmp_path / "official.pth", "--to", "videomae")
    assert code == 2 and "loss_predictor" in err and "--drop-extras" in err
    code, summary = _run(cli, capsys, source, tmp_path / "official.pth", "--to", "videomae", "--drop-extras")
    assert code == 0 and summary["dropped"] == ["loss_predictor", "teacher"] and summary["verify"]["identical"]
    official = torch.load(tmp_path / "official.pth", weights_only=True)
    assert set(official) == {"model"}
    assert not any(k.startswith(("loss_predictor.", "teacher.")) for k in official["model"])

    # official -> HF -> official gives back the same tensors (head counts passed: width 64 is unlisted).
    geometry = ["--num-frames", 4, "--img-size", 32, "--num-heads", 2, "--decoder-num-heads", 2]
    code, summary = _run(cli, capsys, tmp_path / "official.pth", tmp_path / "hf2", "--to", "hf", *geometry)
    assert code == 0 and summary["src_format"] == "videomae" and summary["verify"]["identical"]
    code, summary = _run(cli, capsys, tmp_path / "hf2", tmp_path / "official2.pth", "--to", "videomae")
    assert code == 0
    again = torch.load(tmp_path / "official2.pth", weights_only=True)["model"]
    assert set(again) == set(official["model"])
    assert all(torch.equal(again[k], official["model"][k]) for k in again)


def test_cli_official_finetuned_checkpoint_to_hf_matches_logits(tmp_path, capsys):
    cli = _cli()
    torch.manual_seed(0)
    ours = perturbed(create_model(CLASSIFIER, **CLASSIFIER_KW))
    torch.save({"module": ours.state_dict()}, tmp_path / "ft.pth")  # official fine-tune files use "module"
    code, summary = _run(cli, capsys, tmp_path / "ft.pth", tmp_path / "hf", "--to", "hf", "--num-frames", 4,
                         "--img-size", 32, "--num-heads", 2)  # fmt: skip
    assert code == 0 and summary["model_name"] == CLASSIFIER
    theirs = VideoMAEForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    videos = clips()
    with torch.no_grad():
        torch.testing.assert_close(theirs(hf.to_hf_pixel_values(videos)).logits, ours(videos), atol=ATOL, rtol=0)


def test_cli_refuses_unknown_layouts_naming_the_file_and_prefixes(tmp_path, capsys):
    cli = _cli()
    torch.save({"state_dict": {"backbone.stem.weight": torch.zeros(2), "cls_head.fc.bias": torch.zeros(2)}},
               tmp_path / "other.pth")  # fmt: skip
    code, err = _run(cli, capsys, tmp_path / "other.pth", tmp_path / "out.pth", "--to", "hpm")
    assert code == 2 and "other.pth" in err and "backbone.stem" in err and "cls_head.fc" in err
    (tmp_path / "empty").mkdir()
    code, err = _run(cli, capsys, tmp_path / "empty", tmp_path / "out.pth", "--to", "hpm")
    assert code == 2 and "config.json" in err
    # Official ViT-B widths need no head count: 768 -> 12 heads, decoder 384 -> 6 heads.
    name, kwargs = hf.model_config_from_state(create_model("hpm_pretrain_vit_base_patch16").state_dict())
    assert name == "hpm_pretrain_vit_base_patch16" and kwargs["encoder_num_heads"] == 12
    assert kwargs["decoder_num_heads"] == 6 and kwargs["decoder_depth"] == 4 and kwargs["masking"] == "random"
