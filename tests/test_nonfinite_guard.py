"""The finite-loss guard skips updates on the device: weights, optimiser state and teacher are left
exactly as they were, the next finite round updates them, and a run of bad steps stops the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tool_helpers import subprocess_env

from hpm_video.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(("stage", "accum", "optimizer"), [(0, 2, "adamw"), (2, 1, "adamw"), (2, 2, "lars")])
def test_nonfinite_round_leaves_weights_optimiser_and_teacher_untouched(stage, accum, optimizer, tmp_path):
    # AdamW (fused) skips through ``found_inf`` at any stage (ZeRO-2 no longer computes the norm that
    # would catch it). LARS cannot: there the bad micro-step is dropped before its backward. With
    # accumulation, one bad micro-step spoils its whole round on the device.
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "nonfinite_step.py"), "--stage", str(stage),
         "--accum", str(accum), "--optimizer", optimizer, "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env(PYTHONPATH=REPO),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["on_device"] == (optimizer == "adamw")
    assert result["bad_round_flags"] == [False] + [True] * (accum - 1)
    assert result["good_round_flags"] == [True] * accum
    if optimizer == "adamw":
        assert result["changed_by_bad_round"] == []
    assert result["all_finite"]
    moved = result["moved_by_good_round"]
    assert moved["teacher"] > 0 and moved["encoder"] > 0 and moved["optim"] > 0, moved
    assert result["nonfinite_total"] == 1
    assert "2 non-finite losses in a row" in result["stopped"]
    assert "their updates were skipped" in proc.stderr


def test_teacher_update_weight_on_the_device():
    torch.manual_seed(0)
    model = create_model("hpm_pretrain_vit_tiny_patch16", num_frames=4, img_size=32, depth=1, decoder_depth=1,
                         masking="hpm")
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    teacher, student = model.ema_pairs()
    assert teacher
    start = [t.clone() for t in teacher]
    model.update_teacher(0.9, torch.tensor(0.0))  # a skipped update: the teacher stays
    assert all(torch.equal(a, b) for a, b in zip(start, teacher))
    model.update_teacher(0.9, torch.tensor(1.0))
    expected = [torch.lerp(a, s, 0.1) for a, s in zip(start, student)]
    for got, want in zip(teacher, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(start, teacher))
