"""Video through PyAV (FFmpeg inside the wheel): frames out with their time stamps, tolerant of damage.

``read_frames`` yields every ``every_nth`` decoded frame and a ``FrameError`` for each packet that fails to
decode, then goes on: a truncated or partly corrupt file gives every frame that can be read. Opening
failures (not a video, no video stream, zero length) raise ``VideoError`` with the reason.
``write_video`` encodes frames at a given rate and copies the audio stream of a source file when present.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi"})


class VideoError(Exception):
    """The file cannot be read as a video; ``str(exc)`` is the recorded reason."""


@dataclass(frozen=True)
class Frame:
    index: int  # decoded-frame number (0-based), counting every frame, not only the sampled ones
    time_s: float
    rgb: np.ndarray


@dataclass(frozen=True)
class FrameError:
    index: int  # the frame number the failed packet would have held (best effort)
    time_s: float
    reason: str


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    codec: str
    has_audio: bool


def _open(source: bytes | str | Path):
    import av

    if isinstance(source, bytes):
        if not source:
            raise VideoError("empty video: 0 bytes")
        source = io.BytesIO(source)
    try:
        container = av.open(source, mode="r")
    except Exception as exc:  # PyAV raises InvalidDataError, ValueError, OSError... for unreadable input
        raise VideoError(f"corrupt video: {type(exc).__name__}: {exc}") from None
    if not container.streams.video:
        container.close()
        raise VideoError("not a video: no video stream")
    return container


def probe_video(source: bytes | str | Path) -> VideoInfo:
    container = _open(source)
    try:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or 25
        return VideoInfo(int(ctx.width or 0), int(ctx.height or 0), float(rate), str(ctx.name), bool(container.streams.audio))
    finally:
        container.close()


def read_frames(source: bytes | str | Path, every_nth: int = 1) -> Iterator[Frame | FrameError]:
    container = _open(source)
    try:
        stream = container.streams.video[0]
        base = stream.time_base or Fraction(1, 1000)
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        index = 0

        def emit(frames):
            nonlocal index
            for frame in frames:
                if index % every_nth == 0:
                    t = float(frame.pts * base) if frame.pts is not None else index / rate
                    yield Frame(index, t, frame.to_ndarray(format="rgb24"))
                index += 1

        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except Exception as exc:  # a damaged packet: record it, keep going
                    t = float(packet.pts * base) if packet.pts is not None else index / rate
                    yield FrameError(index, t, f"undecodable frame: {type(exc).__name__}: {exc}")
                    index += 1
                    continue
                yield from emit(frames)
        except Exception as exc:  # demuxing stopped (truncated file): the frames so far stand
            yield FrameError(index, index / rate, f"video ends early: {type(exc).__name__}: {exc}")
        try:  # the frames the decoder still holds (a truncated file ends without the flushing packet)
            yield from emit(stream.codec_context.decode(None))
        except Exception:
            pass
    finally:
        container.close()


def write_video(path: Path, frames: Iterable[np.ndarray], fps: float, audio_from: Path | None = None) -> int:
    """Encode RGB frames (H.264 in yuv420p, even sizes; streamed, not held) to ``path`` atomically; copy
    ``audio_from``'s audio stream. Returns the number of frames written."""
    import itertools

    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise VideoError(f"{path}: no frames to write")
    frames = itertools.chain([first], frames)
    written = 0
    h, w = first.shape[:2]
    rate = Fraction(fps).limit_denominator(1001)
    source = None
    try:
        with av.open(str(tmp), mode="w") as out:
            stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
            audio_out = None
            if audio_from is not None:
                try:
                    source = av.open(str(audio_from))
                    if source.streams.audio:
                        audio_out = out.add_stream_from_template(source.streams.audio[0])
                except Exception as exc:
                    log.warning("%s: audio not copied: %s", audio_from, exc)
                    source = None
            for rgb in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[: stream.height, : stream.width]), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
                written += 1
            for packet in stream.encode():
                out.mux(packet)
            if audio_out is not None:
                try:
                    for packet in source.demux(source.streams.audio[0]):
                        if packet.dts is None:
                            continue
                        packet.stream = audio_out
                        out.mux(packet)
                except Exception as exc:  # damaged audio: the video stands
                    log.warning("%s: audio copy stopped: %s", audio_from, exc)
        tmp.replace(path)
        return written
    finally:
        if source is not None:
            source.close()
        tmp.unlink(missing_ok=True)
