"""Annotation lists: parsing, line-numbered errors, and paths confined to the root."""

from __future__ import annotations

import os

import pytest

from hpm_video.data.annotations import format_list_line, read_list, resolve_under_root


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_reads_relative_and_absolute_paths(tmp_path) -> None:
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    inside_abs = str(root / "sub" / "c.mp4")
    lst = _write(tmp_path / "train.csv", f"a.mp4 0\n\n# a comment\nsub/b.webm 3\n{inside_abs} 12\n")
    assert read_list(lst, str(root)) == [
        (str(root / "a.mp4"), 0),
        (str(root / "sub" / "b.webm"), 3),
        (inside_abs, 12),
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("only_a_path.mp4", "expected 'path label'"),
        ("a b.mp4 3", "got 3 field"),
        ("a.mp4 cat", "not an integer"),
        ("a.mp4 -1", "negative"),
        ("a.mp4 1.5", "not an integer"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line: str, message: str) -> None:
    lst = _write(tmp_path / "list.csv", f"ok1.mp4 0\nok2.mp4 1\n{bad_line}\nok3.mp4 2\n")
    with pytest.raises(ValueError, match=message) as info:
        read_list(lst, str(tmp_path))
    assert f"{lst}:3:" in str(info.value)


@pytest.mark.parametrize("escaping", ["../outside.mp4", "a/../../outside.mp4", "/etc/passwd"])
def test_path_escaping_root_is_refused(tmp_path, escaping: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    lst = _write(tmp_path / "list.csv", f"fine.mp4 0\n{escaping} 1\n")
    with pytest.raises(ValueError, match="outside the data root") as info:
        read_list(lst, str(root))
    assert f"{lst}:2:" in str(info.value)


def test_dotdot_that_stays_inside_root_is_fine(tmp_path) -> None:
    assert resolve_under_root("a/../b.mp4", str(tmp_path)) == os.path.join(str(tmp_path), "b.mp4")
    # A sibling folder whose name starts with the root's name is still outside.
    with pytest.raises(ValueError):
        resolve_under_root(str(tmp_path) + "_evil/x.mp4", str(tmp_path))


def test_missing_and_empty_lists(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        read_list(str(tmp_path / "nope.csv"), str(tmp_path))
    with pytest.raises(ValueError, match="no entries"):
        read_list(_write(tmp_path / "empty.csv", "\n# nothing\n"), str(tmp_path))


def test_format_list_line_refuses_spaces() -> None:
    assert format_list_line("a/b.mp4", 4) == "a/b.mp4 4"
    with pytest.raises(ValueError, match="whitespace"):
        format_list_line("air drumming/x.mp4", 1)
