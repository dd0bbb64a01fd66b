"""The fine-tuning configs load, carry the published recipes' key settings, and write no value twice."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from hpm_video.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(REPO, "configs", "finetune")
LEAVES = sorted(p for p in glob.glob(os.path.join(FOLDER, "*.yaml")) if not os.path.basename(p).startswith("_"))


def test_every_config_loads():
    names = {os.path.basename(p) for p in LEAVES}
    for size in ("small", "base", "large"):
        assert {f"k400_vit_{size}.yaml", f"ssv2_vit_{size}.yaml"} <= names
    assert {"image_vit_base.yaml", "image_vit_large.yaml", "demo.yaml"} <= names
    for path in LEAVES:
        cfg = load_config(path)
        assert cfg.MODEL.NAME.startswith("hpm_vit_"), path


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_dataset_protocols(size):
    k400 = load_config(os.path.join(FOLDER, f"k400_vit_{size}.yaml"))
    assert (k400.DATA.SAMPLING, k400.DATA.SAMPLING_RATE, k400.DATA.FLIP) == ("dense", 4, True)
    assert (k400.DATA.TEST_NUM_SEGMENT, k400.DATA.TEST_NUM_CROP, k400.FINETUNE.NUM_CLASSES) == (5, 3, 400)
    ssv2 = load_config(os.path.join(FOLDER, f"ssv2_vit_{size}.yaml"))
    assert (ssv2.DATA.SAMPLING, ssv2.DATA.FLIP) == ("segment", False)  # no flip on SSv2
    assert (ssv2.DATA.TEST_NUM_SEGMENT, ssv2.DATA.TEST_NUM_CROP, ssv2.FINETUNE.NUM_CLASSES) == (2, 3, 174)
    for cfg in (k400, ssv2):
        assert cfg.MODEL.NAME == f"hpm_vit_{size}_patch16"
        assert (cfg.MODEL.NUM_FRAMES, cfg.MODEL.INPUT_SIZE, cfg.MODEL.DROP_PATH) == (16, 224, 0.1)
        assert (cfg.FINETUNE.MIXUP, cfg.FINETUNE.CUTMIX, cfg.FINETUNE.SMOOTHING, cfg.FINETUNE.REPROB) == (
            0.8, 1.0, 0.1, 0.25)  # fmt: skip
        assert cfg.FINETUNE.RAND_AUGMENT == "rand-m7-n4-mstd0.5-inc1"
        assert cfg.SOLVER.WARMUP_EPOCHS == 5 and cfg.SOLVER.WEIGHT_DECAY == 0.05
        assert cfg.SOLVER.BATCH_SIZE * cfg.DATA.NUM_SAMPLE % 2 == 0  # mixup pairs clips
    assert load_config(os.path.join(FOLDER, "k400_vit_base.yaml")).SOLVER.LAYER_DECAY == 0.75
    assert load_config(os.path.join(FOLDER, "ssv2_vit_small.yaml")).SOLVER.LAYER_DECAY == 0.7


def test_image_recipe():
    cfg = load_config(os.path.join(FOLDER, "image_vit_base.yaml"))
    assert cfg.DATA.DATASET == "image" and (cfg.MODEL.NUM_FRAMES, cfg.MODEL.TUBELET_SIZE) == (1, 1)
    assert cfg.SOLVER.LAYER_DECAY == 0.8  # HPM's image fine-tuning (DESIGN.md section 2)
    assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.BASE_LR, cfg.FINETUNE.NUM_CLASSES) == (100, 5e-4, 1000)


def _flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif key != "_BASE_":
            flat[prefix + key] = value
    return flat


def _chain(path: str) -> list[tuple[str, dict]]:
    """``[(file, flattened values)]`` from the file up through its ``_BASE_`` files."""
    out = []
    while path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        out.append((path, _flatten(raw)))
        base = raw.get("_BASE_")
        path = os.path.join(os.path.dirname(path), base) if base else ""
    return out


def test_no_value_is_written_twice():
    for leaf in LEAVES:
        chain = _chain(leaf)
        for i, (path, values) in enumerate(chain):
            for later_path, later in chain[i + 1 :]:
                same = {k for k in values if k in later and later[k] == values[k] and k != "OUTPUT_DIR"}
                assert not same, f"{os.path.basename(path)} repeats {sorted(same)} of {os.path.basename(later_path)}"
