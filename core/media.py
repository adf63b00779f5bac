"""Images and videos in, RGB uint8 frames out — with limits and one clear error type.

    from core.media import load_media
    media = load_media("clip.mp4", num_frames=8)   # Media(kind="video", frames=[8 x HxWx3], meta)

Videos are decoded with decord; PyAV is the fallback when decord cannot open a file. A folder
of frame images (how DFEW and FERV39k ship their clips) reads as a video. Every failure a user
can cause (corrupt, truncated, empty, zero frames, too big, not media) raises `MediaError`.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import MediaError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}


@dataclass(frozen=True)
class MediaLimits:
    max_file_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 40_000_000          # ~ 7300 x 5500
    max_video_seconds: float = 120.0
    max_video_side: int = 4096
    max_frames: int = 64


DEFAULT_LIMITS = MediaLimits()


@dataclass
class Media:
    kind: str                                   # "image" or "video"
    frames: list[np.ndarray]                    # RGB uint8, H x W x 3
    meta: dict = field(default_factory=dict)    # size, fps, duration_s, frame_count, timestamps_s


# ---------------------------------------------------------------------------------- images

def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, L, 1, I;16, I, F, CMYK) -> RGB, alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def _check_file(path: Path, limits: MediaLimits) -> None:
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{path.name}: the file is empty")
    if size > limits.max_file_bytes:
        raise MediaError(f"{path.name}: {size / 2**20:.0f} MiB is over the "
                         f"{limits.max_file_bytes / 2**20:.0f} MiB limit")


def load_image(source: str | os.PathLike | bytes, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """An image file (or its bytes) -> RGB uint8 array, upright per its EXIF orientation."""
    if isinstance(source, bytes):
        name, stream = "image", io.BytesIO(source)
        if len(source) == 0:
            raise MediaError("the image is empty")
        if len(source) > limits.max_file_bytes:
            raise MediaError("the image is over the file size limit")
    else:
        path = Path(source)
        _check_file(path, limits)
        name, stream = path.name, path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                if img.width * img.height > limits.max_image_pixels:
                    raise MediaError(f"{name}: {img.width}x{img.height} is over the "
                                     f"{limits.max_image_pixels / 1e6:.0f} megapixel limit")
                img.load()
                img = ImageOps.exif_transpose(img)
                return np.asarray(_to_rgb(img), dtype=np.uint8).copy()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(f"{name}: the image is too large to decode safely") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for truncated/corrupt data
        raise MediaError(f"{name}: the image is corrupt or truncated ({exc})") from None


# ---------------------------------------------------------------------------------- videos

def sample_indices(frame_count: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread uniformly (segment centres) over `frame_count` frames."""
    if frame_count <= 0:
        return []
    if num_frames >= frame_count:
        return list(range(frame_count))
    step = frame_count / num_frames
    return [min(frame_count - 1, int(step * i + step / 2)) for i in range(num_frames)]


def fps_indices(frame_count: int, native_fps: float, target_fps: float, max_frames: int) -> list[int]:
    """Indices that resample a video at `target_fps` (capped at `max_frames`, spread uniformly)."""
    if frame_count <= 0 or native_fps <= 0:
        return []
    duration = frame_count / native_fps
    wanted = max(1, int(duration * target_fps))
    indices = sorted({min(frame_count - 1, int(i * native_fps / target_fps)) for i in range(wanted)})
    if len(indices) > max_frames:
        indices = [indices[i] for i in sample_indices(len(indices), max_frames)]
    return indices


class _VideoReader:
    """The part of a decoder we need: frame count, fps, size, and frames by index."""

    frame_count: int
    fps: float
    width: int
    height: int

    def get(self, indices: list[int]) -> list[np.ndarray]:
        raise NotImplementedError


class _DecordReader(_VideoReader):
    def __init__(self, path: Path):
        import decord

        decord.logging.set_level(decord.logging.QUIET)  # we report failures ourselves, once
        self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        self.frame_count = len(self._vr)
        self.fps = float(self._vr.get_avg_fps() or 0.0)
        first = self._vr[0].shape if self.frame_count else (0, 0, 3)
        self.height, self.width = int(first[0]), int(first[1])

    def get(self, indices: list[int]) -> list[np.ndarray]:
        batch = self._vr.get_batch(indices).asnumpy()
        return [np.ascontiguousarray(f) for f in batch]


class _PyAVReader(_VideoReader):
    """Decodes the whole stream once (only used when decord fails, e.g. odd containers)."""

    def __init__(self, path: Path, limits: MediaLimits):
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path.name}: the file has no video stream")
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            self._frames = []
            max_decoded = int(limits.max_video_seconds * max(self.fps, 1.0) * 1.1) + 1
            for frame in container.decode(stream):
                self._frames.append(frame.to_ndarray(format="rgb24"))
                if len(self._frames) > max_decoded:
                    raise MediaError(f"{path.name}: the video is longer than the "
                                     f"{limits.max_video_seconds:.0f} s limit")
        self.frame_count = len(self._frames)
        self.height, self.width = self._frames[0].shape[:2] if self._frames else (0, 0)

    def get(self, indices: list[int]) -> list[np.ndarray]:
        return [self._frames[i] for i in indices]


class _FolderReader(_VideoReader):
    """A clip stored as a folder of frame images (sorted by name), as DFEW and FERV39k ship."""

    def __init__(self, path: Path, limits: MediaLimits, fps: float = 25.0):
        self._files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self._limits = limits
        self.frame_count, self.fps = len(self._files), fps
        self.height = self.width = 0
        if self._files:
            self.height, self.width = load_image(self._files[0], limits).shape[:2]

    def get(self, indices: list[int]) -> list[np.ndarray]:
        return [load_image(self._files[i], self._limits) for i in indices]


def _probe_container(path: Path) -> None:
    """Reject non-video files with a clear message before decord logs its own errors to stderr."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path.name}: the file has no video stream")
    except MediaError:
        raise
    except Exception:
        raise MediaError(f"{path.name}: not a video file, or the file is corrupt or truncated") from None


def _open_video(path: Path, limits: MediaLimits) -> _VideoReader:
    if path.is_dir():
        return _FolderReader(path, limits)
    _check_file(path, limits)
    _probe_container(path)
    try:
        reader: _VideoReader = _DecordReader(path)
        if reader.frame_count > 0:
            return reader
    except MediaError:
        raise
    except Exception as exc:  # decord raises its own DECORDError/RuntimeError for unreadable files
        log.debug("decord could not open %s (%s); trying PyAV", path.name, exc)
    try:
        return _PyAVReader(path, limits)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"{path.name}: not a readable video ({type(exc).__name__})") from None


def probe_video(path: str | os.PathLike, limits: MediaLimits = DEFAULT_LIMITS) -> dict:
    """Frame count, fps, duration and size of a video, checked against the limits."""
    reader = _open_video(Path(path), limits)
    return _checked_meta(Path(path), reader, limits)


def _checked_meta(path: Path, reader: _VideoReader, limits: MediaLimits) -> dict:
    if reader.frame_count == 0:
        raise MediaError(f"{path.name}: the video has no frames")
    duration = reader.frame_count / reader.fps if reader.fps > 0 else 0.0
    if duration > limits.max_video_seconds:
        raise MediaError(f"{path.name}: {duration:.0f} s is over the {limits.max_video_seconds:.0f} s limit")
    if max(reader.width, reader.height) > limits.max_video_side:
        raise MediaError(f"{path.name}: {reader.width}x{reader.height} is over the "
                         f"{limits.max_video_side} px resolution limit")
    return {"frame_count": reader.frame_count, "fps": reader.fps, "duration_s": duration,
            "width": reader.width, "height": reader.height}


def load_video(path: str | os.PathLike, num_frames: int | None = 8, fps: float | None = None,
               limits: MediaLimits = DEFAULT_LIMITS) -> Media:
    """Decode a video (file or frame folder) into sampled frames.

    `num_frames`: that many frames uniformly over the clip (default). `fps`: sample at that rate
    instead (capped at `limits.max_frames`).
    """
    path = Path(path)
    reader = _open_video(path, limits)
    meta = _checked_meta(path, reader, limits)
    if fps is not None:
        indices = fps_indices(reader.frame_count, reader.fps or 25.0, fps, limits.max_frames)
    else:
        indices = sample_indices(reader.frame_count, min(num_frames or 8, limits.max_frames))
    try:
        frames = reader.get(indices)
    except MediaError:
        raise
    except Exception as exc:  # a stream that is truncated after a valid header
        raise MediaError(f"{path.name}: the video is corrupt or truncated ({type(exc).__name__})") from None
    if not frames:
        raise MediaError(f"{path.name}: no frames could be decoded")
    frames = [f if f.ndim == 3 and f.shape[2] == 3 else _to_rgb_array(f) for f in frames]
    meta["indices"] = indices
    meta["timestamps_s"] = [i / reader.fps if reader.fps else 0.0 for i in indices]
    return Media(kind="video", frames=frames, meta=meta)


def _to_rgb_array(frame: np.ndarray) -> np.ndarray:
    return np.asarray(_to_rgb(Image.fromarray(frame)), dtype=np.uint8)


def center_frame(path: str | os.PathLike, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """The middle frame of a video (or the image itself), as the paper's Gemini prompts use."""
    path = Path(path)
    if media_kind(path) == "image":
        return load_image(path, limits)
    reader = _open_video(path, limits)
    _checked_meta(path, reader, limits)
    return reader.get([reader.frame_count // 2])[0]


# ---------------------------------------------------------------------------------- either

def media_kind(path: str | os.PathLike) -> str:
    """"image" or "video", from the extension, a frame folder, or by sniffing the content."""
    path = Path(path)
    if path.is_dir():
        return "video"
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    try:
        with Image.open(path):
            return "image"
    except Exception:
        return "video"


def load_media(path: str | os.PathLike, num_frames: int = 8, fps: float | None = None,
               limits: MediaLimits = DEFAULT_LIMITS) -> Media:
    """An image (1 frame) or a video (sampled frames), whichever the file is."""
    path = Path(path)
    if media_kind(path) == "image":
        frame = load_image(path, limits)
        return Media(kind="image", frames=[frame],
                     meta={"width": frame.shape[1], "height": frame.shape[0]})
    return load_video(path, num_frames=num_frames, fps=fps, limits=limits)
