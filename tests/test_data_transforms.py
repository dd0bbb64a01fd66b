"""Clip transforms: one random draw per clip, same op on every frame, the right crop geometry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hpm_video.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EvalTransform,
    FinetuneTrainTransform,
    MultiScaleCrop,
    PretrainTransform,
    TubeRandomErasing,
    VideoRandAugment,
    frames_to_clip,
    long_side_crop_offsets,
    normalize_clip,
    seeded_globals,
    short_side_resize,
)


def _textured_frame(h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((6, 6, 1), np.uint8))[:h, :w])


def _static_clip(t: int = 6, h: int = 90, w: int = 120) -> np.ndarray:
    return np.stack([_textured_frame(h, w)] * t)


def _all_frames_equal(x: torch.Tensor | np.ndarray, time_axis: int) -> bool:
    x = torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x
    first = x.select(time_axis, 0)
    return all(torch.equal(x.select(time_axis, t), first) for t in range(x.shape[time_axis]))


def test_rand_augment_applies_the_same_ops_to_every_frame() -> None:
    ra = VideoRandAugment("rand-m7-n4-mstd0.5-inc1")
    clip = _static_clip()
    changed = 0
    for seed in range(12):
        out = ra(clip, np.random.default_rng(seed))
        assert out.shape == clip.shape and out.dtype == np.uint8
        assert _all_frames_equal(out, 0), f"seed {seed}: frames diverged"
        changed += int(not np.array_equal(out[0], clip[0]))
    assert changed >= 8  # it really augments (n=4 ops, each applied with p=0.5)


def test_rand_augment_is_deterministic_and_restores_global_rngs() -> None:
    ra = VideoRandAugment()
    clip = _static_clip(t=2)
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    a = ra(clip, np.random.default_rng(5))
    after = (random.random(), np.random.rand())
    assert before == after  # global RNG streams untouched
    b = ra(clip, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    different = [not np.array_equal(a, ra(clip, np.random.default_rng(s))) for s in range(6, 12)]
    assert any(different)


def test_finetune_train_transform_keeps_static_clip_static() -> None:
    tf = FinetuneTrainTransform(input_size=64, flip=True, reprob=1.0)
    clip = _static_clip()
    for seed in range(6):
        with seeded_globals(seed):
            out = tf(clip, np.random.default_rng(seed))
        assert out.shape == (3, 6, 64, 64) and out.dtype == torch.float32
        assert _all_frames_equal(out, 1), f"seed {seed}: crop/flip/erase differed between frames"


def test_tube_erasing_uses_one_box_for_all_frames() -> None:
    erase = TubeRandomErasing(probability=1.0, mode="const")
    clip = torch.ones(3, 5, 40, 40)
    erase(clip, np.random.default_rng(0))
    mask = clip != 1  # const mode fills with zeros
    assert mask.any()
    assert all(torch.equal(mask[:, t], mask[:, 0]) for t in range(5))
    never = TubeRandomErasing(probability=0.0)
    untouched = torch.ones(3, 2, 8, 8)
    assert torch.equal(never(untouched, np.random.default_rng(0)), torch.ones(3, 2, 8, 8))
    noisy = torch.zeros(3, 4, 40, 40)
    TubeRandomErasing(probability=1.0, mode="pixel")(noisy, np.random.default_rng(1))
    assert noisy.abs().sum() > 0 and all(torch.equal(noisy[:, t], noisy[:, 0]) for t in range(4))


def test_multiscale_crop_sizes_and_fixed_positions() -> None:
    crop = MultiScaleCrop(112, scales=(1.0, 0.875, 0.75, 0.66))
    h, w = 240, 320
    sizes = crop.crop_sizes(h, w)
    assert sizes == [240, 210, 180, 158]
    rng = np.random.default_rng(0)
    seen_pairs, seen_pos = set(), set()
    for _ in range(2000):
        top, left, ch, cw = crop.sample(h, w, rng)
        i, j = sizes.index(ch), sizes.index(cw)
        assert abs(i - j) <= 1  # at most one scale step of aspect distortion
        step_h, step_w = (h - ch) // 4, (w - cw) // 4
        assert top % max(step_h, 1) == 0 and left % max(step_w, 1) == 0
        assert 0 <= top <= h - ch and 0 <= left <= w - cw
        seen_pairs.add((i, j))
        if (ch, cw) == (180, 180):
            seen_pos.add((top // step_h, left // step_w))
    assert len(seen_pairs) == 10  # 4 diagonal + 6 off-by-one pairs
    assert len(seen_pos) == 13  # corners, centre, edge midpoints, quarter points


def test_multiscale_crop_snaps_sizes_near_output() -> None:
    assert MultiScaleCrop(224).crop_sizes(256, 340)[1] == 224  # int(256 * .875) = 224
    assert MultiScaleCrop(224).crop_sizes(258, 340)[1] == 224  # 225 is within 3 px: snapped


def test_pretrain_transform_shape_and_normalisation() -> None:
    grey = np.full((4, 60, 80, 3), 128, np.uint8)
    out = PretrainTransform(input_size=32)(grey, np.random.default_rng(0))
    assert out.shape == (3, 4, 32, 32)
    expected = (128 / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(out[:, 0, 0, 0], expected)


def test_eval_crops_are_spaced_along_long_side() -> None:
    assert long_side_crop_offsets(100, 200, 100, 3) == [(0, 0), (0, 50), (0, 100)]
    assert long_side_crop_offsets(200, 100, 100, 3) == [(0, 0), (50, 0), (100, 0)]
    assert long_side_crop_offsets(120, 200, 100, 1) == [(10, 50)]
    with pytest.raises(ValueError):
        long_side_crop_offsets(50, 200, 100, 3)

    # A horizontal ramp: each crop's mean value tells where along the width it was taken.
    ramp = np.tile(np.linspace(0, 255, 200).astype(np.uint8)[None, None, :, None], (2, 100, 1, 3))
    tf = EvalTransform(input_size=50, short_side_size=50, num_crop=3, mean=(0, 0, 0), std=(1, 1, 1))
    resized = tf.resize(ramp)
    assert tuple(resized.shape) == (2, 3, 50, 100)
    means = [tf.crop(resized, c).mean().item() for c in range(3)]
    assert means[0] < means[1] < means[2]
    assert means[1] == pytest.approx(0.5, abs=0.02)


def test_short_side_resize_keeps_aspect() -> None:
    clip = frames_to_clip(np.zeros((2, 240, 426, 3), np.uint8))
    assert tuple(short_side_resize(clip, 120).shape) == (2, 3, 120, 213)
    tall = frames_to_clip(np.zeros((1, 300, 150, 3), np.uint8))
    assert tuple(short_side_resize(tall, 64).shape) == (1, 3, 128, 64)


def test_normalize_layout_is_c_t_h_w() -> None:
    clip = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    clip[2] = 255
    out = normalize_clip(clip, (0, 0, 0), (1, 1, 1))
    assert out.shape == (3, 5, 4, 4)
    assert out[:, 2].eq(1).all() and out[:, 1].eq(0).all()


def test_seeded_globals_restores_state() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with seeded_globals(99):
        inside = torch.rand(1)
    assert torch.equal(torch.rand(3), expected)
    with seeded_globals(99):
        assert torch.equal(torch.rand(1), inside)
