"""Video in and out: mp4 bytes <-> uint8 frames, source files, fps and size changes.

Decoding clips (the hot path of every loader worker) uses decord when it can be
imported and PyAV otherwise. The choice is made once at import and logged; the
environment variable ``LAPO_VIDEO_BACKEND=pyav|decord`` forces one, and
:func:`set_backend` changes it at run time (tests exercise both).

Encoding is always PyAV/libx264: yuv420p, every frame kept, no B-frames and a
short keyframe interval so that decoding a clip never has to reorder or reach
far back. One encoder thread makes the output bytes a pure function of the
input frames, which resumable sharding relies on.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

log = logging.getLogger(__name__)

BACKENDS = ("decord", "pyav")
ENV_VAR = "LAPO_VIDEO_BACKEND"


class VideoDecodeError(ValueError):
    """Bytes or a file that do not decode to a video with at least one frame."""


# --------------------------------------------------------------------------- backend choice


def _decord_importable() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:  # ImportError, or a broken shared library
        return False
    return True


def _pick_backend(requested: str | None) -> str:
    requested = (requested or "").strip().lower()
    if requested and requested not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "pyav":
        return "pyav"
    if _decord_importable():
        return "decord"
    msg = "decord cannot be imported; decoding clips with PyAV (slower)"
    if requested == "decord":
        msg = f"{ENV_VAR}=decord but {msg}"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return "pyav"


def set_backend(name: str | None = None) -> str:
    """Select the clip decoder: "decord", "pyav", or None to re-read ``LAPO_VIDEO_BACKEND``."""
    global BACKEND
    BACKEND = _pick_backend(name if name is not None else os.environ.get(ENV_VAR))
    log.info("lapo.video: decoding clips with %s", BACKEND)
    return BACKEND


BACKEND: str = _pick_backend(os.environ.get(ENV_VAR))
log.info("lapo.video: decoding clips with %s", BACKEND)


# --------------------------------------------------------------------------- decoding bytes


def _decode_decord(data: bytes, num_threads: int) -> np.ndarray:
    import decord

    # The reader is built here, inside the calling worker: decord readers must not cross forks.
    reader = decord.VideoReader(io.BytesIO(data), num_threads=num_threads)
    n = len(reader)
    if n == 0:
        raise VideoDecodeError("video has no frames")
    try:
        return reader.get_batch(range(n)).asnumpy()  # (T, H, W, 3)
    except decord.DECORDError as e:
        # decord 0.6 pads rows of some widths (e.g. 16, 24, 48 px) and then fails its own size
        # check; the bytes are fine, so the caller retries with PyAV.
        if "DECORDArrayCopyFromTo" in str(e):
            raise _DecordLayoutError(str(e)) from e
        raise


def rgb_array(frame: av.VideoFrame, **resize) -> np.ndarray:
    """The frame as uint8 RGB (H, W, 3), optionally scaled (``width``, ``height``, ``interpolation``).

    Always single-threaded swscale. PyAV keeps one swscale context per thread, and by
    default that context runs its own pool of slice threads; a process forked afterwards
    (a DataLoader worker) inherits the context but not its threads, and hangs for good
    when it uses or frees it. Frames here are small, so slice threads bought nothing.
    """
    return frame.reformat(format="rgb24", threads=1, **resize).to_ndarray()


class _DecordLayoutError(RuntimeError):
    pass


_warned_layout = False


def _decode_pyav(data: bytes, num_threads: int) -> np.ndarray:
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise VideoDecodeError("no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = max(num_threads, 1)
        frames = [rgb_array(f) for f in container.decode(stream)]
    if not frames:
        raise VideoDecodeError("video has no frames")
    return np.stack(frames)  # (T, H, W, 3)


def decode_video_bytes(
    data: bytes, *, num_threads: int = 1, backend: str | None = None
) -> np.ndarray:
    """Decode a whole video held in memory (e.g. the ``mp4`` of a shard sample).

    Returns uint8 frames of shape (T, H, W, 3), RGB. ``backend`` overrides the
    module-wide :data:`BACKEND` for this call. Raises :class:`VideoDecodeError`
    for empty or undecodable bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_video_bytes expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise VideoDecodeError("empty video bytes (0 bytes)")
    which = backend or BACKEND
    decode = _decode_decord if which == "decord" else _decode_pyav
    try:
        try:
            frames = decode(bytes(data), num_threads)
        except _DecordLayoutError:
            global _warned_layout
            if not _warned_layout:
                _warned_layout = True
                log.warning("decord cannot lay out frames of this width; using PyAV for such clips")
            which = "pyav"
            frames = _decode_pyav(bytes(data), num_threads)
    except VideoDecodeError as e:
        raise VideoDecodeError(f"cannot decode {len(data)} video bytes with {which}: {e}") from e
    except Exception as e:  # decord raises DECORDError (a RuntimeError), PyAV av.FFmpegError
        raise VideoDecodeError(
            f"cannot decode {len(data)} video bytes with {which}: {type(e).__name__}: {e}"
        ) from e
    return np.ascontiguousarray(frames, dtype=np.uint8)


# --------------------------------------------------------------------------- encoding


def encode_video(
    frames: np.ndarray,
    fps: float,
    *,
    gop: int = 16,
    crf: int = 20,
    preset: str = "veryfast",
) -> bytes:
    """Encode uint8 frames (T, H, W, 3) to H.264 yuv420p mp4 bytes, every frame kept.

    H and W must be even (yuv420p halves the chroma planes). x264 runs single-threaded,
    yet two encodes of the same frames have, rarely, come out with different bytes (cause
    not found), so compare clips by their decoded frames, not their bytes.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"encode_video expects uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("encode_video: no frames to encode")
    if h % 2 or w % 2:
        raise ValueError(f"encode_video: height and width must be even for yuv420p, got {h}x{w}")
    if not fps > 0:
        raise ValueError(f"encode_video: fps must be > 0, got {fps}")
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            "g": str(gop),
            "bf": "0",  # no reordering: decode order == display order, cheap random access
            "threads": "1",  # deterministic bytes (x264 frame threads may change decisions)
        }
        # One converter for the clip: VideoFrame.reformat builds a fresh swscale context per
        # call (~1 ms a frame); reusing one costs ~0.07 ms and gives the same bytes.
        to_yuv = VideoReformatter()
        for i in range(t):
            vf = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            # swscale's default (bilinear) chroma subsampling smears colour edges of small game
            # frames; area averaging keeps the round-trip error about 4x lower.
            vf = to_yuv.reformat(vf, format="yuv420p", interpolation="AREA", threads=1)
            vf.pts = i
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))
    return buf.getvalue()


# --------------------------------------------------------------------------- source files


def probe_video_file(path: str | Path) -> dict:
    """Header facts without decoding: ``{"fps", "frames" (estimate), "height", "width"}``.

    ``frames`` comes from the container's count when present, otherwise from the
    duration times the frame rate, so it is an estimate (exact for most mp4).
    """
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or rate <= 0:
                raise VideoDecodeError(f"{path}: unknown frame rate")
            frames = int(stream.frames or 0)
            if frames <= 0:
                if stream.duration and stream.time_base:
                    seconds = float(stream.duration * stream.time_base)
                elif container.duration:
                    seconds = container.duration / av.time_base
                else:
                    seconds = 0.0
                frames = int(round(seconds * float(rate)))
            ctx = stream.codec_context
            return {"fps": float(rate), "frames": frames, "height": ctx.height, "width": ctx.width}
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(f"{path}: cannot open video: {type(e).__name__}: {e}") from e


def open_video_file(path: str | Path) -> tuple[float, Iterator[av.VideoFrame]]:
    """Open any ffmpeg-readable file; return (fps, iterator of decoded PyAV frames).

    Frames are streamed so that long videos never sit in memory, and stay in the
    codec's pixel format until the caller converts the ones it keeps (see
    :func:`square_frame`). The fps is the container's average rate; frames come in
    decode order and a constant rate is assumed.
    """
    try:
        container = av.open(str(path), mode="r")
    except Exception as e:
        raise VideoDecodeError(f"{path}: cannot open video: {type(e).__name__}: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        container.close()
        raise VideoDecodeError(f"{path}: unknown frame rate")
    stream.codec_context.thread_count = 1  # callers parallelise over files instead

    def frames() -> Iterator[av.VideoFrame]:
        try:
            yield from container.decode(stream)
        except av.FFmpegError as e:
            raise VideoDecodeError(f"{path}: decoding failed: {e}") from e
        finally:
            container.close()

    return float(rate), frames()


def iter_video_file(path: str | Path) -> tuple[float, Iterator[np.ndarray]]:
    """Like :func:`open_video_file`, yielding uint8 RGB frames (H, W, 3)."""
    fps, frames = open_video_file(path)
    return fps, (rgb_array(f) for f in frames)


def read_video_file(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a whole file (mp4/webm/avi/mkv/...) to (frames (T, H, W, 3) uint8, fps)."""
    fps, it = iter_video_file(path)
    frames = list(it)
    if not frames:
        raise VideoDecodeError(f"{path}: video has no frames")
    return np.stack(frames), fps


# --------------------------------------------------------------------------- fps and size


def resample_index(j: int, src_fps: float, dst_fps: float) -> int:
    """Source frame shown at output frame j: the nearest in time, ties rounded up.

    Output frame j sits at time j / dst_fps; it exists only while this index is a
    valid source frame, so :func:`resample_indices` and streaming agree exactly.
    """
    x = (
        Fraction(j)
        * Fraction(src_fps).limit_denominator(1001)
        / Fraction(dst_fps).limit_denominator(1001)
    )
    return int(x + Fraction(1, 2))  # floor(x + 1/2): exact, no banker's rounding


def resample_indices(num_src: int, src_fps: float, dst_fps: float) -> np.ndarray:
    """Source frame indices (int64) of every output frame when changing fps.

    Downsampling drops frames, upsampling repeats them. Same fps is the identity.
    """
    out = []
    j = 0
    while (i := resample_index(j, src_fps, dst_fps)) < num_src:
        out.append(i)
        j += 1
    return np.asarray(out, dtype=np.int64)


def square_frame(frame: av.VideoFrame | np.ndarray, size: int, mode: str = "crop") -> np.ndarray:
    """One frame (PyAV frame or uint8 (H, W, 3)) -> uint8 (size, size, 3), aspect ratio kept.

    ``crop``: scaled so the shorter side is ``size``, then the centre cut out.
    ``pad``: scaled so the longer side is ``size``, then letterboxed with black.
    Scaling and colour conversion happen in one swscale pass with area averaging,
    which is both the fastest path from a decoded frame and alias-free when shrinking.
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"resize mode must be 'crop' or 'pad', got {mode!r}")
    if isinstance(frame, np.ndarray):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    h, w = frame.height, frame.width
    scale = size / (min(h, w) if mode == "crop" else max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if mode == "crop":
        nh, nw = max(nh, size), max(nw, size)
    img = rgb_array(frame, width=nw, height=nh, interpolation="AREA")  # (nh, nw, 3)
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return np.ascontiguousarray(img[top : top + size, left : left + size])
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = img
    return out


resize_square = square_frame  # the name for callers holding numpy frames


def resize_frames(frames: np.ndarray, size: int, mode: str = "crop") -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8 with :func:`resize_square`."""
    return np.stack([square_frame(f, size, mode) for f in frames])
