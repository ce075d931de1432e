"""What each part of the compiled decode step is worth: its batch-1 step time with one part taken back.

    python research/decode_step.py                  # the benchmark model of benchmarks/lm_vs_hf.py, 3 rounds
    python research/decode_step.py --rounds 5 --precision fp32

Variants, each in its own process, the rounds alternating between them so that the host's noise hits all:
  kosmo           `kosmo.generate.compiled` as it is
  view-writes     the KV cache's new entries written through each layer's view (`cache.k[layer][...] = `),
                  which Inductor compiles as a copy of the layer's cache in and out around them
  python-wrapper  the step's kernels called from Inductor's Python wrapper, not its C++ one

Each run prefills a 32-token prompt, then times 60 greedy decode steps (`decode_greedy`, reading the token
back each step as `generate_ids` does), 15 times; prints the median of the 15 per variant and round, then
one JSON line of each variant's median over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = ("kosmo", "view-writes", "python-wrapper")


def step_ms(variant: str, precision: str) -> float:
    import torch

    import kosmo.generate as gen
    from kosmo import hardware
    from kosmo.model.cache import KVCache
    from kosmo.model.lm import LM, LMConfig

    if variant == "view-writes":
        def view_writes(self, layer, k, v):
            rows = torch.arange(k.shape[0])[:, None]
            self.k[layer][rows, :, self.step.pos] = k.transpose(1, 2).to(self.k.dtype)
            self.v[layer][rows, :, self.step.pos] = v.transpose(1, 2).to(self.v.dtype)
        KVCache.write = view_writes
    if variant == "python-wrapper":
        torch_compile = torch.compile
        torch.compile = lambda fn, **kw: torch_compile(fn, **{**kw, "options": {**kw["options"], "cpp_wrapper": False}})
    dtype = torch.bfloat16 if hardware.resolve_precision(precision, torch.device("cpu")) == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=4096, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=384,
                   tie_embeddings=False)
    model = LM(cfg).to(dtype).eval()
    prompt = torch.randint(16, 4096, (1, 32))
    step = gen.compiled(gen.decode_greedy, "cpu")
    times = []
    with torch.no_grad():
        cache = model.new_cache(1, gen.COMPILED_ROOM, dtype, torch.device("cpu"), 0, static=True)
        for i in range(16):
            cache.reset()
            gen.prefill(model, prompt, torch.tensor([32]), cache)
            tok = torch.tensor([5])
            t0 = time.perf_counter()
            for _ in range(60):
                tok = step(model, cache, tok)
                tok.tolist()
            if i == 0:  # the first compiles, or loads the compiled step from Inductor's cache, and checks its guards
                torch.compiler.set_stance(skip_guard_eval_unsafe=True).__enter__()  # as generate_ids does after it
            else:
                times.append((time.perf_counter() - t0) / 60 * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a child
    args = ap.parse_args()
    if args.variant:
        print(json.dumps({"ms": step_ms(args.variant, args.precision)}))
        return
    results = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", v, "--precision", args.precision],
                                 capture_output=True, text=True, check=True).stdout
            results[v].append(json.loads(out.strip().splitlines()[-1])["ms"])
            print(f"round {r + 1}: {v} {results[v][-1]:.3f} ms a step", flush=True)
    print(json.dumps({v: round(statistics.median(ms), 3) for v, ms in results.items()}))


if __name__ == "__main__":
    main()
