"""The `kosmo` command line. Every user error ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from kosmo.errors import KosmoError
from kosmo.hardware import PRECISIONS
from kosmo.train.run import stages

# `kosmo export --format` -> the run archs it writes (gguf: an mllm's LM alone)
FORMAT_ARCH = {"llava": ("mllm",), "llama": ("lm",), "gguf": ("lm", "mllm")}


def cmd_world(args):
    from kosmo.data.world import (
        World,
        WorldConfig,
        write_audio,
        write_drawing,
        write_mockups,
        write_reasoning,
        write_signs,
        write_world,
    )
    for flag in ("audio", "draw", "mockups", "signs", "reasoning", "lm_eval"):
        if getattr(args, flag) < 0:
            raise KosmoError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    if args.audio and shutil.which("espeak-ng") is None:  # before the pictures, not after them
        raise KosmoError("--audio needs espeak-ng: install it (make test does) or run `apt-get install espeak-ng`")
    if args.sign_digits != 2 and not args.signs:
        raise KosmoError("--sign-digits shapes the signs' numbers: give it with --signs N")
    if args.mockups and args.mockup_size < 64:  # below that a note's letters are under 5 pixels
        raise KosmoError(f"--mockup-size must be at least 64, got {args.mockup_size}")
    world = World(WorldConfig(seed=args.seed, image_size=args.image_size, sign_digits=args.sign_digits))
    if args.signs:
        world.render_sign(world.sign(0))  # too small a picture or a missing font, also before the pictures
    paths = write_world(args.out, args.n, seed=args.seed, image_size=args.image_size)
    if args.audio:
        paths.update(write_audio(world, args.out, n=args.audio, val=max(1, args.audio // 10)))
    if args.draw:
        paths.update(write_drawing(world, args.out, n=args.draw, val=max(1, args.draw // 20)))
    if args.mockups:
        paths.update(write_mockups(args.out, n=args.mockups, val=max(1, args.mockups // 10), seed=args.seed,
                                   image_size=args.mockup_size))
    if args.signs:
        paths.update(write_signs(world, args.out, n=args.signs, val=max(30, args.signs // 10)))
    if args.reasoning:
        paths.update(write_reasoning(world, args.out, n=args.reasoning, val=max(1, args.reasoning // 20)))
    if args.lm_eval:
        from kosmo.eval.choice import write_lm_eval_task
        paths.update(write_lm_eval_task(world, Path(args.out) / "lm_eval", args.lm_eval))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def cmd_tokenizer(args):
    from kosmo.data.formats import parse_source
    from kosmo.data.jsonl import iter_texts
    from kosmo.tokenizer import Tokenizer
    for path in args.data:  # fail on a missing file before the slow part
        parse_source(path).files
    tok = Tokenizer.train(iter_texts(args.data), args.vocab_size)
    path = tok.save(args.out)
    print(json.dumps({"tokenizer": str(path), "vocab_size": tok.vocab_size}))


def cmd_shard(args):
    from kosmo.data.formats import parse_source
    from kosmo.data.jsonl import iter_texts
    from kosmo.data.stream import write_shards
    for path in args.data:
        parse_source(path).files
    shards = write_shards(iter_texts(args.data), args.out, args.rows_per_shard)
    print(json.dumps({"shards": len(shards), "out": str(args.out)}))


def cmd_train(args):
    from kosmo.train.run import run_stage
    last = run_stage(args.stage, args.data, args.out, init=args.init, tokenizer=args.tokenizer,
                     config_file=args.config, overrides=args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line
        print(json.dumps(last))


def cmd_label(args):
    from kosmo.align.data import label_run
    n = label_run(args.init, args.data, args.out, args.overrides)
    print(json.dumps({"pairs": n, "out": str(args.out)}))


def cmd_generate(args):
    from kosmo import hardware
    from kosmo.generate import Sampling, generate
    from kosmo.model.load import load_run
    device = hardware.pick_device(args.device)
    precision = hardware.resolve_precision(args.precision, device)
    model, tok, config = load_run(args.model, device, precision)
    if config.get("arch") == "clip":
        raise KosmoError(f"{args.model}: a CLIP run embeds images and text; it does not generate")
    if config.get("arch") == "ctc":
        raise KosmoError(f"{args.model}: an audio (CTC) run transcribes speech; it does not generate text")
    if config.get("arch") == "vqvae":
        raise KosmoError(f"{args.model}: a vqvae run turns pictures into codes and back; it does not generate text")
    prompts = list(args.prompt)
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise KosmoError(f"{args.prompts_file}: file not found")
        prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise KosmoError("give at least one --prompt or a --prompts-file")
    if args.image_out:
        return _draw(args, model, tok, prompts, device, precision)
    from kosmo.tokenizer import BOS
    pictures, images = _pictures(args, model, config, len(prompts))
    sounds, audio = _clips(args, model, config, len(prompts))
    ids = [[BOS] + pictures + sounds + tok.encode(p) for p in prompts]
    s = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0, top_k=args.top_k,
                 top_p=args.top_p, stop=args.stop, seed=args.seed)
    try:
        with hardware.autocast(device, precision):
            results = generate(model, tok, ids, s, images=images, audio=audio, compile=args.compile)
    except ValueError as e:
        raise KosmoError(str(e)) from None
    for p, r in zip(prompts, results):
        print(json.dumps({"prompt": p, "completion": r.text, "finish_reason": r.finish_reason,
                          "tokens": len(r.tokens)}, ensure_ascii=False))


def _draw(args, model, tok, prompts: list[str], device, precision):
    """--image-out: --n pictures per prompt, drawn together; IMAGE_OUT itself for one picture, else
    IMAGE_OUT's name numbered 1, 2, … in prompt order."""
    from kosmo import hardware
    from kosmo.draw import DrawSampling, draw
    if args.n < 1:
        raise KosmoError(f"--n must be at least 1, got {args.n}")
    if args.image or args.audio:
        raise KosmoError("--image-out draws from text alone: drop --image and --audio")
    try:
        s = DrawSampling(cfg=args.cfg, temperature=1.0 if args.temperature is None else args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        with hardware.autocast(device, precision):
            drawn = draw(model, tok, [p for p in prompts for _ in range(args.n)], s)
    except ValueError as e:
        raise KosmoError(f"{args.model}: {e}") from None
    out = Path(args.image_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, (picture, prompt) in enumerate(zip(drawn, [p for p in prompts for _ in range(args.n)]), start=1):
        path = out if len(drawn) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        picture.save(path)
        print(json.dumps({"prompt": prompt, "image": str(path)}, ensure_ascii=False))


def _pictures(args, model, config: dict, n_prompts: int):
    """The --image pictures: their markers, which open every prompt, and the pixels of all prompts."""
    if not args.image:
        return [], None
    if not model.image_size:
        raise KosmoError(f"{args.model}: a text-only {config.get('arch', 'lm')} run takes no --image")
    from kosmo.data.chat import image_block
    from kosmo.data.images import load_images
    pixels, _, skipped = load_images(args.image, model.image_size,
                                     config.get("config", {}).get("image_mode", "crop"))
    if skipped:
        raise KosmoError(skipped[0][1])
    markers = [t for _ in args.image for t in image_block(model.tokens_per_image)]
    return markers, pixels.repeat(n_prompts, 1, 1, 1).to(next(model.parameters()).device)


def _clips(args, model, config: dict, n_prompts: int):
    """The --audio clips: their markers, after the pictures in every prompt, and the clips of all prompts."""
    if not args.audio:
        return [], None
    if not model.n_mels:
        raise KosmoError(f"{args.model}: this {config.get('arch', 'lm')} run does not hear; it takes no --audio")
    from kosmo.data.audio import AudioCache, batch_clips
    from kosmo.data.chat import audio_block
    cache = AudioCache(model.n_mels)
    feats = [cache.get(path) for path in args.audio]
    try:
        markers = [t for f in feats for t in audio_block(model.audio_tokens(f.shape[-1]))]
    except ValueError as e:
        raise KosmoError(str(e)) from None
    return markers, batch_clips(feats * n_prompts, model.n_mels).to(next(model.parameters()).device)


def cmd_eval(args):
    from kosmo import hardware
    device = hardware.pick_device(args.device)
    precision = hardware.resolve_precision(args.precision, device)
    with hardware.autocast(device, precision):
        print(json.dumps(_evaluate(args, device, precision)))


def _evaluate(args, device, precision: str) -> dict:
    from kosmo.eval.fewshot import parse_counts
    from kosmo.model.load import load_run
    if not args.data and args.kind not in ("copy", "needle"):  # these build their own prompts
        raise KosmoError(f"eval {args.kind} needs --data")
    if args.pages and args.kind != "html":
        raise KosmoError(f"--pages is for eval html, not eval {args.kind}")
    if args.kind == "html" and args.pages:  # pages from a file: nothing to generate, no model
        from kosmo.eval.html import evaluate_pages
        return evaluate_pages(args.data[0], args.pages, limit=args.limit, shots=args.screenshots)
    if not args.model:
        raise KosmoError(f"eval {args.kind} needs --model" + (" (or --pages)" if args.kind == "html" else ""))
    if args.seq_len < 2:  # a row must hold a token and the next one to predict
        raise KosmoError(f"--seq-len must be at least 2, got {args.seq_len}")
    # the counts are checked before the model loads, so a typo fails at once
    spans = parse_counts(args.spans, "--spans", 2, "20,48") if args.kind == "copy" else None
    shots = parse_counts(args.shots, "--shots", 0, "0,2,4,8") if args.kind == "fewshot" else None
    scales = _guidance_scales(args.cfg_scales) if args.kind == "imagegen" else None
    if args.kind == "needle":
        from kosmo.eval.needle import parse_depths, parse_lengths
        lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
        if args.trials < 1 or args.prefill_chunk < 1:
            raise KosmoError(f"--trials and --prefill-chunk must be at least 1, "
                             f"got {args.trials} and {args.prefill_chunk}")
    model, tok, config = load_run(args.model, device, precision)
    if config.get("arch") == "reward":
        raise KosmoError(f"{args.model}: a reward model scores replies and does not generate; evaluate a policy run")
    if config.get("arch") == "ctc":  # its CER and WER are measured by `kosmo train audio` itself
        raise KosmoError(f"{args.model}: an audio (CTC) run transcribes speech; eval {args.kind} needs a text model")
    if (config.get("arch") == "vqvae") != (args.kind == "vqvae"):
        wanted = "a vqvae run" if args.kind == "vqvae" else "a language-model or CLIP run"
        raise KosmoError(f"{args.model}: eval {args.kind} needs {wanted}, this is a {config.get('arch')} run")
    is_clip = config.get("arch") == "clip"
    if args.kind != "vqvae" and is_clip != (args.kind in ("zeroshot", "retrieval")):
        raise KosmoError(f"{args.model}: eval {args.kind} needs "
                         f"{'a CLIP run' if not is_clip else 'a language-model run'}, this is a {config.get('arch')} run")
    if args.kind == "align":
        from kosmo.eval.align import evaluate_align
        reference = load_run(args.reference, device, precision)[0] if args.reference else None
        metrics = evaluate_align(model, tok, args.data[0], reference=reference, limit=args.limit)
    elif args.kind == "choice":
        from kosmo.eval.choice import choice_accuracy, read_items
        metrics = choice_accuracy(model, tok, read_items(args.data[0], args.limit))
    elif args.kind == "reasoning":
        from kosmo.eval.reasoning import evaluate_reasoning
        metrics = evaluate_reasoning(model, tok, args.data[0], think=args.think, limit=args.limit)
    elif args.kind == "vqvae":
        from kosmo.eval.vqvae import reconstruction
        mode = config.get("config", {}).get("image_mode", "crop")  # the pictures as the run was trained on them
        metrics = {}
        for path in args.data:
            result = reconstruction(model, path, limit=args.limit, mode=mode)
            metrics = result if len(args.data) == 1 else {**metrics, str(path): result}
    elif args.kind == "ppl":
        from kosmo.eval.ppl import perplexity
        metrics = perplexity(model, tok, args.data, seq_len=args.seq_len)
    elif args.kind == "copy":
        from kosmo.eval.copying import copy_accuracy
        metrics = copy_accuracy(model, tok.vocab_size, spans=spans)
    elif args.kind == "needle":
        from kosmo.eval.needle import needle, plot_heatmap
        metrics = needle(model, tok, lengths, depths, trials=args.trials, seed=args.seed,
                         prefill_chunk=args.prefill_chunk)
        if args.plot:
            plot_heatmap(metrics, args.plot)
    elif args.kind == "fewshot":
        from kosmo.eval.fewshot import fewshot, plot_curves
        results = {str(p): fewshot(model, tok, p, shots, limit=args.limit, blind=not args.no_blind) for p in args.data}
        if args.plot:
            plot_curves([(Path(p).stem, r) for p, r in results.items()], args.plot)
        metrics = next(iter(results.values())) if len(results) == 1 else results
    elif args.kind in ("zeroshot", "retrieval"):
        from kosmo.eval import clip as E
        fn = E.zeroshot if args.kind == "zeroshot" else E.retrieval
        metrics = fn(model, tok, args.data[0], **({"template": args.template} if args.kind == "zeroshot" else {}))
    elif args.kind == "imagegen":
        from kosmo.eval.imagegen import evaluate_run
        metrics = evaluate_run(model, tok, args.data[0], limit=args.limit, scales=scales,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    elif args.kind == "html":
        from kosmo.eval.html import evaluate_run
        metrics = evaluate_run(model, tok, args.data[0], limit=args.limit, blind=not args.no_blind,
                               shots=args.screenshots, image_mode=config.get("config", {}).get("image_mode", "crop"))
    elif args.kind in ("asr", "sounds"):
        from kosmo.eval import audio as A
        metrics = {}
        for path in args.data:
            result = A.evaluate(args.kind, model, tok, path, with_deaf=not args.no_blind, limit=args.limit)
            metrics = result if len(args.data) == 1 else {**metrics, str(path): result}
    else:
        from kosmo.eval.vision import evaluate
        kw = {"limit": args.limit, **({"system": args.system} if args.kind == "vqa" else {})}
        metrics = {}
        for path in args.data:
            result = evaluate(args.kind, model, tok, path, with_blind=not args.no_blind, **kw)
            metrics = result if len(args.data) == 1 else {**metrics, str(path): result}
    return metrics


def _guidance_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        scales = []
    if not scales or any(not s >= 1 for s in scales):
        raise KosmoError(f"--cfg-scales must be guidance scales of at least 1, e.g. 1,3; got {text!r}")
    return scales


def cmd_export(args):
    from kosmo.model.load import load_run
    if args.dtype is not None and args.format != "gguf":
        raise KosmoError("--dtype is for --format gguf")
    if args.adapter and args.format == "gguf":
        raise KosmoError("--adapter writes a PEFT adapter; --format gguf writes the merged model")
    model, tok, config = load_run(args.model, merge=not args.adapter)
    if args.adapter:
        from kosmo.interop.hf_llama import export_peft_adapter
        from kosmo.model.lora import LoRAConfig
        if "lora" not in config:
            raise KosmoError(f"{args.model}: --adapter exports a LoRA run's adapters; this run has none")
        export_peft_adapter(model, LoRAConfig(**config["lora"]), args.out)
        print(json.dumps({"exported": str(args.out), "format": "peft"}))
        return
    arch = config.get("arch", "lm")
    fmt = args.format or ("llava" if arch == "mllm" else "llama")
    if arch not in FORMAT_ARCH[fmt]:
        raise KosmoError(f"{args.model}: --format {fmt} exports runs of arch {' or '.join(FORMAT_ARCH[fmt])}, "
                         f"and this one is {arch}")
    if fmt == "llava":
        from kosmo.interop.hf_llava import export_hf_llava
        export_hf_llava(model, args.out, tok, image_mode=config.get("config", {}).get("image_mode", "crop"))
    elif fmt == "gguf":
        from kosmo.interop.gguf import export_gguf
        try:
            export_gguf(model, tok, args.out, dtype=args.dtype or "f32", name=Path(args.model).resolve().name)
        except KosmoError as e:
            raise KosmoError(f"{args.model}: {e}") from None
    else:
        from kosmo.interop.hf_llama import export_hf
        export_hf(model, args.out, tokenizer=tok)
    print(json.dumps({"exported": str(args.out), "format": fmt}))


def cmd_import(args):
    from kosmo import checkpoint
    from kosmo.interop.adopt import adopt_tokenizer, has_kosmo_specials
    from kosmo.model.load import save_run
    from kosmo.tokenizer import Tokenizer
    hf_dir = Path(args.hf)
    # the tokenizer before the weights: it fails faster
    own = hf_dir / "tokenizer.json"
    if args.tokenizer or has_kosmo_specials(own):
        tok, adoption = Tokenizer.load(args.tokenizer or own), None
    else:  # a checkpoint's own tokenizer with other special ids
        tok, adoption = adopt_tokenizer(hf_dir)
    extra = {"adopted_tokenizer": adoption.to_dict()} if adoption else {}
    if checkpoint.read_json(hf_dir / "config.json").get("model_type") == "llava":
        from kosmo.interop.hf_llava import import_hf_llava
        model, image_mode = import_hf_llava(hf_dir, adoption)
        arch, extra = "mllm", extra | {"config": {"image_mode": image_mode}}
    else:
        from kosmo.interop.hf_llama import import_hf
        model, arch = import_hf(hf_dir, adoption), "lm"
    save_run(args.out, model, tok, {"stage": "import", "arch": arch, "model": model.cfg.to_dict(),
                                    "source": str(args.hf), **extra})
    print(json.dumps({"imported": str(args.out), "arch": arch, "params": sum(p.numel() for p in model.parameters()),
                      **({"adopted_tokenizer": adoption.source, "shift": adoption.shift} if adoption else {})}))


def cmd_demo(args):
    from kosmo.config import parse_overrides
    from kosmo.demo import SECTIONS, run_demo
    sections = tuple(args.sections.split(",")) if args.sections else SECTIONS
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise KosmoError(f"--sections: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    run_demo(args.out, budget="quick" if args.quick else "full" if args.full else "default", sections=sections,
             recipe=parse_overrides(args.knobs))


def cmd_serve(args):
    from kosmo.serve.api import Limits, serve
    from kosmo.serve.engine import PREFIX_BLOCK
    from kosmo.serve.media import MediaPolicy
    domains = tuple(d.strip().lower() for d in (args.allowed_media_domains or "").split(",") if d.strip())
    local = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    if local is not None and not local.is_dir():
        raise KosmoError(f"--allowed-local-media-path: {local} is not a directory")
    if args.prefill_chunk < 0:
        raise KosmoError(f"--prefill-chunk must be at least 0 (0: prompts go in at once), got {args.prefill_chunk}")
    if args.prefix_cache_tokens != 0 and args.prefix_cache_tokens < PREFIX_BLOCK:
        raise KosmoError(f"--prefix-cache-tokens must be 0 (off) or at least one block of {PREFIX_BLOCK}, "
                         f"got {args.prefix_cache_tokens}")
    media = MediaPolicy(max_image_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                        allowed_domains=domains, local_root=local)
    serve(args.model, args.host, args.port, args.api_key or os.environ.get("KOSMO_API_KEY"), args.device,
          args.max_batch, args.max_queue, media,
          Limits(args.max_body_bytes, args.max_images, max_audio_clips=args.max_audio_clips,
                 max_audio_seconds=args.max_audio_seconds, max_pictures=args.max_images_per_request),
          args.precision, args.prefill_chunk or None, args.prefix_cache_tokens, args.batch_shapes)


def cmd_chat(args):
    from kosmo.serve.chat import chat
    chat(args.model, args.device, args.max_tokens, args.temperature, args.precision)


def add_device_args(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the device runs it natively, else fp32")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kosmo", description="Train, align, evaluate and serve multimodal LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="write the shapes world as JSONL + PNG")
    w.add_argument("--out", required=True)
    w.add_argument("--n", type=int, default=1000)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--image-size", type=int, default=32)
    w.add_argument("--audio", type=int, default=0, metavar="N",
                   help="also N spoken sentences and N sound events (and a tenth as many held out) as WAV + JSONL; "
                        "needs espeak-ng")
    w.add_argument("--draw", type=int, default=0, metavar="N",
                   help="also N prompts to draw training pictures from, and N/20 evaluation prompts of each "
                        "GenEval category with the specs that check their pictures (draw.jsonl, val_draw.jsonl)")
    w.add_argument("--mockups", type=int, default=0, metavar="N",
                   help="also N hand-drawn web-page mockups answered by their HTML, and N/10 held out with the "
                        "ground truth `eval html` checks pages against (mockups.jsonl, val_mockups.jsonl)")
    w.add_argument("--mockup-size", type=int, default=128, help="the mockups' pictures, in pixels a side")
    w.add_argument("--signs", type=int, default=0, metavar="N",
                   help="also N pictures of signs, number labels and price tags to read (and a tenth as many, at "
                        "least 30, with numbers training never shows) as captions and reading questions "
                        "(signs.jsonl, signs_vqa.jsonl and their val_ files); needs --image-size 40 or more and "
                        "fonts-dejavu-core")
    w.add_argument("--sign-digits", type=int, default=2, metavar="D",
                   help="with --signs, training labels and prices show numbers of 2 to D digits (D up to 4, a "
                        "price's up to 3), none holding a held-out number; held-out ones keep two")
    w.add_argument("--reasoning", type=int, default=0, metavar="N",
                   help="also N counting questions with direct and worked answers (reasoning_direct.jsonl, "
                        "reasoning_worked.jsonl, reasoning_chat.jsonl) and N/20 held out in and N/20 out of "
                        "distribution (val_reasoning.jsonl)")
    w.add_argument("--lm-eval", type=int, default=0, metavar="N",
                   help="also N held-out multiple-choice questions answered from text (lm_eval/shapes_qa.jsonl) and "
                        "the lm-evaluation-harness task over them (lm_eval/shapes_qa.yaml); `eval choice` scores them")
    w.set_defaults(fn=cmd_world)

    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True)
    t.set_defaults(fn=cmd_tokenizer)

    sh = sub.add_parser("shard", help="write the text of data sources into parquet shards, for `train lm` to stream")
    sh.add_argument("--data", nargs="+", required=True)
    sh.add_argument("--out", required=True, help="a new folder for shard-00000.parquet, …")
    sh.add_argument("--rows-per-shard", type=int, default=100_000, help="documents per shard")
    sh.set_defaults(fn=cmd_shard)

    tr = sub.add_parser("train", help="run a training stage")
    tr.add_argument("stage", choices=sorted(stages()))
    tr.add_argument("--data", nargs="+", required=True)
    tr.add_argument("--out", required=True)
    tr.add_argument("--init", help="run directory to start from")
    tr.add_argument("--tokenizer", help="tokenizer.json (or its folder); default: train one on --data")
    tr.add_argument("--config", help="YAML config file")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    tr.set_defaults(fn=cmd_train)

    lb = sub.add_parser("label", help="sample replies to the shapes world's alignment prompts and rank them with its "
                                      "judge: a preference file for `train reward` and `train dpo`")
    lb.add_argument("--init", required=True, help="run directory whose replies are sampled")
    lb.add_argument("--data", nargs="+", required=True, help="prompt lines with the judge's fields (align.jsonl)")
    lb.add_argument("--out", required=True, help="the preference file to write (JSONL)")
    lb.add_argument("overrides", nargs="*", metavar="key=value",
                    help="label.samples, label.temperature, label.max_new_tokens, seq_len, seed: as in `train reward`")
    lb.set_defaults(fn=cmd_label)

    g = sub.add_parser("generate", help="complete prompts, or draw them (--image-out)")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", action="append", default=[])
    g.add_argument("--prompts-file")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="a picture before the text of every prompt (repeatable; KOSMOS and Flamingo runs)")
    g.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="a clip after the pictures of every prompt (repeatable; runs that hear); with an empty "
                        "--prompt, the model transcribes it")
    g.add_argument("--image-out", metavar="PNG", help="draw each prompt into this file (runs that draw)")
    g.add_argument("--n", type=int, default=1, help="--image-out: pictures per prompt")
    g.add_argument("--cfg", type=float, default=3.0, help="--image-out: classifier-free guidance scale (1: none)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, help="0 is greedy (the default for text; drawing's is 1)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--seed", type=int)
    g.add_argument("--compile", action="store_true",
                   help="decode with one torch.compile graph a step (pays for its compilation on long outputs)")
    add_device_args(g)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="evaluate a model; the last stdout line is a JSON object")
    e.add_argument("kind", choices=["ppl", "copy", "caption", "vqa", "chat", "asr", "sounds", "fewshot", "zeroshot",
                                    "retrieval", "align", "vqvae", "imagegen", "needle", "html", "reasoning", "choice"])
    e.add_argument("--model", help="the run to evaluate (html with --pages needs none)")
    e.add_argument("--data", nargs="+", help="the evaluation's JSONL files (every kind but copy and needle)")
    e.add_argument("--seq-len", type=int, default=256, help="ppl: tokens per row")
    e.add_argument("--spans", default="20,48", help="copy: lengths of the repeated spans, comma-separated")
    e.add_argument("--limit", type=int, help="evaluate the first N lines only")
    e.add_argument("--system", help="vqa: a system prompt before each question")
    e.add_argument("--think", action="store_true",
                   help="reasoning: ask for the worked answer with the system prompt 'Think step by step.'")
    e.add_argument("--template", default="a picture of a {}.", help="zeroshot: the class prompt")
    e.add_argument("--shots", default="0,2,4,8", help="fewshot: numbers of in-context examples")
    e.add_argument("--plot", help="fewshot: write the curve to this PNG; needle: the heatmap")
    e.add_argument("--no-blind", action="store_true",
                   help="skip the image-removed baseline (asr, sounds: the audio-removed one)")
    e.add_argument("--reference", help="align: the SFT run to measure win-rate and KL against")
    e.add_argument("--cfg-scales", default="1,3", help="imagegen: classifier-free guidance scales (1: off)")
    e.add_argument("--temperature", type=float, default=1.0, help="imagegen: sampling temperature of the codes")
    e.add_argument("--top-k", type=int, default=0, help="imagegen: sample among the k likeliest codes (0: all)")
    e.add_argument("--seed", type=int, default=0, help="imagegen: the seed of the drawings; needle: of the keys")
    e.add_argument("--lengths", default="1k,2k,4k,8k,16k,32k", help="needle: context lengths (k: 1024 tokens)")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle: where the key sits, 0 (start) to 1 (end)")
    e.add_argument("--trials", type=int, default=4, help="needle: keys asked for at each length and depth")
    e.add_argument("--prefill-chunk", type=int, default=2048, help="needle: tokens per prefill chunk")
    e.add_argument("--pages", help="html: judge these pages (JSONL lines {\"html\"}, line i for mockup i) instead "
                                   "of the model's; --data itself gives the canonical pages")
    e.add_argument("--screenshots", metavar="DIR", help="html: write the first mockups beside their pages here")
    add_device_args(e)
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a Hugging Face checkpoint: LlavaForConditionalGeneration with its "
                                      "processor, or LlamaForCausalLM (a LoRA run's adapters merged); or GGUF")
    x.add_argument("--model", required=True)
    x.add_argument("--out", required=True, help="the directory to write; with --format gguf, the file")
    x.add_argument("--format", choices=list(FORMAT_ARCH),
                   help="llava for a multimodal run, llama for a text-only one (default: the run's own); "
                        "gguf: the LM as one file for llama.cpp")
    x.add_argument("--dtype", choices=["f32", "f16", "q8_0"],
                   help="gguf: the type of the weight matrices (default f32; norms stay f32)")
    x.add_argument("--adapter", action="store_true",
                   help="a LoRA run: write its adapters alone as a PEFT adapter over its base's export")
    x.set_defaults(fn=cmd_export)

    i = sub.add_parser("import", help="make a run directory from a Hugging Face Llama or LLaVA checkpoint")
    i.add_argument("--hf", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--tokenizer", help="kosmo tokenizer.json (default: the checkpoint's own, adopted when its "
                   "special tokens are not kosmo's: kosmo's at ids 0-15, the checkpoint's vocabulary after them)")
    i.set_defaults(fn=cmd_import)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web playground for a run")
    sv.add_argument("--model", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="required from clients as a Bearer token (default: $KOSMO_API_KEY)")
    add_device_args(sv)
    sv.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which clients get 429")
    sv.add_argument("--prefill-chunk", type=int, default=2048,
                    help="a longer prompt goes in as chunks of this many tokens, bounding a long context's "
                         "activation memory (0: all at once)")
    sv.add_argument("--prefix-cache-tokens", type=int, default=8192,
                    help="prompt positions whose keys and values are kept for later prompts that begin the same "
                         "way, in blocks of 64 (0: off)")
    sv.add_argument("--batch-shapes", choices=("full", "bucketed"), default="full",
                    help="full: every decode step runs --max-batch rows, so a request's numbers never depend on "
                         "the others; bucketed: the busy rows rounded up to a power of two, faster when few "
                         "requests run, its last bits depending on how many")
    sv.add_argument("--max-body-bytes", type=int, default=16 * 2**20)
    sv.add_argument("--max-images", type=int, default=4, help="images per request")
    sv.add_argument("--max-images-per-request", type=int, default=4,
                    help="pictures one image generation may ask for (its n)")
    sv.add_argument("--max-image-bytes", type=int, default=8 * 2**20)
    sv.add_argument("--max-image-pixels", type=int, default=16_000_000)
    sv.add_argument("--max-audio-clips", type=int, default=4, help="audio clips per chat request")
    sv.add_argument("--max-audio-seconds", type=float, default=30.0,
                    help="longest clip decoded (the model may hear less at once)")
    sv.add_argument("--allowed-media-domains", help="comma-separated domains whose http(s) image URLs may be fetched")
    sv.add_argument("--allowed-local-media-path", help="folder whose files file:// image URLs may name")
    sv.set_defaults(fn=cmd_serve)

    ch = sub.add_parser("chat", help="chat with a run in the terminal (/image PATH, /audio PATH, /system TEXT, /reset)")
    ch.add_argument("--model", required=True)
    add_device_args(ch)
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.set_defaults(fn=cmd_chat)

    d = sub.add_parser("demo", help="the whole pipeline on the shapes world")
    d.add_argument("--out", default="out")
    budget = d.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    budget.add_argument("--full", action="store_true", help="the longer recipes whose figures the docs give")
    d.add_argument("--sections", help="comma-separated sections to run, in order (default: all)")
    d.add_argument("knobs", nargs="*", metavar="KNOB=VALUE",
                   help="change a budget's knob, e.g. draw_steps=800 (BUDGETS in kosmo/demo/)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if argv[:1] in (["train"], ["label"]):
        # key=value overrides may stand anywhere; pull them out so `--data a b` cannot swallow them.
        # A key is dotted names, where `*` may stand in a glob (train.lr_scale.*_gate=30).
        is_override = [not a.startswith("-") and "=" in a
                       and a.split("=", 1)[0].replace(".", "_").replace("*", "_").isidentifier() for a in argv]
        overrides = [a for a, o in zip(argv, is_override) if o]
        argv = [a for a, o in zip(argv, is_override) if not o]
    args = parser().parse_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = args.overrides + overrides
    try:
        args.fn(args)
    except KosmoError as e:
        print(f"kosmo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
