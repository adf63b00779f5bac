"""`python app.py build-model ...` and `python app.py predict MEDIA ...`."""
from __future__ import annotations

import argparse
import json
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build-model", help="assemble an untrained checkpoint from base parts")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="tiny random parts: a TEST FIXTURE")
    which.add_argument("--llm", help="causal LM: hub id or folder (e.g. lmsys/vicuna-7b-v1.5)")
    p.add_argument("--vision", help="vision encoder: hub id or folder (e.g. openai/clip-vit-large-patch14-336)")
    p.add_argument("--prior", help="face prior network (default: the FER2013 mini-Xception)")
    p.add_argument("--version", default=None, help="version name recorded in the checkpoint")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=build_model_command)

    p = subparsers.add_parser("predict", help="EMO-LLaMA label, scores and explanation for a file")
    p.add_argument("media", help="an image, a video or a folder of frames")
    p.add_argument("--model", default=os.environ.get("EMO_LLAMA_MODEL"),
                   help="checkpoint folder or hub id (default: $EMO_LLAMA_MODEL; none: prior-only)")
    p.add_argument("--question", help="ask something else than the default explanation prompt")
    p.add_argument("--frames", type=int, default=None, help="frames sampled from a video")
    p.add_argument("--no-explain", action="store_true", help="scores only, skip text generation")
    p.add_argument("--quantize", choices=["8bit", "4bit"], default=os.environ.get("EMO_QUANTIZATION"),
                   help="load the frozen LLM in 8/4 bit through bitsandbytes (default: $EMO_QUANTIZATION)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=predict_command)


def build_model_command(args: argparse.Namespace) -> int:
    from core.errors import UserError
    from core.model.build import build_from_parts, build_tiny

    if args.tiny:
        out = build_tiny(args.out, **({"version": args.version} if args.version else {}))
    else:
        if not args.vision:
            raise UserError("--llm needs --vision too (a CLIP/SigLIP encoder id or folder)")
        out = build_from_parts(args.llm, args.vision, args.out, prior=args.prior,
                               version=args.version or "base")
    from core.model.config import EmoLlamaConfig

    config = EmoLlamaConfig.load(out)
    summary = {"out": str(out), "version": config.version, "is_tiny": config.is_tiny,
               "tokens_per_image": config.visual_token_budget(1),
               "tokens_per_16_frame_video": config.visual_token_budget(16)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        kind = "TINY TEST FIXTURE (random weights)" if config.is_tiny else "untrained checkpoint"
        print(f"wrote {kind} to {out} (version {config.version})")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from core.engine import Engine, EngineConfig

    config = EngineConfig(batch_window_ms=0, quantization=args.quantize)
    if args.frames:
        config.num_frames = args.frames
    engine = Engine(args.model, config)
    try:
        result = engine.predict(args.media, question=args.question, explain=not args.no_explain)
    finally:
        engine.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model: {result['model_version']}" + (f"  ({result['note']})" if result.get("note") else ""))
    print(f"label: {result['label']}")
    for label, p in sorted(result["scores"].items(), key=lambda kv: -kv[1]):
        print(f"  {label:15s} {p:.3f}")
    if result.get("explanation"):
        print(f"explanation: {result['explanation']}")
    return 0
