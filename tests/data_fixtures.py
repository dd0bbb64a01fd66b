"""Helpers shared by the data tests: the bundled sample clips and generators of bad files.

Bad files are written under a caller-given temporary folder, never into the repository.
"""

from __future__ import annotations

import os
import shutil

import av
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "datasets", "samples")
TRAIN_LIST = os.path.join(SAMPLES, "train.csv")
MP4 = os.path.join(SAMPLES, "bikes_01.mp4")
WEBM = os.path.join(SAMPLES, "carphone_02_vp9.webm")
SHORT_WEBM = os.path.join(SAMPLES, "bbb_03_vp9.webm")  # 31 frames at 12 fps


def sample_entries() -> list[tuple[str, int]]:
    """``(file name, label)`` for every line of the bundled train list."""
    with open(TRAIN_LIST, encoding="utf-8") as f:
        return [(a, int(b)) for a, b in (line.split() for line in f if line.strip())]


def write_list(path: str, entries: list[tuple[str, int]]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for name, label in entries:
            f.write(f"{name} {label}\n")
    return path


def encode_video(path: str, frames: np.ndarray, fps: int = 10, codec: str = "libx264") -> str:
    """Encode uint8 ``(T, H, W, 3)`` frames (H, W even) losslessly enough for tests."""
    fmt = "webm" if path.endswith(".webm") else None
    with av.open(path, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0", "preset": "ultrafast", "threads": "1"}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def make_bad_files(folder: str) -> dict[str, str]:
    """Write one file per kind of bad input; return ``{kind: path}``.

    Kinds: missing, zero_byte, garbage, truncated (mp4 cut in half; its index is at the front, so the
    container opens but the stream ends early), corrupt (a run of random bytes over the middle of a
    stream), unknown_codec (an AVI whose codec tag no decoder knows), no_video (audio-only WAV).
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    data = open(MP4, "rb").read()
    paths = {
        k: os.path.join(folder, n)
        for k, n in [
            ("missing", "missing.mp4"),
            ("zero_byte", "zero.mp4"),
            ("garbage", "garbage.mp4"),
            ("truncated", "truncated.mp4"),
            ("corrupt", "corrupt.mp4"),
            ("unknown_codec", "unknown.avi"),
            ("no_video", "audio.wav"),
        ]
    }
    open(paths["zero_byte"], "wb").close()
    with open(paths["garbage"], "wb") as f:
        f.write(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with open(paths["truncated"], "wb") as f:
        f.write(data[: len(data) // 2])
    corrupt = bytearray(data)
    start = len(corrupt) // 3
    corrupt[start : start + 20000] = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    with open(paths["corrupt"], "wb") as f:
        f.write(bytes(corrupt))
    # A valid MJPEG AVI with its FourCC replaced: the container parses, the codec is unknown.
    mjpeg = os.path.join(folder, "mjpeg.avi")
    with av.open(mjpeg, "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    raw = open(mjpeg, "rb").read()
    assert raw.count(b"MJPG") >= 1
    with open(paths["unknown_codec"], "wb") as f:
        f.write(raw.replace(b"MJPG", b"QZX9"))
    os.remove(mjpeg)
    with av.open(paths["no_video"], "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return paths


def copy_samples(folder: str) -> str:
    """Copy the bundled clips into ``folder`` (so tests can add bad files beside them)."""
    os.makedirs(folder, exist_ok=True)
    for name, _ in sample_entries():
        shutil.copy(os.path.join(SAMPLES, name), os.path.join(folder, name))
    return folder
