"""StepProbe (kernels, host syncs, peak tensor memory) and tools/bench_step_counts.py, on the CPU."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from tool_helpers import load_tool, subprocess_env

import hpm_video  # noqa: F401
from hpm_video.models import create_model
from hpm_video.profiling import StepProbe, attention_backends, kernel_breakdown, kernel_category

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=3,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
MiB = 2**20


def _tool():
    return load_tool("bench_step_counts")


def test_probe_names_each_host_sync_and_where_it_was_asked_for():
    x = torch.randn(16)
    with StepProbe() as probe:
        y = x * 2  # a kernel, no sync
        float(y.sum())  # .item()
        x[x > 0]  # boolean-mask indexing: the count of True is read back
        torch.unique(x)
        x.new_tensor([0.5, 2.0])  # host values: a blocking host-to-device copy on CUDA
        torch.full((), 0.5)  # a fill kernel: no copy
    sites = probe.syncs
    assert sum(sites.values()) == 4
    assert all("test_tools_step_counts.py" in key for key in sites), sites
    names = {key.split(" @ ")[0] for key in sites}
    assert {"_local_scalar_dense", "index", "_unique2", "lift_fresh"} <= names, names
    assert probe.kernels["other"] >= 3


def test_probe_counts_whole_device_waits():
    """DeepSpeed's throughput timer waited on the GPU twice per step: no dispatched op shows that."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    with StepProbe() as probe:
        accelerator.synchronize()  # a no-op on the CPU, a torch.cuda.synchronize() on a GPU
    [(site, count)] = probe.syncs.items()
    assert count == 1 and site.startswith("device synchronize @ ") and "test_tools_step_counts.py" in site
    assert "synchronize" not in vars(accelerator) and torch.cuda.synchronize.__module__ == "torch.cuda"  # undone


def test_probe_sees_copies_between_host_and_device_on_fake_cuda():
    """What a CPU run never shows: on fake CUDA tensors, host <-> device copies are listed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hpm_video.objective import patchify_targets

    with FakeTensorMode(allow_non_fake_inputs=True):
        on_device, on_host = torch.randn(4, device="cuda"), torch.randn(4)
        clip = torch.randn(1, 3, 2, 16, 16, device="cuda")
        with StepProbe() as probe:
            on_host.to("cuda")
            on_device.cpu()
            on_device.copy_(on_host)
            torch.full((), 0.5, device="cuda") * on_device  # a fill kernel: nothing crosses
            patchify_targets(clip, 2, 16, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))  # mean/std from Python numbers
    names = Counter(key.split(" @ ")[0] for key in probe.syncs.elements())
    assert names == {"_to_copy cpu->cuda": 3, "_to_copy cuda->cpu": 1, "copy_ cpu->cuda": 1, "lift_fresh": 2}, names


@pytest.mark.parametrize("masking", ["random", "hpm"])
def test_fake_cuda_forward_and_ema_copy_nothing_from_the_host(masking, capsys):
    """The model's forward (mask, teacher, gathers, targets, losses) and the EMA on fake CUDA
    tensors: no copy between host and device, no read-back."""
    tool = _tool()
    assert tool.main(["--model", "hpm_pretrain_vit_tiny_patch16", "--frames", "4", "--size", "32", "--batch", "2",
                      "--masking", masking, "--fake-device", "cuda"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cuda" and result["host_syncs"] == {}, result["host_syncs"]
    assert result["kernels"]["forward"] > 50 and ("ema" in result["kernels"]) == (masking == "hpm")


def test_probe_peak_counts_live_storages_once_and_frees_them():
    probe = StepProbe()
    with probe:
        a = torch.empty(4 * MiB, dtype=torch.uint8)
        view = a[: MiB]  # a view shares the storage: no new bytes
        b = torch.empty(8 * MiB, dtype=torch.uint8)
        del a, view
        c = torch.empty(2 * MiB, dtype=torch.uint8)
    assert probe.peak_bytes == 12 * MiB
    assert probe.live_bytes == 10 * MiB
    del b, c
    assert probe.live_bytes == 0


@pytest.mark.parametrize("masking", ["random", "hpm"])
def test_real_training_step_on_cpu_has_no_host_sync(masking):
    """The same check as the CUDA sync-debug test, on real CPU tensors: mask, targets, losses,
    backward, fused AdamW and the EMA never ask for a value."""
    tool = _tool()
    args = tool.parse_args(["--model", "hpm_pretrain_vit_tiny_patch16", "--frames", "4", "--size", "32",
                            "--batch", "2", "--masking", masking, "--precision", "fp32"])  # fmt: skip
    result = tool.count_model_step(args, fake=False, use_predictor=True, **SMALL)
    assert result["host_syncs"] == {}
    phases = {"forward", "backward", "optimizer"} | ({"ema"} if masking == "hpm" else set())
    assert set(result["kernels"]) == phases and all(n > 0 for n in result["kernels"].values())
    assert result["kernels"]["optimizer"] < 10  # fused AdamW: a handful of kernels for every tensor


def test_fake_counts_equal_a_real_run():
    """Fake tensors compute nothing but allocate and dispatch exactly as the real step does."""
    tool = _tool()
    args = tool.parse_args(["--model", "hpm_pretrain_vit_tiny_patch16", "--frames", "4", "--size", "32",
                            "--batch", "2", "--masking", "hpm", "--precision", "bf16"])  # fmt: skip
    torch.manual_seed(0)
    real = tool.count_model_step(args, fake=False, **SMALL)
    fake = tool.count_model_step(args, fake=True, **SMALL)
    assert fake["kernels"] == real["kernels"]
    assert fake["peak_tensor_gib"] == pytest.approx(real["peak_tensor_gib"], rel=0.02)
    assert fake["resident_gib"] == pytest.approx(real["resident_gib"], rel=1e-3)


def test_full_size_counts_and_activation_checkpointing_memory():
    """ViT-B at 16 x 224^2 counted in seconds; checkpointing trades kernels for memory."""
    tool = _tool()
    base = ["--model", "hpm_pretrain_vit_base_patch16", "--batch", "8", "--masking", "random"]
    plain = tool.count_model_step(tool.parse_args(base))
    ckpt = tool.count_model_step(tool.parse_args([*base, "--grad-ckpt"]))
    assert plain["host_syncs_total"] == 0 and ckpt["host_syncs_total"] == 0
    activations = {k: r["peak_tensor_gib"] - r["resident_gib"] for k, r in (("plain", plain), ("ckpt", ckpt))}
    # What remains with checkpointing is mostly the fp32 gradients (0.35 GiB) and one block's recompute.
    assert activations["ckpt"] < 0.5 * activations["plain"], activations
    assert ckpt["kernels"]["backward"] > plain["kernels"]["backward"]  # the recomputed forward
    assert plain["resident_gib"] > 94e6 * 4 * 3 / 2**30  # fp32 weights + two AdamW moments (+ the batch)


@pytest.mark.parametrize("masking", ["random", "hpm"])
def test_training_forward_has_no_graph_breaks(masking):
    tool = _tool()
    args = tool.parse_args(["--model", "hpm_pretrain_vit_tiny_patch16", "--masking", masking])
    result = tool.graph_breaks(args, **SMALL)
    assert result["graph_breaks"] == 0, result["graph_break_reasons"]
    assert result["graphs"] == 1


def test_full_step_compiles_as_one_graph_with_backward_on_cpu():
    """``fullgraph=True`` raises on any break; aot_eager also traces the backward (no codegen)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("hpm_pretrain_vit_tiny_patch16", num_frames=4, img_size=32, masking="hpm", **SMALL)
    videos = torch.randn(2, 3, 4, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # As the training loop does: the mask noise is drawn outside (a Generator would break the graph).
    noise = model.mask_noise(videos, torch.Generator().manual_seed(0))
    out = compiled(videos, alpha=0.5, noise=noise)
    out["loss"].backward()
    eager = model(videos, alpha=0.5, generator=torch.Generator().manual_seed(0))  # the same draw inside
    assert torch.equal(out["mask"], eager["mask"])
    torch.testing.assert_close(out["loss"], eager["loss"], rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_step_has_no_host_sync_of_ours(stage, tmp_path):
    """The training loop's own step: the finite-loss guard stays on the device, and ZeRO-1/2 skip
    the gradient norm nothing uses, so ZeRO-0 and -2 neither read back nor upload host values;
    ZeRO-3's are DeepSpeed's own (its gradient norm: a validity read, tensors from host values)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_step_counts.py"), "--deepspeed", str(stage),
         "--masking", "hpm", "--batch", "2", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=subprocess_env(PYTHONPATH=ROOT),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    syncs = result["host_syncs"]
    assert not [site for site in syncs if "hpm_video" in site], syncs
    if stage < 3:
        assert syncs == {}
    else:
        assert syncs and all("deepspeed" in site for site in syncs), syncs
    assert result["kernels_total"] > 100


def test_growing_alpha_does_not_recompile_the_step():
    """alpha rises every epoch; the loop passes it as a tensor (``masking.alpha_tensor``) and no
    shape depends on it, so no alpha after the first recompiles the step; masks equal eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from hpm_video.masking import alpha_tensor

    torch._dynamo.reset()
    model = create_model("hpm_pretrain_vit_tiny_patch16", num_frames=4, img_size=32, masking="hpm", **SMALL)
    # aot_eager, not eager: like inductor it specialises a float used in Python control flow.
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    videos = torch.randn(2, 3, 4, 32, 32)
    compiled_at_first = None
    for alpha in (0.0, 0.2, 0.35, 0.5):
        noise = model.mask_noise(videos)
        eager = model(videos, alpha=alpha, noise=noise)["mask"]
        assert torch.equal(compiled(videos, alpha=alpha_tensor(alpha), noise=noise)["mask"], eager)
        compiled_at_first = compiled_at_first or counter.frame_count
    # Nothing compiled after the first step (whose tracing dynamo may restart once).
    assert counter.frame_count == compiled_at_first <= 2, counter.frame_count


# Kernel names as CUPTI reports them on an H100/H200 with torch 2.x (cuBLASLt's nvjet and sm90
# GEMMs, flash attention, inductor's Triton kernels, ATen's eager kernels), and ATen ops on the CPU.
KERNEL_NAMES = {
    "nvjet_tst_192x16_64x8_2x2_2cta_h_bz_TNT": "gemm",
    "nvjet_tst_64x24_64x16_4x1_v_bz_splitK_TNT": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)": "gemm",
    "triton_tem_fused_mm_0": "gemm",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false>>(Params)": "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>()": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>)":
        "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
    "triton_red_fused__to_copy_add_native_layer_norm_3": "inductor_fused",
    "triton_poi_fused_gelu_7": "inductor_fused",
    "triton_poi_fused__scaled_dot_product_flash_attention_transpose_4": "inductor_fused",  # a copy feeding SDPA
    "triton_per_fused__scaled_dot_product_efficient_attention_backward_sum_9": "inductor_fused",
    "void at::native::(anonymous namespace)::multi_tensor_apply_for_fused_optimizer<4, FusedAdamMathFunctor>":
        "optimizer_ema",
    "void at::native::multi_tensor_apply_kernel<TensorListMetadata<3>, LerpFunctor<float>, float>": "optimizer_ema",
    "Memcpy DtoD (Device -> Device)": "copy",
    "void at::native::elementwise_kernel<128, 4, gpu_kernel_impl_nocast<direct_copy_kernel_cuda>>": "copy",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<c10::BFloat16, unsigned int, 4, 64, 64>": "copy",
    "void at::native::index_elementwise_kernel<128, 4, gpu_index_kernel<index_kernel_impl>>": "index_sort",
    "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(TensorInfo)": "index_sort",
    "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<Policy900, false, float, long>": "index_sort",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norm",
    "void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl, at::detail::Array<char*, 2>>":
        "elementwise_reduce",
    "void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps<float, float, float, float>>>":
        "elementwise_reduce",
    "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "aten::addmm": "gemm",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
    "aten::_fused_adamw_": "optimizer_ema",
    "aten::native_layer_norm": "norm",
    "aten::gelu": "elementwise_reduce",
    "some_unknown_kernel": "other",
}  # fmt: skip


def test_kernel_categories_of_real_kernel_names():
    assert {name: kernel_category(name) for name in KERNEL_NAMES} == KERNEL_NAMES


def test_attention_backends_from_kernel_names():
    # cuDNN's kernels carry "flash" too; inductor's copies feeding SDPA and the dispatcher are no backend.
    assert attention_backends(KERNEL_NAMES) == ["cudnn", "efficient", "flash"]
    cudnn = [n for n in KERNEL_NAMES if n.startswith("cudnn")]
    assert attention_backends([*cudnn, "triton_poi_fused__scaled_dot_product_flash_attention_transpose_4"]) == ["cudnn"]
    assert attention_backends(["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math"]) == [
        "math"
    ]
    assert attention_backends(["nvjet_tst_a", "aten::scaled_dot_product_attention"]) == []


def test_kernel_breakdown_per_step_shares_and_longest():
    kernels = [("nvjet_tst_a", 300.0), ("nvjet_tst_a", 300.0), ("triton_poi_fused_add_0", 100.0),
               ("flash_fwd_kernel", 200.0), ("nvjet_tst_a", 300.0), ("Memset (Device)", 10.0)]  # fmt: skip
    result = kernel_breakdown(kernels, steps=2, top=2)
    assert result["kernel_ms_per_step"] == pytest.approx(1.21 / 2)
    assert result["kernels_per_step"] == 3.0
    shares = {"attention": 200 / 1210, "gemm": 900 / 1210, "inductor_fused": 100 / 1210, "copy": 10 / 1210}
    assert result["share"] == {c: pytest.approx(v, abs=1e-4) for c, v in shares.items()}
    assert list(result["share"]) == ["attention", "gemm", "inductor_fused", "copy"]  # the categories' order
    assert result["ms_per_step"]["gemm"] == pytest.approx(0.45)
    assert result["attention_backends"] == ["flash"]
    assert result["top"] == [
        {"name": "nvjet_tst_a", "category": "gemm", "ms_per_step": 0.45, "calls_per_step": 1.5},
        {"name": "flash_fwd_kernel", "category": "attention", "ms_per_step": 0.1, "calls_per_step": 0.5},
    ]
    with pytest.raises(ValueError, match="steps"):
        kernel_breakdown(kernels, steps=0)
