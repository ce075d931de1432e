"""Soak test of `kosmo serve`: many streaming clients for minutes on loopback, some reading slowly and some
hanging up mid-stream, while the server's resident memory is sampled. It reports RSS over time and its growth
(the median of the first minute against the last), errors by status, requests completed, and whether every
engine slot is free again at the end (a request that leaks its slot would keep it forever).

    .venv/bin/python benchmarks/soak.py                      # 10 minutes, 32 clients, a tiny random LM
    .venv/bin/python benchmarks/soak.py --minutes 2 --out soak.json
    .venv/bin/python benchmarks/soak.py --model RUN          # any run directory

Exits 1 when a request failed or a slot leaked, so it can stand in a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from kosmo.data.world import World
from kosmo.model.lm import LM, LMConfig
from kosmo.model.load import save_run
from kosmo.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port, start_server  # noqa: E402

KINDS = ("normal", "slow reader", "disconnects")


def tiny_run(out: Path) -> Path:
    """A random 2-layer LM over a 512-token vocabulary: the server's own overhead dominates, as a soak wants."""
    world = World()
    tok = Tokenizer.train((world.text(i, "train") for i in range(500)), vocab_size=512)
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                   init_std=0.1)
    save_run(out, LM(cfg), tok, {"stage": "benchmark", "arch": "lm", "model": cfg.to_dict()})
    return out


def rss_mb(pid: int) -> float:
    """Resident set size from /proc (Linux), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Tally:
    def __init__(self):
        self.completed = collections.Counter()  # kind -> requests read to [DONE] (or hung up on, as meant)
        self.errors = collections.Counter()  # status or exception name -> count
        self.tokens = 0


async def client(http: httpx.AsyncClient, kind: str, deadline: float, prompts: list[str], max_tokens: int,
                 rng: random.Random, tally: Tally):
    """Sends streaming chat requests one after another until the deadline, behaving as `kind`."""
    while time.monotonic() < deadline:
        body = {"messages": [{"role": "user", "content": rng.choice(prompts)}], "stream": True,
                "max_tokens": rng.randint(max_tokens // 4, max_tokens), "seed": rng.randrange(2**31)}
        hang_up_after = rng.randint(1, max_tokens // 4) if kind == "disconnects" else None
        chunks = 0
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    tally.errors[str(r.status_code)] += 1
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if "error" in json.loads(line[6:]):
                        tally.errors["error in stream"] += 1
                        break
                    chunks += 1
                    if chunks == hang_up_after:
                        break  # leaving the block closes the connection mid-stream
                    if kind == "slow reader":
                        await asyncio.sleep(rng.uniform(0.02, 0.2))
                else:
                    tally.tokens += chunks
            tally.completed[kind] += 1
        except httpx.HTTPError as e:
            tally.errors[type(e).__name__] += 1


async def sample_rss(pid: int, deadline: float, every: float, series: list):
    start = time.monotonic()
    while time.monotonic() < deadline:
        series.append((round(time.monotonic() - start, 1), round(rss_mb(pid), 1)))
        await asyncio.sleep(every)


async def soak(url: str, pid: int, clients: int, seconds: float, max_tokens: int, sample_every: float) -> dict:
    world = World()
    prompts = [world.text(i, "val") for i in range(64)]
    tally, series = Tally(), []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        tasks = [client(http, KINDS[i % len(KINDS)], deadline, prompts, max_tokens, random.Random(i), tally)
                 for i in range(clients)]
        await asyncio.gather(sample_rss(pid, deadline, sample_every, series), *tasks)
        health = await settled(http)
    window = min(60.0, seconds / 4)  # a short run compares its first and last quarters
    first = statistics.median(mb for t, mb in series if t <= window)
    last = statistics.median(mb for t, mb in series if t >= series[-1][0] - window)
    return {
        "clients": {kind: sum(KINDS[i % len(KINDS)] == kind for i in range(clients)) for kind in KINDS},
        "seconds": seconds, "requests_completed": dict(tally.completed), "streamed_tokens": tally.tokens,
        "errors": dict(tally.errors),
        "rss_mb": {"window_s": window, "first_median": first, "last_median": last, "growth": round(last - first, 1),
                   "growth_pct": round(100 * (last - first) / first, 2), "series": series},
        "slots": {"max_batch": health["max_batch"], "free_at_end": health["free_slots"],
                  "running_at_end": health["running"], "waiting_at_end": health["waiting"]},
    }


async def settled(http: httpx.AsyncClient, timeout: float = 30) -> dict:
    """/health once the engine has let go of every request (a hung-up one is freed at the engine's next step)."""
    stop = time.monotonic() + timeout
    while True:
        health = (await http.get("/health")).json()
        if health["free_slots"] == health["max_batch"] and not health["waiting"] or time.monotonic() > stop:
            return health
        await asyncio.sleep(0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="run directory (default: a tiny random LM)")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--sample-every", type=float, default=1.0, help="seconds between RSS samples")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice)")
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.model) if args.model else tiny_run(Path(tmp) / "run")
        port = free_port()
        server, health = start_server(run, port, args.max_batch, args.device, args.precision, args.threads)
        try:
            report = asyncio.run(soak(f"http://127.0.0.1:{port}", server.pid, args.clients, args.minutes * 60,
                                      args.max_tokens, args.sample_every))
        finally:
            server.terminate()
            server.wait()
    report = {"model": args.model or "tiny random LM", "device": health["device"], "precision": health["precision"],
              **report}
    Path(args.out).write_text(json.dumps(report, indent=1))
    slots, rss = report["slots"], report["rss_mb"]
    leaked = slots["max_batch"] - slots["free_at_end"]
    print(f"{sum(report['requests_completed'].values())} requests {report['requests_completed']}, "
          f"errors {report['errors'] or 'none'}, RSS {rss['first_median']:.0f} -> {rss['last_median']:.0f} MiB "
          f"({rss['growth']:+.1f}), slots free at end {slots['free_at_end']}/{slots['max_batch']}; "
          f"report in {args.out}")
    sys.exit(1 if report["errors"] or leaked else 0)


if __name__ == "__main__":
    main()
