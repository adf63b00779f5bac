"""core.media on real files: image modes, EXIF orientation, video sampling, broken files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.errors import MediaError
from core.media import (MediaLimits, center_frame, fps_indices, load_image, load_media,
                        load_video, probe_video, sample_indices)
from tests.media_files import (audio_only_mp4, face_photo, ramp_frames, truncated_copy, write_image,
                               write_video)


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
        path = audio_only_mp4(tmp_path / "bad.m4a.mp4")
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


# ------------------------------------------------------------- header-first limits (issue 14)

def test_probe_image_reads_the_header_only(tmp_path):
    from core.media import probe_image
    from tests.media_files import png_claiming

    photo = write_image(tmp_path / "a.png", face_photo())
    assert probe_image(photo) == {"width": 512, "height": 512, "format": "PNG", "mode": "RGB",
                                  "frames": 1}
    # 30000 x 30000 declared in a file of ~100 bytes: refused before a pixel is decoded.
    huge = png_claiming(tmp_path / "huge.png", 30000, 30000)
    assert huge.stat().st_size < 200
    for call in (probe_image, load_image, load_media):
        with pytest.raises(MediaError, match="megapixel limit"):
            call(huge)
    # Under Pillow's own bomb threshold but over ours: our limit, with the real size.
    with pytest.raises(MediaError, match="13000x13000 is over the 40 megapixel limit"):
        load_image(png_claiming(tmp_path / "big.png", 13000, 13000))


def test_animated_gif_frames_are_counted_and_limited(tmp_path):
    from core.media import probe_image

    frames = [Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50)
    assert probe_image(gif)["frames"] == 5
    assert load_image(gif).shape == (16, 16, 3)  # the first frame
    with pytest.raises(MediaError, match="5 frames is over the 4 frame limit"):
        load_image(gif, MediaLimits(max_image_frames=4))


def test_big_images_are_scaled_down_right_after_decoding(tmp_path):
    limits = MediaLimits(max_side=256)
    png = write_image(tmp_path / "a.png", face_photo())
    media = load_media(png, limits=limits)
    assert media.frames[0].shape == (256, 256, 3)
    assert media.meta == {"width": 256, "height": 256, "original_size": [512, 512]}
    # A JPEG is decoded at a reduced scale by libjpeg, then resized to the exact side.
    wide = np.ascontiguousarray(np.concatenate([face_photo()] * 3, axis=1)[:400])  # 1536 x 400
    jpeg = write_image(tmp_path / "wide.jpg", wide, quality=90)
    small = load_image(jpeg, limits)
    assert small.shape == (67, 256, 3)
    assert abs(float(small.mean()) - float(wide.mean())) < 3  # the same picture, smaller
    assert load_image(jpeg, MediaLimits(max_side=None)).shape == (400, 1536, 3)


def test_exif_turn_and_scale_down_together(tmp_path):
    wide = np.zeros((200, 400, 3), dtype=np.uint8)
    wide[:, :200] = 255  # white left half
    img = Image.fromarray(wide)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    media = load_media(path, limits=MediaLimits(max_side=100))
    rgb = media.frames[0]
    assert rgb.shape == (100, 50, 3) and media.meta["original_size"] == [200, 400]
    assert rgb[:40].mean() > 200 and rgb[-40:].mean() < 50


def test_16_bit_png_is_scaled_down_in_16_bits(tmp_path):
    deep = (np.asarray(Image.fromarray(face_photo()).convert("L"), dtype=np.uint16) * 257)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    rgb = load_image(path, MediaLimits(max_side=128))
    assert rgb.shape == (128, 128, 3) and rgb.max() > 200 and 60 < rgb.mean() < 200  # not white


def test_heic_and_images_sent_as_videos_say_what_they_are(tmp_path):
    from core.media import media_kind, probe_image
    from tests.media_files import heic_like

    heic = heic_like(tmp_path / "IMG_0001.heic")
    no_suffix = tmp_path / "IMG_0002"
    no_suffix.write_bytes(heic.read_bytes())
    for path in (heic, no_suffix):
        assert media_kind(path) == "image"
        for call in (load_media, load_image, probe_image, probe_video):
            with pytest.raises(MediaError, match="HEIC is not supported: convert to JPEG or PNG"):
                call(path)
    from PIL import features

    if features.check("avif"):  # AVIF shares HEIF's container and brands, and Pillow reads it
        avif = write_image(tmp_path / "photo.avif", face_photo())
        assert load_media(avif).frames[0].shape == (512, 512, 3)
    png = write_image(tmp_path / "photo.png", face_photo())
    for call in (load_video, probe_video):
        with pytest.raises(MediaError, match="photo.png: this is an image, not a video"):
            call(png)


def _av1_ramp(tmp_path, n: int = 30):
    from tests.media_files import has_encoder

    if not has_encoder("libsvtav1"):
        pytest.skip("the local PyAV has no AV1 encoder (libsvtav1)")
    return write_video(tmp_path / "ramp.mkv", ramp_frames(n), fps=10, codec="libsvtav1")


def test_pyav_fallback_samples_the_right_frames_of_an_av1_mkv(tmp_path):
    path = _av1_ramp(tmp_path)
    media = load_video(path, num_frames=5)  # decord cannot read AV1: this is the PyAV path
    assert media.meta["frame_count"] == 30 and media.meta["duration_s"] == pytest.approx(3.0)
    expected = [8 * i for i in media.meta["indices"]]
    assert np.allclose([float(f.mean()) for f in media.frames], expected, atol=6)
    assert abs(float(center_frame(path).mean()) - 8 * 15) < 6


@pytest.mark.parametrize("unlimited", [float("inf"), None])
def test_any_limits_the_callers_pass_are_accepted(tmp_path, unlimited):
    """The web path asked for an unbounded length and got "not a readable video (OverflowError)"."""
    path = _av1_ramp(tmp_path)
    limits = MediaLimits(max_video_seconds=unlimited, max_frames=unlimited, max_side=unlimited,
                         max_image_pixels=unlimited, max_file_bytes=unlimited,
                         max_video_side=unlimited, max_image_frames=unlimited)
    assert probe_video(path, limits)["frame_count"] == 30
    assert len(load_video(path, num_frames=4, limits=limits).frames) == 4
    assert load_image(write_image(tmp_path / "a.png", face_photo()), limits).shape == (512, 512, 3)


def test_video_limits_come_from_the_container_header(tmp_path):
    from core.media import VideoTooLong

    path = _av1_ramp(tmp_path)
    with pytest.raises(MediaError, match="64x48 is over the 32 px resolution limit"):
        probe_video(path, MediaLimits(max_video_side=32))
    with pytest.raises(VideoTooLong) as too_long:
        load_video(path, limits=MediaLimits(max_video_seconds=1.0))
    assert too_long.value.duration_s == pytest.approx(3.0, abs=0.2) and too_long.value.limit_s == 1.0
