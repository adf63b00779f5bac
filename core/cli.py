"""`python app.py faces MEDIA [--json] [--aligned]`: what the face pipeline sees in an image or
a video (`--aligned`: the image is a face crop; no detection, the whole image is the face)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("faces", help="detect faces, landmarks, prior expression scores, AGR")
    p.add_argument("media", help="an image, a video file or a folder of frames")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from a video (default 8)")
    p.add_argument("--aligned", action="store_true",
                   help="the image is a face crop (FER2013, RAF-DB aligned): no detection")
    p.add_argument("--json", action="store_true", help="print the prediction-JSON face fields")
    p.set_defaults(handler=faces_command)


def analyze_media(path: str, num_frames: int = 8, aligned: bool = False) -> dict:
    """Faces of an image, or of each sampled video frame, in the prediction JSON shape; `notes`
    says what the user should know (a capped face count, an image too small, a crop that may
    not be a face)."""
    from core.faces import shared_analyzer
    from core.media import load_media

    started = time.perf_counter()
    media = load_media(path, num_frames=num_frames)
    decoded = time.perf_counter()
    analyzer = shared_analyzer()
    faces, notes, found = [], [], 0
    for index, frame in enumerate(media.frames):
        frame_faces = analyzer.analyze(frame, aligned=aligned)
        found += frame_faces.found
        where = f" (frame {index})" if media.kind == "video" else ""
        notes += [f"{note}{where}" for note in frame_faces.notes if f"{note}{where}" not in notes]
        for face in frame_faces:
            entry = face.to_json()
            if media.kind == "video":
                entry["frame"] = index
                entry["time_s"] = round(media.meta["timestamps_s"][index], 3)
            faces.append(entry)
    done = time.perf_counter()
    return {"media": {"kind": media.kind, **{k: v for k, v in media.meta.items()
                                            if k not in ("indices", "timestamps_s")}},
            "faces": faces, "faces_found": found, "notes": notes, "analyzer": analyzer.describe(),
            "timings_ms": {"decode": round((decoded - started) * 1000, 1),
                           "faces": round((done - decoded) * 1000, 1)}}


def faces_command(args: argparse.Namespace) -> int:
    result = analyze_media(args.media, args.frames, aligned=args.aligned)
    try:
        _print_faces(args, result)
        sys.stdout.flush()
    except BrokenPipeError:  # `faces ... | head`: stop quietly; the last flush must not raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_faces(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.media}: {result['media']['kind']}, {len(result['faces'])} face(s)")
    for note in result["notes"]:
        print(f"  note: {note}")
    for face in result["faces"]:
        top = max(face["prior"], key=face["prior"].get)
        where = f"frame {face['frame']} " if "frame" in face else ""
        attrs = face["attributes"] or "no attribute network configured"
        print(f"  {where}box {face['box']} score {face['score']:.2f}: "
              f"{top} {face['prior'][top]:.2f}; attributes: {attrs}")
