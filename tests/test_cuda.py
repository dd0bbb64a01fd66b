"""Checks that need a CUDA device (``pytest -m cuda``); every test skips without one.

Run by ``tools/gpu_check.sh``. They need only torch, timm and einops (plus triton for
``torch.compile``), which is what a bare GPU machine has.
"""

import pytest
import torch

import hpm_video  # noqa: F401
from hpm_video.models import create_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TINY = dict(
    img_size=64, patch_size=16, num_frames=4, tubelet_size=2,
    encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=3,
    decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, mask_ratio=0.75,
)  # fmt: skip
NAME = "hpm_pretrain_vit_tiny_patch16"


def model_on_cuda(**kw):
    torch.manual_seed(0)
    return create_model(NAME, **{**TINY, **kw}).cuda()


def clips(batch=4):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 4, 64, 64, generator=generator).cuda()


@pytest.mark.parametrize("masking", ["random", "hpm"])
def test_bf16_step_is_finite_and_close_to_fp32(masking):
    model = model_on_cuda(masking=masking)
    videos = clips()
    mask = model.generate_mask(videos, alpha=0.5)
    out32 = model(videos, mask=mask)
    out32["loss"].backward()
    grads32 = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16 = model(videos, mask=mask)
    out16["loss"].backward()
    assert torch.isfinite(out16["loss"]) and torch.isfinite(out16["loss_rec"])
    # bf16 keeps ~3 significant digits: the reconstruction loss agrees loosely, not exactly.
    torch.testing.assert_close(out16["loss_rec"].float(), out32["loss_rec"], rtol=3e-2, atol=3e-2)
    if masking == "hpm":
        torch.testing.assert_close(out16["loss_pred"].float(), out32["loss_pred"], rtol=5e-2, atol=5e-2)
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    grads16 = torch.cat([dict(model.named_parameters())[n].grad.flatten().float() for n in names])
    assert torch.isfinite(grads16).all()
    reference = torch.cat([grads32[n].flatten() for n in names])
    cosine = torch.nn.functional.cosine_similarity(grads16, reference, dim=0)
    assert cosine > 0.95, float(cosine)  # the whole gradient points the same way


def test_hard_masking_on_cuda_gives_exact_counts():
    model = model_on_cuda(masking="hpm")
    videos = clips(batch=8)
    for alpha in (0.0, 0.5, 1.0):
        mask = model.generate_mask(videos, alpha=alpha)
        assert mask.device.type == "cuda" and mask.dtype == torch.bool
        assert (mask.sum(dim=1) == 12 * 2).all()  # int(0.75 * 16) tubes x 2 time slots, every sample
        assert torch.equal(mask[:, :16], mask[:, 16:])  # tube masking: same positions in every slot
    # alpha = 1: exactly the tubes with the highest time-averaged predicted loss.
    scores = model.score_tokens(videos).float().mean(dim=1)  # (B, 16)
    hardest = torch.topk(scores, 12, dim=1).indices
    mask = model.generate_mask(videos, alpha=1.0)
    assert mask[:, :16].gather(1, hardest).all()


@pytest.mark.parametrize("masking", ["random", "hpm"])
def test_forward_compiles_without_graph_breaks(masking):
    """The training forward (mask drawn inside) is one graph: no host syncs, no Python fallbacks."""
    torch._dynamo.reset()
    model = model_on_cuda(masking=masking)
    videos = clips()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    # As the training loop does: the noise comes from a generator outside the compiled forward.
    noise = model.mask_noise(videos, torch.Generator(device="cuda").manual_seed(0))
    out = compiled(videos, alpha=0.5, noise=noise)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    explanation = torch._dynamo.explain(model)(videos, alpha=0.5, noise=noise)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]


def test_encoder_decoder_with_a_given_mask_compile_in_one_graph():
    """A given mask: the model's parts (the path the visualiser and evaluation use) compile fully.

    ``forward(mask=...)`` itself validates the mask on the host first (``check_mask``), which is a
    graph break by design; the parts after it must not add any.
    """
    from hpm_video.masking import visible_and_masked_ids

    torch._dynamo.reset()
    model = model_on_cuda(masking="hpm")
    videos = clips()
    mask = model.generate_mask(videos, alpha=0.5)
    num_masked = int(mask[0].sum())
    ids_keep, ids_masked = visible_and_masked_ids(mask, num_masked)

    def parts(videos, ids_keep, ids_masked):
        latent = model.forward_encoder(videos, ids_keep)
        reconstruction, predicted = model.forward_decoder(latent, ids_keep, ids_masked)
        return model.forward_loss(videos, reconstruction, predicted, ids_masked)["loss"]

    eager = parts(videos, ids_keep, ids_masked)
    compiled = torch.compile(parts, fullgraph=True)(videos, ids_keep, ids_masked)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("masking", ["random", "hpm"])
def test_training_step_has_no_host_sync(masking):
    """Masks, targets, gathers, losses, backward and the EMA all stay on the device."""
    model = model_on_cuda(masking=masking, use_predictor=True)
    videos = clips()
    gen = torch.Generator(device="cuda").manual_seed(0)
    model(videos, alpha=0.3, generator=gen)["loss"].backward()  # warm-up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(videos, alpha=0.3, generator=gen)
        out["loss"].backward()
        model.update_teacher(0.999)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()


@pytest.mark.parametrize("stage", [0, 2])
def test_training_loop_step_on_deepspeed_has_no_host_sync_and_skips_nan_rounds(stage, tmp_path):
    """The loop's whole step (noise, forward, finite-loss guard, DeepSpeed backward and step, EMA)
    at ZeRO-0 and -2 under CUDA's sync debug mode, then the skip of a NaN round."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(repo, "tests", "nonfinite_step.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, script, "--stage", str(stage), "--accum", "2", "--output-dir", str(tmp_path),
            "--device", "cuda"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=repo, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["changed_by_bad_round"] == [] and result["nonfinite_total"] == 1, result
    assert all(count > 0 for count in result["moved_by_good_round"].values()), result


def test_profiled_step_names_its_kernels():
    """The kernel categories of ``hpm_video.profiling`` on real CUDA kernel names: a bf16 step's
    matrix products and attention are found as such, and every kernel is counted once."""
    from torch.profiler import ProfilerActivity, profile

    from hpm_video.masking import alpha_tensor
    from hpm_video.profiling import kernel_breakdown, kernel_category, profiled_kernels

    model = model_on_cuda(masking="hpm")
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    videos = clips()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(videos, alpha=alpha_tensor(0.5, videos.device))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(0.99)

    step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = profiled_kernels(prof, "cuda")
    result = kernel_breakdown(kernels, steps=1)
    assert kernels and result["kernel_ms_per_step"] > 0
    assert {"gemm", "attention", "optimizer_ema"} <= set(result["share"]), result["top"]
    assert sum(result["share"].values()) == pytest.approx(1.0, abs=1e-3)
    # The backend torch picked is read off the attention kernels' names (cuDNN's, FlashAttention-2's...).
    assert result["attention_backends"], sorted({n for n, _ in kernels if kernel_category(n) == "attention"})
