"""Decoding: both backends agree, the fallback works, the time limit fires, bad files raise one error."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_fixtures import MP4, SHORT_WEBM, WEBM, encode_video, make_bad_files  # noqa: E402

from hpm_video.data import decoding  # noqa: E402
from hpm_video.data.decoding import (  # noqa: E402
    DecordReader,
    PyAVReader,
    VideoDecodeError,
    call_with_timeout,
    open_video,
    read_clips,
)

needs_decord = pytest.mark.skipif(not decoding.decord_available(), reason="decord not installed")


@needs_decord
@pytest.mark.parametrize("path", [MP4, WEBM, SHORT_WEBM], ids=["h264-mp4", "vp9-webm", "vp9-webm-12fps"])
def test_backends_decode_identical_frames(path: str) -> None:
    d = open_video(path, backend="decord", fallback=False)
    p = open_video(path, backend="pyav")
    assert isinstance(d, DecordReader) and isinstance(p, PyAVReader)
    assert d.num_frames == p.num_frames > 20
    assert d.fps == pytest.approx(p.fps, rel=1e-3)
    n = d.num_frames
    # Unsorted, repeated, far apart (forces seeks past keyframes), and the last frame.
    idx = [n - 1, 0, 5, 5, n // 2, 1, n - 2, n // 3]
    fd, fp = d.get_frames(idx), p.get_frames(idx)
    assert fd.shape == fp.shape == (len(idx), fd.shape[1], fd.shape[2], 3)
    assert fd.dtype == fp.dtype == np.uint8
    np.testing.assert_array_equal(fd, fp)
    # Requested order is honoured: repeated index gives equal frames, distinct indices differ.
    np.testing.assert_array_equal(fp[2], fp[3])
    assert not np.array_equal(fp[0], fp[1])
    d.close()
    p.close()


def test_pyav_random_access_matches_sequential_decode() -> None:
    with open_video(MP4, backend="pyav") as r:
        everything = r.get_frames(range(r.num_frames))
        picks = [70, 3, 40, 41, 12]
        np.testing.assert_array_equal(r.get_frames(picks), everything[picks])


def test_pyav_exact_frames_from_synthetic_video(tmp_path) -> None:
    # Each frame has a distinct flat grey level; lossless H.264 keeps it, so indices can be checked exactly.
    levels = np.arange(0, 250, 10, dtype=np.uint8)
    frames = np.repeat(levels[:, None, None, None], 32 * 64 * 3).reshape(len(levels), 32, 64, 3)
    path = encode_video(str(tmp_path / "grey.mp4"), frames)
    for backend in ["pyav"] + (["decord"] if decoding.decord_available() else []):
        with open_video(path, backend=backend, fallback=False) as r:
            assert r.num_frames == len(levels)
            got = r.get_frames([24, 0, 13]).reshape(3, -1).mean(axis=1)
            np.testing.assert_allclose(got, levels[[24, 0, 13]], atol=2)


def test_mis_encoded_metadata_does_not_stop_pyav(tmp_path) -> None:
    """A title tag that is not UTF-8 (PyAV < 19 refuses such a file by default; 19 lets it through)."""
    import av

    levels = np.arange(0, 250, 50, dtype=np.uint8)
    frames = np.repeat(levels[:, None, None, None], 32 * 32 * 3).reshape(len(levels), 32, 32, 3)
    path = str(tmp_path / "tagged.mkv")
    with av.open(path, "w", format="matroska") as container:
        container.metadata["title"] = "QQQQQQQQ"
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    data = open(path, "rb").read()
    assert data.count(b"QQQQQQQQ") == 1
    with open(path, "wb") as f:
        f.write(data.replace(b"QQQQQQQQ", b"\xff\xfe\xfd\xfc" * 2))  # same length: the file stays valid
    with open_video(path, backend="pyav", fallback=False) as r:
        assert r.num_frames == len(levels)
        got = r.get_frames([4, 0]).reshape(2, -1).mean(axis=1)
        np.testing.assert_allclose(got, levels[[4, 0]], atol=6)


def test_auto_backend_recovers_from_a_real_decord_failure(tmp_path) -> None:
    # decord 0.6.0 fails to copy out frames 48 pixels wide (a buffer size check); FFmpeg reads them.
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 48, 3), dtype=np.uint8)
    path = encode_video(str(tmp_path / "w48.mp4"), frames)
    reference = open_video(path, backend="pyav").get_frames([0, 3, 5])
    reader = open_video(path, backend="auto")
    np.testing.assert_array_equal(reader.get_frames([0, 3, 5]), reference)
    if decoding.decord_available():
        try:
            open_video(path, backend="decord", fallback=False).get_frames([0, 3, 5])
        except VideoDecodeError:
            assert reader.backend == "pyav"  # the fallback really was used


def test_index_out_of_range_is_a_caller_error() -> None:
    with open_video(MP4, backend="pyav") as r, pytest.raises(IndexError, match=r"\[0, 75\)"):
        r.get_frames([0, 75])


def test_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError, match="unknown video backend"):
        open_video(MP4, backend="opencv")


@pytest.mark.parametrize(
    "kind", ["missing", "zero_byte", "garbage", "truncated", "corrupt", "unknown_codec", "no_video"]
)
@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_bad_files_raise_video_decode_error(tmp_path, kind: str, backend: str) -> None:
    path = make_bad_files(str(tmp_path))[kind]

    def read_all() -> None:
        with open_video(path, backend=backend) as r:
            r.get_frames(range(r.num_frames))

    with pytest.raises(VideoDecodeError) as info:
        call_with_timeout(read_all, 20.0, path)
    assert info.value.path == path
    assert path in str(info.value)


def test_fallback_to_pyav_when_decord_fails(monkeypatch) -> None:
    if not decoding.decord_available():
        pytest.skip("decord not installed")

    def broken(self, indices):
        raise VideoDecodeError(self.path, "simulated decord failure")

    monkeypatch.setattr(DecordReader, "_read_sorted", broken)
    r = open_video(MP4, backend="auto")
    assert r.backend == "decord"
    frames = r.get_frames([0, 10])
    assert r.backend == "pyav"
    np.testing.assert_array_equal(frames, open_video(MP4, backend="pyav").get_frames([0, 10]))
    with pytest.raises(VideoDecodeError, match="simulated"):
        open_video(MP4, backend="decord", fallback=False).get_frames([0])


def test_time_limit_gives_up_on_a_hanging_decoder(monkeypatch) -> None:
    release = threading.Event()

    def hang(self, indices):
        release.wait(10)
        return np.zeros((len(indices), 2, 2, 3), np.uint8)

    monkeypatch.setattr(PyAVReader, "_read_sorted", hang)
    before = decoding.abandoned_decoder_threads()
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError, match="time limit"):
        read_clips(MP4, lambda n, fps: [np.arange(4)], backend="pyav", timeout_s=0.3)
    assert time.monotonic() - t0 < 3.0
    assert decoding.abandoned_decoder_threads() == before + 1
    release.set()  # let the abandoned thread finish so it does not outlive the test


def test_read_clips_decodes_union_once_and_splits() -> None:
    calls = []
    real = PyAVReader._read_sorted

    def spy(self, indices):
        calls.append(list(indices))
        return real(self, indices)

    PyAVReader._read_sorted = spy
    try:
        clips = read_clips(
            MP4, lambda n, fps: [np.array([0, 4, 8]), np.array([4, 8, 12, 12])], backend="pyav"
        )
    finally:
        PyAVReader._read_sorted = real
    assert calls == [[0, 4, 8, 12]]
    assert [c.shape[0] for c in clips] == [3, 4]
    np.testing.assert_array_equal(clips[0][1:], clips[1][:2])
    np.testing.assert_array_equal(clips[1][2], clips[1][3])


def test_truncated_webm(tmp_path) -> None:
    # Matroska has no frame count up front; a cut file would read as a valid shorter video. The PyAV
    # reader compares the packets with the duration in the header and refuses it.
    data = open(WEBM, "rb").read()
    path = tmp_path / "cut.webm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="truncated"):
        open_video(str(path), backend="pyav")
    # decord does not check; with it the file reads as a prefix of the original, never as garbage.
    if not decoding.decord_available():
        return
    with open_video(str(path), backend="auto") as r, open_video(WEBM, backend="pyav") as full:
        assert 0 < r.num_frames < full.num_frames
        np.testing.assert_array_equal(r.get_frames([r.num_frames - 1]), full.get_frames([r.num_frames - 1]))


def test_packet_without_picture_shows_the_previous_frame() -> None:
    # Simulate a container packet that decodes to no picture (as a lone hidden VP9 frame would) by
    # adding a timestamp no decoded frame carries between frames 10 and 11.
    reader = PyAVReader(MP4)
    original = reader.get_frames([10, 11, 12])
    pts = reader._pts
    assert pts is not None and pts[11] - pts[10] > 1
    fake = (pts[10] + pts[11]) // 2
    reader._pts = sorted(pts + [fake])
    reader._pts_to_index = {p: i for i, p in enumerate(reader._pts)}
    reader._key_indices = [i + (i > 10) for i in reader._key_indices]
    reader.num_frames += 1
    got = reader.get_frames([10, 11, 12, 13])
    np.testing.assert_array_equal(got[0], original[0])
    np.testing.assert_array_equal(got[1], original[0])  # the picture-less packet repeats frame 10
    np.testing.assert_array_equal(got[2:], original[1:])
    reader.close()
