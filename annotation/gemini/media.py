"""What Gemini is shown: JPEGs of an image or of a video's sampled frames, and their token cost.
"""
from __future__ import annotations

import io
import os

import numpy as np


IMAGE_TOKENS = 258       # Gemini bills an image up to 384 px (or one 768 px tile) as 258 tokens
MAX_SIDE = 768           # larger images are tiled (more tokens) for no gain on a face crop


def encode_jpeg(rgb: np.ndarray, max_side: int = MAX_SIDE, quality: int = 90) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def sample_images(path: str | os.PathLike, modality: str, frames: int = 1) -> list[bytes]:
    """JPEG bytes to send for a sample: the image, or a video's centre frame / `frames` frames."""
    from core.media import center_frame, load_image, load_video

    if modality != "video":
        return [encode_jpeg(load_image(path))]
    if frames <= 1:
        return [encode_jpeg(center_frame(path))]
    return [encode_jpeg(frame) for frame in load_video(path, num_frames=frames).frames]


def estimate_tokens(images: list[bytes], prompt: str) -> int:
    return IMAGE_TOKENS * len(images) + len(prompt) // 4 + 600  # 600: a typical answer
