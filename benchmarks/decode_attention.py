"""Decode-step attention over a slot cache, three ways, side by side on this machine:

    per-row       one attention call per row over exactly its keys
    longest-row   one masked call over the longest row's keys, rounded up to 64 (what kosmo runs)
    whole-cache   one masked call over every position the cache holds

for 16 rows of lengths spread over the context, with the `small` LM's heads (6 query, 2 key-value
heads of 64), per layer. It also says whether each form gives a row the same bits alone (its
neighbours' lengths 1) as among the others: the serving engine promises that.

    .venv/bin/python benchmarks/decode_attention.py
    .venv/bin/python benchmarks/decode_attention.py --context 512 2048 --rows 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from kosmo import hardware
from kosmo.model.cache import KVCache
from kosmo.model.lm import LMConfig


def per_row(cache: KVCache, q):
    B, Hq, _, d = q.shape
    Hkv = cache.k.shape[2]
    y = torch.zeros_like(q)
    for b in range(B):
        n = int(cache.lengths[b]) + 1
        y[b] = F.scaled_dot_product_attention(q[b:b + 1].view(1, Hkv, Hq // Hkv, d), cache.k[0, b:b + 1, :, :n],
                                              cache.v[0, b:b + 1, :, :n]).view(Hq, 1, d)
    return y


def masked_call(cache: KVCache, q, S: int):
    B, Hq, _, d = q.shape
    Hkv = cache.k.shape[2]
    mask = (torch.arange(S) < (cache.lengths + 1)[:, None])[:, None, None, :]
    y = F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, d), cache.k[0, :, :, :S], cache.v[0, :, :, :S],
                                       attn_mask=mask)
    return y.view(B, Hq, 1, d)


def longest_row(cache: KVCache, q):
    cache.begin(1)
    y = cache.attend(0, q, cache.k[0, :, :, :1], cache.v[0, :, :, :1])  # rewrites one key per row, as decoding does
    cache.step = None
    return y


FORMS = {"per-row": per_row, "longest-row": longest_row,
         "whole-cache": lambda cache, q: masked_call(cache, q, cache.k.shape[3])}


def filled_cache(cfg: LMConfig, rows: int, context: int, lengths: list[int], dtype) -> KVCache:
    cache = KVCache(cfg, rows, context, dtype)
    cache.k.normal_()
    cache.v.normal_()
    cache.lengths = torch.tensor(lengths)
    return cache


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = torch.bfloat16 if hardware.resolve_precision("auto", device) == "bf16" else torch.float32
    cfg = LMConfig(dim=384, n_layers=1, n_heads=6, n_kv_heads=2, max_seq_len=max(args.context))
    print(hardware.describe(device, "bf16" if dtype == torch.bfloat16 else "fp32"))
    gen = torch.Generator().manual_seed(0)
    for context in args.context:
        lengths = torch.randint(8, context - 1, (args.rows,), generator=gen).tolist()
        q = torch.randn(args.rows, cfg.n_heads, 1, cfg.head_dim, generator=gen).to(dtype)
        row = {"context": context, "rows": args.rows, "dtype": str(dtype).removeprefix("torch.")}
        for name, form in FORMS.items():
            torch.manual_seed(0)
            cache = filled_cache(cfg, args.rows, context, lengths, dtype)
            together = form(cache, q)
            same = True
            for b in range(args.rows):  # row b alone: every other row holds one key
                torch.manual_seed(0)
                alone = filled_cache(cfg, args.rows, context, [1] * args.rows, dtype)
                alone.k.copy_(cache.k)
                alone.v.copy_(cache.v)
                alone.lengths[b] = lengths[b]
                same &= torch.equal(form(alone, q)[b], together[b])
            row[f"{name}_ms"] = round(1e3 * timed(lambda: form(cache, q), args.repeats), 3)
            row[f"{name}_row_alone_same_bits"] = same
        print(json.dumps(row))


if __name__ == "__main__":
    main()
