import json
import os

import pytest
import torch
from tool_helpers import load_tool, subprocess_env

from hpm_video.profiling import KERNEL_CATEGORY_ORDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {
    "device", "device_name", "model", "batch", "precision", "masking", "compile", "grad_ckpt", "steps",
    "step_time_ms", "clips_per_s", "peak_memory_gib", "memory_kind", "train_gflops_per_clip", "flops_method",
    "model_tflops", "peak_bf16_tflops", "mfu", "losses_finite", "sdpa_backend",
}  # fmt: skip


def _cli():
    return load_tool("bench_train")


TINY_ARGS = ["--model", "hpm_pretrain_vit_tiny_patch16", "--frames", "4", "--size", "64", "--batch", "2",
             "--steps", "2", "--device", "cpu", "--warmup", "1"]  # fmt: skip


def test_cpu_tiny_run_prints_valid_json(capsys):
    bench = _cli()
    assert bench.main([*TINY_ARGS, "--profile-steps", "1"]) == 0
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
    # One profiled step: on the CPU the "kernels" are ATen ops. Which kind leads is a timing, and on a
    # busy 2-core machine not even the matrix products reliably do, so only the bookkeeping is checked.
    kernels = result["kernels"]
    assert kernels["profiled_steps"] == 1 and kernels["kernels_per_step"] > 100
    assert sum(kernels["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(kernels["ms_per_step"].values()) == pytest.approx(kernels["kernel_ms_per_step"], rel=1e-2)
    assert {"gemm", "attention", "optimizer_ema"} <= set(kernels["share"]) <= set(KERNEL_CATEGORY_ORDER)
    assert all(kernels["share"][c] > 0 for c in ("gemm", "attention", "optimizer_ema"))
    assert {k["category"] for k in kernels["top"]} <= set(KERNEL_CATEGORY_ORDER)
    assert kernels["busy_fraction"] is None  # a GPU-only ratio
    assert result["sdpa_backend"] == "auto" and kernels["attention_backends"] == ["flash"]  # torch's pick on a CPU


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


def test_deepspeed_engine_mode_times_the_training_loop_step(tmp_path):
    """``--zero``: the loop's own step (guard, DeepSpeed backward/step, EMA) on a one-process engine."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_train.py"), *TINY_ARGS, "--masking", "hpm", "--zero", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env(PYTHONPATH=ROOT),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # nothing but the JSON on stdout, DeepSpeed's logging included
    assert FIELDS <= set(result)
    assert result["engine"] == "deepspeed_zero2" and result["losses_finite"] is True
    assert result["use_predictor"] is True and result["train_gflops_per_clip"] > 0


def test_gpu_check_script_prints_json_lines_and_keeps_its_budget(tmp_path):
    """The prepared GPU script's plumbing, on the CPU: a zero budget skips every benchmark (each
    reported as skipped), every line is JSON, and the lines also land in $OUT."""
    import subprocess

    env = {**os.environ, "BUDGET_S": "0", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh")], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    checks = [line.get("check") for line in lines]
    # The two headline benchmarks come before the CUDA tests, which run even on a spent budget.
    assert checks[:4] == ["environment", "bench_train", "bench_train", "pytest -m cuda"] and checks[-1] == "done"
    assert lines[3]["rc"] in (0, 5)  # CUDA tests skip (or are absent) without a GPU
    benches = [line for line in lines if line.get("check") == "bench_train"]
    assert len(benches) >= 6 and all("budget" in line["skipped"] for line in benches)
    with open(tmp_path / "gpu_check.jsonl") as f:
        assert [json.loads(line) for line in f] == lines


def test_bench_data_sizes_the_data_workers_for_a_gpu_rate(capsys):
    bench = load_tool("bench_data")
    assert bench.main(["--seconds", "0.2", "--workers", "0", "--num-sample", "2", "--target-clips-per-s", "1000"]) == 0
    result = json.loads(capsys.readouterr().out)
    cores = result["cores_needed"]
    assert cores["target_clips_per_s"] == 1000
    for key, item in result["pretrain_item"].items():
        assert key.endswith("num_sample=2") and item["cpu_ms_per_clip"] > 0
        assert cores[key] == pytest.approx(item["cpu_ms_per_clip"], abs=0.06)  # 1000 clips/s x ms / 1000


def test_gpu_check_report_table_and_plot(tmp_path, capsys):
    """What the next GPU session pastes into docs/performance.md, from gpu_check.sh's JSON lines."""
    report = load_tool("report_gpu_check")
    base = dict(check=None, device_name="NVIDIA H200", model="hpm_pretrain_vit_base_patch16", batch=128,
                compile=True, grad_ckpt=False, step_time_ms=80.0, peak_memory_gib=30.5)  # fmt: skip
    rows = [
        {"check": "environment", "torch": "2.11"},
        {**base, "masking": "random", "engine": "plain", "clips_per_s": 1600.0, "model_tflops": 340.6, "mfu": 0.344},
        {**base, "masking": "hpm", "engine": "deepspeed_zero2", "clips_per_s": 500.0, "model_tflops": 362.1,
         "mfu": 0.366, "kernels": {"error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"}},
        {**base, "device": "cpu", "masking": "random", "compile": False, "engine": "plain", "clips_per_s": 5.0,
         "model_tflops": 1.0, "mfu": None,
         "kernels": {"kernel_ms_per_step": 300.0, "busy_fraction": None, "kernels_per_step": 900.0,
                     "share": {"gemm": 0.7, "norm": 0.3}}},  # a CPU run: no MFU, no busy ratio
        {**base, "masking": "hpm", "engine": "plain", "clips_per_s": 520.0, "model_tflops": 371.4, "mfu": 0.376,
         "kernels": {"kernel_ms_per_step": 230.0, "busy_fraction": 0.935, "kernels_per_step": 1480.0,
                     "share": {"attention": 0.21, "gemm": 0.55, "inductor_fused": 0.2, "other": 0.04},
                     "attention_backends": ["cudnn"]}},
        {**base, "masking": "random", "compile": False, "engine": "plain", "sdpa_backend": "flash",
         "clips_per_s": 900.0, "model_tflops": 182.6, "mfu": 0.185,
         "kernels": {"kernel_ms_per_step": 140.0, "busy_fraction": 0.99, "kernels_per_step": 850.0,
                     "share": {"attention": 0.3, "gemm": 0.7}, "attention_backends": ["flash"]}},
        {"check": "bench_train", "error": "OutOfMemoryError: CUDA out of memory", "args": "--model y --batch 256",
         "model": "hpm_pretrain_vit_base_patch16", "masking": "hpm"},  # bench_train's own failure line
        {"check": "bench_train", "skipped": "budget: 3s left, needs ~60s", "args": "--model x --zero 3"},
        {"check": "pytest -m cuda", "rc": 1, "summary": "1 failed, 10 passed", "problems": ["FAILED t.py::a"]},
    ]  # fmt: skip
    log = tmp_path / "gpu_check.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, '{"check": "pytest -m cuda", "summary": "bad \\escape"}')  # one broken line costs only itself
    log.write_text("a warning line\n" + "\n".join(lines) + "\n")
    png = tmp_path / "plot.png"
    assert report.main([str(log), "--plot", str(png)]) == 0
    out = capsys.readouterr()
    assert "gpu_check.jsonl:5: skipped, not JSON" in out.err
    table, kernels, others = out.out.split("\n\n")
    assert others.splitlines() == [
        '* environment: torch: "2.11"',
        '* pytest -m cuda: rc: 1, summary: "1 failed, 10 passed", problems: ["FAILED t.py::a"]',
    ]
    table = table.splitlines()
    assert len(table) == 2 + 7 and all(line.count("|") == len(report.COLUMNS) + 1 for line in table)
    assert "| `--model y --batch 256` | failed: OutOfMemoryError: CUDA out of memory |" in table[-2]
    # MFU against bench_train's peak (989 for the H200) and against the 790.
    headline = "| NVIDIA H200 | ViT-B | random | 128 | yes | no | plain | auto | 1600.0 | 80.0 | 30.5 | 340.6 |"
    assert f"{headline} 34.4% | 43.1% |" in table
    # The attention backend: the one allowed (--sdpa-backend), else torch's pick as its kernels show.
    assert "| plain | auto (cudnn) | 520.0 |" in table[5] and "| plain | flash | 900.0 |" in table[6]
    assert table[4].endswith("| 5.0 | 80.0 | 30.5 | 1.0 | - | - |")  # a CPU run has neither
    assert "skipped: budget" in table[-1]
    # The profiled runs' second table: one row each, the profiler's failure said as such.
    kernels = kernels.splitlines()
    # Columns: the categories some run has, in KERNEL_CATEGORIES's order.
    header = "| run | kernel ms/step | busy | kernels/step | attention | gemm | inductor_fused | norm | other |"
    assert kernels[0] == header
    assert len(kernels) == 2 + 4 and all(line.count("|") == 10 for line in kernels)
    assert "profiler failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" in kernels[2]
    assert kernels[3] == "| ViT-B random b128 | 300.0 | - | 900 | 0.0% | 70.0% | 0.0% | 30.0% | 0.0% |"
    assert kernels[4] == "| ViT-B hpm b128 compile | 230.0 | 94% | 1480 | 21.0% | 55.0% | 20.0% | 0.0% | 4.0% |"
    assert kernels[5] == "| ViT-B random b128 only-flash | 140.0 | 99% | 850 | 30.0% | 70.0% | 0.0% | 0.0% | 0.0% |"
    from PIL import Image

    with Image.open(png) as image:
        assert image.size[0] == 1000 and image.size[1] > 60


def test_a_failed_run_prints_one_json_line_the_report_shows(capsys):
    bench = _cli()
    args = [*TINY_ARGS, "--frames", "5"]  # the last --frames counts: the tubelet of 2 does not divide 5
    assert bench.main(args) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["check"] == "bench_train" and line["args"] == " ".join(args)
    assert line["error"].startswith("ValueError: clip size not divisible: 5 frames by tubelet 2")


def test_sdpa_backend_allows_one_attention_backend_and_refuses_one_that_cannot_run(capsys):
    bench = _cli()
    assert bench.main([*TINY_ARGS, "--masking", "hpm", "--sdpa-backend", "math", "--profile-steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sdpa_backend"] == "math" and result["losses_finite"]
    assert result["kernels"]["attention_backends"] == ["math"]  # student, teacher and decoders alike
    # cuDNN attention has no CPU kernel: the run fails as one JSON line, and the flags are restored.
    assert bench.main([*TINY_ARGS, "--sdpa-backend", "cudnn"]) == 1
    assert json.loads(capsys.readouterr().out)["error"].startswith("RuntimeError: ")
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
