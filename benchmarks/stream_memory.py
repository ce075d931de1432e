"""Resident memory of `kosmo train lm` streaming a corpus several times larger than the process's whole footprint.

Writes --gb of text (documents of ~2 KB: world sentences in random order) into parquet shards with
`kosmo.data.stream.write_shards`, trains a tokenizer on a sample, then runs the real command

    kosmo train lm --data SHARDS/ --tokenizer TOK --out RUN train.max_steps=N …   (a 1-layer, 32-wide LM)

in a child process and samples its RSS (/proc/PID/status) every 0.2 s; and, for the trainer's own footprint,
the same command on the first shard's documents as JSONL, packed in memory. The reader's memory is bounded by
one parquet record batch (--row-group documents) and the tokens of `READ_AHEAD_DOCS` (256) documents
read ahead; nothing grows with the corpus. Prints one JSON object; deletes everything it wrote unless --keep.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_memory.py --gb 3 --steps 800

With --read-through it also reads one whole epoch of the packed stream in a child process, every shard and
every document tokenized and cut into rows, so that the text read, not only the corpus on disk, is several
times the reader's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from kosmo.data.stream import READ_AHEAD_DOCS, write_shards
from kosmo.data.world import World
from kosmo.tokenizer import Tokenizer


def corpus(total_bytes: int, seed: int = 0):
    """Documents of 8 world sentences drawn at random, numbered, until `total_bytes` of UTF-8 text."""
    world, rng = World(), np.random.default_rng(seed)
    pool = [world.text(i, "train") for i in range(4000)]
    written, i = 0, 0
    while written < total_bytes:
        for picks in rng.integers(0, len(pool), (4096, 8)).tolist():  # drawn in bulk: numpy per document is slow
            doc = f"Document {i}. " + " ".join([pool[j] for j in picks])
            written += len(doc)  # the world's text is ASCII: characters are bytes
            i += 1
            yield doc
            if written >= total_bytes:
                return


def shard_index(state: dict) -> int:
    """The shard a `datasets` stream state stands in (its innermost `shard_idx`)."""
    inner = state.get("examples_iterable")
    return shard_index(inner) if isinstance(inner, dict) else state["shard_idx"]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_sampled(cmd: list[str], what: str) -> tuple[np.ndarray, str]:
    """Runs cmd, sampling its RSS (MiB) every 0.2 s; the samples and its stdout. Its output goes to files, so a
    chatty child never blocks on a full pipe while it is being sampled."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        samples = []
        while proc.poll() is None:
            r = rss_mib(proc.pid)
            if r is not None:
                samples.append(r)
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{what} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return np.array(samples), out.read()


def train_rss(data: Path, out: Path, steps: int, args) -> np.ndarray:
    """RSS samples (MiB) of `kosmo train lm` on `data` with a 1-layer, 32-wide LM (the tokenizer beside `out`)."""
    cmd = [sys.executable, "-m", "kosmo", "train", "lm", "--data", str(data), "--tokenizer", str(out.parent / "tok"),
           "--out", str(out), f"seq_len={args.seq_len}", "model.dim=32", "model.n_layers=1", "model.n_heads=2",
           "model.n_kv_heads=1", "val_fraction=0", f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
           f"train.save_every={max(1, steps // 2)}", "train.eval_every=0", "train.progress=false",
           "train.tensorboard=false", "train.precision=fp32"]
    return run_sampled(cmd, f"kosmo train lm --data {data}")[0]


READ_THROUGH = """
import sys, time
from kosmo.data.formats import parse_source
from kosmo.data.stream import TextStream
from kosmo.tokenizer import Tokenizer
stream = TextStream(parse_source(sys.argv[1]), Tokenizer.load(sys.argv[2]), int(sys.argv[3]))
rows, t0 = 0, time.perf_counter()
while stream.reader.epoch == 0:
    stream.next_rows(64)
    rows += 64
print(rows, time.perf_counter() - t0)
"""


def read_through_rss(shards: Path, tok: Path, seq_len: int) -> tuple[np.ndarray, int, float]:
    """RSS samples (MiB) of a child process that reads one whole epoch of the packed stream (every shard,
    every document tokenized and packed into rows of seq_len + 1), its row count and its seconds."""
    samples, out = run_sampled([sys.executable, "-c", READ_THROUGH, str(shards), str(tok), str(seq_len)],
                               f"reading {shards} through")
    rows, seconds = out.split()
    return samples, int(rows), float(seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0, help="text to write, in GB (10^9 bytes, uncompressed UTF-8)")
    ap.add_argument("--rows-per-shard", type=int, default=2000)
    ap.add_argument("--row-group", type=int, default=1024, help="documents per parquet record batch")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dir", help="work folder (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the shards and the run")
    ap.add_argument("--read-through", action="store_true",
                    help="also read one whole epoch of the packed stream, every shard, and sample its RSS")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="kosmo-stream-"))
    try:
        t0 = time.perf_counter()
        shards = write_shards(corpus(int(args.gb * 1e9)), work / "shards", args.rows_per_shard, args.row_group)
        write_s = time.perf_counter() - t0
        sample = [d for _, d in zip(range(3000), corpus(10**9, seed=1))]
        tok = Tokenizer.train(iter(sample), 1024)
        tok.save(work / "tok")
        bytes_per_token = sum(len(d.encode()) for d in sample) / sum(map(len, tok.encode_batch(sample)))

        # the same command on one shard's documents as JSONL, packed in memory: the trainer's own footprint
        small = work / "one_shard.jsonl"
        small.write_text("".join(json.dumps({"text": t}) + "\n" for t in pq.read_table(shards[0])["text"].to_pylist()))
        baseline = train_rss(small, work / "baseline", min(args.steps, 100), args)
        t1 = time.perf_counter()
        rss = train_rss(work / "shards", work / "run", args.steps, args)
        train_s = time.perf_counter() - t1
        position = json.loads(next((work / "run" / "state").glob("step-*/stream-rank0.json")).read_text())

        through = {}
        if args.read_through:
            t2 = time.perf_counter()
            seen, rows, seconds = read_through_rss(work / "shards", work / "tok", args.seq_len)
            through = {"read_through_rows": rows, "read_through_tokens": rows * args.seq_len,
                       "read_through_seconds": round(seconds, 1), "read_through_wall_seconds":
                       round(time.perf_counter() - t2, 1), "read_through_peak_rss_mib": round(float(seen.max()), 1),
                       "read_through_rss_mib_by_tenth": [round(float(seen[min(len(seen) - 1, int(len(seen) * q))]), 1)
                                                         for q in np.linspace(0.1, 1, 10)],
                       "corpus_over_read_through_peak_rss": round(args.gb * 1e9 / (float(seen.max()) * 2**20), 1)}
        on_disk = sum(f.stat().st_size for f in shards)
        tokens = args.steps * args.batch_size * args.seq_len
        deciles = [round(float(rss[min(len(rss) - 1, int(len(rss) * q))]), 1) for q in np.linspace(0.1, 1, 10)]
        peak = float(rss.max())
        print(json.dumps({
            "corpus_text_gb": round(args.gb, 3), "corpus_on_disk_gb": round(on_disk / 1e9, 3), "shards": len(shards),
            "documents_per_shard": args.rows_per_shard, "row_group_documents": args.row_group,
            "read_ahead_documents": READ_AHEAD_DOCS,
            "write_seconds": round(write_s, 1), "train_seconds": round(train_s, 1), "steps": args.steps,
            "tokens_trained": tokens, "text_read_mb": round(tokens * bytes_per_token / 1e6, 1),
            "shards_read": shard_index(position["docs"]) + 1 if position["epoch"] == 0 else len(shards),
            "baseline_peak_rss_mib": round(float(baseline.max()), 1), "peak_rss_mib": round(peak, 1),
            "final_rss_mib": round(float(rss[-1]), 1),
            "rss_mib_by_tenth_of_the_run": deciles,
            "corpus_over_peak_rss": round(args.gb * 1e9 / (peak * 2**20), 1),
            "in_memory_tokens_would_need_gb": round(args.gb * 1e9 / bytes_per_token * 8 / 1e9, 2), **through,
        }))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
