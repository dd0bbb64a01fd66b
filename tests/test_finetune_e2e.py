"""A tiny fine-tune on the bundled clips through ``run_finetune.main``: initialisation from a pretraining
model file, train with mixup + EMA, single-view validation, multi-view test, ``--eval`` and resume
(CPU, fp32, ZeRO 0, one process)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

import run_finetune
from hpm_video.checkpoint import load_model_file, save_model_file
from hpm_video.models import HPMPretrainModel

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "datasets", "samples")
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

CONFIG = """_BASE_: {repo}/configs/finetune/demo.yaml
MODEL:
  INPUT_SIZE: 32
  NUM_FRAMES: 4
  EMBED_DIM: 48
  NUM_HEADS: 3
  DEPTH: 2
DATA:
  ROOT: {samples}
  TRAIN_LIST: {samples}/train.csv
  VAL_LIST: {samples}/val.csv
  NUM_WORKERS: 0
  NUM_SAMPLE: 2
  SHORT_SIDE_SIZE: 32
  TEST_NUM_SEGMENT: 2
  TEST_NUM_CROP: 2
SOLVER:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BATCH_SIZE: 2
  STEPS_PER_EPOCH: 2
FINETUNE:
  INIT: {init}
  CLASS_NAMES: {samples}/classes.txt
  MODEL_EMA: true
  MODEL_EMA_DECAY: 0.9
  EVAL_EVERY_EPOCHS: 1
  TEST_WEIGHTS: best
  EVAL_BATCH_SIZE: 4
ENGINE:
  SAVE_EVERY_EPOCHS: 1
  TENSORBOARD: false
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Pretraining weights, a config, and one fine-tuning run; the process-group variables restored after."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    pre = HPMPretrainModel(img_size=32, patch_size=16, num_frames=4, tubelet_size=2, encoder_embed_dim=48,
                           encoder_depth=2, encoder_num_heads=3, decoder_embed_dim=32, decoder_depth=1,
                           decoder_num_heads=2, masking="hpm")  # fmt: skip
    init = str(root / "pretrain" / "model_final.pth")
    save_model_file(init, pre, "hpm_pretrain_vit_tiny_patch16", img_size=32, num_frames=4)
    config = root / "tiny.yaml"
    config.write_text(CONFIG.format(repo=REPO, samples=SAMPLES, init=init))
    out = str(root / "out")
    code = run_finetune.main(["--config", str(config), "OUTPUT_DIR", out])
    assert code == 0
    yield str(config), out, pre, init
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def read_log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_and_multiview_test_write_everything(run):
    _, out, pre, _ = run
    with open(os.path.join(out, "eval.json")) as f:
        result = json.load(f)
    for key in ("top1", "top5", "mean_class_accuracy", "per_class_accuracy", "loss"):
        assert key in result
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert result["num_videos"] == result["num_videos_listed"] == 8
    assert result["views_per_video"] == 4 and result["incomplete_videos"] == 0
    assert result["class_names"] == ["bigbuckbunny", "bikes", "carphone"]
    assert result["checkpoint"].endswith("model_best.pth")  # TEST_WEIGHTS best

    with open(os.path.join(out, "predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["num_views"] for r in rows} == {"4"}
    labels = {}
    with open(os.path.join(SAMPLES, "val.csv")) as f:
        for line in f:
            path, label = line.split()
            labels[path] = int(label)
    assert {r["path"]: int(r["label"]) for r in rows} == labels  # labels come from the sample list
    top1 = 100 * sum(r["pred_1"] == r["label"] for r in rows) / len(rows)
    assert result["top1"] == pytest.approx(top1)
    for r in rows:  # top-3 of 3 classes: a probability distribution
        assert sum(float(r[f"score_{i}"]) for i in (1, 2, 3)) == pytest.approx(1.0, abs=1e-4)

    with open(os.path.join(out, "init_report.json")) as f:
        report = json.load(f)
    assert "blocks.1.mlp.fc2.weight" in report["loaded"]
    assert any(k.startswith("teacher.") for k in report["dropped"])
    assert report["head"] == "absent"

    log = read_log(out)
    kinds = {r["kind"] for r in log}
    assert {"train", "val_model", "val_ema"} <= kinds
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if r["kind"] == "train")
    assert {r["epoch"] for r in log if r["kind"] == "train"} == {0, 1}

    # Fine-tuning moved the weights away from the pretrained encoder; the final file rebuilds as a classifier.
    final = load_model_file(os.path.join(out, "model_final.pth"))
    assert not torch.equal(final.blocks[0].attn.qkv.weight, pre.encoder.blocks[0].attn.qkv.weight)
    tag = os.path.join(out, "checkpoints", "epoch-0001")
    assert os.path.isfile(os.path.join(tag, "COMPLETE")) and os.path.isfile(os.path.join(tag, "model_ema.pth"))
    with open(os.path.join(out, "model_best.json")) as f:
        assert json.load(f)["weights"] in ("model", "ema")


def test_eval_only_reproduces_the_test(run):
    config, out, _, init = run
    with open(os.path.join(out, "eval.json")) as f:
        before = json.load(f)
    os.unlink(os.path.join(out, "eval.json"))
    assert run_finetune.main(["--config", config, "--eval", "OUTPUT_DIR", out]) == 0
    with open(os.path.join(out, "eval.json")) as f:
        after = json.load(f)
    assert after["top1"] == before["top1"] and after["loss"] == pytest.approx(before["loss"], rel=1e-6)
    # The latest DeepSpeed checkpoint holds the same weights as model_final.pth.
    final = os.path.join(out, "model_final.pth")
    assert run_finetune.main(["--config", config, "--eval", "--checkpoint", final, "OUTPUT_DIR", out]) == 0
    with open(os.path.join(out, "eval.json")) as f:
        from_file = json.load(f)
    tag = os.path.join(out, "checkpoints", "epoch-0001")
    assert run_finetune.main(["--config", config, "--eval", "--checkpoint", tag, "OUTPUT_DIR", out]) == 0
    with open(os.path.join(out, "eval.json")) as f:
        from_tag = json.load(f)
    assert from_tag["loss"] == pytest.approx(from_file["loss"], rel=1e-6)
    # A pretrained encoder has no classifier head: refused, not silently scored.
    with pytest.raises(ValueError, match="no classifier head"):
        run_finetune.main(["--config", config, "--eval", "--checkpoint", init, "OUTPUT_DIR", out])


def test_resume_continues_at_the_next_epoch(run):
    config, out, _, _ = run
    assert run_finetune.main(["--config", config, "OUTPUT_DIR", out, "SOLVER.EPOCHS", "3",
                              "FINETUNE.FINAL_TEST", "False"]) == 0  # fmt: skip
    epochs = [r["epoch"] for r in read_log(out) if r["kind"] == "train"]
    assert epochs.count(0) == epochs.count(1) == epochs.count(2) == 2  # each epoch once (2 steps), none repeated
    assert os.path.isfile(os.path.join(out, "checkpoints", "epoch-0002", "COMPLETE"))


def test_image_path_from_an_mae_checkpoint(run, tmp_path):
    """Images as one-frame clips, initialised from an MAE-layout checkpoint (Conv2d patches, fused qkv
    bias, cls token, stored 2-D table): the table becomes a learned one and travels into the model files."""
    from PIL import Image
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    config = run[0]
    rng = torch.Generator().manual_seed(0)
    for c, name in enumerate(("cats", "dogs")):
        os.makedirs(tmp_path / "images" / name)
        for i in range(4):
            pixels = (torch.rand(40, 40, 3, generator=rng) * 127 + 128 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    torch.manual_seed(0)
    mae = TimmViT(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=0,
                  class_token=True, global_pool="token")  # fmt: skip
    state = dict(mae.state_dict(), mask_token=torch.zeros(1, 1, 32), **{"decoder_embed.weight": torch.zeros(32, 48)})
    init = str(tmp_path / "mae_pretrain.pth")
    torch.save({"model": state}, init)
    out = str(tmp_path / "out")
    images = str(tmp_path / "images")
    assert run_finetune.main([
        "--config", config, "OUTPUT_DIR", out, "DATA.DATASET", "image", "DATA.ROOT", images, "DATA.TRAIN_LIST",
        images, "DATA.VAL_LIST", images, "MODEL.NUM_FRAMES", "1", "MODEL.TUBELET_SIZE", "1", "FINETUNE.NUM_CLASSES",
        "2", "FINETUNE.INIT", init, "FINETUNE.CLASS_NAMES", "", "FINETUNE.MODEL_EMA", "False", "SOLVER.EPOCHS", "1",
        "SOLVER.BATCH_SIZE", "4", "FINETUNE.RAND_AUGMENT", "rand-m9-mstd0.5-inc1",
    ]) == 0  # fmt: skip
    with open(os.path.join(out, "init_report.json")) as f:
        report = json.load(f)
    assert report["kind"] == "mae-image" and "cls_token" in report["dropped"]
    final = load_model_file(os.path.join(out, "model_final.pth"))
    assert final.pos_embed_kind == "learned" and final.pos_embed.shape == (1, 4, 48)
    with open(os.path.join(out, "eval.json")) as f:
        result = json.load(f)
    assert result["num_videos"] == 8 and result["views_per_video"] == 1 and result["num_crops"] == 1


def test_linear_probe_trains_only_the_head(run, tmp_path):
    config, _, pre, _ = run
    out = str(tmp_path / "probe")
    assert run_finetune.main([
        "--config", config, "OUTPUT_DIR", out, "FINETUNE.LINEAR_PROBE", "True", "FINETUNE.MODEL_EMA", "False",
        "FINETUNE.MIXUP", "0.0", "FINETUNE.CUTMIX", "0.0", "SOLVER.EPOCHS", "1", "SOLVER.WEIGHT_DECAY", "0.0",
        "SOLVER.BASE_LR", "25.0", "FINETUNE.FINAL_TEST", "False",
    ]) == 0  # fmt: skip
    probe = load_model_file(os.path.join(out, "model_final.pth"))  # BatchNorm folded: a plain classifier
    assert torch.equal(probe.blocks[1].mlp.fc1.weight, pre.encoder.blocks[1].mlp.fc1.weight)
    assert torch.equal(probe.patch_embed.proj.weight, pre.encoder.patch_embed.proj.weight)
    assert isinstance(probe.head, torch.nn.Linear)


def test_bad_settings_are_refused(run, tmp_path):
    config = run[0]
    out = ["OUTPUT_DIR", str(tmp_path / "refused")]
    with pytest.raises(ValueError, match="MODEL_EMA needs whole weights"):
        run_finetune.main(["--config", config, "ENGINE.ZERO_STAGE", "3", *out])
    with pytest.raises(ValueError, match="pretraining model; fine-tuning needs a classifier"):
        run_finetune.main(["--config", config, "MODEL.NAME", "hpm_pretrain_vit_tiny_patch16", *out])
    with pytest.raises(ValueError, match="DATA.FLIP is on for Something-Something-v2"):
        run_finetune.main(["--config", config, "DATA.DATASET", "ssv2", "DATA.FLIP", "True", *out])
    with pytest.raises(ValueError, match=r"FINETUNE.INIT_POS_GRID = \[8, 14\] must be empty or three positive"):
        run_finetune.main(["--config", config, "FINETUNE.INIT_POS_GRID", "[8, 14]", *out])
    assert not os.path.exists(out[1])  # refused before anything was written
    with pytest.raises(ValueError, match="even number of clips"):
        run_finetune.main(["--config", config, "SOLVER.BATCH_SIZE", "1", "DATA.NUM_SAMPLE", "1", "FINETUNE.INIT", "",
                           *out])  # fmt: skip
    with pytest.raises(ValueError, match="label 2 but FINETUNE.NUM_CLASSES is 2"):
        run_finetune.main(["--config", config, "FINETUNE.NUM_CLASSES", "2", "FINETUNE.INIT", "", *out])
    assert run_finetune.main(["--config", config, "FINETUNE.POS_EMBED", "fixed", *out]) == 2  # bad choice: usage error
