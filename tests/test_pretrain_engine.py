"""Pretraining runs end to end through the real entry points (subprocesses, DeepSpeed on the CPU, fp32).

Each run uses a tiny model on the bundled sample clips. One process: plain ``python run_pretrain.py``;
two processes: the ``deepspeed`` launcher (as a multi-node job would start) and ``torchrun``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tool_helpers import subprocess_env

from hpm_video.checkpoint import load_model_file
from hpm_video.config import load_config
from hpm_video.engine import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.slow

TINY = f"""_BASE_: {REPO}/configs/demo.yaml
MODEL:
  INPUT_SIZE: 64
  NUM_FRAMES: 4
  EMBED_DIM: 48
  NUM_HEADS: 3
  DEPTH: 2
  DECODER_EMBED_DIM: 32
  DECODER_NUM_HEADS: 2
  DECODER_DEPTH: 1
DATA:
  ROOT: {REPO}/datasets/samples
  TRAIN_LIST: {REPO}/datasets/samples/train.csv
  NUM_WORKERS: 0
  NUM_SAMPLE: 1
SOLVER:
  EPOCHS: 3
  WARMUP_EPOCHS: 1
  BATCH_SIZE: 2
  BASE_LR: 0.05
ENGINE:
  SAVE_EVERY_EPOCHS: 1
  VIS_EVERY_EPOCHS: 1000
  LOG_EVERY_STEPS: 1
  TENSORBOARD: false
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def pretrain(config: str, out: str, *overrides: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["run_pretrain.py", "--config", config, "OUTPUT_DIR", out, *overrides]
    return run(cmd)


def losses(out: str) -> list[tuple[int, float, float]]:
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss_rec"], r["loss_pred"]) for r in rows if r["kind"] == "train"]


def weights(out: str) -> dict[str, torch.Tensor]:
    return load_model_file(os.path.join(out, "model_final.pth")).state_dict()


def test_bad_config_is_refused_clearly(tiny_config, tmp_path):
    proc = subprocess.run(
        [sys.executable, "run_pretrain.py", "--config", tiny_config, "SOLVER.EPOCH", "3"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown config key 'SOLVER.EPOCH' (did you mean EPOCHS?)" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {tiny_config}\nSOLVER:\n  BATCH_SIZE: two\n")
    with pytest.raises(ValueError, match="SOLVER.BATCH_SIZE"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="choose one of: fp32, bf16, fp16"):
        load_config(tiny_config, ["ENGINE.PRECISION", "fp8"])
    with pytest.raises(ValueError, match="choose 0, 1, 2 or 3"):
        load_config(tiny_config, ["ENGINE.ZERO_STAGE", "4"])


def test_demo_config_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    proc = pretrain(
        f"{REPO}/configs/demo.yaml", out, "SOLVER.EPOCHS", "2", "SOLVER.STEPS_PER_EPOCH", "1",
        "DATA.NUM_WORKERS", "2", "ENGINE.VIS_EVERY_EPOCHS", "1",
    )  # fmt: skip
    for name in ("checkpoint", "model", "log", "picture"):
        assert f"  {name}" in proc.stdout, proc.stdout
    assert checkpointing.latest_checkpoint(out).endswith("epoch-0001")
    from PIL import Image

    with Image.open(os.path.join(out, "hard_tubes_epoch0002.png")) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    rows = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    for key in ("loss_rec", "loss_pred", "rank_corr", "alpha", "lr", "grad_norm", "clips_per_s", "skipped_samples"):
        assert key in rows[-1], key
    model = load_model_file(os.path.join(out, "model_final.pth"))
    assert model.masking == "hpm" and model.teacher is not None


@pytest.fixture(scope="module")
def one_process_run(tiny_config, tmp_path_factory) -> str:
    """The reference: 1 process, ZeRO-0, 4 clips per step, 2 epochs."""
    out = str(tmp_path_factory.mktemp("one") / "run")
    pretrain(tiny_config, out, "SOLVER.BATCH_SIZE", "4", "SOLVER.EPOCHS", "2")
    return out


def assert_same_run(reference: str, other: str) -> None:
    a, b = losses(reference), losses(other)
    assert len(a) == len(b) == 4
    for (sa, ra, pa), (sb, rb, pb) in zip(a, b):
        assert sa == sb
        # Same data, masks and updates; only the float summation order differs between the runs.
        assert rb == pytest.approx(ra, rel=1e-4) and pb == pytest.approx(pa, rel=1e-4)
    wa, wb = weights(reference), weights(other)
    # The pairwise loss ignores a shift of all predictions, so the predictor's final norm bias and head
    # bias get a gradient that is zero up to rounding; Adam turns that noise into steps of about +-lr.
    shift_invariant = ("loss_predictor.norm.bias", "loss_predictor.head.bias")
    lr_bound = 0.05 * 4 / 256 * len(a)
    for key in wa:  # the EMA teacher (teacher.*) included
        exact = not key.endswith(shift_invariant)
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4 if exact else 0, atol=1e-5 if exact else lr_bound,
                                   msg=key)  # fmt: skip


def test_two_processes_zero2_via_deepspeed_launcher_match_one_process(tiny_config, tmp_path, one_process_run):
    """Same global batch (4 clips): 2 ranks x 2 under ZeRO-2 (deepspeed launcher) vs 1 process x 4."""
    two = str(tmp_path / "two")
    launcher = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29611"]
    pretrain(tiny_config, two, "SOLVER.BATCH_SIZE", "2", "SOLVER.EPOCHS", "2", "ENGINE.ZERO_STAGE", "2",
             launcher=launcher)  # fmt: skip
    assert_same_run(one_process_run, two)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_match_and_export(tiny_config, tmp_path, stage, one_process_run):
    out = str(tmp_path / f"zero{stage}")
    launcher = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(29620 + stage)]
    pretrain(tiny_config, out, "ENGINE.ZERO_STAGE", str(stage), "SOLVER.EPOCHS", "2", launcher=launcher)
    assert_same_run(one_process_run, out)  # ZeRO-3 partitions the teacher too: its EMA must still match
    final = weights(out)
    exported = str(tmp_path / "full.pth")
    run([sys.executable, "tools/export_encoder.py", out, "--full", "--output", exported])
    for key, value in load_model_file(exported).state_dict().items():
        torch.testing.assert_close(value, final[key], msg=key)
    encoder = str(tmp_path / "encoder.pth")
    run([sys.executable, "tools/export_encoder.py", out, "--teacher", "--output", encoder])
    enc = torch.load(encoder, weights_only=True)["model"]
    torch.testing.assert_close(enc["blocks.0.attn.qkv.weight"], final["teacher.encoder.blocks.0.attn.qkv.weight"])


def test_kill_and_resume_reproduces_uninterrupted_run(tiny_config, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    pretrain(tiny_config, full)
    cmd = [sys.executable, "run_pretrain.py", "--config", tiny_config, "OUTPUT_DIR", killed]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(killed, "log.jsonl")
    deadline = time.time() + 240
    # Kill -9 once the first checkpoint is complete and the next epoch has taken a step.
    while time.time() < deadline and proc.poll() is None:
        if checkpointing.latest_checkpoint(killed) and os.path.exists(log) and len(open(log).readlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(killed, "model_final.pth"))
    # A save that died half-way (no COMPLETE marker) must be ignored.
    partial = os.path.join(checkpointing.checkpoint_root(killed), "epoch-0009")
    os.makedirs(partial)
    open(os.path.join(partial, "mp_rank_00_model_states.pt"), "wb").write(b"\x00truncated")
    assert checkpointing.latest_checkpoint(killed) != partial
    pretrain(tiny_config, killed)
    shutil.rmtree(partial)
    wa, wb = weights(full), weights(killed)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=1e-7, msg=key)
    # The log reads as one run: the steps the killed run logged after its checkpoint were dropped
    # on resume, not logged twice.
    resumed, uninterrupted = losses(killed), losses(full)
    assert [s for s, _, _ in resumed] == [s for s, _, _ in uninterrupted]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), rtol=1e-5, atol=1e-6)
    # A fresh start into this folder would prune its own checkpoint against the older run's: refused,
    # before anything (config.yaml included) is written.
    config_before = open(os.path.join(killed, "config.yaml")).read()
    fresh = [sys.executable, "run_pretrain.py", "--config", tiny_config, "OUTPUT_DIR", killed,
             "ENGINE.AUTO_RESUME", "False", "SOLVER.EPOCHS", "5"]  # fmt: skip
    proc = subprocess.run(fresh, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "holds checkpoints of an earlier run" in proc.stderr
    assert open(os.path.join(killed, "config.yaml")).read() == config_before


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_config, tmp_path):
    out = str(tmp_path / "nan")
    # An absurd learning rate drives the weights to inf/NaN within a few steps.
    cmd = [sys.executable, "run_pretrain.py", "--config", tiny_config, "OUTPUT_DIR", out, "SOLVER.BASE_LR", "1e12",
           "SOLVER.WARMUP_EPOCHS", "0", "ENGINE.MAX_BAD_STEPS", "2", "SOLVER.EPOCHS", "20"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "non-finite losses in a row" in proc.stderr
    assert "their updates were skipped" in proc.stderr


def test_image_pretraining_uses_the_same_path(tmp_path):
    """ImageNet-style folders through the image config: one-frame clips, tubelet 1, token masking."""
    from PIL import Image

    root = tmp_path / "images"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (48, 64, 3), generator=torch.Generator().manual_seed(i)).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / label / f"{i}.png")
    out = str(tmp_path / "run")
    pretrain(
        f"{REPO}/configs/pretrain/image/hpm_vit_base.yaml", out,
        "MODEL.NAME", "hpm_pretrain_vit_tiny_patch16", "MODEL.INPUT_SIZE", "32", "MODEL.DEPTH", "1",
        "MODEL.DECODER_EMBED_DIM", "32", "MODEL.DECODER_NUM_HEADS", "2", "MODEL.DECODER_DEPTH", "1",
        "DATA.ROOT", str(root), "DATA.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", "4", "SOLVER.EPOCHS", "2",
        "SOLVER.WARMUP_EPOCHS", "1", "ENGINE.DEVICE", "cpu", "ENGINE.PRECISION", "fp32", "ENGINE.ZERO_STAGE", "0",
        "ENGINE.TENSORBOARD", "False", "ENGINE.VIS_EVERY_EPOCHS", "1",
    )  # fmt: skip
    model = load_model_file(os.path.join(out, "model_final.pth"))
    assert model.encoder.patch_embed.tubelet_size == 1 and model.mask_unit == "token"
    assert [step for step, _, _ in losses(out)] == [2, 4]  # 8 images / batch 4, logged at each epoch's end
    assert os.path.exists(os.path.join(out, "hard_tubes_epoch0002.png"))


def test_bf16_autocast_keeps_fp32_weights_and_teacher(tiny_config, tmp_path):
    """bf16 runs under autocast with fp32 weights, so EMA steps of 1e-4 are not lost to rounding."""
    out = str(tmp_path / "bf16")
    pretrain(tiny_config, out, "ENGINE.PRECISION", "bf16", "ENGINE.ZERO_STAGE", "2", "SOLVER.EPOCHS", "1",
             "SOLVER.STEPS_PER_EPOCH", "2")  # fmt: skip
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]  # as saved, not as loaded
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert any(k.startswith("teacher.") for k in state)
    rows = losses(out)
    assert rows and all(torch.isfinite(torch.tensor(r[1:])).all() for r in rows)
