"""Real media files for tests: images in many modes, mp4s written with PyAV, broken copies.

Face photos come from scikit-image's bundled data (`astronaut()`: a smiling face), so nothing is
downloaded.
"""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def face_photo() -> np.ndarray:
    """Eileen Collins, smiling (512x512 RGB, ships with scikit-image)."""
    import skimage.data

    return skimage.data.astronaut()


def no_face_photo() -> np.ndarray:
    """A cup of coffee: no face."""
    import skimage.data

    return skimage.data.coffee()


def write_image(path: Path, rgb: np.ndarray, mode: str | None = None, **save_args) -> Path:
    img = Image.fromarray(rgb)
    if mode:
        img = img.convert(mode)
    img.save(path, **save_args)
    return path


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str = "libx264") -> Path:
    """An H.264 mp4 of the given RGB frames (even width and height required by yuv420p)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def ramp_frames(n: int = 30, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Frames whose brightness encodes their index (frame i has value 8*i)."""
    return [np.full((height, width, 3), (8 * i) % 256, dtype=np.uint8) for i in range(n)]


def face_frames(n: int = 12) -> list[np.ndarray]:
    """The astronaut photo panned a few pixels per frame: a short video with one face."""
    photo = face_photo()[:320, 96:416]
    return [np.ascontiguousarray(np.roll(photo, 2 * i, axis=1)) for i in range(n)]


def truncated_copy(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst
