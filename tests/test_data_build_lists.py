"""tools/build_lists.py: lists from folders, Kinetics CSV and SSv2 JSON, with bad files reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_fixtures import REPO, SAMPLES, make_bad_files  # noqa: E402
from tool_helpers import load_tool  # noqa: E402

from hpm_video.data import VideoFinetuneDataset, read_list  # noqa: E402

build_lists = load_tool("build_lists")


def _run(argv: list[str], capsys) -> tuple[int, dict]:
    code = build_lists.main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_folder_tree(tmp_path, capsys) -> None:
    root = tmp_path / "tree"
    for cls, names in {"bunny": ["bbb_01.mp4", "bbb_03_vp9.webm"], "street": ["bikes_01.mp4"]}.items():
        (root / cls).mkdir(parents=True)
        for n in names:
            shutil.copy(os.path.join(SAMPLES, n), root / cls / n)
    bad = make_bad_files(str(tmp_path / "bad"))
    shutil.copy(bad["garbage"], root / "street" / "garbage.mp4")
    shutil.copy(bad["zero_byte"], root / "street" / "empty.mp4")
    (root / "street" / "notes.txt").write_text("not a video")
    (root / "with space").mkdir()
    shutil.copy(os.path.join(SAMPLES, "carphone_01.mp4"), root / "with space" / "c.mp4")

    out = str(tmp_path / "lists" / "train.csv")
    code, report = _run(["folder", "--root", str(root), "--out", out], capsys)
    assert code == 0
    assert open(out).read().splitlines() == [
        "bunny/bbb_01.mp4 0",
        "bunny/bbb_03_vp9.webm 0",
        "street/bikes_01.mp4 1",
    ]
    assert open(tmp_path / "lists" / "classes.txt").read().split("\n")[:3] == [
        "bunny",
        "street",
        "with space",
    ]
    assert report["written"] == 3
    assert report["unreadable"]["count"] == 2
    assert any("garbage.mp4" in s for s in report["unreadable"]["first"])
    assert any("empty" in s for s in report["unreadable"]["first"])
    assert report["whitespace_in_path"] == {"count": 1, "first": ["with space/c.mp4"]}
    # The written list loads straight into a dataset.
    assert len(read_list(out, str(root))) == 3


def test_kinetics_csv(tmp_path, capsys) -> None:
    root = tmp_path / "k400"
    (root / "riding_a_bike").mkdir(parents=True)
    shutil.copy(
        os.path.join(SAMPLES, "bikes_01.mp4"), root / "riding_a_bike" / "abcdefghijk_000010_000020.mp4"
    )
    shutil.copy(os.path.join(SAMPLES, "bbb_01.mp4"), root / "zzzzzzzzzzz_000003_000013.mp4")  # flat layout
    trunc = make_bad_files(str(tmp_path / "bad"))["truncated"]
    (root / "abseiling").mkdir()
    shutil.copy(trunc, root / "abseiling" / "trunc_id_00_000000_000010.mp4")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "riding a bike,abcdefghijk,10,20,train\n"
        "abseiling,zzzzzzzzzzz,3,13,train\n"
        "abseiling,missingvid00,0,10,train\n"
        "abseiling,trunc_id_00,0,10,train\n"
        "abseiling,,0,10,train\n"
    )
    out = str(tmp_path / "out" / "train.csv")
    code, report = _run(["kinetics", "--csv", str(csv_path), "--root", str(root), "--out", out], capsys)
    assert code == 0
    assert open(tmp_path / "out" / "classes.txt").read().splitlines() == ["abseiling", "riding a bike"]
    assert open(out).read().splitlines() == [
        "riding_a_bike/abcdefghijk_000010_000020.mp4 1",
        "zzzzzzzzzzz_000003_000013.mp4 0",
    ]
    assert report["missing"]["count"] == 1 and "missingvid00_000000_000010" in report["missing"]["first"][0]
    assert report["unreadable"]["count"] == 1 and "truncated" in report["unreadable"]["first"][0]
    assert report["bad_annotation_rows"]["count"] == 1 and ":6:" in report["bad_annotation_rows"]["first"][0]

    # The validation split reuses the train class list so labels agree.
    val_csv = tmp_path / "validate.csv"
    val_csv.write_text(
        "label,youtube_id,time_start,time_end,split\nriding a bike,abcdefghijk,10,20,val\n"
        "juggling fire,abcdefghijk,10,20,val\n"
    )
    val_out = str(tmp_path / "out" / "val.csv")
    code, report = _run(
        [
            "kinetics",
            "--csv",
            str(val_csv),
            "--root",
            str(root),
            "--out",
            val_out,
            "--classes",
            str(tmp_path / "out" / "classes.txt"),
        ],
        capsys,
    )
    assert open(val_out).read().splitlines() == ["riding_a_bike/abcdefghijk_000010_000020.mp4 1"]
    assert "not in the class list" in report["bad_annotation_rows"]["first"][0]


def test_ssv2_json(tmp_path, capsys) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    shutil.copy(os.path.join(SAMPLES, "carphone_02_vp9.webm"), root / "101.webm")
    shutil.copy(os.path.join(SAMPLES, "bbb_03_vp9.webm"), root / "202.webm")
    (root / "303.webm").write_bytes(b"")
    labels = {"Holding something next to something": "0", "Pushing something from left to right": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    train = [
        {
            "id": "101",
            "label": "holding a phone next to a face",
            "template": "Holding [something] next to [something]",
            "placeholders": ["a phone", "a face"],
        },
        {"id": "202", "label": "pushing a rabbit", "template": "Pushing [something] from left to right"},
        {"id": "303", "label": "x", "template": "Pushing [something] from left to right"},
        {"id": "404", "label": "y", "template": "Holding [something] next to [something]"},
        {"id": "505", "label": "z", "template": "Spinning [something] that quickly stops spinning"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    out = str(tmp_path / "train.csv")
    code, report = _run(
        [
            "ssv2",
            "--labels",
            str(tmp_path / "labels.json"),
            "--annotations",
            str(tmp_path / "train.json"),
            "--root",
            str(root),
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0
    assert open(out).read().splitlines() == ["101.webm 0", "202.webm 1"]
    assert report["missing"]["count"] == 1 and report["missing"]["first"][0].endswith("404.webm")
    assert report["unreadable"]["count"] == 1 and "303.webm" in report["unreadable"]["first"][0]
    assert report["bad_annotation_rows"]["count"] == 1
    ds = VideoFinetuneDataset(
        out, str(root), mode="val", sampling="segment", num_frames=4, input_size=32, short_side_size=32
    )
    assert ds[0]["label"] == 0 and ds[1]["video"].shape == (3, 4, 32, 32)


def test_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "build_lists.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "kinetics" in result.stdout and "ssv2" in result.stdout and "folder" in result.stdout
