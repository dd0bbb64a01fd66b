import json
import os

import pytest
import torch
import torch.nn.functional as F
from tool_helpers import load_tool
from torch import nn

import hpm_video  # noqa: F401
from hpm_video.flops import (
    NORM_MACS_PER_ELEMENT,
    analytic_params,
    arch_from_model,
    arch_from_name,
    count_flops,
    fvcore_macs,
    model_flops,
)
from hpm_video.masking import alpha_tensor
from hpm_video.models import CLASSIFIER_MODELS, PRETRAIN_MODELS, create_model

pytest.importorskip("fvcore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_SIZES = ("tiny", "small", "base")  # large/huge are left to the tool: slow to trace on a CPU


def hand_count_videomae_base_forward_flops(official: bool = False) -> float:
    """ViT-B 16x224, tube mask 0.9, no predictor: forward FLOPs (2 per multiply-add), written out.

    Only linear layers (incl. the patch embedding) and the two attention matmuls per block. The
    patch embedding runs on the visible tubes, as ours does; the official code embeds every tube
    (``official=True``), which gives the 212.6 training GFLOPs the GPU-speed issue quotes.
    """
    tokens, visible = 8 * 14 * 14, 8 * (196 - int(0.9 * 196))  # 1568, 160
    masked = tokens - visible
    enc_dim, enc_depth = 768, 12
    dec_dim, dec_depth = 384, 4
    patch_dim = 3 * 2 * 16 * 16  # 1536 values per tube

    def block(n, d):  # qkv + proj + MLP (4x) linears, then Q K^T and P V
        return n * (3 * d * d + d * d + 2 * d * 4 * d) + 2 * n * n * d

    macs = (tokens if official else visible) * patch_dim * enc_dim  # patch embedding
    macs += enc_depth * block(visible, enc_dim)
    macs += visible * enc_dim * dec_dim  # encoder_to_decoder
    macs += dec_depth * block(tokens, dec_dim)
    macs += masked * dec_dim * patch_dim  # decoder head on the masked tokens only
    return 2 * macs


def test_videomae_base_pretraining_matches_hand_count():
    report = model_flops("hpm_pretrain_vit_base_patch16", 16, 224, mask_ratio=0.9, masking="random", method="fvcore")
    assert report["tokens"] == 1568 and report["visible_tokens"] == 160
    hand = hand_count_videomae_base_forward_flops() / 1e9
    # The 212.6 GFLOPs per training clip = 3 x the official forward, which embeds every tube.
    assert 3 * hand_count_videomae_base_forward_flops(official=True) / 1e9 == pytest.approx(212.6, rel=0.01)
    assert hand == pytest.approx(70.9 - 3.3, rel=0.01)
    assert report["forward_gflops"] == pytest.approx(hand, rel=0.01)
    assert report["train_gflops"] == pytest.approx(3 * hand, rel=0.01)
    assert report["forward_gmacs"] * 2 == pytest.approx(report["forward_gflops"])
    assert report["teacher_gflops"] == 0
    assert report["params"] == analytic_params(arch_from_name("hpm_pretrain_vit_base_patch16"))[0]
    assert report["params"] / 1e6 == pytest.approx(94.2, abs=0.1)  # VideoMAE ViT-B pretraining model


def test_sdpa_handler_counts_attention_matmuls():
    class Attend(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    total, _ = fvcore_macs(Attend(), (q, k, v))
    assert total == 2 * 3 * 5 * 7 * (8 + 4)


TINY = dict(num_frames=4, img_size=64, encoder_depth=2, decoder_depth=1)
VARIANTS = [
    dict(masking="hpm"),
    dict(masking="random", use_predictor=True, mask_unit="token", mask_ratio=0.75),
    dict(masking="random", qkv_bias=False, init_values=0.1, mlp_ratio=2.0),
    dict(masking="hpm", img_size=(64, 32)),  # non-square frames
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fvcore_and_closed_form_agree_exactly(variant):
    kwargs = {**TINY, **variant}
    model = create_model("hpm_pretrain_vit_tiny_patch16", **kwargs)
    traced = count_flops(model, method="fvcore")
    closed = count_flops(model, method="analytic")
    by_name = model_flops("hpm_pretrain_vit_tiny_patch16", method="analytic", **kwargs)
    for key in ("forward_gmacs", "teacher_gmacs", "train_gmacs"):
        assert traced[key] == pytest.approx(closed[key], rel=1e-9) == by_name[key]
    assert arch_from_model(model) == arch_from_name("hpm_pretrain_vit_tiny_patch16", **kwargs)
    assert (traced["params"], traced["teacher_params"]) == analytic_params(arch_from_model(model))
    assert traced["parts_gmacs"]["other"] == 0  # every counted op sits in a named part
    assert traced["train_gmacs"] == pytest.approx(3 * traced["forward_gmacs"] + traced["teacher_gmacs"])
    assert (traced["teacher_gmacs"] > 0) == (variant["masking"] == "hpm")
    assert model.training  # mode restored


def test_closed_form_refuses_clips_the_model_refuses():
    with pytest.raises(ValueError, match="15 frames by tubelet 2; 60x60 pixels by patch 16"):
        model_flops("hpm_pretrain_vit_tiny_patch16", num_frames=15, img_size=60, method="analytic")


def test_hpm_teacher_pass_is_a_full_clip_encoder_and_predictor():
    name = "hpm_pretrain_vit_tiny_patch16"
    random_mode = model_flops(name, masking="random", use_predictor=True, method="fvcore", **TINY)
    hpm = model_flops(name, masking="hpm", method="fvcore", **TINY)
    assert hpm["forward_gmacs"] == pytest.approx(random_mode["forward_gmacs"])  # same student

    class StudentScoresFullClip(nn.Module):  # encoder + encoder_to_decoder + loss predictor, no mask
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, videos):
            return self.model.score_tokens(videos, use_teacher=False)

    model = create_model(name, masking="hpm", **TINY)
    full_clip, _ = fvcore_macs(StudentScoresFullClip(model), (torch.randn(1, 3, 4, 64, 64),))
    assert hpm["teacher_gmacs"] * 1e9 == pytest.approx(full_clip)
    assert hpm["teacher_gmacs"] > hpm["parts_gmacs"]["encoder"] + hpm["parts_gmacs"]["loss_predictor"]


@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_classifier_counts(use_mean_pooling):
    kwargs = dict(num_frames=4, img_size=64, depth=2, num_classes=7, use_mean_pooling=use_mean_pooling)
    model = create_model("hpm_vit_tiny_patch16", **kwargs)
    traced = count_flops(model, method="fvcore")
    assert traced["kind"] == "finetune" and traced["tokens"] == 32
    assert traced["forward_gmacs"] == pytest.approx(count_flops(model, method="analytic")["forward_gmacs"])
    by_name = model_flops("hpm_vit_tiny_patch16", method="analytic", **kwargs)
    assert by_name["params"] == traced["params"] == sum(p.numel() for p in model.parameters())
    assert traced["train_gmacs"] == pytest.approx(3 * traced["forward_gmacs"])


def _cli():
    return load_tool("flops")


def test_cli_table_and_json_for_registered_models(capsys):
    cli = _cli()
    names = [n for n in PRETRAIN_MODELS + CLASSIFIER_MODELS if any(f"_{s}_" in n for s in SMALL_SIZES)]
    assert cli.main(["--models", *names, "--method", "analytic", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert len(reports) == 3 * 2 + 3  # pretraining in two masking modes, classifiers once
    base = next(r for r in reports if r["model"] == "hpm_pretrain_vit_base_patch16" and r["masking"] == "random")
    assert base["train_gflops"] == pytest.approx(3 * hand_count_videomae_base_forward_flops() / 1e9, rel=0.01)
    for r in reports:
        assert {"params", "forward_gflops", "teacher_gflops", "train_gflops", "convention"} <= set(r)
    assert cli.main(["--models", "hpm_pretrain_vit_tiny_patch16", "hpm_vit_tiny_patch16", "--frames", "4",
                     "--size", "64", "--masking", "hpm", "--method", "analytic"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "hpm_pretrain_vit_tiny_patch16" in table and "hpm_vit_tiny_patch16" in table
    assert "multiply-adds" in table  # the convention is printed


def _executed_flops(model: nn.Module, videos: torch.Tensor) -> dict[str, int]:
    """FLOPs of one real training step as torch's own counter sees the matrix products and
    attention run: ``forward``, ``total`` (forward + backward), ``embed`` (the student's patch
    embedding forward), and the LayerNorm FLOPs of the forward at fvcore's 5 per element, which
    the counter does not count (``norm_student``, ``norm_teacher``).

    Attention is counted by the model-FLOPs convention: backward = 2 x forward. (Torch's formula
    for the GPU kernels adds flash attention's recomputation of Q K^T in the backward, which is
    not model work; the counter has no formula for the CPU kernels, so both are mapped here.)
    """
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def sdpa_forward(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return 2 * flop_counter.sdpa_flop_count(query, key, value)

    counts = {"norm_student": 0, "norm_teacher": 0}

    def count_norm(key):
        def hook(module, args, output):
            counts[key] += 2 * NORM_MACS_PER_ELEMENT * args[0].numel()

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            module.register_forward_hook(count_norm("norm_teacher" if name.startswith("teacher.") else "norm_student"))
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa_forward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward}  # fmt: skip
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        loss = model(videos, alpha=alpha_tensor(0.5, videos.device))["loss"]
        counts["forward"] = counter.get_total_flops()
        counts["embed"] = sum(counter.get_flop_counts()[f"{type(model).__name__}.encoder.patch_embed"].values())
        loss.backward()
    counts["total"] = counter.get_total_flops()
    return counts


@pytest.mark.parametrize("masking", ["random", "hpm"])
def test_counted_flops_are_what_a_training_step_executes(masking):
    """The FLOPs that MFU divides by are the work a real step does: the counted forward (3 x for
    training) plus the teacher pass equal what torch's FLOP counter sees run, forward and backward,
    at full ViT-B 16 x 224 size (fake tensors: nothing is computed). Extra work (a teacher that
    got gradients, a decoder on tokens it should skip) or a miscount would show here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kwargs = dict(num_frames=16, img_size=224, masking=masking, mask_ratio=0.9)
    counted = count_flops(create_model("hpm_pretrain_vit_base_patch16", **kwargs), method="analytic")
    batch = 2
    with torch.device("meta"):  # then fake storage: fake tensors refuse the teacher's deep copy
        model = create_model("hpm_pretrain_vit_base_patch16", **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        run = _executed_flops(model, torch.randn(batch, 3, 16, 224, 224))
    assert (counted["teacher_gflops"] > 0) == (masking == "hpm") == (run["norm_teacher"] > 0)
    per_clip = {key: value / batch / 1e9 for key, value in run.items()}
    forward = per_clip["forward"] + per_clip["norm_student"] + per_clip["norm_teacher"]
    assert forward == pytest.approx(counted["forward_gflops"] + counted["teacher_gflops"], rel=1e-6)
    # Training counts 3 x the student's forward. Autograd does that work but for the gradient of
    # the clip itself (none is needed: one patch-embedding forward fewer) and the LayerNorms.
    train = per_clip["total"] + per_clip["embed"] + 3 * per_clip["norm_student"] + per_clip["norm_teacher"]
    assert train == pytest.approx(counted["train_gflops"], rel=1e-6)
