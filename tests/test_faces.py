"""The face pipeline on real photos that ship with scikit-image."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ModelLoadError
from core.attributes import FairFacePredictor
from core.faces import ARCFACE_TEMPLATE, FaceConfig, align_face, shared_analyzer, similarity_transform
from tests.media_files import face_frames, face_photo, no_face_photo, write_image, write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analyzer():
    return shared_analyzer()


def test_smiling_face_is_found_and_happy(analyzer):
    faces = analyzer.analyze(face_photo())
    assert len(faces) == 1
    face = faces[0]
    x1, y1, x2, y2 = face.box
    assert 150 < x1 < x2 < 300 and 40 < y1 < y2 < 200  # the astronaut's face, not her suit
    assert face.score > 0.95
    assert max(face.prior, key=face.prior.get) == "happiness" and face.prior["happiness"] > 0.5
    assert sum(face.prior.values()) == pytest.approx(1.0, abs=1e-4)
    assert face.embedding.shape == (128,) and np.isfinite(face.embedding).all()
    # Attributes come only from a configured network (the default age/gender one gives no
    # race): whatever it does not estimate stays empty, never invented.
    assert face.attributes is None or face.attributes.race == ""
    left_eye, right_eye, nose, mouth_l, mouth_r = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and nose[1] < mouth_l[1]


def test_no_face_gives_an_empty_list(analyzer):
    assert analyzer.analyze(no_face_photo()) == []
    assert analyzer.analyze(np.zeros((64, 64, 3), dtype=np.uint8)) == []


def test_several_faces_come_largest_first(analyzer):
    photo = face_photo()
    small = photo[::2, ::2]
    canvas = np.full((512, 1024, 3), 128, dtype=np.uint8)
    canvas[:, :512] = photo
    canvas[100:356, 700:956] = small
    faces = analyzer.analyze(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area and faces[0].box[0] < 512 < faces[1].box[0]


def test_alignment_puts_landmarks_on_the_template(analyzer):
    face = analyzer.analyze(face_photo())[0]
    assert face.aligned.shape == (112, 112, 3) and face.aligned.dtype == np.uint8
    matrix = similarity_transform(face.landmarks.astype(float), ARCFACE_TEMPLATE.astype(float))
    mapped = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 6  # 5 real points fit a similarity well


def test_similarity_transform_recovers_a_known_transform():
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)
    assert align_face(face_photo(), src.astype(np.float32)).shape == (112, 112, 3)


def test_fairface_folder_loads_and_predicts_valid_categories(tmp_path, analyzer):
    import torchvision

    net = torchvision.models.resnet34(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 18)
    torch.save(net.state_dict(), tmp_path / FairFacePredictor.weights_file)
    predictor = FairFacePredictor(str(tmp_path))
    face = analyzer.analyze(face_photo())[0]
    (attrs,) = predictor.predict([face.aligned])
    assert attrs.age in {"0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"}
    assert attrs.gender in {"male", "female"} and attrs.to_json()["race"]


def test_missing_attribute_and_prior_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="FairFace"):
        FairFacePredictor(str(tmp_path))
    from core.priors import TransformersPrior

    with pytest.raises(ModelLoadError, match="prior network"):
        TransformersPrior(str(tmp_path / "nothing-here"))


def test_transformers_prior_from_a_local_folder(tmp_path):
    """A stronger prior network loads from a folder; its expression labels are canonicalised."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from core.priors import TransformersPrior

    labels = ["Angry", "Happy", "Neutral", "not-a-face"]
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64,
                       id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    prior = TransformersPrior(str(tmp_path))
    assert prior.labels == ["anger", "happiness", "neutral"]
    probs, embedding = prior.predict([face_photo(), no_face_photo()])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert embedding.shape == (2, 32)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_faces_command_prints_prediction_json(tmp_path):
    photo = write_image(tmp_path / "photo.jpg", face_photo())
    result = _run("faces", str(photo), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    (face,) = out["faces"]
    assert set(face) >= {"box", "score", "landmarks", "prior", "attributes"}
    assert len(face["box"]) == 4 and len(face["landmarks"]) == 5
    assert max(face["prior"], key=face["prior"].get) == "happiness"


def test_faces_command_on_a_video_reports_faces_per_frame(tmp_path):
    video = write_video(tmp_path / "clip.mp4", face_frames(12), fps=6)
    result = _run("faces", str(video), "--json", "--frames", "4")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["media"]["kind"] == "video" and out["media"]["frame_count"] == 12
    assert sorted({f["frame"] for f in out["faces"]}) == [0, 1, 2, 3]


def test_faces_command_on_a_face_crop_and_on_a_tiny_image(tmp_path):
    import cv2

    crop = write_image(tmp_path / "crop.png", cv2.resize(face_photo()[40:200, 150:300], (48, 48)))
    result = _run("faces", str(crop), "--aligned", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["faces_found"] == 1 and out["notes"] == [] and out["faces"][0]["box"] == [0, 0, 48, 48]
    tiny = write_image(tmp_path / "tiny.png", face_photo()[::40, ::40])  # 13x13
    result = _run("faces", str(tiny))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "note: too small to find a face (13×13; at least 20 px a side)" in result.stdout


def test_faces_command_bad_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("text, not an image")
    result = _run("faces", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not an image" in result.stderr
    assert "Traceback" not in result.stderr


def test_retinaface_loads_from_a_weights_folder_without_downloading(tmp_path):
    """The facexlib path: weights present in the folder -> no download, the detector runs.

    The weights here are random (the real file cannot be downloaded in tests), so this checks the
    loading and output plumbing, not detection quality.
    """
    from facexlib.detection.retinaface import RetinaFace

    from core.faces import RetinaFaceDetector, make_detector

    net = RetinaFace(network_name="resnet50", half=False, device="cpu")
    torch.save(net.state_dict(), tmp_path / RetinaFaceDetector.weights_file)
    detector = make_detector(FaceConfig(facexlib_dir=str(tmp_path)))
    assert isinstance(detector, RetinaFaceDetector)
    for box, score, points in detector.detect(face_photo()[:128, :128]):
        assert box.shape == (4,) and points.shape == (5, 2) and 0 <= score <= 1
    with pytest.raises(ModelLoadError, match="detection_Resnet50_Final"):
        RetinaFaceDetector(str(tmp_path / "empty"))
