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


# ------------------------------------------------------------------- the bad-input corpus

def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid little PNG (signature, IHDR, one IDAT, IEND, correct CRCs) whose header declares
    `width` x `height`: what a decompression bomb looks like before anything is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))
    return path


def heic_like(path: Path) -> Path:
    """The start of an iPhone photo: an ISO-BMFF `ftyp` box with the HEIC brands (no pixels)."""
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"
                     + b"\x00\x00\x00\x10meta\x00\x00\x00\x00" + bytes(64))
    return path


def audio_only_mp4(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def zero_frame_mp4(path: Path) -> Path:
    """An mp4 whose H.264 track never got a frame (a recording stopped at once)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()  # the header is written even though no frame follows
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


# Video codecs of the corpus: (file name, PyAV encoder). AV1 in MKV is the one decord cannot read.
CORPUS_CODECS = [("av1.mkv", "libsvtav1"), ("vp9.webm", "libvpx-vp9"), ("hevc.mp4", "libx265")]


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def bad_input_corpus(folder: Path) -> dict[str, Path]:
    """Every kind of file a user might send, written into `folder`: {name: path}.

    Codecs the local PyAV cannot encode are left out (`has_encoder` says which).
    """
    folder.mkdir(parents=True, exist_ok=True)
    photo = face_photo()
    files: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        files[name] = path

    empty = folder / "empty.png"
    empty.touch()
    add("empty", empty)
    add("truncated_png", truncated_copy(write_image(folder / "whole.png", photo),
                                        folder / "truncated.png"))
    add("truncated_jpg", truncated_copy(write_image(folder / "whole.jpg", photo),
                                        folder / "truncated.jpg"))
    text = folder / "text.jpg"
    text.write_text("this is a text file, saved with a .jpg name\n" * 5)
    add("text_as_image", text)
    add("tiny_1x1", write_image(folder / "tiny_1x1.png", photo[:1, :1]))
    add("tiny_19x19", write_image(folder / "tiny_19x19.png", photo[100:119, 200:219]))
    add("thin_300x10", write_image(folder / "thin_300x10.png", photo[100:110, 100:400]))
    # 16-bit greyscale over the full 0..65535 range: clipping to 8 bits makes it almost white.
    grey = np.asarray(Image.fromarray(photo).convert("L"), dtype=np.uint16) * 257
    deep = folder / "deep_16bit.png"
    Image.fromarray(grey).save(deep)
    add("deep_16bit", deep)
    add("cmyk", write_image(folder / "cmyk.jpg", photo, mode="CMYK"))
    frames = [Image.fromarray(np.roll(photo, 8 * i, axis=1)) for i in range(3)]
    gif = folder / "animated.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated_gif", gif)
    # Stored turned on its side with EXIF "rotate 90 CW to display": upright only if read right.
    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(photo[:400, 96:416], k=1)))
    exif = sideways.getexif()
    exif[0x0112] = 6
    rotated = folder / "exif_rotated.jpg"
    sideways.save(rotated, exif=exif, quality=92)
    add("exif_rotated", rotated)
    add("declared_huge", png_claiming(folder / "declared_huge.png", 30000, 30000))
    add("heic", heic_like(folder / "photo.heic"))
    for name, codec in CORPUS_CODECS:
        if has_encoder(codec):
            add(name.split(".")[0], write_video(folder / name, face_frames(12), fps=6, codec=codec))
    add("audio_only", audio_only_mp4(folder / "audio_only.mp4"))
    add("zero_frames", zero_frame_mp4(folder / "zero_frames.mp4"))
    return files
