"""core.media on real files: image modes, EXIF orientation, video sampling, broken files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.errors import MediaError
from core.media import (MediaLimits, center_frame, fps_indices, load_image, load_media,
                        load_video, probe_video, sample_indices)
from tests.media_files import face_photo, ramp_frames, truncated_copy, write_image, write_video


@pytest.mark.parametrize("name,mode", [("rgb.jpg", "RGB"), ("grey.png", "L"), ("rgba.png", "RGBA"),
                                       ("palette.gif", "P"), ("la.png", "LA"), ("cmyk.jpg", "CMYK"),
                                       ("rgb.webp", "RGB"), ("bw.bmp", "1")])
def test_images_of_every_mode_load_as_rgb(tmp_path, name, mode):
    path = write_image(tmp_path / name, face_photo(), mode=mode)
    rgb = load_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (512, 512, 3)


def test_16_bit_greyscale_is_rescaled_to_8_bit(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    rgb = load_image(path)
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255


def test_rgba_transparency_becomes_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    path = write_image(tmp_path / "clear.png", rgba)
    assert (load_image(path) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :20] = 255  # white left half
    img = Image.fromarray(wide)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    rgb = load_image(path)
    assert rgb.shape == (40, 20, 3)
    assert rgb[:15].mean() > 200 and rgb[-15:].mean() < 50  # white half now on top


def test_image_bytes_load(tmp_path):
    path = write_image(tmp_path / "a.png", face_photo())
    assert load_image(path.read_bytes()).shape == (512, 512, 3)


@pytest.mark.parametrize("content,name,message", [
    (b"", "empty.jpg", "empty"),
    (b"this is text, not a picture", "text.jpg", "not an image"),
])
def test_non_images_raise_media_error(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MediaError, match=message):
        load_image(path)


def test_truncated_jpeg_raises_media_error(tmp_path):
    path = write_image(tmp_path / "full.jpg", face_photo())
    with pytest.raises(MediaError, match="corrupt or truncated"):
        load_image(truncated_copy(path, tmp_path / "half.jpg"))


def test_image_limits(tmp_path):
    path = write_image(tmp_path / "a.png", face_photo())
    with pytest.raises(MediaError, match="megapixel"):
        load_image(path, MediaLimits(max_image_pixels=1000))
    with pytest.raises(MediaError, match="MiB"):
        load_image(path, MediaLimits(max_file_bytes=100))
    with pytest.raises(MediaError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_sampling_indices():
    assert sample_indices(30, 3) == [5, 15, 25]
    assert sample_indices(4, 8) == [0, 1, 2, 3]
    assert sample_indices(0, 8) == []
    assert fps_indices(30, 10.0, 2.0, 64) == [0, 5, 10, 15, 20, 25]
    assert len(fps_indices(3000, 30.0, 30.0, 16)) == 16


def test_video_uniform_sampling_reads_the_right_frames(tmp_path):
    path = write_video(tmp_path / "ramp.mp4", ramp_frames(30), fps=10)
    media = load_video(path, num_frames=5)
    assert media.kind == "video" and len(media.frames) == 5
    assert media.meta["frame_count"] == 30 and media.meta["fps"] == pytest.approx(10.0)
    assert media.meta["duration_s"] == pytest.approx(3.0)
    expected = [8 * i for i in media.meta["indices"]]
    measured = [float(f.mean()) for f in media.frames]
    assert np.allclose(measured, expected, atol=4)  # lossy codec, values within a few levels


def test_video_fps_sampling_and_center_frame(tmp_path):
    path = write_video(tmp_path / "ramp.mp4", ramp_frames(30), fps=10)
    media = load_video(path, fps=2.0)
    assert media.meta["indices"] == [0, 5, 10, 15, 20, 25]
    assert media.meta["timestamps_s"] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert abs(float(center_frame(path).mean()) - 8 * 15) < 4


def test_frame_folder_reads_as_a_video(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(ramp_frames(10)):
        write_image(folder / f"{i:05d}.png", frame)
    media = load_media(folder, num_frames=4)
    assert media.kind == "video" and len(media.frames) == 4
    assert [int(f.mean()) for f in media.frames] == [8 * i for i in media.meta["indices"]]


def test_video_limits(tmp_path):
    path = write_video(tmp_path / "ramp.mp4", ramp_frames(30), fps=10)
    with pytest.raises(MediaError, match="limit"):
        probe_video(path, MediaLimits(max_video_seconds=1.0))
    with pytest.raises(MediaError, match="resolution"):
        probe_video(path, MediaLimits(max_video_side=32))


@pytest.mark.parametrize("case", ["truncated", "text", "empty", "audio_only", "empty_folder"])
def test_broken_videos_raise_one_media_error(tmp_path, case):
    good = write_video(tmp_path / "good.mp4", ramp_frames(30))
    if case == "truncated":
        path = truncated_copy(good, tmp_path / "bad.mp4")
    elif case == "text":
        path = tmp_path / "bad.mp4"
        path.write_text("not a video")
    elif case == "empty":
        path = tmp_path / "bad.mp4"
        path.touch()
    elif case == "audio_only":
        import av

        path = tmp_path / "bad.m4a.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("aac", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate = 8000
            for packet in [*stream.encode(frame), *stream.encode()]:
                container.mux(packet)
    else:
        path = tmp_path / "frames"
        path.mkdir()
    with pytest.raises(MediaError):
        load_media(path)


def test_load_media_dispatches_on_content(tmp_path):
    img = write_image(tmp_path / "photo.png", face_photo())
    vid = write_video(tmp_path / "clip.mp4", ramp_frames(12))
    assert load_media(img).kind == "image"
    assert load_media(vid, num_frames=4).kind == "video"
    no_ext = tmp_path / "photo"
    no_ext.write_bytes(img.read_bytes())
    assert load_media(no_ext).kind == "image"
