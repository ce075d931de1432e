"""`kosmo demo`: the pipeline on the shapes world, end to end, with a report.

Stages so far: world data -> BPE tokenizer -> language-model pretraining -> perplexity on held-out
text and on the compositional held-out split -> samples. Writes OUT/report.json, OUT/report.md and
loss curves as PNG; the trained run directory is OUT/runs/lm.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from kosmo import checkpoint
from kosmo.data.world import World, write_world

SAMPLE_PROMPTS = ["There is a small red", "A triangle has", "The picture has", "In the top left corner"]

BUDGETS = {  # steps and data sizes: the default fits ~10 minutes on 2 CPU cores, --quick ~1 minute
    "default": {"n": 2000, "lm_steps": 300, "batch": 16, "seq_len": 128, "vocab": 2048},
    "quick": {"n": 300, "lm_steps": 40, "batch": 8, "seq_len": 64, "vocab": 1024},
}


def stage(name: str):
    print(f"\n== {name} ==", file=sys.stderr, flush=True)


def write_texts(path: Path, world: World, split: str, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"text": world.text(i, split)}) + "\n")
    return path


def plot_losses(run: Path, out_png: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    ev = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path, quick: bool = False) -> dict:
    from kosmo.eval.ppl import perplexity
    from kosmo.generate import Sampling, generate
    from kosmo.model.load import load_run
    from kosmo.tokenizer import BOS
    from kosmo.train.run import run_stage

    budget = BUDGETS["quick" if quick else "default"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    report: dict = {"budget": "quick" if quick else "default", "stages": {}}
    timings = {}

    stage("1/4 shapes world")
    t0 = time.time()
    world = World()
    data = write_world(out / "data", budget["n"])
    val_text = write_texts(out / "data" / "val_text.jsonl", world, "val", max(100, budget["n"] // 10))
    heldout_text = write_texts(out / "data" / "heldout_text.jsonl", world, "heldout", max(100, budget["n"] // 10))
    timings["world"] = time.time() - t0

    stage("2/4 tokenizer + language model pretraining")
    t0 = time.time()
    lm_run = out / "runs" / "lm"
    overrides = [f"train.max_steps={budget['lm_steps']}", f"train.batch_size={budget['batch']}",
                 f"seq_len={budget['seq_len']}", f"vocab_size={budget['vocab']}", "train.lr=2e-3",
                 f"train.warmup_steps={max(5, budget['lm_steps'] // 20)}",
                 f"train.eval_every={max(10, budget['lm_steps'] // 10)}", "train.tensorboard=false",
                 "model.size=tiny"]
    last = run_stage("lm", [data["text"], data["interleaved"]], lm_run, overrides=overrides)
    timings["lm"] = time.time() - t0
    plot_losses(lm_run, out / "lm_loss.png", "language model pretraining")

    stage("3/4 perplexity")
    model, tok, _ = load_run(lm_run)
    first = json.loads((lm_run / "metrics.jsonl").read_text().splitlines()[0])
    lm_report = {"params": model.num_params(), "steps": last["step"], "first_loss": round(first["loss"], 4),
                 "final_loss": round(last["loss"], 4), "eval_loss": round(last.get("eval_loss", math.nan), 4),
                 "tok_per_s": round(last["tok_per_s"]),
                 "ppl_val": perplexity(model, tok, [val_text], seq_len=budget["seq_len"])["ppl"],
                 "ppl_heldout": perplexity(model, tok, [heldout_text], seq_len=budget["seq_len"])["ppl"],
                 "ppl_uniform": tok.vocab_size}
    report["stages"]["lm"] = lm_report

    stage("4/4 samples")
    prompts = [[BOS] + tok.encode(p) for p in SAMPLE_PROMPTS]
    completions = generate(model, tok, prompts, Sampling(max_new_tokens=24, temperature=0.0))
    report["samples"] = [{"prompt": p, "completion": c.text} for p, c in zip(SAMPLE_PROMPTS, completions)]

    timings["total"] = time.time() - t_start
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    checkpoint.write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report))
    print((out / "report.md").read_text())
    return report


def render_markdown(r: dict) -> str:
    lm = r["stages"]["lm"]
    lines = [
        "# kosmo demo report", "",
        f"Budget: `{r['budget']}`; total time {r['timings_s']['total']} s. Every number below was measured by this run "
        "(`kosmo demo`); `report.json` holds them all.", "",
        "## Language model", "",
        "| metric | value |", "|---|---:|",
        f"| parameters | {lm['params']:,} |",
        f"| training steps | {lm['steps']} |",
        f"| train loss, first → last step | {lm['first_loss']} → {lm['final_loss']} |",
        f"| eval loss (held-out rows) | {lm['eval_loss']} |",
        f"| perplexity, val text | {lm['ppl_val']} |",
        f"| perplexity, compositional held-out text | {lm['ppl_heldout']} |",
        f"| perplexity of a uniform guess | {lm['ppl_uniform']} |",
        f"| training tokens/s | {lm['tok_per_s']} |", "",
        "![language model loss](lm_loss.png)", "",
        "## Samples (greedy)", "",
        "| prompt | completion |", "|---|---|",
    ]
    lines += [f"| {s['prompt']} | {s['completion'].replace('|', '/').strip()} |" for s in r["samples"]]
    return "\n".join(lines) + "\n"
