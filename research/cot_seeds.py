"""Does a worked answer (a scratchpad) help a small model count, in and out of distribution, seed after seed?

    python research/cot_seeds.py --out out/cot --seeds 0,1,2 --val 200 --plot out/cot/reasoning.png

Writes the world's counting questions (kosmo.data.world.reasoning; `kosmo world --reasoning N` writes the same
files) and trains one byte-level BPE tokenizer on them. For each seed it pretrains one LM on the training questions'
prompts alone (no answers) with copy rows beside them (kosmo.train.lm.copy_rows: repeated random spans, which form
the induction head that copying a place into its entry needs), then fine-tunes two models from it: one on the
direct answers, one on the worked answers. The two see the same questions in the same order (rows are not packed)
with the same prompts, steps, batch and learning rate, so they differ only in their targets. Both stages use a
constant learning rate after warm-up, AdamW with beta2 0.999 and no weight decay, fp32. Each model is scored by
`kosmo eval reasoning` (greedy, exact answer) on held-out scenes of 3-6 objects (in distribution) and 7-10 (out of
distribution). With --chat it also trains one model on reasoning_chat.jsonl, both forms chosen by the system
prompt, and scores it with and without the prompt.

Prints one JSON line per run and a table of means and spreads over the seeds; writes OUT/results.json and, with
--plot, a figure. A run that is already trained and scored under OUT is read back, not redone, so seeds may be run
side by side (`--seeds 0` and `--seeds 1` at once, after one of them has written the data and tokenizer) and then
gathered by a last invocation with every seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kosmo.data.jsonl import iter_texts, read_jsonl
from kosmo.data.world import World, WorldConfig, write_reasoning
from kosmo.eval.reasoning import constant_accuracy, evaluate_reasoning, read_items
from kosmo.model.lm import LM, LMConfig
from kosmo.model.load import load_run, save_run
from kosmo.tokenizer import Tokenizer
from kosmo.train.run import run_stage

VARIANTS = {"worked": "reasoning_worked", "direct": "reasoning_direct"}


def initial_run(out: Path, seed: int, tok: Tokenizer, prompts: Path, args) -> Path:
    """The common start of a seed's two runs (sft begins from a run): an LM pretrained on the questions' prompts
    alone, with copy rows beside them, so that it has the induction head a worked answer copies with before it
    sees any answer; with --pretrain-steps 0, the random LM."""
    run = out / "runs" / f"init-{seed}"
    if (run / "model.safetensors").is_file():
        return run
    cfg = LMConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                   n_kv_heads=args.heads, max_seq_len=256, smear_keys=True)
    if not args.pretrain_steps:
        torch.manual_seed(seed)
        save_run(run, LM(cfg), tok, {"stage": "init", "arch": "lm", "model": cfg.to_dict()})
        return run
    model = [f"model.{k}={getattr(cfg, k)}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")]
    run_stage("lm", [str(prompts)], run, tokenizer=str(out / "tokenizer.json"), overrides=[
        *model, "model.smear_keys=true", f"copy_rows={args.copy_rows}", "seq_len=128", "val_fraction=0",
        f"train.max_steps={args.pretrain_steps}", f"train.batch_size={args.batch}", "train.warmup_steps=20",
        *optimiser(args, seed)])
    return run


def optimiser(args, seed: int) -> list[str]:
    """The training overrides both stages share: a constant learning rate after warm-up, AdamW with a slow
    second moment and no weight decay, fp32 (the recipe under which copy rows formed an induction head)."""
    return [f"train.seed={seed}", f"train.lr={args.lr}", f"train.min_lr_ratio={args.min_lr_ratio}",
            f"train.beta2={args.beta2}", f"train.weight_decay={args.weight_decay}", "train.precision=fp32",
            "train.eval_every=0", "train.save_every=100000", "train.progress=false", "train.tensorboard=false"]


def train_and_score(name: str, data: Path, init: Path, seed: int, val: Path, out: Path, args,
                    thinks: tuple[bool, ...] = (False,)) -> dict:
    run = out / "runs" / name
    scored = run / "reasoning.json"
    if scored.is_file():  # trained and scored by an earlier invocation (e.g. one per seed, side by side)
        row = json.loads(scored.read_text())
        print(json.dumps(row), flush=True)
        return row
    start = time.time()
    if not (run / "model.safetensors").is_file():
        run_stage("sft", [str(data)], run, init=init, overrides=[
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", "train.warmup_steps=20",
            "val_fraction=0", "pack=false", "seq_len=256", *optimiser(args, seed)])
    trained = time.time() - start
    model, tok, _ = load_run(run)
    model.eval()
    row = {"run": name, "seed": seed, "train_s": round(trained, 1)}
    for think in thinks:
        m = evaluate_reasoning(model, tok, val, think=think, limit=None)
        key = "think" if think else "plain"
        row.update({k if len(thinks) == 1 else f"{key}_{k}": m[k]
                    for k in ("accuracy_id", "accuracy_ood", "by_objects", "worked", "example")})
    scored.write_text(json.dumps(row))
    print(json.dumps(row), flush=True)
    return row


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f} (min {min(values):.1f}, max {max(values):.1f})"


def plot(rows: list[dict], constant: dict, png: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, variant in enumerate(VARIANTS):
        runs = [r for r in rows if r["run"].startswith(variant)]
        for j, key in enumerate(("accuracy_id", "accuracy_ood")):
            values = [r[key] for r in runs]
            x = j + (i - 0.5) * 0.36
            bars.bar(x, statistics.mean(values), 0.34, color=f"C{i}", alpha=0.75,
                     label=variant if j == 0 else None)
            bars.scatter([x] * len(values), values, color="k", s=10, zorder=3)
        counts = sorted({int(n) for r in runs for n in r["by_objects"]})
        means = [statistics.mean(r["by_objects"][str(n)] for r in runs) for n in counts]
        lines.plot(counts, means, "o-", color=f"C{i}", label=variant)
    for j, key in enumerate(("accuracy_id", "accuracy_ood")):
        bars.hlines(constant[key], j - 0.4, j + 0.4, colors="0.4", linestyles="dashed",
                    label="best constant answer" if j == 0 else None)
    bars.set_xticks([0, 1], ["in distribution\n(3-6 objects)", "out of distribution\n(7-10 objects)"])
    bars.set_ylabel("exact-answer accuracy (%)")
    bars.set_ylim(0, 100)
    bars.legend()
    lines.axvspan(6.5, 10.5, color="0.9")
    lines.set_xlabel("objects in the scene (shaded: more than training saw)")
    lines.set_ylabel("accuracy (%), mean over seeds")
    lines.set_ylim(0, 100)
    lines.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (and initial weights)")
    p.add_argument("--n", type=int, default=20000, help="training questions")
    p.add_argument("--val", type=int, default=300, help="held-out questions in and out of distribution, each")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=1.0, help="1: constant after warm-up; below: cosine decay")
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="steps of the lm stage on the prompts and copy rows before sft (0: sft from random weights)")
    p.add_argument("--copy-rows", type=float, default=0.5, help="share of each pretraining batch of copy rows")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=400)
    p.add_argument("--chat", action="store_true", help="also train one model on both forms (the first seed)")
    p.add_argument("--plot", help="write the figure to this PNG")
    args = p.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    torch.set_num_threads(1)  # the figures were made on 2 shared cores; one thread per run is what they had
    out = Path(args.out)
    data = out / "data"
    files = {key: data / f"{key}.jsonl" for key in (*VARIANTS.values(), "reasoning_chat", "val_reasoning")}
    if not all(f.is_file() for f in files.values()):  # an invocation beside this one may be reading them
        files = write_reasoning(World(WorldConfig(seed=0)), data, n=args.n, val=args.val)
    prompts = data / "reasoning_prompts.jsonl"  # the training questions without answers, for pretraining
    if not prompts.is_file():
        prompts.write_text("".join(json.dumps({"text": m["messages"][0]["content"]}) + "\n"
                                   for _, m in read_jsonl(files["reasoning_direct"])))
    tok_path = out / "tokenizer.json"
    if not tok_path.is_file():
        Tokenizer.train(iter_texts([files["reasoning_direct"], files["reasoning_worked"]]), args.vocab_size).save(
            tok_path)
    tok = Tokenizer.load(tok_path)
    rows = []
    for seed in seeds:
        init = initial_run(out, seed, tok, prompts, args)
        for variant, key in VARIANTS.items():
            rows.append(train_and_score(f"{variant}-{seed}", files[key], init, seed, files["val_reasoning"], out,
                                        args))
    chat = None
    if args.chat:
        init = initial_run(out, seeds[0], tok, prompts, args)
        chat = train_and_score(f"chat-{seeds[0]}", files["reasoning_chat"], init, seeds[0], files["val_reasoning"],
                               out, args, thinks=(False, True))
    table = {variant: {key: summary([r[key] for r in rows if r["run"].startswith(variant)])
                       for key in ("accuracy_id", "accuracy_ood")} for variant in VARIANTS}
    ood = {r["run"]: r["accuracy_ood"] for r in rows}
    gaps = [ood[f"worked-{seed}"] - ood[f"direct-{seed}"] for seed in seeds]
    table["ood_gain"] = summary(gaps)
    items = read_items(files["val_reasoning"])
    constant = {f"accuracy_{k}": constant_accuracy([it for it in items if it["ood"] == (k == "ood")])
                for k in ("id", "ood")}
    table["constant"] = {k: f"{v:.1f}" for k, v in constant.items()}
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": rows, "chat": chat,
                                                  "table": table}, indent=1))
    print(f"{'':8} {'in distribution':>40} {'out of distribution':>40}", file=sys.stderr)
    for variant in (*VARIANTS, "constant"):
        print(f"{variant:8} {table[variant]['accuracy_id']:>40} {table[variant]['accuracy_ood']:>40}", file=sys.stderr)
    print(f"worked - direct, out of distribution: {table['ood_gain']}", file=sys.stderr)
    if chat:
        for key in ("plain", "think"):
            print(f"chat model, {key}: in distribution {chat[f'{key}_accuracy_id']}, out of distribution "
                  f"{chat[f'{key}_accuracy_ood']}, worked answers {chat[f'{key}_worked']}%", file=sys.stderr)
    if args.plot:
        plot(rows, constant, args.plot)


if __name__ == "__main__":
    main()
