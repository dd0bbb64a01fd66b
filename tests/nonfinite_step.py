"""Run by test_nonfinite_guard.py and test_cuda.py in a subprocess (DeepSpeed needs its own process
group): rounds of the training loop's step with a NaN clip in one of them, printing what changed as
JSON. On CUDA, two more rounds first run under CUDA's sync debug mode, which raises on any host sync
(at ZeRO-0, 1 or 2: ZeRO-3 reads its gradient norm back by design). ``--optimizer lars`` uses timm's
LARS (the linear probe's), which cannot skip on the device.

    python tests/nonfinite_step.py --stage 0 --accum 2 --output-dir DIR [--device cuda] [--optimizer lars]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from hpm_video.config import load_config, model_kwargs
from hpm_video.engine import distributed as dist_utils
from hpm_video.engine.deepspeed_setup import initialize
from hpm_video.engine.pretrain import pretrain_step
from hpm_video.engine.steps import NonFiniteGuard, start_run
from hpm_video.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Weights (student and teacher) and the client optimiser's state, cloned."""
    state = {f"param/{k}": v.detach().clone() for k, v in engine.module.state_dict().items()}
    for i, per_param in enumerate(engine.client_optimizer.state.values()):
        for name, value in per_param.items():
            state[f"optim/{i}/{name}"] = value.detach().clone()
    return state


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


def main(args: argparse.Namespace) -> None:
    accum = args.accum
    precision = "bf16" if args.device == "cuda" else "fp32"
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"), [
        "OUTPUT_DIR", args.output_dir, "ENGINE.ZERO_STAGE", str(args.stage), "SOLVER.ACCUM_STEPS", str(accum),
        "ENGINE.DEVICE", args.device, "ENGINE.PRECISION", precision,
        "MODEL.INPUT_SIZE", "32", "MODEL.NUM_FRAMES", "4", "MODEL.DEPTH", "1", "MODEL.DECODER_DEPTH", "1",
        "ENGINE.MAX_BAD_STEPS", "2",
    ])  # fmt: skip
    dist_utils.fill_rendezvous_env()
    device, _, _ = start_run(cfg)
    torch.manual_seed(0)
    model = create_model(cfg.MODEL.NAME, **model_kwargs(cfg))
    optimizer = None
    if args.optimizer == "lars":
        from timm.optim import Lars

        optimizer = Lars(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    engine, _ = initialize(model, cfg, device, 2, optimizer)
    guard = NonFiniteGuard(cfg.ENGINE.MAX_BAD_STEPS, engine)
    generator = torch.Generator(device=device).manual_seed(0)
    good = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    bad = good.clone()
    bad[0, 0, 0, 0, 0] = float("nan")

    def one_round(first: torch.Tensor) -> list[bool]:
        """An accumulation round whose first micro-step sees ``first``."""
        flags = []
        for clip in [first] + [good] * (accum - 1):
            out = pretrain_step(engine, clip, 0.5, 0.9, generator, (0, 1), guard)
            flags.append(bool(out["finite"]))
        return flags

    one_round(good)  # the optimiser state exists from here on
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the loop's step raises
        try:
            for clip in [bad] + [good] * (2 * accum - 1):  # two whole rounds, the first one bad
                pretrain_step(engine, clip, 0.5, 0.9, generator, (0, 1), guard)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    guard_total_before = guard.check(0, 0)
    before = snapshot(engine)
    bad_flags = one_round(bad)
    after_bad = snapshot(engine)
    total_after_bad = guard.check(0, 1) - guard_total_before
    good_flags = one_round(good)
    after_good = snapshot(engine)
    moved = changed(after_bad, after_good)
    result = {
        "bad_round_flags": bad_flags,
        "good_round_flags": good_flags,
        "changed_by_bad_round": changed(before, after_bad),
        "moved_by_good_round": {
            group: sum(k.startswith(prefix) for k in moved)
            for group, prefix in (("teacher", "param/teacher."), ("encoder", "param/encoder."), ("optim", "optim/"))
        },
        "nonfinite_total": total_after_bad,
        "on_device": guard.on_device,
        "all_finite": all(bool(torch.isfinite(v).all()) for v in after_good.values() if v.is_floating_point()),
    }
    for _ in range(2):  # two bad micro-steps in a row: the next check stops the run
        pretrain_step(engine, bad, 0.5, 0.9, generator, (0, 1), guard)
    try:
        guard.check(0, 4)
        result["stopped"] = None
    except RuntimeError as err:
        result["stopped"] = str(err)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"])
    main(parser.parse_args())
