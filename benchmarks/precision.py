"""What this CPU does with bf16: square matmuls in fp32 and in bf16, and the precision `auto` picks.

A CPU with AMX or AVX-512-BF16 runs bf16 matmuls faster than fp32; one without emulates them, many
times slower. This prints both speeds side by side, with the host description that every run records.

    .venv/bin/python benchmarks/precision.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/precision.py  # as an AVX2-only CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kosmo import hardware


def gflops(n: int, dtype: torch.dtype, seconds: float) -> float:
    """Best throughput of an n x n matmul over repeats for about `seconds` (at least three)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: kernel selection, buffers
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best, runs = min(best, time.perf_counter() - t0), runs + 1
    return 2 * n ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per size and dtype")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    print(json.dumps({**hardware.describe(cpu, "auto"), "threads": torch.get_num_threads()}))
    print("| n | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("|---:|---:|---:|---:|")
    for n in args.sizes:
        fp32, bf16 = gflops(n, torch.float32, args.seconds), gflops(n, torch.bfloat16, args.seconds)
        print(f"| {n} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f}x |")


if __name__ == "__main__":
    main()
