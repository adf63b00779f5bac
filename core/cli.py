"""`python app.py faces MEDIA [--json]`: what the face pipeline sees in an image or a video."""
from __future__ import annotations

import argparse
import json
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("faces", help="detect faces, landmarks, prior expression scores, AGR")
    p.add_argument("media", help="an image, a video file or a folder of frames")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from a video (default 8)")
    p.add_argument("--json", action="store_true", help="print the prediction-JSON face fields")
    p.set_defaults(handler=faces_command)


def analyze_media(path: str, num_frames: int = 8) -> dict:
    """Faces of an image, or of each sampled video frame, in the prediction JSON shape."""
    from core.faces import shared_analyzer
    from core.media import load_media

    started = time.perf_counter()
    media = load_media(path, num_frames=num_frames)
    decoded = time.perf_counter()
    analyzer = shared_analyzer()
    faces = []
    for index, frame in enumerate(media.frames):
        for face in analyzer.analyze(frame):
            entry = face.to_json()
            if media.kind == "video":
                entry["frame"] = index
                entry["time_s"] = round(media.meta["timestamps_s"][index], 3)
            faces.append(entry)
    done = time.perf_counter()
    return {"media": {"kind": media.kind, **{k: v for k, v in media.meta.items()
                                            if k not in ("indices", "timestamps_s")}},
            "faces": faces, "analyzer": analyzer.describe(),
            "timings_ms": {"decode": round((decoded - started) * 1000, 1),
                           "faces": round((done - decoded) * 1000, 1)}}


def faces_command(args: argparse.Namespace) -> int:
    result = analyze_media(args.media, args.frames)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.media}: {result['media']['kind']}, {len(result['faces'])} face(s)")
    for face in result["faces"]:
        top = max(face["prior"], key=face["prior"].get)
        where = f"frame {face['frame']} " if "frame" in face else ""
        attrs = face["attributes"] or "no attribute network configured"
        print(f"  {where}box {face['box']} score {face['score']:.2f}: "
              f"{top} {face['prior'][top]:.2f}; attributes: {attrs}")
    return 0
