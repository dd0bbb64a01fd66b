"""Fast unit tests of the training machinery (no processes, no DeepSpeed engine)."""

import glob
import json
import os

import pytest
import torch

from hpm_video.config import load_config, model_kwargs
from hpm_video.engine import checkpointing, distributed
from hpm_video.engine.deepspeed_setup import deepspeed_config
from hpm_video.engine.optim import apply_schedules, cosine_value, param_groups
from hpm_video.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    f for f in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(f).startswith("_")
)  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_config_loads_and_builds_its_model(path):
    cfg = load_config(path)
    with torch.device("meta"):
        model = create_model(cfg.MODEL.NAME, **model_kwargs(cfg))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_published_pretrain_recipe():
    cfg = load_config(os.path.join(REPO, "configs/pretrain/k400/vit_base_hpm.yaml"))
    assert (cfg.MASK.MODE, cfg.MASK.RATIO, cfg.MASK.UNIT) == ("hpm", 0.9, "tube")
    assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.WARMUP_EPOCHS, cfg.SOLVER.BASE_LR) == (800, 40, 1.5e-4)
    assert tuple(cfg.SOLVER.BETAS) == (0.9, 0.95) and cfg.SOLVER.WEIGHT_DECAY == 0.05
    assert cfg.DATA.SAMPLING_RATE == 4
    assert load_config(os.path.join(REPO, "configs/pretrain/ssv2/vit_base_random.yaml")).DATA.SAMPLING_RATE == 2


def test_slurm_variables_become_rendezvous(monkeypatch):
    # A private copy of the environment: what fill_rendezvous_env writes must not leak into later
    # tests (a leaked WORLD_SIZE=16 would make an in-process run wait for 15 missing ranks).
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="1", MASTER_PORT="29500")
    distributed.fill_rendezvous_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "16", "1")


def test_slurm_task_gets_the_gpu_of_its_local_id(monkeypatch):
    """Under ``srun`` only SLURM_LOCALID names the GPU: it must be mapped before the device is picked."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    os.environ.update(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="3", MASTER_PORT="29500")
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed, "init_distributed", lambda device: chosen.append(device))
    assert distributed.start_process("auto") == torch.device("cuda", 3)
    assert chosen == [3, torch.device("cuda", 3)]


def test_single_process_defaults(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "SLURM_PROCID"):
        os.environ.pop(key, None)
    distributed.fill_rendezvous_env()
    assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0


def test_cosine_schedule():
    assert cosine_value(0, 1.0, 0.0, 100, 10, 0.0) == 0.0
    assert cosine_value(5, 1.0, 0.0, 100, 10, 0.0) == pytest.approx(0.5)
    assert cosine_value(10, 1.0, 0.0, 100, 10) == pytest.approx(1.0)
    assert cosine_value(55, 1.0, 0.0, 100, 10) == pytest.approx(0.5)
    assert cosine_value(100, 1.0, 0.1, 100, 10) == pytest.approx(0.1)


def test_param_groups_skip_decay_on_biases_norms_and_tokens():
    model = create_model("hpm_pretrain_vit_tiny_patch16", img_size=32, num_frames=2, encoder_depth=1, decoder_depth=1)
    groups = param_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in groups[0]["params"])
    for n in ("mask_token", "encoder.blocks.0.attn.q_bias", "encoder.norm.weight", "decoder.head.bias"):
        assert all(names[i] != n for i in decayed), n
    opt = torch.optim.AdamW(groups)
    apply_schedules(opt, 0.1, 0.0)
    apply_schedules(opt, 0.2, 0.04)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]  # a zero-crossing keeps groups apart
    assert all(g["lr"] == 0.2 for g in opt.param_groups)



@pytest.mark.parametrize("layer_decay", [1.0, 0.75])
def test_weight_decay_starting_at_zero_still_reaches_the_decayed_groups(layer_decay):
    """SOLVER.WEIGHT_DECAY 0 with a rising WEIGHT_DECAY_END: which groups decay is known from the start."""
    model = create_model("hpm_vit_tiny_patch16", img_size=32, num_frames=2, depth=2, num_classes=5)
    at_zero = param_groups(model, 0.0, layer_decay=layer_decay)
    at_05 = param_groups(model, 0.05, layer_decay=layer_decay)
    assert all(g["weight_decay"] == 0.0 for g in at_zero)
    assert [g["wd_scale"] for g in at_zero] == [g["wd_scale"] for g in at_05]
    assert [g["weight_decay"] for g in at_05] == [0.05 * g["wd_scale"] for g in at_05]
    opt = torch.optim.AdamW(at_zero)
    apply_schedules(opt, 0.1, 0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decayed} >= {"head.weight", "blocks.1.mlp.fc1.weight", "patch_embed.proj.weight"}
    assert all(p.ndim > 1 for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])


def test_layer_decay_groups_scale_lr_by_depth():
    model = create_model("hpm_vit_tiny_patch16", img_size=32, num_frames=2, depth=3, num_classes=5)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale_of = {}
    for g in groups:
        for p in g["params"]:
            scale_of[id(p)] = g["lr_scale"]
    by_name = {n: scale_of[id(p)] for n, p in model.named_parameters()}
    assert by_name["patch_embed.proj.weight"] < by_name["blocks.0.attn.qkv.weight"] < by_name["blocks.2.mlp.fc1.weight"]
    assert by_name["head.weight"] == 1.0


def test_deepspeed_config_from_cfg():
    cfg = load_config(os.path.join(REPO, "configs/demo.yaml"), ["SOLVER.ACCUM_STEPS", "2", "SOLVER.CLIP_GRAD", "5.0",
                                                                 "ENGINE.ZERO_STAGE", "3"])  # fmt: skip
    ds = deepspeed_config(cfg, torch.device("cpu"), micro_batch=8)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 5.0 and ds["zero_optimization"]["stage"] == 3
    assert "fp16" not in ds and "torch_autocast" not in ds
    assert ds["timers"]["throughput"]["enabled"] is False  # it waits for the GPU twice per step
    assert "compute_grad_norm" not in ds["zero_optimization"]  # ZeRO-3 has no such option
    # ZeRO-1/2 without clipping: no gradient norm (nothing reads it; the guard catches NaN updates).
    zero2 = load_config(os.path.join(REPO, "configs/demo.yaml"), ["ENGINE.ZERO_STAGE", "2"])
    assert deepspeed_config(zero2, torch.device("cpu"))["zero_optimization"]["compute_grad_norm"] is False
    zero2.defrost()
    zero2.SOLVER.CLIP_GRAD = 1.0
    assert "compute_grad_norm" not in deepspeed_config(zero2, torch.device("cpu"))["zero_optimization"]
    bf16 = load_config(os.path.join(REPO, "configs/demo.yaml"), ["ENGINE.PRECISION", "bf16"])
    assert deepspeed_config(bf16, torch.device("cpu"))["torch_autocast"]["dtype"] == "bfloat16"
    fp16 = load_config(os.path.join(REPO, "configs/demo.yaml"), ["ENGINE.PRECISION", "fp16"])
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        deepspeed_config(fp16, torch.device("cpu"))
    assert deepspeed_config(fp16, torch.device("cuda"))["fp16"]["loss_scale"] == 0  # dynamic scaling


def test_only_complete_checkpoints_count(tmp_path):
    root = tmp_path / "checkpoints"
    for epoch, complete in ((1, True), (3, True), (4, False)):
        tag = root / checkpointing.tag_for_epoch(epoch)
        tag.mkdir(parents=True)
        if complete:
            checkpointing.write_json_atomic(str(tag / checkpointing.MARKER), {"epoch": epoch})
    assert checkpointing.latest_checkpoint(str(tmp_path)).endswith("epoch-0003")
    assert checkpointing.read_client_state(checkpointing.latest_checkpoint(str(tmp_path))) == {"epoch": 3}
    assert checkpointing.resolve_tag_dir(str(tmp_path)).endswith("epoch-0003")
    with pytest.raises(FileNotFoundError, match="complete checkpoint"):
        checkpointing.resolve_tag_dir(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .latest .*epoch-0003"):
        checkpointing.checkpoint_to_resume(str(tmp_path), auto_resume=False)
    assert checkpointing.checkpoint_to_resume(str(tmp_path), auto_resume=True).endswith("epoch-0003")
    assert checkpointing.checkpoint_to_resume(str(tmp_path / "fresh"), auto_resume=False) is None


class _FakeEngine:
    """What ``checkpointing.save`` asks of a DeepSpeed engine: a file per tag."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"weights")


def test_pruning_keeps_the_new_checkpoint_and_removes_markers_first(tmp_path, monkeypatch):
    out = str(tmp_path)
    for epoch in range(4):
        checkpointing.save(_FakeEngine(), out, epoch, {"epoch": epoch}, keep_last=1)
    assert [e for e, _ in checkpointing.complete_checkpoints(out)] == [2, 3]
    # A checkpoint numbered above the one being written is not the written one's elder: kept, and
    # the new one survives its own pruning.
    checkpointing.save(_FakeEngine(), out, 9, {"epoch": 9}, keep_last=1)
    checkpointing.save(_FakeEngine(), out, 4, {"epoch": 4}, keep_last=1)
    assert [e for e, _ in checkpointing.complete_checkpoints(out)] == [3, 4, 9]

    def killed(path, ignore_errors=False):  # the process dies while deleting the first old folder
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save(_FakeEngine(), out, 5, {"epoch": 5}, keep_last=1)
    # The half-deleted folder lost its marker first, so it no longer counts as a checkpoint.
    assert [e for e, _ in checkpointing.complete_checkpoints(out)] == [4, 5, 9]


def test_nonfinite_counts_continue_across_a_resume():
    from types import SimpleNamespace

    from hpm_video.engine.steps import NonFiniteGuard

    engine = SimpleNamespace(module=torch.nn.Linear(2, 2), client_optimizer=object())
    guard = NonFiniteGuard(3, engine)
    for loss in (1.0, float("nan"), float("nan")):
        guard.observe(torch.tensor(loss))
    saved = guard.state_dict()
    assert saved == {"total": 2, "in_row": 2}
    resumed = NonFiniteGuard(3, engine)
    resumed.load_state_dict(saved)
    assert resumed.check(0, 0) == 2  # the total goes on; nothing new to warn about
    resumed.observe(torch.tensor(float("nan")))  # the third in a row, counting those before the kill
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        resumed.check(0, 1)


def test_resumed_log_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    from hpm_video.engine.logger import RunLogger

    path = tmp_path / "log.jsonl"
    rows = [json.dumps({"kind": "train", "step": step, "loss": 1.0}) + "\n" for step in range(1, 6)]
    path.write_text("".join(rows) + '{"kind": "train", "st')  # the kill cut the last line
    RunLogger(str(tmp_path), enabled=True, tensorboard=False, resume_step=3).log(4, {"loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    RunLogger(str(tmp_path), enabled=True, tensorboard=False)  # no training run (a progress bar): kept
    assert len(path.read_text().splitlines()) == 4
    # Killed before its first checkpoint: the restart is a fresh start and repeats every step.
    RunLogger(str(tmp_path), enabled=True, tensorboard=False, resume_step=0).log(1, {"loss": 0.9})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


def test_epoch_streams_have_their_own_seeds():
    from hpm_video.engine.steps import MASK_STREAM, PROCESS_STREAM, epoch_seed

    seeds = {epoch_seed(0, 1, MASK_STREAM), epoch_seed(0, 1, PROCESS_STREAM, 0), epoch_seed(0, 1, PROCESS_STREAM, 1),
             epoch_seed(0, 2, MASK_STREAM)}  # fmt: skip
    assert len(seeds) == 4 and epoch_seed(0, 1, MASK_STREAM) == epoch_seed(0, 1, MASK_STREAM)


def test_compile_mode_reaches_torch_compile_and_bad_modes_are_refused():
    from hpm_video.engine.deepspeed_setup import compile_kwargs

    assert compile_kwargs(load_config(None, ["ENGINE.COMPILE", "True"])) == {}
    cfg = load_config(None, ["ENGINE.COMPILE", "True", "ENGINE.COMPILE_MODE", "max-autotune-no-cudagraphs"])
    assert compile_kwargs(cfg) == {"mode": "max-autotune-no-cudagraphs"}
    with pytest.raises(ValueError, match="ENGINE.COMPILE_MODE = 'fast'.*reduce-overhead"):
        load_config(None, ["ENGINE.COMPILE_MODE", "fast"])


def test_compile_with_zero3_and_alpha_out_of_range_are_refused():
    with pytest.raises(ValueError, match="ENGINE.COMPILE = True does not work with ENGINE.ZERO_STAGE = 3"):
        load_config(None, ["ENGINE.COMPILE", "True", "ENGINE.ZERO_STAGE", "3"])
    load_config(None, ["ENGINE.COMPILE", "True", "ENGINE.ZERO_STAGE", "2"])  # the compiled ZeRO stages
    with pytest.raises(ValueError, match=r"MASK.ALPHA_MAX = 1.5 must be in \[0, 1\]"):
        load_config(None, ["MASK.ALPHA_MAX", "1.5"])


@pytest.mark.parametrize("key", ["SOLVER.ACCUM_STEPS", "ENGINE.SAVE_EVERY_EPOCHS", "ENGINE.LOG_EVERY_STEPS",
                                 "ENGINE.VIS_EVERY_EPOCHS", "FINETUNE.EVAL_EVERY_EPOCHS"])  # fmt: skip
def test_zero_counts_and_periods_are_refused_when_loaded(key):
    """A period of 0 would divide by zero only after an epoch of work."""
    with pytest.raises(ValueError, match=f"config {key} = 0 must be >= 1"):
        load_config(None, [key, "0"])


def test_slurm_script_runs_from_the_submit_folder_not_its_spooled_copy(tmp_path):
    """sbatch runs a copy of the script from slurmd's spool folder; srun must still start run_pretrain.py."""
    import shutil
    import subprocess

    spool, fake_bin = tmp_path / "spool" / "job42", tmp_path / "bin"
    spool.mkdir(parents=True)
    fake_bin.mkdir()
    shutil.copy(os.path.join(REPO, "tools", "slurm_pretrain.sh"), spool / "slurm_script")
    # A long node list: a reader that stops after the first line would kill scontrol with SIGPIPE.
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho node-a\nseq -f 'node-%g' 20000\n")
    (fake_bin / "srun").write_text('#!/bin/sh\necho "cwd=$PWD master=$MASTER_ADDR:$MASTER_PORT args=$*"\n')
    for tool in ("scontrol", "srun"):
        (fake_bin / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": REPO,
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "42"}  # fmt: skip
    env.pop("MASTER_PORT", None)
    run = subprocess.run(["bash", str(spool / "slurm_script"), "configs/demo.yaml", "SOLVER.EPOCHS", "1"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (
        f"cwd={REPO} master=node-a:20042 args=--kill-on-bad-exit=1 python run_pretrain.py "
        "--config configs/demo.yaml SOLVER.EPOCHS 1"
    )
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)  # submitted from elsewhere: a clear refusal
    run = subprocess.run(["bash", str(spool / "slurm_script"), "configs/demo.yaml"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "submit the job from the hpm-video repository root" in run.stderr
