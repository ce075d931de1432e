"""Drawing speed: seconds per picture with classifier-free guidance, from the prompt to the pixels.

Measured on the demo's size of drawing model with random weights (the `tiny` LM, a 36-pixel vision tower in
12-pixel patches, and a VQ-VAE of 36-pixel pictures in codes of --code-pixels: 12 (the demo's, 3 x 3 = 9 codes) or
4 (9 x 9 = 81 codes), from a codebook of 256), or on a trained one (--model RUN), two ways:
- in-process: `kosmo.draw.draw`, its prompt and unconditional twin in one batch, then the decoder to pixels;
- through `kosmo serve`'s /v1/images/generations with the openai client: the engine's slots, the decoder, PNG
  and base64 (the server decodes `--max-batch` rows at every step, however many are busy).
(a) one picture at guidance --cfg, the median of --repeats; (b) --pictures pictures batched (one `draw` call, or
one request with n) over the same one at a time: the throughput ratio. Every picture is sampled (temperature 1)
from its own seed. Targets on 2 CPU cores: (a) at most 1 s, (b) at least 4x.

    .venv/bin/python benchmarks/draw_speed.py --threads 2
    .venv/bin/python benchmarks/draw_speed.py --model RUN --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai
import torch
from serve_load import free_port, start_server

from kosmo import hardware
from kosmo.data.world import World
from kosmo.draw import DrawSampling, draw
from kosmo.model.lm import SIZES, LMConfig
from kosmo.model.load import load_run, save_run
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.model.vqvae import VQVAE, VQVAEConfig
from kosmo.tokenizer import Tokenizer
from kosmo.train.mllm import with_image_tokenizer

PROMPTS = ["a small red circle", "a big blue square", "a green triangle left of a yellow circle",
           "two purple squares", "an orange circle above a red triangle", "a large grey square",
           "a blue circle and a green square", "a small yellow triangle"]
TARGET_ONE_S, TARGET_RATIO = 1.0, 4.0


def random_run(out: Path, size: str, code_pixels: int) -> Path:
    """A random KOSMOS model that draws, of the demo's sizes: the LM `size`, its vision tower and a VQ-VAE."""
    world = World()
    tok = Tokenizer.train((world.text(i, "train") for i in range(2000)), vocab_size=2048)
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=36, patch_size=12, dim=128, n_layers=4, n_heads=4, mlp_dim=512),
                     lm=LMConfig(**{**SIZES[size], "vocab_size": 2048}))
    coder = VQVAE(VQVAEConfig(image_size=36, downsample=code_pixels, codebook_size=256, channels=128))
    model = with_image_tokenizer(MLLM(cfg), coder)
    save_run(out, model, tok, {"stage": "benchmark", "arch": "mllm", "model": model.cfg.to_dict()})
    return out


def timed(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def measure(args, tmp: Path) -> dict:
    run = Path(args.model) if args.model else random_run(tmp / "run", args.size, args.code_pixels)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = hardware.pick_device(args.device)
    model, tok, _ = load_run(run, device, args.precision)
    if model.image_tokenizer is None:
        sys.exit(f"{run}: this model cannot draw")
    host = hardware.describe(device, args.precision)
    coder = model.image_tokenizer
    shape = {"codes_per_picture": coder.grid ** 2, "picture_size": coder.cfg.image_size}
    k = args.pictures
    prompts = (PROMPTS * k)[:k]

    def in_process(ps: list[str], seed: int):
        with hardware.autocast(device, args.precision):
            return draw(model, tok, ps, DrawSampling(cfg=args.cfg, temperature=1.0, seed=seed))

    in_process(prompts[:1], 0)  # warm-up: first-call allocations and kernel choices
    one = [timed(lambda: in_process(prompts[:1], i)) for i in range(args.repeats)]
    batched = timed(lambda: in_process(prompts, 100))
    alone = sum(timed(lambda: in_process([p], 200 + i)) for i, p in enumerate(prompts))
    rows = {"in-process (kosmo.draw)": {"one_picture_s": statistics.median(one), "batched_s": batched,
                                        "one_at_a_time_s": alone}}

    port = args.port or free_port()
    proc, health = start_server(run, port, args.max_batch, str(device), args.precision, args.threads,
                                "--max-images-per-request", str(k))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=3600)

        def endpoint(prompt: str, n: int, seed: int):
            r = client.images.generate(prompt=prompt, n=n, extra_body={"guidance_scale": args.cfg,
                                                                       "temperature": 1.0, "seed": seed})
            assert len(r.data) == n

        endpoint(prompts[0], 1, 0)  # warm-up
        one = [timed(lambda: endpoint(prompts[0], 1, i)) for i in range(args.repeats)]
        batched = timed(lambda: endpoint(prompts[0], k, 100))
        alone = sum(timed(lambda: endpoint(p, 1, 200 + i)) for i, p in enumerate(prompts))
        rows[f"endpoint (openai client, --max-batch {args.max_batch})"] = {
            "one_picture_s": statistics.median(one), "batched_s": batched, "one_at_a_time_s": alone}
    finally:
        proc.terminate()
        proc.wait()

    for row in rows.values():
        row["ratio"] = row["one_at_a_time_s"] / row["batched_s"]
        for key in row:
            row[key] = round(row[key], 3)
    return {"model": args.model or f"random {args.size}", "host": host, "server_precision": health["precision"],
            "threads": torch.get_num_threads(), "cfg": args.cfg, "pictures": k, **shape, "paths": rows,
            "targets": {"one_picture_s": TARGET_ONE_S, "ratio": TARGET_RATIO}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="run directory of a model that draws (default: a random one of --size)")
    ap.add_argument("--size", default="tiny", choices=list(SIZES))
    ap.add_argument("--code-pixels", type=int, default=12, help="the random VQ-VAE's pixels per code (12 or 4)")
    ap.add_argument("--cfg", type=float, default=3.0, help="guidance scale")
    ap.add_argument("--pictures", type=int, default=8, help="pictures batched in (b)")
    ap.add_argument("--repeats", type=int, default=5, help="single pictures timed in (a); the median counts")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's slots (a guided picture takes 2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=hardware.PRECISIONS)
    ap.add_argument("--threads", type=int, help="torch threads, here and in the server (default: torch's choice)")
    ap.add_argument("--port", type=int)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="draw-speed-") as tmp:
        result = measure(args, Path(tmp))
    host = result["host"]
    print(f"{result['model']}: {result['codes_per_picture']} codes per {result['picture_size']}-pixel picture, "
          f"guidance {result['cfg']}, on {host['device_name']} ({host['cpu_capability']}, {host['precision']}, "
          f"server {result['server_precision']}, torch threads: {result['threads']})")
    k = result["pictures"]
    print(f"| path | one picture s | {k} batched s | {k} one at a time s | throughput ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, r in result["paths"].items():
        print(f"| {name} | {r['one_picture_s']:.3f} | {r['batched_s']:.3f} | {r['one_at_a_time_s']:.3f} "
              f"| {r['ratio']:.2f}x |")
    print(f"targets: one picture <= {TARGET_ONE_S} s, {k} batched >= {TARGET_RATIO}x one at a time")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
