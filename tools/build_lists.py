#!/usr/bin/env python
"""Write VideoMAE-style annotation lists (``path label`` per line) and report files that cannot be used.

Three sources:

  folder    a class-per-folder tree: ROOT/<class>/<video>; classes sorted by name get labels 0..N-1
  kinetics  the official Kinetics-400 CSV (label,youtube_id,time_start,time_end,split); videos named
            <youtube_id>_<start:06d>_<end:06d>.<ext>, under ROOT/<class>/ (class spelled as in the CSV
            or with spaces replaced by '_') or directly in ROOT
  ssv2      the official Something-Something-v2 JSON files: labels.json (template -> id) and
            train.json / validation.json ([{"id", "template", ...}]); videos ROOT/<id>.webm

Every listed file is checked (``--check``): missing, empty or unreadable files are reported (count and
the first few paths) and left out of the list, as are paths containing whitespace, which the list format
cannot hold. Paths are written relative to ROOT unless ``--absolute``.

Examples:
  python tools/build_lists.py folder --root data/k400/train --out data/k400/train.csv
  python tools/build_lists.py kinetics --csv kinetics400/train.csv --root data/k400/train \\
      --out data/k400/train.csv --classes-out data/k400/classes.txt
  python tools/build_lists.py kinetics --csv kinetics400/validate.csv --root data/k400/val \\
      --classes data/k400/classes.txt --out data/k400/val.csv
  python tools/build_lists.py ssv2 --labels labels.json --annotations train.json \\
      --root data/ssv2/videos --out data/ssv2/train.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# hpm_video (and with it torch) is imported inside the functions that need it, so --help is instant.

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
SHOW = 5  # how many example paths each report line shows


@dataclass
class Report:
    written: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    whitespace: list[str] = field(default_factory=list)
    bad_rows: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "written": self.written,
            "missing": {"count": len(self.missing), "first": self.missing[:SHOW]},
            "unreadable": {
                "count": len(self.unreadable),
                "first": [f"{p}: {r}" for p, r in self.unreadable[:SHOW]],
            },
            "whitespace_in_path": {"count": len(self.whitespace), "first": self.whitespace[:SHOW]},
            "bad_annotation_rows": {"count": len(self.bad_rows), "first": self.bad_rows[:SHOW]},
        }


def check_file(path: str, check: str, backend: str, timeout_s: float) -> str | None:
    """Return ``None`` if the file is usable, else the reason it is not."""
    if not os.path.isfile(path):
        return "missing"
    if os.path.getsize(path) == 0:
        return "file is empty (0 bytes)"
    if check == "exists":
        return None
    from hpm_video.data.decoding import VideoDecodeError, call_with_timeout, open_video

    def probe() -> None:
        with open_video(path, backend=backend) as reader:
            if check == "decode":
                reader.get_frames(sorted({0, reader.num_frames // 2, reader.num_frames - 1}))

    try:
        call_with_timeout(probe, timeout_s, path)
    except VideoDecodeError as e:
        return e.reason
    return None


def write_list(
    entries: Iterable[tuple[str | None, int, str]],
    root: str,
    out: str,
    check: str,
    backend: str,
    workers: int,
    timeout_s: float,
    absolute: bool,
    report: Report,
) -> Report:
    """Check ``(path or None, label, description)`` entries and write the usable ones to ``out``.

    A ``None`` path means the video was not found; ``description`` names it in the report.
    """
    items = list(entries)
    present = [(p, lab) for p, lab, _ in items if p is not None]
    report.missing.extend(desc for p, _, desc in items if p is None)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(lambda e: check_file(e[0], check, backend, timeout_s), present))
    lines = []
    for (path, label), reason in zip(present, reasons):
        if reason == "missing":
            report.missing.append(path)
            continue
        if reason is not None:
            report.unreadable.append((path, reason))
            continue
        text = os.path.abspath(path) if absolute else os.path.relpath(path, root)
        if any(c.isspace() for c in text):
            report.whitespace.append(text)
            continue
        lines.append(f"{text} {label}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    report.written = len(lines)
    return report


def read_classes(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        names = [line.rstrip("\n") for line in f if line.strip()]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: duplicate class names")
    return names


def save_classes(path: str, names: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))


def folder_entries(
    root: str, extensions: tuple[str, ...]
) -> tuple[list[tuple[str | None, int, str]], list[str]]:
    from hpm_video.data.annotations import resolve_under_root

    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SystemExit(f"{root}: no class folders found")
    entries: list[tuple[str | None, int, str]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(extensions):
                    path = resolve_under_root(os.path.join(dirpath, fname), root)
                    entries.append((path, label, path))
    return entries, classes


def _kinetics_name(row: dict[str, str], where: str) -> str:
    try:
        start, end = int(float(row["time_start"])), int(float(row["time_end"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: bad time_start/time_end ({e})") from None
    youtube_id = (row.get("youtube_id") or "").strip()
    if not youtube_id:
        raise ValueError(f"{where}: empty youtube_id")
    return f"{youtube_id}_{start:06d}_{end:06d}"


def kinetics_entries(
    csv_path: str, root: str, classes: list[str] | None, extensions: tuple[str, ...], report: Report
) -> tuple[list[tuple[str | None, int, str]], list[str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"label", "youtube_id", "time_start", "time_end"}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise SystemExit(f"{csv_path}: expected columns {sorted(needed)}, found {reader.fieldnames}")
        rows = [(f"{csv_path}:{i}", row) for i, row in enumerate(reader, start=2)]
    if classes is None:
        classes = sorted({row["label"].strip() for _, row in rows if row["label"].strip()})
    index = {name: i for i, name in enumerate(classes)}
    # Index the files once instead of probing every candidate name for every row.
    present: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in filenames:
            stem, ext = os.path.splitext(fname)
            if ext.lower() in extensions:
                rel_dir = os.path.relpath(dirpath, root)
                present.setdefault(
                    os.path.join(rel_dir, stem) if rel_dir != "." else stem, os.path.join(dirpath, fname)
                )
    entries: list[tuple[str | None, int, str]] = []
    for where, row in rows:
        label_name = row["label"].strip()
        if label_name not in index:
            report.bad_rows.append(f"{where}: class {label_name!r} is not in the class list")
            continue
        try:
            stem = _kinetics_name(row, where)
        except ValueError as e:
            report.bad_rows.append(str(e))
            continue
        candidates = [os.path.join(label_name, stem), os.path.join(label_name.replace(" ", "_"), stem), stem]
        path = next((present[c] for c in candidates if c in present), None)
        entries.append((path, index[label_name], f"{stem} ({label_name})"))
    return entries, classes


def ssv2_entries(
    labels_path: str, annotations_path: str, root: str, extension: str, report: Report
) -> list[tuple[str | None, int, str]]:
    with open(labels_path, encoding="utf-8") as f:
        labels = {name: int(i) for name, i in json.load(f).items()}
    with open(annotations_path, encoding="utf-8") as f:
        annotations = json.load(f)
    if not isinstance(annotations, list):
        raise SystemExit(f"{annotations_path}: expected a JSON list of videos")
    entries: list[tuple[str | None, int, str]] = []
    for i, item in enumerate(annotations):
        where = f"{annotations_path}[{i}]"
        if not isinstance(item, dict) or "id" not in item or "template" not in item:
            report.bad_rows.append(f"{where}: needs 'id' and 'template' (the test split has no labels)")
            continue
        template = str(item["template"]).replace("[", "").replace("]", "")
        if template not in labels:
            report.bad_rows.append(f"{where}: template {template!r} is not in {labels_path}")
            continue
        name = f"{item['id']}{extension}"
        path = os.path.join(root, name)
        entries.append((path if os.path.exists(path) else None, labels[template], path))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--root", required=True, help="folder the videos are in; list paths are relative to it"
        )
        p.add_argument("--out", required=True, help="list file to write")
        p.add_argument(
            "--check",
            choices=["exists", "open", "decode"],
            default="open",
            help="how hard to check each file: exists (non-empty), open (container and index), "
            "decode (also decode three frames). Default: open",
        )
        p.add_argument(
            "--backend",
            default="pyav",
            choices=["auto", "decord", "pyav"],
            help="decoder used by the check (default pyav, which also detects truncated files)",
        )
        p.add_argument("--workers", type=int, default=4, help="files checked in parallel (default 4)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per file (default 30)")
        p.add_argument("--absolute", action="store_true", help="write absolute paths")
        p.add_argument(
            "--ext",
            default=",".join(VIDEO_EXTENSIONS),
            help="video file extensions to accept (comma separated)",
        )
        p.add_argument("--report", help="also write the report as JSON to this file")

    p_folder = sub.add_parser("folder", help="class-per-folder tree")
    common(p_folder)
    p_folder.add_argument(
        "--classes-out", help="write the class names (line i = label i); default: classes.txt beside --out"
    )
    p_k = sub.add_parser("kinetics", help="official Kinetics-400 CSV")
    common(p_k)
    p_k.add_argument("--csv", required=True, help="kinetics400 train.csv / validate.csv / test.csv")
    p_k.add_argument(
        "--classes", help="class list to use (from the train split) so labels agree across splits"
    )
    p_k.add_argument(
        "--classes-out", help="where to write the class list (default: classes.txt beside --out)"
    )
    p_s = sub.add_parser("ssv2", help="official Something-Something-v2 JSON files")
    common(p_s)
    p_s.add_argument("--labels", required=True, help="labels.json (template -> class id)")
    p_s.add_argument("--annotations", required=True, help="train.json or validation.json")
    p_s.set_defaults(ext=".webm")
    args = parser.parse_args(argv)

    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        parser.error(f"--root {args.root!r} is not a directory")
    extensions = tuple(e if e.startswith(".") else "." + e for e in args.ext.lower().split(",") if e)
    report = Report()
    classes: list[str] | None = None
    if args.source == "folder":
        entries, classes = folder_entries(root, extensions)
    elif args.source == "kinetics":
        given = read_classes(args.classes) if args.classes else None
        entries, classes = kinetics_entries(args.csv, root, given, extensions, report)
        if given is not None:
            classes = None  # nothing new to write
    else:
        entries = ssv2_entries(args.labels, args.annotations, root, extensions[0], report)
    write_list(
        entries, root, args.out, args.check, args.backend, args.workers, args.timeout, args.absolute, report
    )
    if classes is not None:
        classes_out = getattr(args, "classes_out", None) or os.path.join(
            os.path.dirname(os.path.abspath(args.out)), "classes.txt"
        )
        save_classes(classes_out, classes)
    result = {"list": os.path.abspath(args.out), **report.as_dict()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0 if report.written else 1


if __name__ == "__main__":
    raise SystemExit(main())
