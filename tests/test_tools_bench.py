import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {
    "device", "device_name", "model", "batch", "precision", "masking", "compile", "grad_ckpt", "steps",
    "step_time_ms", "clips_per_s", "peak_memory_gib", "memory_kind", "train_gflops_per_clip", "flops_method",
    "model_tflops", "peak_bf16_tflops", "mfu", "losses_finite",
}  # fmt: skip


def _cli():
    spec = importlib.util.spec_from_file_location("tools_bench_train", os.path.join(ROOT, "tools", "bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_ARGS = ["--model", "hpm_pretrain_vit_tiny_patch16", "--frames", "4", "--size", "64", "--batch", "2",
             "--steps", "2", "--device", "cpu", "--warmup", "1"]  # fmt: skip


def test_cpu_tiny_run_prints_valid_json(capsys):
    bench = _cli()
    assert bench.main(TINY_ARGS) == 0
    result = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(result)
    assert result["device"] == "cpu" and result["precision"] == "fp32"  # bf16 is opt-in on CPU
    assert result["losses_finite"] is True
    assert result["step_time_ms"] > 0 and result["clips_per_s"] > 0
    assert result["clips_per_s"] == pytest.approx(2 / (result["step_time_ms"] / 1e3), rel=1e-2)
    assert result["peak_memory_gib"] > 0
    # Tiny ViT at 4 x 64^2, mask 0.9 (random, no predictor): the closed form and fvcore agree.
    assert result["train_gflops_per_clip"] > 0
    assert result["model_tflops"] == pytest.approx(result["train_gflops_per_clip"] * result["clips_per_s"] / 1e3,
                                                   rel=0.05, abs=1e-4)  # fmt: skip
    assert result["mfu"] is None and result["peak_bf16_tflops"] is None  # no peak for a CPU


def test_hpm_mode_counts_the_teacher_and_mfu_uses_the_peak(capsys):
    bench = _cli()
    args = [*TINY_ARGS, "--masking", "hpm", "--warmup", "0", "--steps", "1", "--flops", "analytic"]
    assert bench.main(args) == 0
    hpm = json.loads(capsys.readouterr().out)
    args = [*TINY_ARGS, "--warmup", "0", "--steps", "1", "--flops", "analytic", "--peak-tflops", "1.0"]
    assert bench.main(args) == 0
    random_mode = json.loads(capsys.readouterr().out)
    assert hpm["use_predictor"] and not random_mode["use_predictor"] and hpm["losses_finite"]
    # Teacher pass over the full clip plus a second decoder: several times the random-mode cost.
    assert hpm["train_gflops_per_clip"] > 2 * random_mode["train_gflops_per_clip"]
    assert random_mode["peak_bf16_tflops"] == 1.0
    assert random_mode["mfu"] == pytest.approx(random_mode["model_tflops"], rel=1e-2, abs=1e-4)


def test_peak_table():
    bench = _cli()
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756
    assert bench.peak_tflops("NVIDIA H100 NVL") == 835
    assert bench.peak_tflops("NVIDIA H200") == 989
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bench.peak_tflops("Some CPU") is None
