"""kosmo LM vs transformers' LlamaForCausalLM, side by side in one process.

Same config, same weights (exported from kosmo), same batch, same precision: the one that
`train.precision=auto` picks on this machine (bf16 autocast where the CPU has AMX or AVX-512-BF16,
fp32 elsewhere) unless --precision forces one. Reports training tokens/s (forward, the loss each
library trains with, backward, and the fused `torch.optim.AdamW` step both trainers default to; fp32
weights, under bf16 autocast when bf16) and greedy decode tokens/s at batch 1 and batch 8 (weights
held in the benchmark's dtype), kosmo eager and compiled (`generate_ids(compile=True)`), with
kosmo/transformers ratios. --compile adds kosmo trained as `train.compile=true` runs it (the whole
forward compiled) against transformers eager, as its Trainer runs by default, and against
transformers compiled the same way; and what the compilation costs in steps. Each contender's training
MFU is printed as the trainer logs it: three times the forward's FLOPs a token (counted by torch on
kosmo's model; transformers' does the same work) at its tokens/s, over the matmul peak measured on this
machine. Runs alternate between the contenders so machine noise hits all alike; the median of the
repeats is reported.

Batch-1 decode streams every weight but the embedding table once per token, so its decode step is
reported beside its bandwidth floor on this machine: those bytes over the copy bandwidth measured here
(STREAM's convention: bytes read plus bytes written per second, by `Tensor.copy_` of buffers far larger
than the caches; the best of the measurements between the rounds). A decode step's time leaves the
prompt out, as llama.cpp's eval time does: the time of a call for n new tokens less that of a call for
one (the prefill and the first token), over n - 1.

    .venv/bin/python benchmarks/lm_vs_hf.py                         # the table in docs/performance.md
    .venv/bin/python benchmarks/lm_vs_hf.py --train-only --compile  # training, eager and compiled
    .venv/bin/python benchmarks/lm_vs_hf.py --decode-only --rounds 3  # decode only, beside its floor
    .venv/bin/python benchmarks/lm_vs_hf.py --quick                 # a fast smoke run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_vs_hf.py --train-only --compile --cpu-time  # a busy host
    .venv/bin/python benchmarks/lm_vs_hf.py --device cuda          # both on the GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
import transformers
from torch.utils import flop_counter

from kosmo import hardware
from kosmo.generate import Sampling, generate_ids
from kosmo.interop.hf_llama import export_hf
from kosmo.model.lm import LM, LMConfig
from kosmo.train.lm import lm_loss


def train_step_fn(model, opt, ids, hf: bool, dtype):
    """One optimizer step on ids (B, T + 1) as each library trains: transformers' `labels=` loss, and
    kosmo's trainer's (`kosmo.train.lm.lm_loss`, summed, over the batch's count of targets)."""
    batch = {"input": ids[:, :-1], "labels": ids[:, 1:]}

    def step():
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if hf:
                loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
            else:
                loss = lm_loss(model, batch)[0] / batch["labels"].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def flops_per_token(model, ids, dtype) -> float:
    """What the trainer's MFU counts a target token as: three times the forward's FLOPs (PaLM's convention)."""
    batch = {"input": ids[:, :-1], "labels": ids[:, 1:]}
    with flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad(), \
            torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        lm_loss(model, batch)
    return 3 * counter.get_total_flops() / batch["labels"].numel()


def print_mfu(train: dict, per_token: float, peak: float, precision: str):
    """Each contender's MFU as the trainer logs it: the model's FLOPs at its tokens/s over the matmul peak."""
    print(f"MFU ({per_token / 1e6:.0f} MFLOP a token, over the {precision} matmul peak measured here, "
          f"{peak / 1e9:,.0f} GFLOP/s): " + ", ".join(f"{k} {v * per_token / peak:.1%}" for k, v in train.items()))


def copy_bandwidth(dtype, device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes moved per second (read + written) copying a buffer of `mib` MiB on `device`, the best of
    `repeats`."""
    src = torch.ones(mib * 2**20 // dtype.itemsize, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), 1) for _ in range(repeats))
    return 2 * src.numel() * dtype.itemsize / best


def streamed_bytes(model: LM, dtype) -> int:
    """Weight bytes a batch-1 decode step reads: all but the embedding table, of which it reads one row
    (with tied embeddings the table is the vocabulary head, read whole)."""
    skip = 0 if model.cfg.tie_embeddings else model.embed.weight.numel()
    return (model.num_params() - skip) * dtype.itemsize


# what `timed` reads: the wall clock, or with --cpu-time this process's CPU time, which on a host shared
# with other work counts this process's own turns only (run it with OMP_NUM_THREADS=1, as threads
# waiting at a barrier spin on CPU time)
clock = time.perf_counter


def timed(fn, repeats: int) -> float:
    sync()
    t0 = clock()
    for _ in range(repeats):
        fn()
    sync()
    return (clock() - t0) / repeats


def report(args, precision, device, rows, decode=""):
    print(f"config: {args.layers} layers, dim {args.dim}, {args.heads} heads ({args.kv_heads} kv), vocab {args.vocab}, "
          f"train batch {args.batch}x{args.seq}, {decode}"
          f"{precision} (--precision {args.precision}; {hardware.describe(device, precision)['device_name']}, "
          f"kernels {hardware.cpu_capability()}, bf16 features: {', '.join(hardware.cpu_flags()) or 'none'}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print("| measure | kosmo | transformers | kosmo / transformers |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")


def print_compile_cost(args, first_step, train_times):
    """What compilation costs (the first step over an eager one) and how many steps repay it."""
    if not args.compile:
        return
    for eager_name, name in (("kosmo", "kosmo, train.compile"), ("transformers", "transformers, torch.compile")):
        eager, compiled = statistics.median(train_times[eager_name]), statistics.median(train_times[name])
        cost = first_step[name] - first_step[eager_name]
        repaid = f"repaid after {cost / (eager - compiled):,.0f} steps" if compiled < eager else "never repaid"
        print(f"{name}: first step {cost:.1f} s longer than eager's, then {(eager - compiled) * 1e3:.0f} ms "
              f"a step faster ({eager * 1e3:.0f} -> {compiled * 1e3:.0f} ms): {repaid}")


def sync():
    """Waits for queued GPU work, so that a time covers it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--precision", choices=hardware.PRECISIONS, default="auto")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time kosmo training with train.compile")
    ap.add_argument("--train-only", action="store_true", help="time training only, not decode")
    ap.add_argument("--decode-only", action="store_true", help="time decode only, not training")
    ap.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time (a shared host)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2: a decode step's time is a call for n tokens less a call for one")
    if args.cpu_time:
        global clock
        clock = time.process_time
    if args.quick:
        args.rounds, args.new_tokens = 2, 16
    device = torch.device(args.device)
    precision = hardware.resolve_precision(args.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                   n_kv_heads=args.kv_heads, max_seq_len=max(args.seq, 128) + args.new_tokens + 64,
                   tie_embeddings=False)
    ours = LM(cfg)
    with tempfile.TemporaryDirectory() as d:
        export_hf(ours, d)
        theirs = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").to(device)
    ours = ours.to(device)
    ids = torch.randint(16, args.vocab, (args.batch, args.seq + 1)).to(device)

    # ---- training throughput
    steps, first_step = {}, {}
    contenders = [("kosmo", ours, False), ("transformers", theirs, True)]
    if args.compile:
        compiled = copy.deepcopy(ours)
        compiled.compile()  # as train.compile=true does
        theirs_compiled = copy.deepcopy(theirs)
        theirs_compiled.compile()
        contenders += [("kosmo, train.compile", compiled, False),
                       ("transformers, torch.compile", theirs_compiled, True)]
    for name, model, hf in [] if args.decode_only else contenders:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # both trainers' default
        steps[name] = train_step_fn(model, opt, ids, hf, dtype)
        first_step[name] = timed(steps[name], 1)  # warm-up (allocations, autocast caches, oneDNN kernels, compilation)
    train_times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            train_times[name].append(timed(fn, 2))
    tokens = args.batch * args.seq
    train = {k: tokens / statistics.median(v) for k, v in train_times.items()}
    rows = [] if args.decode_only else [("training tokens/s", train["kosmo"], train["transformers"])]
    if args.compile and not args.decode_only:
        rows += [("training tokens/s, kosmo with train.compile", train["kosmo, train.compile"], train["transformers"]),
                 ("training tokens/s, both compiled", train["kosmo, train.compile"],
                  train["transformers, torch.compile"])]
    mfu = None if args.decode_only else \
        (train, flops_per_token(ours, ids, dtype), hardware.matmul_peak(device, precision), precision)
    if args.train_only:
        report(args, precision, device, rows)
        print_mfu(*mfu)
        print_compile_cost(args, first_step, train_times)
        return

    # ---- decode throughput: both models hold their weights in the benchmark dtype, as when serving
    ours = copy.deepcopy(ours).to(dtype).eval()
    theirs = theirs.to(dtype).eval()
    prompt_len = 32
    decode, compile_s = {}, {}
    bandwidths = []  # measured between the rounds, as the host's memory traffic from other work varies
    for batch in (1, 8):
        prompts = ids[:batch, :prompt_len]
        n = args.new_tokens

        def run_ours(compile=False, n=n):
            generate_ids(ours, prompts.tolist(), Sampling(max_new_tokens=n), stop_ids=(), compile=compile)

        def run_theirs(n=n):
            with torch.no_grad():
                theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=0)

        run_ours(), run_theirs()  # warm-up
        t0 = time.perf_counter()  # the wall clock even with --cpu-time: Inductor compiles in worker processes
        run_ours(compile=True)
        compile_s[batch] = time.perf_counter() - t0
        runs = {"kosmo": run_ours, "kosmo, compiled": lambda n=n: run_ours(True, n), "transformers": run_theirs}
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, run in runs.items():
                times[k].append(timed(run, 1))
            bandwidths.append(copy_bandwidth(dtype, device))
        decode[batch] = {k: batch * n / statistics.median(v) for k, v in times.items()}
        if batch == 1:
            # the prompt and the first token alone: what the n - 1 decode steps after it take is the rest
            first = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, run in runs.items():
                    first[k].append(timed(lambda: run(n=1), 1))
            step_ms = {k: (statistics.median(times[k]) - statistics.median(first[k])) / (n - 1) * 1e3 for k in runs}
    bandwidth = max(bandwidths)  # the best, so the floor is the lowest seen
    floor_s = streamed_bytes(ours, dtype) / bandwidth  # seconds a batch-1 token takes at best

    for batch in (1, 8):
        rows += [(f"decode tokens/s, batch {batch}", decode[batch]["kosmo"], decode[batch]["transformers"]),
                 (f"decode tokens/s, batch {batch}, kosmo compiled", decode[batch]["kosmo, compiled"],
                  decode[batch]["transformers"])]
    report(args, precision, device, rows, f"decode {prompt_len}+{args.new_tokens} tokens, ")
    if mfu:
        print_mfu(*mfu)
    print_compile_cost(args, first_step, train_times)
    per_token = {k: 1e3 / v for k, v in decode[1].items()}
    print(f"batch-1 decode floor: {streamed_bytes(ours, dtype) / 1e6:.1f} MB of weights a token at "
          f"{bandwidth / 1e9:.1f} GB/s copy bandwidth = {floor_s * 1e3:.2f} ms a token; a decode step "
          "(the prompt's prefill and first token left out) took "
          + ", ".join(f"{k} {ms:.2f} ms ({ms / (floor_s * 1e3):.1f}x the floor)" for k, ms in step_ms.items())
          + "; the whole generate call, over its new tokens: "
          + ", ".join(f"{k} {ms:.2f} ms ({ms / (floor_s * 1e3):.1f}x)" for k, ms in per_token.items()))
    print(f"kosmo's first compiled decode (compiling its step, or loading it from Inductor's cache) took "
          f"{compile_s[1]:.0f} s at batch 1 and {compile_s[8]:.0f} s at batch 8")
    trained = {} if args.decode_only else {"train_ratio": round(train["kosmo"] / train["transformers"], 3),
                                           "train_mfu": round(train["kosmo"] * mfu[1] / mfu[2], 4)}
    print(json.dumps({"precision": precision, **trained,
                      "decode_b1_ratio": round(decode[1]["kosmo"] / decode[1]["transformers"], 3),
                      "decode_b8_ratio": round(decode[8]["kosmo"] / decode[8]["transformers"], 3),
                      "decode_b1_compiled_ratio": round(decode[1]["kosmo, compiled"] / decode[1]["transformers"], 3),
                      "decode_b8_compiled_ratio": round(decode[8]["kosmo, compiled"] / decode[8]["transformers"], 3),
                      "decode_b1_floor_ms": round(floor_s * 1e3, 3),
                      "decode_b1_compiled_step_ms": round(step_ms["kosmo, compiled"], 3),
                      "decode_b1_compiled_step_vs_floor": round(step_ms["kosmo, compiled"] / (floor_s * 1e3), 2),
                      "decode_b1_compiled_vs_floor": round(per_token["kosmo, compiled"] / (floor_s * 1e3), 2)}))


if __name__ == "__main__":
    main()
