"""Video input: decoded frames with their index and timestamp (PyAV, the ``video`` extra)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from featcache.errors import FerError

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


class VideoError(FerError):
    pass


@dataclass
class Frame:
    index: int          # position in the decoded stream, from 0
    time: float         # presentation time in seconds
    image: np.ndarray   # RGB uint8 (H, W, 3)


def read_frames(path: str | Path, every: int = 1) -> Iterator[Frame]:
    """Every ``every``-th frame of the first video stream of ``path``."""
    if every < 1:
        raise VideoError(f"--every must be at least 1, not {every}")
    try:
        import av
    except ImportError:
        raise VideoError(f"{path}: reading video needs PyAV: pip install 'cafe-fer[video]'") from None
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{path}: cannot open it as a video ({e})") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        decoded = 0
        try:
            for decoded, frame in enumerate(container.decode(stream), 1):
                i = decoded - 1
                if i % every:
                    continue
                t = frame.time if frame.time is not None else (i / rate if rate else float("nan"))
                yield Frame(i, float(t), frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed after {decoded} frame(s) ({e})") from None
