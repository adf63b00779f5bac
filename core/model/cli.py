"""`python app.py build-model ...` and `python app.py predict MEDIA ...`.

    python app.py predict photo.jpg --json          # one prediction JSON
    python app.py build-model --from-vlm HuggingFaceTB/SmolVLM-256M-Instruct --out /tmp/smol
    python app.py predict photo.jpg --model zero-shot:HuggingFaceTB/SmolVLM-256M-Instruct
    python app.py predict crop.png --aligned        # a face crop: no detection, the image is the face
    python app.py predict photos/ --json > out.jsonl   # one JSON line per file, progress on stderr
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build-model", help="assemble an untrained checkpoint from base parts")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="tiny random parts: a TEST FIXTURE")
    which.add_argument("--from-llamavid", metavar="DIR_OR_ID",
                       help="convert a LLaMA-VID release (e.g. YanweiLi/llama-vid-7b-full-224-video-fps-1)")
    which.add_argument("--from-vlm", metavar="ID_OR_DIR",
                       help="a released VLM as the base (llava-hf/llava-1.5-7b-hf, "
                            "HuggingFaceTB/SmolVLM-256M-Instruct): its own vision, projector and chat "
                            "template, + FIM tokens, the AGR sentence and LoRA on its language model")
    which.add_argument("--llm", help="causal LM: hub id or folder (e.g. lmsys/vicuna-7b-v1.5)")
    p.add_argument("--vision", help="vision encoder: hub id or folder (e.g. openai/clip-vit-large-patch14-336)")
    p.add_argument("--prior", help="face prior network (default: the FER2013 mini-Xception)")
    p.add_argument("--eva", help="LLaMA-VID: the EVA-ViT-g weights file (default: its mm_vision_tower)")
    p.add_argument("--bert", help="LLaMA-VID: the Q-Former's BERT tokenizer (default: bert-base-uncased)")
    p.add_argument("--processor", help="LLaMA-VID: the CLIP image processor folder (default: its image_processor)")
    p.add_argument("--no-fim", action="store_true", help="LLaMA-VID / VLM: leave Face Info Mining out")
    p.add_argument("--no-agr", action="store_true", help="LLaMA-VID / VLM: no age/gender/race sentence")
    p.add_argument("--version", default=None, help="version name recorded in the checkpoint")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=build_model_command)

    p = subparsers.add_parser("predict", help="EMO-LLaMA label, scores and explanation for a file "
                                              "or every file of a folder")
    p.add_argument("media", help="an image, a video, or a folder: each image and video in it "
                                 "(and its subfolders) is predicted; see --frames-folder")
    p.add_argument("--aligned", action="store_true",
                   help="the images are face crops (as FER2013 / RAF-DB aligned): no detection, "
                        "the whole image is the face")
    p.add_argument("--frames-folder", action="store_true",
                   help="MEDIA is one clip stored as a folder of frames (DFEW, FERV39k)")
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
    elif getattr(args, "from_vlm", None):
        from core.model.vlm import build_vlm_checkpoint

        out = build_vlm_checkpoint(args.from_vlm, args.out, fim=not args.no_fim, agr=not args.no_agr,
                                   version=args.version)
    else:
        if not args.vision:
            raise UserError("--llm needs --vision too (a CLIP/SigLIP encoder id or folder)")
        out = build_from_parts(args.llm, args.vision, args.out, prior=args.prior,
                               version=args.version or "base", bert=args.bert or "bert-base-uncased")
    from core.model.config import EmoLlamaConfig

    config = EmoLlamaConfig.load(out)
    summary = {"out": str(out), "version": config.version, "is_tiny": config.is_tiny}
    if config.vlm:  # the base's own image tokens: their count depends on the image (tiling)
        summary.update(vlm=config.vlm, fim=config.use_fim, agr=config.use_agr,
                       face_tokens=config.face_tokens if config.use_fim else 0)
    else:
        summary.update(tokens_per_image=config.visual_token_budget(1),
                       tokens_per_16_frame_video=config.visual_token_budget(16))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        kind = "TINY TEST FIXTURE (random weights)" if config.is_tiny else "untrained checkpoint"
        print(f"wrote {kind} to {out} (version {config.version})")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from core.engine import Engine, EngineConfig
    from core.errors import UserError

    folder = Path(args.media).is_dir() and not args.frames_folder
    files = media_files(Path(args.media)) if folder else []
    if folder and not files:
        raise UserError(f"{args.media}: no image or video files in this folder (a clip stored as "
                        "frames: add --frames-folder)")
    # A folder's files are submitted together, so the engine may batch them (its window);
    # a single file runs at once.
    config = EngineConfig(batch_window_ms=EngineConfig.batch_window_ms if folder else 0,
                          quantization=args.quantize)
    if args.frames:
        config.num_frames = args.frames
    if args.max_new_tokens:
        config.max_new_tokens = args.max_new_tokens
    engine = Engine(args.model, config)
    try:
        if folder:
            return _predict_folder(engine, Path(args.media), files, args)
        result = engine.predict(args.media, question=args.question, explain=not args.no_explain,
                                aligned=args.aligned)
    finally:
        engine.close()
    try:
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        _print_result(result)
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_gone()
    return 0


def _print_result(result: dict, prefix: str = "") -> None:
    print(f"{prefix}model: {result['model_version']}" + (f"  ({result['note']})" if result.get("note") else ""))
    print(f"{prefix}label: {result['label']}")
    for label, p in sorted(result["scores"].items(), key=lambda kv: -kv[1]):
        print(f"{prefix}  {label:15s} {p:.3f}")
    if result.get("explanation"):
        print(f"{prefix}explanation: {result['explanation']}")


def media_files(folder: Path) -> list[Path]:
    """The images and videos under `folder` (subfolders too, hidden ones skipped), sorted."""
    from core.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    wanted = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in wanted
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _predict_folder(engine, folder: Path, files: list[Path], args: argparse.Namespace) -> int:
    """One result per file, in file order (a JSON line each with --json), `in_flight` requests
    submitted at a time so the engine batches them; a file that fails gets its error line and
    the rest go on. Exit 1 when any file failed."""
    from tqdm import tqdm

    from core.errors import UserError

    in_flight = max(1, min(engine.config.max_queue, 2 * engine.config.max_batch))
    todo, waiting = iter(files), collections.deque()
    failed = 0

    def submit() -> None:
        for path in todo:
            waiting.append((path, engine.stream(path, question=args.question, explain=not args.no_explain,
                                                aligned=args.aligned)))
            if len(waiting) >= in_flight:
                return

    bar = tqdm(total=len(files), desc="predict", unit="file", file=sys.stderr, mininterval=0.5,
               dynamic_ncols=True)
    try:
        submit()
        while waiting:
            path, stream = waiting.popleft()
            name = str(path.relative_to(folder))
            try:
                result = next(e for e in stream if e["event"] == "done")["result"]
                line = {"file": name, **result}
            except UserError as exc:
                failed += 1
                line = {"file": name, "error": str(exc)}
            finally:
                stream.close()
            submit()
            bar.update(1)
            if args.json:
                print(json.dumps(line), flush=True)
            elif "error" in line:
                print(f"{name}: error: {line['error']}", flush=True)
            else:
                best = f" ({line['scores'][line['label']]:.3f})" if line.get("label") else ""
                note = f"  [{line['note']}]" if line.get("label") is None and line.get("note") else ""
                print(f"{name}: {line.get('label')}{best}{note}", flush=True)
    except BrokenPipeError:  # `| head`: the reader has all it wants
        for _, stream in waiting:
            stream.close()
        return _stdout_gone()
    finally:
        bar.close()
    print(f"{len(files)} file(s), {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _stdout_gone() -> int:
    """The reader of stdout went away (`predict ... | head -1`): stop quietly. stdout is pointed
    at /dev/null so that the interpreter's last flush does not raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    return 0
