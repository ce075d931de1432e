"""Load test of `kosmo serve`: time to first token, time per output token, and request and token
throughput at several concurrencies, side by side in one run, for

    continuous batching   the engine as `kosmo serve` runs it (`--batch-shapes full`, the prefix cache on)
    bucketed              the same with `--batch-shapes bucketed`
    one at a time         the same server decoding one request at a time (`--max-batch 1`)

and, on a shared-prefix workload (a 512-token system prompt before every short question), the
continuous-batching server with its prefix cache on and off (`--prefix-cache-tokens 0`).

Each concurrency level keeps C streaming chat requests in flight (a client sends its next request
as soon as its last one ends) over real HTTP, after one warm-up request. Without --model it serves a
random-weight LM of the `small` size (6 layers, dim 384, 4096-token vocabulary), where batching matters.

    .venv/bin/python benchmarks/serve_load.py                 # the table in docs/performance.md
    .venv/bin/python benchmarks/serve_load.py --quick         # a fast smoke run
    .venv/bin/python benchmarks/serve_load.py --model RUN     # any run directory
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from kosmo import hardware
from kosmo.data.world import World
from kosmo.model.lm import LM, SIZES, LMConfig
from kosmo.model.load import save_run
from kosmo.tokenizer import Tokenizer


def random_run(out: Path, size: str) -> Path:
    world = World()
    tok = Tokenizer.train((world.text(i, "train") for i in range(3000)), vocab_size=4096)
    torch.manual_seed(0)
    cfg = LMConfig(**{**SIZES[size], "vocab_size": 4096})
    save_run(out, LM(cfg), tok, {"stage": "benchmark", "arch": "lm", "model": cfg.to_dict()})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, max_batch: int, device: str, precision: str,
                 threads: int | None, *options: str) -> tuple[subprocess.Popen, dict]:
    """The server (with more `kosmo serve` options) and what its /health says (device and the precision it
    decodes in)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "kosmo", "serve", "--model", str(run), "--port", str(port),
                             "--max-batch", str(max_batch), "--device", device, "--precision", precision,
                             "--max-queue", "256", *options], env=env)
    for _ in range(600):
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            if health.status_code == 200:
                return proc, health.json()
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def system_prompt(run: Path, world: World, tokens: int) -> str:
    """Shapes-world text that the run's tokenizer makes `tokens` tokens of (give or take a merge at the cut)."""
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    ids: list[int] = []
    for i in range(10_000):
        ids += tokenizer.encode(world.text(i, "train") + " ")
        if len(ids) >= tokens:
            return tokenizer.decode(ids[:tokens])
    raise RuntimeError("the world ran out of text")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, system: str | None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and "role" not in chunk["choices"][0]["delta"]:
                last = time.perf_counter()  # a chunk per generated token
                first = first or last
    return {"ttft": first - start, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens,
            "end": time.perf_counter()}


async def load(url: str, concurrency: int, requests: int, max_tokens: int, prompts: list[str],
               system: str | None = None) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_request(client, prompts[-1], 4, system)  # warm-up
        todo = iter(range(requests))
        results = []

        async def worker():
            for i in todo:
                results.append(await one_request(client, prompts[i % len(prompts)], max_tokens, system))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests,
            "ttft_ms": 1000 * statistics.median(r["ttft"] for r in results),
            "tpot_ms": 1000 * statistics.median(r["tpot"] for r in results),
            "req_per_s": requests / wall, "tok_per_s": sum(r["tokens"] for r in results) / wall}


def table(rows: list[dict], first: str):
    print(f"\n| {first} | concurrency | TTFT ms | time/token ms | requests/s | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[first]} | {r['concurrency']} | {r['ttft_ms']:.0f} | {r['tpot_ms']:.1f} | "
              f"{r['req_per_s']:.2f} | {r['tok_per_s']:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="run directory (default: a random LM of --size)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least C)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=512, help="the shared-prefix workload's system prompt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=hardware.PRECISIONS, default="auto")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.size, args.concurrency, args.requests, args.max_tokens, args.system_tokens = "tiny", [1, 4], 4, 16, 128
    world = World()
    prompts = [world.text(i, "val") for i in range(64)]
    top = max(args.concurrency)
    servers = [  # (engine, max batch, more `kosmo serve` options, whether it also runs the shared-prefix workload)
        ("continuous batching", top, (), True),
        ("no prefix cache", top, ("--prefix-cache-tokens", "0"), True),
        ("bucketed", top, ("--batch-shapes", "bucketed"), False),
        ("one at a time", 1, (), False),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.model) if args.model else random_run(Path(tmp) / "run", args.size)
        system = system_prompt(run, world, args.system_tokens)
        rows, shared = [], []
        for engine, max_batch, options, prefix in servers:
            server, health = start_server(run, args.port, max_batch, args.device, args.precision, args.threads,
                                          *options)
            print(f"{engine}: {health['device']}, {health['precision']} (--precision {args.precision})", flush=True)
            url = f"http://127.0.0.1:{args.port}"
            try:
                for c in args.concurrency:
                    if engine != "no prefix cache":  # the same engine as continuous batching on this workload
                        rows.append({"engine": engine, **asyncio.run(load(url, c, max(args.requests, c),
                                                                          args.max_tokens, prompts))})
                        print(json.dumps(rows[-1]), flush=True)
                    if prefix:
                        cache = "off" if options else "on"
                        shared.append({"prefix cache": cache, **asyncio.run(load(url, c, max(args.requests, c),
                                                                                 args.max_tokens, prompts, system))})
                        print(json.dumps({"workload": "shared prefix", **shared[-1]}), flush=True)
            finally:
                server.terminate()
                server.wait()
    table(rows, "engine")
    print(f"\nshared prefix: a {args.system_tokens}-token system prompt before each question")
    table(shared, "prefix cache")
    tps = {r["engine"]: r["tok_per_s"] for r in rows if r["concurrency"] == top}
    print(f"\nthroughput ratio at concurrency {top}: {tps['continuous batching'] / tps['one at a time']:.1f}x "
          f"(continuous batching / one at a time)")
    for c in args.concurrency:
        ttft = {r["prefix cache"]: r["ttft_ms"] for r in shared if r["concurrency"] == c}
        print(f"shared-prefix TTFT at concurrency {c}: {ttft['off'] / ttft['on']:.1f}x lower with the prefix cache "
              f"({ttft['on']:.0f} ms against {ttft['off']:.0f} ms)")
    if 1 in args.concurrency:
        lone = {r["engine"]: r["tpot_ms"] for r in rows if r["concurrency"] == 1}
        alone = lone["one at a time"]
        print(f"a lone request, ms per token: {lone['continuous batching']:.1f} full "
              f"({lone['continuous batching'] / alone:.2f}x one at a time), {lone['bucketed']:.1f} bucketed "
              f"({lone['bucketed'] / alone:.2f}x), {alone:.1f} one at a time")


if __name__ == "__main__":
    main()
