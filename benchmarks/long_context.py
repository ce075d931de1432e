"""Long-context prefill: peak memory and time of one forward of T tokens through the KV cache, against T.

Each length runs in a fresh process, so its peak resident memory (getrusage's maxrss) is its own; the
baseline (the model and the interpreter, before the prompt) is subtracted. The model is the demo's `tiny`
LM (256 wide, 4 deep, a vocabulary of 2048) with random weights and a context of the largest T; the prompt
goes in as cached chunks of --chunk tokens (`kosmo.generate.prefill`), so attention holds one chunk's
scores against the keys so far and the memory that grows with T is the KV cache's. Writes a plot of both
against T.

    .venv/bin/python benchmarks/long_context.py --lengths 1024,2048,4096,8192,16384,32768 --plot long_context.png
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one(T: int, chunk: int, precision: str, threads: int | None) -> dict:
    from kosmo import hardware
    from kosmo.generate import prefill
    from kosmo.model.lm import LM, SIZES, LMConfig
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu")
    precision = hardware.resolve_precision(precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = LM(LMConfig(**{**SIZES["tiny"], "vocab_size": 2048, "max_seq_len": T})).to(dtype).eval()
    idx = torch.randint(16, 2048, (1, T))
    cache = model.new_cache(1, T, dtype, device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad(), hardware.autocast(device, precision):
        prefill(model, idx, torch.tensor([T]), cache, chunk=chunk)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kv = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * T * dtype.itemsize
    return {"T": T, "seconds": round(seconds, 2), "peak_mib": round(peak / 1024, 1),
            "prompt_mib": round((peak - base) / 1024, 1), "kv_cache_mib": round(kv / 2**20, 1),
            "precision": precision, "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (0: the whole prompt at once)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--plot", help="write memory and time against T to this PNG")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure this length only
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.chunk, args.precision, args.threads)))
        return
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        cmd = [sys.executable, __file__, "--one", str(T), "--chunk", str(args.chunk), "--precision", args.precision]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(json.dumps(rows[-1]), flush=True)
    from kosmo import hardware
    print(f"\non {hardware.describe(torch.device('cpu'), rows[0]['precision'])['device_name']}, prefill chunk "
          f"{args.chunk}:\n\n| T | seconds | peak MiB | the prompt's MiB | KV cache MiB |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['seconds']} | {r['peak_mib']} | {r['prompt_mib']} | {r['kv_cache_mib']} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
        Ts = [r["T"] for r in rows]
        a.plot(Ts, [r["prompt_mib"] for r in rows], "o-", label="prefill")
        a.plot(Ts, [r["kv_cache_mib"] for r in rows], "--", label="KV cache")
        a.set_xlabel("T (tokens)")
        a.set_ylabel("peak memory above the model (MiB)")
        a.legend()
        b.plot(Ts, [r["seconds"] for r in rows], "o-")
        b.set_xlabel("T (tokens)")
        b.set_ylabel("prefill (s)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
