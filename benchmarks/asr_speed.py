"""Real-time factor (RTF) of transcription: seconds of compute per second of audio, below 1 faster than real time.

The same clips are transcribed three ways, greedy and in fp32, each clip's cost counted from its encoded file
to its text (decoding, log-mels, prefill and every generated token):
- in-process, one clip at a time: `kosmo.eval.audio`'s prompt `<s><audio>…</audio>` through `generate`;
- in-process, --batch-size clips per `generate` call (a batch lasts as long as its longest transcript);
- through `kosmo serve`'s /v1/audio/transcriptions with the openai client, one request at a time. Its RTF over
  the in-process batch-1 RTF is the endpoint's overhead: HTTP, the multipart form and the engine's slot cache.
Every path generates until EOS or the model's context is full, as the endpoint does (a batch's rows share the
room its longest prompt leaves); "same text" counts the clips whose endpoint transcript equals the in-process
batch-1 one, a check that both paths did the same work. --threads sets torch's threads in this process and the
server's alike: on a CPU that other work keeps busy, a thread count the cores cannot all serve slows whichever
path runs its OpenMP regions from the main thread (this one; the engine decodes in a thread of its own), so pass
one that fits the idle cores.

    .venv/bin/python benchmarks/asr_speed.py --model RUN --data val_speech.jsonl
    .venv/bin/python benchmarks/asr_speed.py --size tiny --clips 4     # a random model that hears, random clips
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openai
import soundfile
import torch
from serve_load import free_port, start_server

from kosmo import hardware
from kosmo.data.audio import SAMPLE_RATE, batch_clips, clip_features, load_audio
from kosmo.data.chat import audio_block
from kosmo.data.world import World
from kosmo.eval.vision import records, resolve
from kosmo.generate import Sampling, generate
from kosmo.model.audio import AudioConfig
from kosmo.model.lm import SIZES, LMConfig
from kosmo.model.load import load_run, save_run
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.tokenizer import BOS, Tokenizer


def random_run(out: Path, size: str) -> Path:
    """A random KOSMOS model of the LM `size` with an audio encoder as wide and deep as its LM."""
    world = World()
    tok = Tokenizer.train((world.text(i, "train") for i in range(3000)), vocab_size=4096)
    torch.manual_seed(0)
    lm = LMConfig(**{**SIZES[size], "vocab_size": 4096})
    cfg = MLLMConfig(vision=VisionConfig(image_size=32, patch_size=8, dim=64, n_layers=1, n_heads=2, mlp_dim=128),
                     lm=lm, audio=AudioConfig(dim=lm.dim, n_layers=lm.n_layers, n_heads=lm.n_heads, mlp_dim=4 * lm.dim))
    save_run(out, MLLM(cfg), tok, {"stage": "benchmark", "arch": "mllm", "model": cfg.to_dict()})
    return out


def random_clips(out: Path, n: int, seconds: tuple[float, float] = (2.0, 8.0)) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        t = np.arange(int(rng.uniform(*seconds) * SAMPLE_RATE)) / SAMPLE_RATE
        samples = 0.05 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
        paths.append(out / f"clip{i}.wav")
        soundfile.write(paths[-1], samples.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return paths


def in_process(model, tok, paths: list[Path], batch_size: int) -> tuple[float, list[str], int]:
    """(seconds, transcripts, generated tokens) for every clip, `batch_size` clips per generate call."""
    seconds, texts, tokens = 0.0, [], 0
    for start in range(0, len(paths), batch_size):
        begin = time.perf_counter()
        feats = [clip_features(load_audio(p), model.n_mels) for p in paths[start:start + batch_size]]
        prompts = [[BOS, *audio_block(model.audio_tokens(f.shape[-1]))] for f in feats]
        room = model.context_length - max(len(p) for p in prompts)
        out = generate(model, tok, prompts, Sampling(max_new_tokens=room), audio=batch_clips(feats, model.n_mels))
        seconds += time.perf_counter() - begin
        texts += [c.text.strip() for c in out]
        tokens += sum(len(c.tokens) for c in out)
    return seconds, texts, tokens


def endpoint(client: openai.OpenAI, model: str, paths: list[Path]) -> tuple[float, list[str], int]:
    seconds, texts, tokens = 0.0, [], 0
    for path in paths:
        begin = time.perf_counter()
        with open(path, "rb") as f:
            r = client.audio.transcriptions.create(model=model, file=f)
        seconds += time.perf_counter() - begin
        texts.append(r.text)
        tokens += r.usage.output_tokens
    return seconds, texts, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="run directory of a model that hears (default: a random one of --size)")
    ap.add_argument("--data", help='JSONL of {"audio": path} lines (default: random clips of 2 to 8 s)')
    ap.add_argument("--size", default="tiny", choices=list(SIZES))
    ap.add_argument("--clips", type=int, default=8, help="clips to transcribe (the first N lines of --data)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch threads, here and in the server (default: torch's choice)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="asr-speed-") as tmp:
        result = measure(args, Path(tmp))
    print(f"{result['clips']} clips, {result['audio_seconds']:.1f} s of audio, on {result['device']} "
          f"(fp32, torch threads: {result['threads']})")
    print(f"{'path':<28}{'compute s':>10}{'RTF':>9}{'tokens':>8}")
    for k, v in result["paths"].items():
        print(f"{k:<28}{v['seconds']:>10.2f}{v['rtf']:>9.4f}{v['tokens']:>8}")
    print(f"endpoint over in-process batch 1: {result['endpoint_overhead']:.2f}x; "
          f"same text: {result['same_text']}/{result['clips']}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def measure(args, tmp: Path) -> dict:
    run = Path(args.model) if args.model else random_run(tmp / "run", args.size)
    if args.data:
        data = Path(args.data)
        paths = [Path(resolve(data, obj["audio"], where, "audio")) for where, obj in records(data)[:args.clips]]
    else:
        paths = random_clips(tmp, args.clips)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = hardware.pick_device(args.device)
    model, tok, _ = load_run(run, device)
    if not model.n_mels:
        sys.exit(f"{run}: this model has no ears")
    model.eval()
    audio_seconds = sum(len(load_audio(p)) for p in paths) / SAMPLE_RATE

    rows = {}
    with torch.no_grad():
        in_process(model, tok, paths[:1], 1)  # warm-up: first-call allocations and kernel choices
        rows["in-process, batch 1"] = in_process(model, tok, paths, 1)
        rows[f"in-process, batch {args.batch_size}"] = in_process(model, tok, paths, args.batch_size)
    del model
    port = free_port()
    # one slot, so the engine's decode steps have batch 1's shape
    proc, _ = start_server(run, port, 1, str(device), "fp32", args.threads)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        name = run.resolve().name
        endpoint(client, name, paths[:1])  # warm-up
        rows["endpoint (openai client)"] = endpoint(client, name, paths)
    finally:
        proc.terminate()
        proc.wait()

    reference = rows["in-process, batch 1"]
    return {"model": args.model or f"random {args.size}", "device": str(device), "threads": torch.get_num_threads(),
            "clips": len(paths), "audio_seconds": round(audio_seconds, 2),
            "paths": {k: {"seconds": round(s, 3), "rtf": round(s / audio_seconds, 4), "tokens": n}
                      for k, (s, _, n) in rows.items()},
            "same_text": sum(a == b for a, b in zip(rows["endpoint (openai client)"][1], reference[1])),
            "endpoint_overhead": round(rows["endpoint (openai client)"][0] / reference[0], 3)}


if __name__ == "__main__":
    main()
