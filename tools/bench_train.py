"""Training-step throughput of the pretraining model; prints one JSON object.

    python tools/bench_train.py --model hpm_pretrain_vit_base_patch16 --frames 16 --size 224 --batch 64 \\
        --precision bf16 --masking hpm [--compile] [--grad-ckpt] [--zero STAGE] [--warmup 3] [--steps 10]

A step is what pretraining does per batch: mask noise, forward (in ``hpm`` mode including the EMA
teacher's scoring of the full clips and the hard mask), backward, fused AdamW step, and in ``hpm``
mode the teacher's EMA update. Inputs are one synthetic batch already on the device, so the number
measures the model, not data loading. Plain mode (the default) is torch training with nothing
around it; its timed loop never reads a value back to the host, and one synchronisation at the end
closes the timing (and checks the losses are finite). ``--zero STAGE`` times the training loop's
own step instead (``hpm_video.engine.pretrain.pretrain_step`` on a one-process DeepSpeed engine at
that ZeRO stage, with ``ENGINE.COMPILE`` for ``--compile``): the difference between the two is the
engine's cost (the loop's step makes the host wait for nothing at ZeRO-0, 1 and 2; at ZeRO-3
DeepSpeed's gradient norm does, three times per step).

Reported: clips/s, step time, peak memory (CUDA ``max_memory_allocated``, or the process's peak RSS
on CPU), model TFLOP/s from the training FLOPs per clip (``hpm_video.flops``: 3 x the student's
forward + the teacher pass; fvcore when installed, else the closed form, which agrees exactly) and
MFU against the GPU's peak dense bf16 TFLOP/s (null on CPU or an unknown GPU; ``--peak-tflops``
overrides). ``--profile-steps N`` runs N more steps under ``torch.profiler`` after the timed ones and
adds ``kernels``: device kernel time and launches per step, the share of each kind of kernel (GEMM,
attention, inductor's fused kernels, optimiser and EMA, copies, ...; ``hpm_video.profiling``), the
longest kernels, the attention backends whose kernels ran (``attention_backends``: torch's pick
shows only there; ``--sdpa-backend`` allows one alone), and ``busy_fraction``, kernel time over the
unprofiled step time (well under 1: the device waits for the host). On the CPU the "kernels" are
ATen operations' own time (views included; inductor's compiled C++ kernels are not ATen operations
and are not seen) and ``busy_fraction`` is null.
Peaks used: H100 SXM 989, H100 NVL 835, H100 PCIe 756, H200 989 (same chip as H100
SXM; some sources, the project issue included, quote 790), A100 312.
Runs on CPU too (``--device cpu``; precision defaults to fp32 there, as bf16 autocast on CPU is slow).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hpm_video  # noqa: F401  (registers the models; imports neither fvcore nor deepspeed nor av)
from hpm_video.engine import COMPILE_MODES
from hpm_video.masking import alpha_tensor
from hpm_video.models import PRETRAIN_MODELS, create_model, ema_decay

# Peak dense bf16 tensor-core TFLOP/s, matched against torch.cuda.get_device_name() in this order.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),  # the project issue quotes 790; the H200's tensor cores are the H100 SXM's
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("H100 80GB HBM3")
    ("A100", 312.0),
)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# --sdpa-backend: the one attention backend allowed ("auto": torch's own choice among all).
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, "cpu_peak_rss"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops_per_clip(model: torch.nn.Module, method: str) -> tuple[float, str]:
    """Training GFLOPs per clip and how they were counted (the model is counted before compiling)."""
    from hpm_video.flops import count_flops

    try:
        report = count_flops(model, method=method)
    except ImportError:  # fvcore asked for explicitly but missing: the closed form is exact here
        report = count_flops(model, method="analytic")
    return report["train_gflops"], report["method"]


def _plain_step(args: argparse.Namespace, device: torch.device, videos: torch.Tensor, mask_generator):
    """The model, and a step of plain torch training: autocast forward, backward, fused AdamW, EMA."""
    kwargs = dict(num_frames=args.frames, img_size=args.size, masking=args.masking, mask_ratio=args.mask_ratio)
    if args.masking == "random":
        kwargs["use_predictor"] = args.use_predictor
    model = create_model(args.model, **kwargs).to(device)
    model.train()
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    flops = training_flops_per_clip(model, args.flops)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    amp_dtype = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    forward = torch.compile(model, mode=args.compile_mode) if args.compile else model
    decay = ema_decay(0)

    def step() -> torch.Tensor:
        # As the training loop does: mask noise drawn outside the (compiled) forward, alpha a tensor.
        noise = model.mask_noise(videos, mask_generator)
        alpha = alpha_tensor(args.alpha, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = forward(videos, alpha=alpha, noise=noise)["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(decay)  # a no-op without a teacher
        return loss.detach()

    return model, step, flops


def _deepspeed_step(args: argparse.Namespace, device: torch.device, videos: torch.Tensor, mask_generator):
    """The model, and the training loop's own step (``pretrain_step``) on a DeepSpeed engine."""
    import tempfile

    from hpm_video.config import load_config, model_kwargs
    from hpm_video.engine import distributed as dist_utils
    from hpm_video.engine.deepspeed_setup import initialize
    from hpm_video.engine.pretrain import pretrain_step
    from hpm_video.engine.steps import NonFiniteGuard

    cfg = load_config(None, [
        "MODEL.NAME", args.model, "MODEL.NUM_FRAMES", str(args.frames), "MODEL.INPUT_SIZE", str(args.size),
        "MODEL.GRAD_CHECKPOINTING", str(args.grad_ckpt), "MASK.MODE", args.masking,
        "MASK.RATIO", str(args.mask_ratio), "MASK.PREDICTOR", str(args.use_predictor),
        "ENGINE.ZERO_STAGE", str(args.zero), "ENGINE.PRECISION", args.precision, "ENGINE.COMPILE", str(args.compile),
        "ENGINE.COMPILE_MODE", args.compile_mode,
        "ENGINE.DEVICE", device.type, "SOLVER.BATCH_SIZE", str(args.batch),
        "OUTPUT_DIR", tempfile.mkdtemp(prefix="bench_train_"),
    ])  # fmt: skip
    dist_utils.fill_rendezvous_env()
    dist_utils.init_distributed(device)
    model = create_model(cfg.MODEL.NAME, **model_kwargs(cfg))
    flops = training_flops_per_clip(model, args.flops)  # before ZeRO-3 partitions the weights
    engine, _ = initialize(model, cfg, device, args.batch)
    guard = NonFiniteGuard(cfg.ENGINE.MAX_BAD_STEPS, engine)
    decay = ema_decay(0)

    def step() -> torch.Tensor:
        # A non-finite loss would skip the update on the device; the timed loss is checked after.
        return pretrain_step(engine, videos, args.alpha, decay, mask_generator, (0, 1), guard)["loss"].detach()

    return engine.module, step, flops


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` (JSON lines stay one line)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def profile_kernels(step, device: torch.device, steps: int, step_s: float) -> dict[str, Any]:
    """Where ``steps`` more steps spend their kernel time (``hpm_video.profiling.kernel_breakdown``)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from hpm_video.profiling import kernel_breakdown, profiled_kernels

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # One profiled but discarded step first: kineto can drop the first kernel records of a session
    # started in a long-lived process (pytorch issue 192021).
    kernels: list[tuple[str, float]] = []
    try:
        with profile(
            activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
            on_trace_ready=lambda prof: kernels.extend(profiled_kernels(prof, device.type)),
            acc_events=True,  # one cycle only; says so, which silences the profiler's warning
        ) as prof:  # fmt: skip
            for _ in range(1 + steps):
                step()
                sync(device)  # so that each step's kernels land in that step's window
                prof.step()
        breakdown = kernel_breakdown(kernels, steps)
    except Exception as err:  # a profiler the machine refuses must not cost the timed figures
        return {"error": error_line(err)}
    # On the CPU the profiler's own overhead inflates the ops' times: no meaningful ratio there.
    busy = breakdown["kernel_ms_per_step"] / (step_s * 1e3) if device.type == "cuda" else None
    breakdown["busy_fraction"] = None if busy is None else round(busy, 4)
    breakdown["profiled_steps"] = steps
    return breakdown


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    if args.precision is None:  # bf16 autocast on a CPU is correct but far slower than fp32
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    torch.manual_seed(args.seed)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    videos = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=generator).to(device)
    mask_generator = torch.Generator(device=device).manual_seed(args.seed)
    build = _plain_step if args.zero is None else _deepspeed_step
    model, step, (train_gflops, flops_method) = build(args, device, videos, mask_generator)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - compile_start

    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    final = torch.stack(losses).float()
    finite = bool(torch.isfinite(final).all())  # the single host sync of the timed part
    sync(device)
    elapsed = time.perf_counter() - start

    step_s = elapsed / args.steps
    clips_per_s = args.batch / step_s
    model_tflops = train_gflops * clips_per_s / 1e3
    name = device_name(device)
    peak = args.peak_tflops if args.peak_tflops else (peak_tflops(name) if device.type == "cuda" else None)
    memory, memory_kind = peak_memory_gib(device)
    kernels = profile_kernels(step, device, args.profile_steps, step_s) if args.profile_steps else None
    return {
        "device": device.type,
        "device_name": name,
        "model": args.model,
        "frames": args.frames,
        "size": args.size,
        "batch": args.batch,
        "precision": args.precision,
        "masking": args.masking,
        "mask_ratio": args.mask_ratio,
        "use_predictor": model.loss_predictor is not None,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "sdpa_backend": args.sdpa_backend,
        "engine": "plain" if args.zero is None else f"deepspeed_zero{args.zero}",
        "grad_ckpt": args.grad_ckpt,
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 3),
        "steps": args.steps,
        "step_time_ms": round(step_s * 1e3, 3),
        "clips_per_s": round(clips_per_s, 3),
        "peak_memory_gib": round(memory, 3),
        "memory_kind": memory_kind,
        "train_gflops_per_clip": round(train_gflops, 3),
        "flops_method": flops_method,
        "flops_convention": "2 FLOPs per multiply-add; training = 3 x student forward + teacher pass",
        "model_tflops": round(model_tflops, 4),
        "peak_bf16_tflops": peak,
        "mfu": None if not peak else round(model_tflops / peak, 4),
        "losses_finite": finite,
        "last_loss": float(final[-1]),
        "torch": torch.__version__,
        "kernels": kernels,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hpm_pretrain_vit_base_patch16", choices=PRETRAIN_MODELS)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=tuple(PRECISIONS), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--masking", default="random", choices=("random", "hpm"))
    parser.add_argument("--mask-ratio", type=float, default=0.9)
    parser.add_argument("--use-predictor", action="store_true", help="random masking with the loss predictor")
    parser.add_argument("--alpha", type=float, default=0.5, help="hard-mask share in hpm mode (cost is the same)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode with --compile")  # fmt: skip
    parser.add_argument("--sdpa-backend", default="auto", choices=("auto", *SDPA_BACKENDS),
                        help="allow only this attention backend (a shape it cannot serve fails the run); "
                             "default: torch picks")  # fmt: skip
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), metavar="STAGE",
                        help="run the training loop's step on a DeepSpeed engine at this ZeRO stage "
                             "(needs deepspeed and fvcore); default: plain torch training")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--profile-steps", type=int, default=0, metavar="N",
                        help="profile N more steps and report where the kernel time goes")  # fmt: skip
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--flops", default="auto", choices=("auto", "fvcore", "analytic"))
    parser.add_argument("--peak-tflops", type=float, help="override the peak used for MFU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.profile_steps < 0:
        parser.error("--steps and --batch must be at least 1, --warmup and --profile-steps at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Only the JSON goes to stdout: libraries' prints and DeepSpeed's logger (whose handler
        # binds the stdout of the moment it is created) go to stderr.
        only = SDPA_BACKENDS.get(args.sdpa_backend)
        with contextlib.redirect_stdout(sys.stderr), sdpa_kernel(only) if only else contextlib.nullcontext():
            result = run(args)
    except (ValueError, RuntimeError) as err:  # out of memory, a failed compile, a refused setting
        print(json.dumps({"check": "bench_train", "error": error_line(err),
                          "args": " ".join(sys.argv[1:] if argv is None else argv),
                          "model": args.model, "masking": args.masking}))  # fmt: skip
        return 1
    print(json.dumps(result))
    return 0 if result["losses_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
