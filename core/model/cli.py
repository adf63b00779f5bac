"""`python app.py build-model ...` and `python app.py predict MEDIA ...`."""
from __future__ import annotations

import argparse
import json
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build-model", help="assemble an untrained checkpoint from base parts")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="tiny random parts: a TEST FIXTURE")
    which.add_argument("--from-llamavid", metavar="DIR_OR_ID",
                       help="convert a LLaMA-VID release (e.g. YanweiLi/llama-vid-7b-full-224-video-fps-1)")
    which.add_argument("--llm", help="causal LM: hub id or folder (e.g. lmsys/vicuna-7b-v1.5)")
    p.add_argument("--vision", help="vision encoder: hub id or folder (e.g. openai/clip-vit-large-patch14-336)")
    p.add_argument("--prior", help="face prior network (default: the FER2013 mini-Xception)")
    p.add_argument("--eva", help="LLaMA-VID: the EVA-ViT-g weights file (default: its mm_vision_tower)")
    p.add_argument("--bert", help="LLaMA-VID: the Q-Former's BERT tokenizer (default: bert-base-uncased)")
    p.add_argument("--processor", help="LLaMA-VID: the CLIP image processor folder (default: its image_processor)")
    p.add_argument("--no-fim", action="store_true", help="LLaMA-VID: leave Face Info Mining out")
    p.add_argument("--no-agr", action="store_true", help="LLaMA-VID: no age/gender/race sentence")
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
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest explanation in tokens (default: the checkpoint's recipe)")
    p.add_argument("--greedy", action="store_true",
                   help="greedy decoding (the engine always decodes greedily; kept for scripts)")
    p.add_argument("--quantize", choices=["8bit", "4bit"], default=os.environ.get("EMO_QUANTIZATION"),
                   help="load the frozen LLM in 8/4 bit through bitsandbytes (default: $EMO_QUANTIZATION)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=predict_command)


def build_model_command(args: argparse.Namespace) -> int:
    from core.errors import UserError
    from core.model.build import build_from_parts, build_tiny

    if args.tiny:
        out = build_tiny(args.out, **({"version": args.version} if args.version else {}))
    elif args.from_llamavid:
        from core.model.llamavid import convert_llamavid

        report = convert_llamavid(args.from_llamavid, args.out, eva=args.eva, bert=args.bert,
                                  processor=args.processor, fim=not args.no_fim, agr=not args.no_agr,
                                  version=args.version)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"converted {report['source']} -> {report['out']} (version {report['version']}) in "
                  f"{report['seconds']} s: {report['consumed']} tensors converted, "
                  f"{sum(report['ignored'].values())} ignored, EVA {report['eva_blocks']} blocks built "
                  f"({len(report['eva_not_built'])} stored tensors not built), FIM "
                  f"{'new' if report['fim'] else 'off'}; report in {report['out']}/conversion_report.json")
            for key in report["unknown"]:
                print(f"  not converted (unknown key): {key}")
        return 0
    else:
        if not args.vision:
            raise UserError("--llm needs --vision too (a CLIP/SigLIP encoder id or folder)")
        out = build_from_parts(args.llm, args.vision, args.out, prior=args.prior,
                               version=args.version or "base", bert=args.bert or "bert-base-uncased")
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
    if args.max_new_tokens:
        config.max_new_tokens = args.max_new_tokens
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
