"""What one pretraining step asks of a GPU, counted without one; prints one JSON object.

    python tools/bench_step_counts.py --model hpm_pretrain_vit_base_patch16 --batch 64 --masking hpm
    python tools/bench_step_counts.py --model hpm_pretrain_vit_large_patch16 --batch 32 --grad-ckpt
    python tools/bench_step_counts.py --deepspeed 2     # the engine's step (tiny model, real tensors)

Model mode (default): the full-size model runs one training step (forward with the mask and, in
``hpm`` mode, the teacher; backward; fused AdamW; EMA) on fake tensors, so nothing is computed and
a ViT-L step takes seconds on a CPU. Reported per step: kernels an eager step launches (by phase),
host synchronisations (with the line that asks for them), the peak of live tensor bytes (weights,
gradients, AdamW state and activations; a lower bound of CUDA's ``max_memory_allocated``) and,
with ``--graph-breaks``, ``torch._dynamo.explain``'s graph-break count of the training forward
(run on a small real clip, as tracing needs values for nothing but is slow at full size).

``--fake-device cuda``: the same on fake CUDA tensors, so that the copies a CPU run never makes
(``.to("cuda")`` of a host tensor, ``.cpu()``, tensors made from host values) show as host syncs.
Only the forward (mask, teacher, targets, losses) and the EMA run: PyTorch's autograd engine
wants a real CUDA context for the backward, and the fused AdamW step is torch's own. Autocast is
off (it needs a real CUDA device too), so kernel counts and memory differ from a bf16 step.

``--deepspeed STAGE``: the step the training loop runs (finite-loss guard, DeepSpeed backward and
step at that ZeRO stage, EMA: ``engine.pretrain.pretrain_step``) on the CPU with the demo config;
this counts the engine's own syncs. Its kernels are not split by phase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

import torch

import hpm_video  # noqa: F401  (registers the models)
from hpm_video.masking import alpha_tensor
from hpm_video.models import PRETRAIN_MODELS, create_model, ema_decay
from hpm_video.profiling import StepProbe

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def _model_step(model, optimizer, videos, amp_dtype, probe: StepProbe | None, alpha: float) -> None:
    phase = probe.phase if probe is not None else (lambda name: contextlib.nullcontext())
    with phase("forward"), torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = model(videos, alpha=alpha)["loss"]
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if model.teacher is not None:
        with phase("ema"):
            model.update_teacher(ema_decay(0))


def _forward_and_ema(model, videos, probe: StepProbe, alpha: float) -> None:
    """The parts of a step that run on fake CUDA tensors without a GPU (see the module docstring)."""
    with probe.phase("forward"):
        model(videos, alpha=alpha_tensor(alpha, videos.device))["loss"]
    if model.teacher is not None:
        with probe.phase("ema"):
            model.update_teacher(ema_decay(0), torch.ones((), device=videos.device))


def count_model_step(args: argparse.Namespace, fake: bool = True, **model_overrides: Any) -> dict[str, Any]:
    """Counts of one training step of ``args.model``; ``fake=False`` runs it for real (small models)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kwargs = dict(num_frames=args.frames, img_size=args.size, masking=args.masking, mask_ratio=args.mask_ratio,
                  **model_overrides)  # fmt: skip
    # Built on ``meta`` then given fake storage: the teacher is a deep copy, which fake tensors refuse.
    with torch.device("meta" if fake else "cpu"):
        model = create_model(args.model, **kwargs)
    device = getattr(args, "fake_device", "cpu") if fake else "cpu"
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        if fake:
            model.to_empty(device=device)
        model.train()
        if device != "cpu":
            videos = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device)
            probe = StepProbe().track(model, videos)
            with probe:
                _forward_and_ema(model, videos, probe, args.alpha)
            return {
                "mode": "model", "device": device, "model": args.model, "batch": args.batch,
                "masking": args.masking, "phases": ["forward", "ema"], **probe.summary(),
                "note": "fake CUDA tensors: forward and EMA only, fp32 (no backward, optimiser or autocast)",
            }  # fmt: skip
        if args.grad_ckpt:
            model.set_grad_checkpointing(True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        videos = torch.randn(args.batch, 3, args.frames, args.size, args.size)
        amp_dtype = PRECISIONS[args.precision]
        _model_step(model, optimizer, videos, amp_dtype, None, args.alpha)  # creates the AdamW state
        probe = StepProbe().track(model, optimizer, videos)
        resident = probe.live_bytes
        with probe:
            _model_step(model, optimizer, videos, amp_dtype, probe, args.alpha)
    result = {
        "mode": "model",
        "model": args.model,
        "frames": args.frames,
        "size": args.size,
        "batch": args.batch,
        "masking": args.masking,
        "mask_ratio": args.mask_ratio,
        "precision": args.precision,
        "grad_ckpt": args.grad_ckpt,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "resident_gib": round(resident / 2**30, 3),  # weights, teacher, AdamW state, the batch
        **probe.summary(),
        "top_ops": probe.top_ops(8),
        "memory_kind": "peak live tensor bytes" + (" under FakeTensorMode" if fake else "")
        + " (a lower bound of CUDA max_memory_allocated)",
    }
    if args.graph_breaks:
        result.update(graph_breaks(args, **model_overrides))
    return result


def graph_breaks(args: argparse.Namespace, **model_overrides: Any) -> dict[str, Any]:
    """``torch._dynamo.explain`` of the training forward on a small real clip of the same model."""
    torch._dynamo.reset()
    kwargs = dict(masking=args.masking, mask_ratio=args.mask_ratio, **model_overrides)
    model = create_model(args.model, **{**kwargs, "num_frames": 4, "img_size": 32})
    videos = torch.randn(2, 3, 4, 32, 32)
    explanation = torch._dynamo.explain(model)(videos, alpha=args.alpha)
    return {
        "graph_breaks": explanation.graph_break_count,
        "graphs": explanation.graph_count,
        "graph_break_reasons": [str(r.reason).splitlines()[0][:200] for r in explanation.break_reasons],
    }


def count_engine_step(args: argparse.Namespace) -> dict[str, Any]:
    from hpm_video.config import load_config, model_kwargs
    from hpm_video.engine import distributed as dist_utils
    from hpm_video.engine.deepspeed_setup import initialize
    from hpm_video.engine.pretrain import pretrain_step
    from hpm_video.engine.steps import NonFiniteGuard, start_run

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = args.output_dir or os.path.join(repo, "output", "bench_step_counts")
    cfg = load_config(os.path.join(repo, "configs", "demo.yaml"), [
        "ENGINE.ZERO_STAGE", str(args.deepspeed), "ENGINE.DEVICE", "cpu", "ENGINE.PRECISION", "fp32",
        "OUTPUT_DIR", out_dir, "MASK.MODE", args.masking,
    ])  # fmt: skip
    dist_utils.fill_rendezvous_env()
    device, _, _ = start_run(cfg)
    model = create_model(cfg.MODEL.NAME, **model_kwargs(cfg))
    engine, _ = initialize(model, cfg, device, args.batch)
    guard = NonFiniteGuard(cfg.ENGINE.MAX_BAD_STEPS, engine)
    size, frames = cfg.MODEL.INPUT_SIZE, cfg.MODEL.NUM_FRAMES
    videos = torch.randn(args.batch, 3, frames, size, size)
    generator = torch.Generator().manual_seed(0)

    def step() -> dict[str, torch.Tensor]:
        return pretrain_step(engine, videos, args.alpha, 0.999, generator, (0, 1), guard)

    for _ in range(args.warmup):  # optimiser state, DeepSpeed buffers, ZeRO-3's recorded fetch order
        step()
    probe = StepProbe()
    with probe:
        out = step()
    if not bool(out["finite"]):
        raise RuntimeError("non-finite loss in the counted step")
    summary = probe.summary()
    summary.pop("peak_tensor_gib"), summary.pop("peak_phase")  # only new tensors are tracked here
    return {
        "mode": "deepspeed",
        "zero_stage": args.deepspeed,
        "model": cfg.MODEL.NAME,
        "masking": args.masking,
        "batch": args.batch,
        **summary,
        "note": "a CPU run cannot see device-to-host copies (.cpu() of a CPU tensor is a no-op)",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hpm_pretrain_vit_base_patch16", choices=PRETRAIN_MODELS)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=tuple(PRECISIONS))
    parser.add_argument("--masking", default="random", choices=("random", "hpm"))
    parser.add_argument("--mask-ratio", type=float, default=0.9)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block")
    parser.add_argument("--graph-breaks", action="store_true", help="also count graph breaks (torch._dynamo.explain)")
    parser.add_argument("--fake-device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the fake tensors; cuda also shows host-device copies (forward and EMA only)")
    parser.add_argument("--deepspeed", type=int, choices=(0, 1, 2, 3), metavar="STAGE",
                        help="count the DeepSpeed training step at this ZeRO stage (demo model, CPU)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3, help="--deepspeed: uncounted steps before the counted one")
    parser.add_argument("--output-dir", help="--deepspeed: where the run's config.yaml goes")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.warmup < 1:
        parser.error("--batch and --warmup must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Only the JSON goes to stdout: libraries' prints and DeepSpeed's logger go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        result = count_engine_step(args) if args.deepspeed is not None else count_model_step(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
