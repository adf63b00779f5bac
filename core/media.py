"""Images and videos in, RGB uint8 frames out — with limits and one clear error type.

    from core.media import load_media
    media = load_media("clip.mp4", num_frames=8)   # Media(kind="video", frames=[8 x HxWx3], meta)

Videos are decoded with decord; PyAV is the fallback when decord cannot open a file (AV1, odd
containers). A folder of frame images (how DFEW and FERV39k ship their clips) reads as a video.
Every failure a user can cause (corrupt, truncated, empty, zero frames, too big, not media)
raises `MediaError`.

Memory is bounded before anything is decoded: an image's size and frame count come from its
header (`probe_image`, PIL's lazy open) and a video's size and length from its container
(`probe_video`), and both are refused above `MediaLimits`. An image that is allowed but big is
scaled down right after decoding (longest side `max_side`, JPEGs already while decoding), so face
detection never sees a giant array. The PyAV fallback converts only the sampled frames to RGB.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import MediaError

log = logging.getLogger(__name__)

# Pillow warns on open above its own bomb threshold; our limit (checked right after the lazy
# open, before any decode) is the one that decides, and a warning line on stderr would break
# the CLI's "one error line" contract. A module filter, because catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}
# Phones' default photo format; Pillow cannot decode it without a plugin we do not ship.
HEIF_EXTENSIONS = {".heic", ".heif", ".hif"}
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"heif"}
HEIC_MESSAGE = "HEIC is not supported: convert to JPEG or PNG"
# Formats PIL identifies that are pictures (PIL also "opens" MPEG-1 video: that one is not).
_PICTURE_FORMATS = {"PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "DIB", "TIFF", "AVIF", "ICO",
                    "PPM", "JPEG2000", "TGA", "PCX", "SGI", "QOI", "DDS", "PSD"}


@dataclass(frozen=True)
class MediaLimits:
    """What a file may cost. Any field may be None or float("inf") for "no limit"."""
    max_file_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 40_000_000          # ~ 7300 x 5500, checked from the header
    max_side: int = 2048                        # decoded images are scaled down to this side
    max_image_frames: int = 5_000               # animated GIF / WebP / multi-page TIFF, from the header
    max_video_seconds: float = 120.0
    max_video_side: int = 4096
    max_frames: int = 64


DEFAULT_LIMITS = MediaLimits()


def _limit(value) -> float:
    """A limit as a number: None, inf and NaN all mean unlimited (callers pass each of them)."""
    if value is None:
        return math.inf
    value = float(value)
    return math.inf if math.isnan(value) else value


def _describe(value: float, unit: str = "", scale: float = 1.0) -> str:
    return f"{value / scale:.0f}{unit}" if math.isfinite(value) else "unlimited"


class VideoTooLong(MediaError):
    """A video over `max_video_seconds`; carries the numbers so a UI can say what to do."""

    def __init__(self, message: str, duration_s: float, limit_s: float):
        super().__init__(message)
        self.duration_s, self.limit_s = duration_s, limit_s


@dataclass
class Media:
    kind: str                                   # "image" or "video"
    frames: list[np.ndarray]                    # RGB uint8, H x W x 3
    meta: dict = field(default_factory=dict)    # size, fps, duration_s, frame_count, timestamps_s


# ---------------------------------------------------------------------------------- images

def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, L, 1, I;16, I, F, CMYK) -> RGB, alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Stretched to the full 8-bit range (a 16-bit PNG is often dark in its low bits);
        # float32, not float64: half the memory for a big scan.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _check_file(path: Path, limits: MediaLimits) -> None:
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if path.is_dir():
        raise MediaError(f"{path.name}: a folder, not an image file")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{path.name}: the file is empty")
    max_bytes = _limit(limits.max_file_bytes)
    if size > max_bytes:
        raise MediaError(f"{path.name}: {size / 2**20:.0f} MiB is over the "
                         f"{max_bytes / 2**20:.0f} MiB limit")


def _is_heif(head: bytes) -> bool:
    """An ISO-BMFF file (`....ftyp<brand>`) whose major or compatible brands are HEIF's."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return False
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, min(len(head), 64) - 3, 4)}
    if brands & {b"avif", b"avis"}:  # AVIF shares HEIF's "mif1" brand, and Pillow reads it
        return False
    return bool(brands & _HEIF_BRANDS)


def _head(path: Path, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(n)
    except OSError:
        return b""


def _source(source: str | os.PathLike | bytes, limits: MediaLimits) -> tuple[str, object, bytes]:
    """(name for messages, what PIL opens, the first bytes), after the size checks."""
    if isinstance(source, bytes):
        if len(source) == 0:
            raise MediaError("the image is empty")
        if len(source) > _limit(limits.max_file_bytes):
            raise MediaError("the image is over the file size limit")
        return "image", io.BytesIO(source), source[:64]
    path = Path(source)
    _check_file(path, limits)
    return path.name, path, _head(path)


def _open_checked(name: str, stream, head: bytes, limits: MediaLimits) -> tuple[Image.Image, int]:
    """PIL's lazy open (header only, no pixels) and the header checked against the limits."""
    if _is_heif(head) or Path(name).suffix.lower() in HEIF_EXTENSIONS:
        raise MediaError(f"{name}: {HEIC_MESSAGE}")
    max_pixels = _limit(limits.max_image_pixels)
    try:
        img = Image.open(stream)
    except Image.DecompressionBombError:
        # PIL refuses > 2 x Image.MAX_IMAGE_PIXELS at open, before we can read the size.
        raise MediaError(f"{name}: the image declares more than "
                         f"{2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels, over the "
                         f"{_describe(max_pixels, '', 1e6)} megapixel limit") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a header PIL cannot parse
        raise MediaError(f"{name}: the image is corrupt or truncated ({_reason(exc)})") from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise MediaError(f"{name}: the image header declares {width}x{height} pixels")
        if width * height > max_pixels:
            raise MediaError(f"{name}: {width}x{height} is over the "
                             f"{_describe(max_pixels, '', 1e6)} megapixel limit")
        # PIL counts GIF/WebP/TIFF frames by walking the frame headers, not by decoding them.
        frames = int(getattr(img, "n_frames", 1) or 1)
        if frames > _limit(limits.max_image_frames):
            raise MediaError(f"{name}: {frames} frames is over the "
                             f"{_describe(_limit(limits.max_image_frames))} frame limit")
        if frames > 1:
            img.seek(0)  # the first frame is the picture we analyse
        return img, frames
    except MediaError:
        img.close()
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        img.close()
        raise MediaError(f"{name}: the image is corrupt or truncated ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    """PIL's own words for a broken file, shortened: never more than a line of it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def probe_image(path: str | os.PathLike, limits: MediaLimits = DEFAULT_LIMITS) -> dict:
    """Width, height, format and frame count from the header, checked against `limits`.

    Reads no pixels, so it is cheap on any upload; raises MediaError (a UserError) for a file
    that is empty, too large, not an image, HEIC, or declares more pixels or frames than allowed.
    A truncated body is only found by decoding (`load_image`).
    """
    name, stream, head = _source(path, limits)
    img, frames = _open_checked(name, stream, head, limits)
    with img:
        return {"width": img.width, "height": img.height, "format": img.format,
                "mode": img.mode, "frames": frames}


# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not lose the picture: show it as stored
        return 1


def _shrunk_size(width: int, height: int, max_side: float) -> tuple[int, int] | None:
    if max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode(img: Image.Image, name: str, limits: MediaLimits) -> tuple[np.ndarray, dict]:
    """Pixels of an opened image: upright, RGB, longest side at most `limits.max_side`."""
    max_side = _limit(limits.max_side)
    orientation = _orientation(img)  # read first: a resized copy no longer carries TIFF tags
    original = img.size
    target = _shrunk_size(*original, max_side)
    if target is not None and img.format in ("JPEG", "MPO"):
        # libjpeg decodes straight at 1/2, 1/4 or 1/8 scale (still >= target): a quarter of
        # the memory or less for a big photo.
        img.draft(img.mode, target)
    img.load()
    if target is not None:
        if img.mode in ("P", "PA", "1"):  # palette/bilevel resize only by nearest neighbour
            img = img.convert("RGBA" if img.mode != "1" else "L")
        # reducing_gap: a cheap box reduce first, then LANCZOS (Pillow cannot reduce I;16)
        gap = None if img.mode.startswith("I;16") else 3.0
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=gap)
    if orientation in _ORIENTATION:
        img = img.transpose(_ORIENTATION[orientation])
    rgb = np.asarray(_to_rgb(img), dtype=np.uint8)
    meta = {"width": rgb.shape[1], "height": rgb.shape[0]}
    if target is not None:
        width, height = original if orientation < 5 else original[::-1]
        meta["original_size"] = [width, height]  # face boxes are in the scaled picture
    return (rgb if rgb.flags.writeable else rgb.copy()), meta


def _load_image(source: str | os.PathLike | bytes, limits: MediaLimits) -> tuple[np.ndarray, dict]:
    name, stream, head = _source(source, limits)
    img, _ = _open_checked(name, stream, head, limits)
    try:
        return _decode(img, name, limits)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(f"{name}: the image is too large to decode safely") from None
    except MemoryError:
        raise MediaError(f"{name}: not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        # PIL raises these for truncated/corrupt data
        raise MediaError(f"{name}: the image is corrupt or truncated ({_reason(exc)})") from None
    finally:
        img.close()


def load_image(source: str | os.PathLike | bytes, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """An image file (or its bytes) -> RGB uint8 array, upright per its EXIF orientation.

    Checked from the header first (`probe_image`); scaled down to `limits.max_side` when bigger.
    """
    return _load_image(source, limits)[0]


# ---------------------------------------------------------------------------------- videos

def sample_indices(frame_count: int, num_frames: int | float) -> list[int]:
    """`num_frames` indices spread uniformly (segment centres) over `frame_count` frames."""
    if frame_count <= 0:
        return []
    if num_frames >= frame_count:
        return list(range(frame_count))
    num_frames = max(1, int(num_frames))
    step = frame_count / num_frames
    return [min(frame_count - 1, int(step * i + step / 2)) for i in range(num_frames)]


def fps_indices(frame_count: int, native_fps: float, target_fps: float,
                max_frames: int | float) -> list[int]:
    """Indices that resample a video at `target_fps` (capped at `max_frames`, spread uniformly)."""
    if frame_count <= 0 or native_fps <= 0 or target_fps <= 0:
        return []
    duration = frame_count / native_fps
    wanted = max(1, min(frame_count, int(duration * target_fps)))
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
    """PyAV, for what decord cannot open (AV1, some MKV/WebM). Nothing is kept in memory.

    The frame count is the container's, or else the number of video packets (demuxed, not
    decoded); `get` decodes up to the last wanted frame and converts only the wanted ones.
    """

    def __init__(self, path: Path, header: dict):
        import av

        self._path = path
        self.fps, self.width, self.height = header["fps"], header["width"], header["height"]
        frames = header["frames"]
        if frames <= 0:
            # Demuxing reads packets without decoding them: fast, and bounded by the file size
            # limit, so the count (and the length check after it) is exact.
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                frames = sum(1 for packet in container.demux(stream) if packet.size)
        self.frame_count = frames

    def get(self, indices: list[int]) -> list[np.ndarray]:
        import av

        if not indices:
            return []
        wanted, last = set(indices), max(indices)
        found: dict[int, np.ndarray] = {}
        latest = None
        with av.open(str(self._path)) as container:
            stream = container.streams.video[0]
            for index, frame in enumerate(container.decode(stream)):
                latest = frame
                if index in wanted:
                    found[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
        if latest is None:
            return []
        # A packet count can exceed the frames the decoder gives (a dropped frame): the clip's
        # last frame stands in for indices past its end.
        tail = None
        frames = []
        for i in indices:
            if i not in found:
                tail = tail if tail is not None else latest.to_ndarray(format="rgb24")
                frames.append(tail)
            else:
                frames.append(found[i])
        return frames


class _FolderReader(_VideoReader):
    """A clip stored as a folder of frame images (sorted by name), as DFEW and FERV39k ship."""

    def __init__(self, path: Path, limits: MediaLimits, fps: float = 25.0):
        self._files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self._limits = limits
        self.frame_count, self.fps = len(self._files), fps
        self.height = self.width = 0
        if self._files:
            first = probe_image(self._files[0], limits)  # header only: no decode to learn the size
            self.height, self.width = first["height"], first["width"]

    def get(self, indices: list[int]) -> list[np.ndarray]:
        return [load_image(self._files[i], self._limits) for i in indices]


def _image_format(path: Path) -> str | None:
    """The picture format PIL recognises in the file's content (None: not a picture)."""
    try:
        with Image.open(path) as img:
            return img.format if img.format in _PICTURE_FORMATS else None
    except Image.DecompressionBombError:
        return "image"
    except Exception:
        return None


def _container_header(path: Path, limits: MediaLimits) -> dict:
    """The container's word on the video stream (size, fps, frames, duration), checked first.

    Rejects non-video files with a clear message before decord logs its own errors to stderr,
    and refuses an over-size or clearly over-long video before any frame is decoded.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path.name}: the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            frames = int(stream.frames or 0)
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
    except MediaError:
        raise
    except Exception:
        raise MediaError(f"{path.name}: not a video file, or the file is corrupt or truncated") from None
    _check_side(path, width, height, limits)
    seconds = _limit(limits.max_video_seconds)
    # Only a clear excess here: the exact check (frames / fps) follows once the clip is open.
    if duration > seconds * 1.05 + 1.0:
        _too_long(path, duration, seconds)
    return {"fps": fps, "width": width, "height": height, "frames": frames, "duration_s": duration}


def _check_side(path: Path, width: int, height: int, limits: MediaLimits) -> None:
    max_side = _limit(limits.max_video_side)
    if max(width, height) > max_side:
        raise MediaError(f"{path.name}: {width}x{height} is over the "
                         f"{max_side:.0f} px resolution limit")


def _too_long(path: Path, duration: float, seconds: float) -> None:
    raise VideoTooLong(f"{path.name}: {duration:.0f} s is over the {seconds:.0f} s limit",
                       duration, seconds)


def _open_video(path: Path, limits: MediaLimits) -> _VideoReader:
    if path.is_dir():
        return _FolderReader(path, limits)
    _check_file(path, limits)
    if _is_heif(_head(path)) or path.suffix.lower() in HEIF_EXTENSIONS:
        raise MediaError(f"{path.name}: {HEIC_MESSAGE}")
    if path.suffix.lower() not in VIDEO_EXTENSIONS and _image_format(path):
        # FFmpeg would "play" a PNG as a one-frame video; say what the file is instead.
        raise MediaError(f"{path.name}: this is an image, not a video: load it as an image")
    header = _container_header(path, limits)
    try:
        reader: _VideoReader = _DecordReader(path)
        if reader.frame_count > 0:
            return reader
    except MediaError:
        raise
    except Exception as exc:  # decord raises its own DECORDError/RuntimeError for unreadable files
        log.debug("decord could not open %s (%s); trying PyAV", path.name, exc)
    try:
        return _PyAVReader(path, header)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"{path.name}: not a readable video ({type(exc).__name__})") from None


def probe_video(path: str | os.PathLike, limits: MediaLimits = DEFAULT_LIMITS) -> dict:
    """Frame count, fps, duration and size of a video, checked against the limits.

    Decodes at most one frame (decord's first, for its size); the PyAV fallback decodes none.
    A clip over `max_video_seconds` raises `VideoTooLong` (a MediaError).
    """
    reader = _open_video(Path(path), limits)
    return _checked_meta(Path(path), reader, limits)


def _checked_meta(path: Path, reader: _VideoReader, limits: MediaLimits) -> dict:
    if reader.frame_count == 0:
        raise MediaError(f"{path.name}: the video has no frames")
    duration = reader.frame_count / reader.fps if reader.fps > 0 else 0.0
    seconds = _limit(limits.max_video_seconds)
    if duration > seconds:
        _too_long(path, duration, seconds)
    _check_side(path, reader.width, reader.height, limits)
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
    max_frames = _limit(limits.max_frames)
    if fps is not None:
        indices = fps_indices(reader.frame_count, reader.fps or 25.0, fps, max_frames)
    else:
        indices = sample_indices(reader.frame_count, min(num_frames or 8, max_frames))
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
    try:
        frames = reader.get([reader.frame_count // 2])
    except Exception as exc:
        raise MediaError(f"{path.name}: the video is corrupt or truncated ({type(exc).__name__})") from None
    if not frames:
        raise MediaError(f"{path.name}: no frames could be decoded")
    return frames[0]


# ---------------------------------------------------------------------------------- either

def media_kind(path: str | os.PathLike) -> str:
    """"image" or "video", from the extension, a frame folder, or by sniffing the content."""
    path = Path(path)
    if path.is_dir():
        return "video"
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in HEIF_EXTENSIONS:
        return "image"  # HEIC: load_image says plainly that it is not supported
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if _is_heif(_head(path)) or _image_format(path):
        return "image"
    return "video"


def load_media(path: str | os.PathLike, num_frames: int = 8, fps: float | None = None,
               limits: MediaLimits = DEFAULT_LIMITS) -> Media:
    """An image (1 frame) or a video (sampled frames), whichever the file is.

    An image's meta has its (possibly scaled-down) width and height, and `original_size` when
    it was scaled down to `limits.max_side`.
    """
    path = Path(path)
    if media_kind(path) == "image":
        frame, meta = _load_image(path, limits)
        return Media(kind="image", frames=[frame], meta=meta)
    return load_video(path, num_frames=num_frames, fps=fps, limits=limits)


# ---------------------------------------------------------------------------------- identity

def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; for a frame folder, of its frames' hashes in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for frame in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            digest.update(hashlib.sha256(frame.read_bytes()).digest())
        return digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
