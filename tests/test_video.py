"""lapo.video: real H.264 bytes made here, decoded with both backends."""

from __future__ import annotations

import av
import numpy as np
import pytest

from lapo import video


def moving_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth scene with a moving square: compressible, so the pixel error is meaningful."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 96)], -1
    )
    frames = np.repeat(base[None], t, 0).astype(np.uint8)  # (T, H, W, 3)
    for i in range(t):
        y, x = (i * 3) % (h - 8), (i * 5) % (w - 8)
        frames[i, y : y + 8, x : x + 8] = rng.integers(0, 255, 3, dtype=np.uint8)
    return frames


@pytest.fixture(params=["decord", "pyav"])
def backend(request, monkeypatch):
    monkeypatch.setenv(video.ENV_VAR, request.param)
    chosen = video.set_backend()
    assert chosen == request.param
    yield chosen
    monkeypatch.delenv(video.ENV_VAR)
    video.set_backend()


@pytest.mark.parametrize("t,h,w", [(1, 16, 16), (37, 48, 64), (20, 62, 30)])
def test_round_trip(backend, t, h, w):
    frames = moving_frames(t, h, w)
    data = video.encode_video(frames, fps=15)
    assert data[4:8] == b"ftyp"  # an mp4 container
    out = video.decode_video_bytes(data)
    assert out.dtype == np.uint8 and out.shape == (t, h, w, 3)
    err = np.abs(out.astype(np.int16) - frames.astype(np.int16)).mean()
    assert err < 8.0, f"mean abs pixel error {err:.2f} with {backend}"


def test_backends_agree():
    data = video.encode_video(moving_frames(24, 32, 32), fps=10)
    a = video.decode_video_bytes(data, backend="decord")
    b = video.decode_video_bytes(data, backend="pyav")
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 3  # colour conversion rounding only


def test_encoding_is_h264_yuv420p_all_frames_and_deterministic():
    frames = moving_frames(40, 32, 48)
    data = video.encode_video(frames, fps=15, gop=8)
    assert video.encode_video(frames, fps=15, gop=8) == data
    import io

    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        assert s.codec_context.pix_fmt == "yuv420p"
        keys = [p.is_keyframe for p in c.demux(s) if p.size]
    assert len(keys) == 40
    assert sum(keys) >= 40 // 8  # short keyframe interval


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        video.encode_video(np.zeros((2, 15, 16, 3), np.uint8), fps=10)
    with pytest.raises(ValueError, match="uint8"):
        video.encode_video(np.zeros((2, 16, 16, 3), np.float32), fps=10)
    with pytest.raises(ValueError, match="no frames"):
        video.encode_video(np.zeros((0, 16, 16, 3), np.uint8), fps=10)


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 10, bytes(range(256)) * 40])
def test_garbage_raises(backend, data):
    with pytest.raises(video.VideoDecodeError, match="decode|empty"):
        video.decode_video_bytes(data)


def test_truncated_mp4_raises_or_is_short(backend):
    data = video.encode_video(moving_frames(30, 32, 32), fps=15)
    with pytest.raises(video.VideoDecodeError):
        video.decode_video_bytes(data[:200])


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv(video.ENV_VAR, "opencv")
    with pytest.raises(ValueError, match="opencv"):
        video.set_backend()
    monkeypatch.delenv(video.ENV_VAR)
    video.set_backend()


@pytest.mark.parametrize(
    "ext,codec", [(".webm", "libvpx-vp9"), (".avi", "mpeg4"), (".mkv", "libx264")]
)
def test_read_video_file_formats(tmp_path, ext, codec):
    frames = moving_frames(12, 40, 56)
    path = tmp_path / f"v{ext}"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=12)
        s.width, s.height, s.pix_fmt = 56, 40, "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    out, fps = video.read_video_file(path)
    assert fps == pytest.approx(12)
    assert out.shape == (12, 40, 56, 3)
    info = video.probe_video_file(path)
    assert (info["height"], info["width"]) == (40, 56)
    assert abs(info["frames"] - 12) <= 1


def test_read_missing_or_corrupt_file(tmp_path):
    with pytest.raises(video.VideoDecodeError, match="nope.mp4"):
        video.read_video_file(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(video.VideoDecodeError, match="bad.mp4"):
        video.read_video_file(bad)


def test_resample_indices():
    np.testing.assert_array_equal(video.resample_indices(10, 30, 30), np.arange(10))
    np.testing.assert_array_equal(video.resample_indices(10, 30, 15), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(video.resample_indices(5, 10, 15), [0, 1, 1, 2, 3, 3, 4])
    idx = video.resample_indices(1000, 30000 / 1001, 15)
    assert len(idx) in (500, 501) and np.all(np.diff(idx) >= 1)
    # streaming (index by index) and batch agree
    assert [video.resample_index(j, 24, 15) for j in range(8)] == list(
        video.resample_indices(13, 24, 15)[:8]
    )


def test_resize_square_crop_and_pad():
    frame = np.zeros((60, 100, 3), np.uint8)
    frame[:, 20:80] = 255  # the centre 60x60 square is white
    crop = video.resize_square(frame, 30, "crop")
    assert crop.shape == (30, 30, 3) and crop.min() == 255
    pad = video.resize_square(frame, 50, "pad")
    assert pad.shape == (50, 50, 3)
    assert pad[:5].max() == 0 and pad[-5:].max() == 0  # letterbox bars
    assert pad[25, 25].min() == 255
    tall = video.resize_frames(np.full((3, 97, 61, 3), 7, np.uint8), 64, "pad")
    assert tall.shape == (3, 64, 64, 3) and tall[:, 32, 32].min() == 7 and tall[:, 32, 0].max() == 0
    with pytest.raises(ValueError, match="crop"):
        video.resize_square(frame, 8, "stretch")


def test_falls_back_to_pyav_without_decord(monkeypatch):
    import sys

    monkeypatch.delenv(video.ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    with pytest.warns(RuntimeWarning, match="decord cannot be imported"):
        assert video.set_backend() == "pyav"
    data = video.encode_video(moving_frames(5, 16, 32), fps=5)
    assert video.decode_video_bytes(data).shape == (5, 16, 32, 3)
    monkeypatch.undo()
    assert video.set_backend() == "decord"


def _decode_in_child(data: bytes, q) -> None:
    q.put(video.decode_video_bytes(data, backend="pyav").shape)


@pytest.mark.parametrize("from_thread", [False, True])
def test_a_forked_worker_decodes_after_the_parent_did(from_thread):
    """PyAV decoding in this process leaves nothing a forked DataLoader worker chokes on.

    A worker forked after the parent decoded with PyAV (or resized a frame) must decode
    too, and must not hang tearing down the parent's per-thread swscale state, also when
    the fork comes from a thread other than the one that decoded.
    """
    import multiprocessing as mp
    import threading

    data = video.encode_video(moving_frames(6, 48, 64), fps=10)
    assert video.decode_video_bytes(data, backend="pyav").shape == (6, 48, 64, 3)
    video.square_frame(moving_frames(1, 48, 64)[0], 32)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(data, q), daemon=True)
    starter = threading.Thread(target=child.start)
    if from_thread:
        starter.start()
        starter.join()
    else:
        child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "a worker forked after PyAV decoding hung"
    assert child.exitcode == 0 and q.get(timeout=5) == (6, 48, 64, 3)
