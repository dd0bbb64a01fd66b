"""Video and image datasets on the bundled real clips, and their handling of bad input."""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_fixtures import (  # noqa: E402
    SAMPLES,
    TRAIN_LIST,
    copy_samples,
    make_bad_files,
    sample_entries,
    write_list,
)

from hpm_video.data import ImageDataset, VideoFinetuneDataset, VideoPretrainDataset, collate_clips  # noqa: E402
from hpm_video.data.decoding import PyAVReader, open_video  # noqa: E402
from hpm_video.data.sampling import dense_test_indices, segment_test_indices  # noqa: E402
from hpm_video.data.transforms import EvalTransform  # noqa: E402

SMALL = dict(num_frames=4, sampling_rate=2, input_size=48)


def test_pretrain_items_on_sample_clips() -> None:
    ds = VideoPretrainDataset(TRAIN_LIST, SAMPLES, num_sample=2, **SMALL)
    assert len(ds) == len(sample_entries()) >= 6
    for i in range(len(ds)):
        item = ds[(i, 1000 + i)]
        assert set(item) == {"video", "skipped", "short"}
        video = item["video"]
        assert video.shape == (2, 3, 4, 48, 48) and video.dtype == torch.float32
        assert torch.isfinite(video).all() and item["skipped"] == 0 and item["short"] == 0
        assert not torch.equal(video[0], video[1])  # repeated augmentation: each clip its own start/crop
    a, b = ds[(3, 7)], ds[(3, 7)]
    assert torch.equal(a["video"], b["video"])  # an item is a function of (index, seed)
    assert not torch.equal(a["video"], ds[(3, 8)]["video"])
    assert ds[2]["video"].shape == (2, 3, 4, 48, 48)  # a bare index works too


def test_pretrain_short_clip_is_padded_and_counted(tmp_path, caplog) -> None:
    lst = write_list(str(tmp_path / "short.csv"), [("bbb_03_vp9.webm", 0)])  # 31 frames
    ds = VideoPretrainDataset(lst, SAMPLES, num_frames=16, sampling_rate=4, input_size=32, num_sample=3)
    with caplog.at_level(logging.WARNING, logger="hpm_video.data"):
        item = ds[(0, 0)]
        ds[(0, 1)]
    assert item["short"] == 3 and item["skipped"] == 0
    assert item["video"].shape == (3, 3, 16, 32, 32)
    # Frames past the end repeat the last frame: indices 0..28 step 4, then 30 eight times.
    last = item["video"][:, :, 8:]
    assert torch.equal(last, last[:, :, :1].expand_as(last))
    assert sum("only 31 frames" in r.getMessage() for r in caplog.records) == 1  # logged once


@pytest.mark.parametrize("sampling", ["dense", "segment"])
def test_finetune_train_items(sampling: str) -> None:
    entries = sample_entries()
    ds = VideoFinetuneDataset(
        TRAIN_LIST, SAMPLES, mode="train", sampling=sampling, num_sample=2, flip=sampling == "dense", **SMALL
    )
    assert len(ds) == len(entries)
    for i in range(len(ds)):
        item = ds[(i, i)]
        assert item["video"].shape == (2, 3, 4, 48, 48)
        assert item["label"] == entries[i][1]
        assert item["skipped"] == 0


def test_finetune_val_is_one_deterministic_center_view() -> None:
    ds = VideoFinetuneDataset(TRAIN_LIST, SAMPLES, mode="val", sampling="dense", short_side_size=56, **SMALL)
    assert len(ds) == len(sample_entries())
    item = ds[(1, 0)]
    assert item["video"].shape == (3, 4, 48, 48)
    assert (item["video_id"], item["view"], item["label"]) == (1, 0, sample_entries()[1][1])
    assert torch.equal(item["video"], ds[(1, 12345)]["video"])


@pytest.mark.parametrize("sampling, num_segment", [("dense", 2), ("segment", 2)])
def test_test_views_cover_segments_and_crops(tmp_path, sampling: str, num_segment: int) -> None:
    entries = [("bikes_01.mp4", 1), ("carphone_01.mp4", 2)]  # 564x240 and 176x144, both wider than tall
    lst = write_list(str(tmp_path / "test.csv"), entries)
    ds = VideoFinetuneDataset(
        lst,
        SAMPLES,
        mode="test",
        sampling=sampling,
        num_segment=num_segment,
        num_crop=3,
        input_size=48,
        short_side_size=48,
        num_frames=4,
        sampling_rate=4,
        backend="pyav",
    )
    assert len(ds) == 2 * num_segment * 3
    items = [ds[i] for i in range(len(ds))]
    assert sorted((it["video_id"], it["view"]) for it in items) == [
        (v, w) for v in range(2) for w in range(num_segment * 3)
    ]
    assert [it["label"] for it in items] == [1] * (num_segment * 3) + [2] * (num_segment * 3)

    # Rebuild every view by hand: which frames (segment) and where (crop) must match the item.
    eval_tf = EvalTransform(48, 48, 3)
    for it in items:
        name = entries[it["video_id"]][0]
        segment, crop = divmod(it["view"], 3)
        with open_video(os.path.join(SAMPLES, name), backend="pyav") as r:
            if sampling == "dense":
                idx = dense_test_indices(r.num_frames, 4, 4, num_segment, segment)
            else:
                idx = segment_test_indices(r.num_frames, 4, num_segment, segment)
            expected = eval_tf.crop(eval_tf.resize(r.get_frames(idx)), crop)
        torch.testing.assert_close(it["video"], expected)
    # Views really differ: other crop, other temporal segment.
    assert not torch.equal(items[0]["video"], items[1]["video"])
    assert not torch.equal(items[0]["video"], items[3]["video"])

    batch = collate_clips(items[:6])
    assert batch["video"].shape == (6, 3, 4, 48, 48)
    assert batch["view"].tolist() == list(range(6))


def _bad_list(tmp_path) -> tuple[str, str, dict[str, str]]:
    root = copy_samples(str(tmp_path / "root"))
    bad = make_bad_files(os.path.join(root, "bad"))
    entries = sample_entries()[:3] + [(os.path.relpath(p, root), 0) for p in bad.values()]
    return write_list(str(tmp_path / "mixed.csv"), entries), root, bad


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_bad_files_are_skipped_counted_and_logged_once(tmp_path, caplog, backend: str) -> None:
    lst, root, bad = _bad_list(tmp_path)
    ds = VideoPretrainDataset(lst, root, num_sample=1, backend=backend, decode_timeout_s=20.0, **SMALL)
    with caplog.at_level(logging.WARNING, logger="hpm_video.data"):
        skipped = []
        for i in range(len(ds)):
            item = ds[(i, 10 * i)]
            assert item["video"].shape == (1, 3, 4, 48, 48) and torch.isfinite(item["video"]).all()
            skipped.append(item["skipped"])
        for i in range(3, len(ds)):  # the second pass over the bad files logs nothing new
            ds[(i, 10 * i + 1)]
    assert skipped[:3] == [0, 0, 0]
    assert all(s >= 1 for s in skipped[3:]), skipped  # each bad entry was skipped, never returned
    assert ds.num_skipped >= 2 * len(bad)
    for kind, path in bad.items():
        logged = [r for r in caplog.records if path in r.getMessage()]
        assert len(logged) == 1, f"{kind}: logged {len(logged)} times"


def test_too_many_consecutive_failures_raise(tmp_path) -> None:
    bad = make_bad_files(str(tmp_path))
    lst = write_list(str(tmp_path / "bad.csv"), [(os.path.basename(p), 0) for p in bad.values()])
    ds = VideoPretrainDataset(lst, str(tmp_path), max_retries=3, backend="pyav", **SMALL)
    with pytest.raises(RuntimeError, match=r"4 consecutive unreadable videos.*max_retries=3"):
        ds[(0, 0)]


def test_eval_replaces_bad_video_by_next_one(tmp_path) -> None:
    root = copy_samples(str(tmp_path / "root"))
    open(os.path.join(root, "empty.mp4"), "wb").close()
    lst = write_list(str(tmp_path / "val.csv"), [("empty.mp4", 0), ("bikes_02.mp4", 1), ("bbb_01.mp4", 0)])
    ds = VideoFinetuneDataset(
        lst, root, mode="test", sampling="segment", num_segment=1, num_crop=2, short_side_size=48, **SMALL
    )
    first, second, third = ds[0], ds[1], ds[2]
    assert (first["video_id"], first["label"], first["skipped"], first["view"]) == (1, 1, 1, 0)
    assert (second["video_id"], second["skipped"], second["view"]) == (
        1,
        0,
        1,
    )  # served from the decode cache
    assert torch.equal(first["video"], ds[0]["video"])  # deterministic replacement
    assert (third["video_id"], third["skipped"]) == (1, 0)
    torch.testing.assert_close(first["video"], third["video"])  # same view of the replacement video


def test_decode_time_limit_inside_dataset(tmp_path, monkeypatch) -> None:
    root = copy_samples(str(tmp_path / "root"))
    lst = write_list(str(tmp_path / "l.csv"), [("bikes_01.mp4", 1), ("bikes_02.mp4", 1)])
    release = threading.Event()
    real = PyAVReader._read_sorted

    def hang_on_first(self, indices):
        if self.path.endswith("bikes_01.mp4"):
            release.wait(10)
        return real(self, indices)

    monkeypatch.setattr(PyAVReader, "_read_sorted", hang_on_first)
    ds = VideoFinetuneDataset(
        lst, root, mode="val", backend="pyav", decode_timeout_s=0.3, short_side_size=48, **SMALL
    )
    item = ds[0]
    release.set()
    assert item["skipped"] == 1 and item["video_id"] == 1


def _make_image_tree(root: str) -> list[tuple[str, int]]:
    entries = []
    for label, (name, _) in enumerate([("bbb_01.mp4", 0), ("bikes_01.mp4", 1)]):
        cls = ["bunny", "street"][label]
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        frames = open_video(os.path.join(SAMPLES, name), backend="pyav").get_frames([0, 30, 60])
        for k, frame in enumerate(frames):
            rel = f"{cls}/img_{k}.{'png' if k % 2 else 'jpg'}"
            Image.fromarray(frame).save(os.path.join(root, rel))
            entries.append((rel, label))
    return entries


def test_image_dataset_folder_and_list(tmp_path) -> None:
    root = str(tmp_path / "images")
    entries = _make_image_tree(root)
    train = ImageDataset(root, input_size=32, train=True)
    assert train.classes == ["bunny", "street"] and len(train) == 6
    item = train[(0, 3)]
    assert item["video"].shape == (3, 1, 32, 32) and item["label"] == 0 and item["skipped"] == 0
    assert torch.equal(item["video"], train[(0, 3)]["video"])
    assert not torch.equal(item["video"], train[(0, 4)]["video"])

    lst = write_list(str(tmp_path / "images" / "list.csv"), entries)
    val = ImageDataset(lst, input_size=32, train=False)
    assert [val[i]["label"] for i in range(len(val))] == [label for _, label in entries]
    assert torch.equal(val[(4, 1)]["video"], val[(4, 2)]["video"])  # eval is deterministic
    batch = collate_clips([val[i] for i in range(4)])
    assert batch["video"].shape == (4, 3, 1, 32, 32)


def _png_with_damaged_second_idat() -> bytes:
    """A PNG that opens but fails in ``load()`` with SyntaxError, not OSError."""
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # > one 64 KiB IDAT
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    pos, idats = 8, []  # chunks: 4-byte length, 4-byte type, data, 4-byte CRC
    while pos < len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        if data[pos + 4 : pos + 8] == b"IDAT":
            idats.append(pos)
        pos += 12 + length
    data[idats[1] + 4 : idats[1] + 8] = b"\x07G\x81<"
    return bytes(data)


def test_image_dataset_skips_bad_images(tmp_path, caplog) -> None:
    root = str(tmp_path / "images")
    entries = _make_image_tree(root)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    png = (tmp_path / "images" / "bunny" / "img_1.png").read_bytes()
    (tmp_path / "images" / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "images" / "bad_chunk.png").write_bytes(_png_with_damaged_second_idat())
    lst = write_list(
        str(tmp_path / "images" / "list.csv"),
        [("broken.jpg", 0), ("cut.png", 0), ("missing.png", 1), ("bad_chunk.png", 1)] + entries,
    )
    ds = ImageDataset(lst, input_size=32, train=False)
    with caplog.at_level(logging.WARNING, logger="hpm_video.data"):
        first = ds[0]
    assert first["skipped"] == 4 and first["label"] == entries[0][1]
    assert sum("skipping unreadable image" in r.getMessage() for r in caplog.records) == 4
    with pytest.raises(ValueError, match="outside the data root"):
        ImageDataset(write_list(str(tmp_path / "images" / "evil.csv"), [("../x.png", 0)]), input_size=32)


def test_malformed_list_fails_fast_with_line_number(tmp_path) -> None:
    lst = tmp_path / "broken.csv"
    lst.write_text("bbb_01.mp4 0\nbikes_01.mp4\n")
    with pytest.raises(ValueError, match=r"broken\.csv:2: expected 'path label'"):
        VideoPretrainDataset(str(lst), SAMPLES, **SMALL)
    with pytest.raises(ValueError, match=r"broken\.csv:2:"):
        VideoFinetuneDataset(str(lst), SAMPLES, mode="test", **SMALL)
