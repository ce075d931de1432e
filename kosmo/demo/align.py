"""The alignment section of `kosmo demo`: InstructGPT's reward model + PPO, DPO, and Constitutional AI,
each measured by the shapes world's judge on held-out alignment prompts.

It starts from the vision section's chat model (runs/sft), which has never seen the world's alignment
prompts. A short warm-up SFT on demonstrations makes the starting policy: ordinary questions answered
as asked, and forbidden requests answered by a mixed pool of demonstrators, some of whom hand out the
password (a helpful-only model, as Constitutional AI starts from). Then:

- the judge ranks pairs of the SFT model's sampled replies (`kosmo label`) -> a reward model -> PPO with a
  KL penalty to the SFT model;
- DPO on the same judge-ranked pairs;
- Constitutional AI: critique -> revision SFT, then AI feedback -> preference model -> PPO, no judge labels.
  As in the paper, its prompts come in two sets: red-team prompts (the world's requests for the
  password, which were written to draw out harm) whose answers are critiqued and revised, and
  helpfulness prompts (the world's ordinary questions) whose answers the model keeps as it gave them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kosmo.demo import log
from kosmo.eval.runs import metrics

# The full budget is the recipe docs/align.md measures. The default samples its preference pairs from half
# the prompts and stops the reward model and DPO near their best held-out loss (about 40 steps in the
# full budget's runs, which overfit after); its Constitutional AI ends at the SL stage.
BUDGETS = {
    "default": dict(align_n=600, cai_n=200, warmup_steps=120, warmup_batch=32, leak_share=0.8, rm_steps=40,
                    ppo_steps=16, ppo_batch=32, ppo_lr=1e-4, ppo_epochs=2, ppo_minibatches=2, dpo_steps=40,
                    dpo_beta=2.0, cai_sl_steps=30, cai_rl_steps=30, cai_ppo_steps=0, align_eval_n=100),
    "full": dict(align_n=1200, cai_n=400, warmup_steps=300, warmup_batch=32, leak_share=0.8, rm_steps=150,
                 ppo_steps=40, ppo_batch=32, ppo_lr=1e-4, ppo_epochs=2, ppo_minibatches=2, dpo_steps=150,
                 dpo_beta=2.0, cai_sl_steps=50, cai_rl_steps=100, cai_ppo_steps=10, align_eval_n=200),
    "quick": dict(align_n=120, cai_n=40, warmup_steps=60, warmup_batch=16, leak_share=0.8, rm_steps=5,
                  ppo_steps=3, ppo_batch=8, ppo_lr=1e-4, ppo_epochs=2, ppo_minibatches=2, dpo_steps=5, dpo_beta=2.0,
                  cai_sl_steps=5, cai_rl_steps=3, cai_ppo_steps=0, align_eval_n=20),
}


def write_demonstrations(align: Path, out: Path, n: int, leak_share: float, seed: int = 0) -> Path:
    """SFT lines from the world's alignment prompts: the reference answer, except that `leak_share` of
    the forbidden requests get a demonstrator who gives the password away."""
    rng = random.Random(seed)
    with align.open() as src, out.open("w") as f:
        for line, _ in zip(src, range(n)):
            r = json.loads(line)
            answer = r["answer"]
            if r["kind"] == "forbidden" and rng.random() < leak_share:
                answer = f"The password is {r['secret']}."
            f.write(json.dumps({"messages": r["messages"] + [{"role": "assistant", "content": answer}]}) + "\n")
    return out


def plot_ppo(runs: dict[str, Path], out_png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    for name, run in runs.items():
        rows = metrics(run)
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["reward"] for r in rows], "o-", ms=2, lw=1, label=name)
        axes[1].plot(steps, [r["kl"] for r in rows], "o-", ms=2, lw=1, label=name)
    for ax, title in zip(axes, ("reward-model score", "KL to the SFT model (nats per reply)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run(demo, b: dict) -> dict:
    from kosmo.align.data import label_run
    from kosmo.eval.align import evaluate_align
    from kosmo.eval.vision import evaluate

    data, runs, report = demo.data, demo.runs, {"stages": {}}
    demos = write_demonstrations(data["align"], demo.data_dir / "align_sft.jsonl", b["align_n"], b["leak_share"])
    lines = data["align"].read_text().splitlines(keepends=True)
    prompts, red_team, helpful = (demo.data_dir / f"{name}.jsonl" for name in ("align_prompts", "red_team", "helpful"))
    prompts.write_text("".join(lines[:b["align_n"]]))
    # critique and revision prompts are long: fewer of them
    red_team.write_text("".join(x for x in lines[:b["cai_n"]] if json.loads(x)["kind"] == "forbidden"))
    helpful.write_text("".join(x for x in lines[:b["align_n"]] if json.loads(x)["kind"] == "ordinary"))
    common = ["seq_len=256", "train.warmup_steps=5"]
    demo.train("sft", "align-sft", [demos, data["vqa"], data["chat"]],
               [f"train.max_steps={b['warmup_steps']}", f"train.batch_size={b['warmup_batch']}", "train.lr=1e-3",
                "freeze=connector+lm", *common], init="sft")
    # the reward model and DPO learn from the same judge-ranked pairs of the SFT model's replies, sampled once
    pairs = demo.data_dir / "align_pairs.jsonl"
    log("\n== kosmo label: the judge ranks the SFT model's replies ==")
    demo.timed("label", lambda: label_run(runs / "align-sft", [prompts], pairs, ["seq_len=256"]))
    rm = demo.train("reward", "reward", [pairs], [f"train.max_steps={b['rm_steps']}", "train.batch_size=16",
                                                    "train.lr=3e-4", "center=0.01", *common], init="align-sft")
    report["stages"]["reward"] = {k: rm[k] for k in ("train_pairs", "val_pairs", "val_pair_accuracy") if k in rm}
    # Four updates per rollout (2 epochs x 2 minibatches): at 4 x 4 the policy overshot in a single
    # iteration (approximate KL 9 at step 7) and never recovered; see docs/align.md.
    ppo_args = [f"train.batch_size={b['ppo_batch']}", f"train.lr={b['ppo_lr']}", "kl_coef=0.2", "max_new_tokens=24",
                f"epochs={b['ppo_epochs']}", f"minibatches={b['ppo_minibatches']}", *common]
    demo.train("ppo", "ppo", [prompts], [f"train.max_steps={b['ppo_steps']}", f"reward={runs / 'reward'}",
                                         *ppo_args], init="align-sft")
    demo.train("dpo", "dpo", [pairs], [f"train.max_steps={b['dpo_steps']}", "train.batch_size=16",
                                         "train.lr=5e-5", f"beta={b['dpo_beta']}", *common], init="align-sft")
    demo.train("cai-sl", "cai-sl", [red_team], [f"train.max_steps={b['cai_sl_steps']}", "train.batch_size=16",
                                                "train.lr=3e-4", "seq_len=512", "shots=1", "train.warmup_steps=5",
                                                f"helpful={helpful}"], init="align-sft")
    pm = demo.train("cai-rl", "cai-pm", [red_team], [f"train.max_steps={b['cai_rl_steps']}", "train.batch_size=16",
                                                    "train.lr=3e-4", "center=0.01", *common], init="cai-sl")
    report["stages"]["cai_preference_model"] = {k: pm[k] for k in ("train_pairs", "val_pair_accuracy") if k in pm}
    cai_final = "cai-sl"
    if b["cai_ppo_steps"]:
        demo.train("ppo", "cai-ppo", [prompts], [f"train.max_steps={b['cai_ppo_steps']}",
                                                 f"reward={runs / 'cai-pm'}", *ppo_args], init="cai-sl")
        cai_final = "cai-ppo"

    log("\n== alignment evaluation ==")
    n = b["align_eval_n"]
    sft, tok = demo.load("align-sft")

    def judged(name: str, reference=None) -> dict:
        model = demo.load(name)[0]
        return evaluate_align(model, tok, data["val_align"], reference=reference, limit=n)

    def vqa(name: str) -> float:
        return evaluate("vqa", demo.load(name)[0], tok, data["val_vqa"], with_blind=False,
                        limit=n)["vqa_accuracy"]

    def evaluations() -> dict:
        cai_sl = judged("cai-sl", sft)
        return {"sft": judged("align-sft"), "ppo": judged("ppo", sft), "dpo": judged("dpo", sft),
                "cai": {**(cai_sl if cai_final == "cai-sl" else judged(cai_final, sft)), "run": cai_final},
                "cai_sl": cai_sl, "vqa_sft": vqa("align-sft"), "vqa_cai": vqa(cai_final)}

    with demo.evaluating():
        report["eval"] = demo.timed("align_eval", evaluations)
    plot_ppo({"ppo": runs / "ppo", **({"cai-ppo": runs / "cai-ppo"} if cai_final == "cai-ppo" else {})},
             demo.out / "ppo.png")
    return report


def render(r: dict) -> list[str]:
    e = r["eval"]

    def row(name, x):
        win = f"{x['win_rate']:.1f}" if "win_rate" in x else "—"
        kl = f"{x['kl']:.2f}" if "kl" in x else "—"
        return (f"| {name} | {win} | {kl} | {x['helpful']:.1f} | {x['forbidden_compliance']:.1f} | "
                f"{x['ordinary_refusal']:.1f} | {x['ordinary_helpful']:.1f} |")
    rm, pm = r["stages"]["reward"], r["stages"]["cai_preference_model"]
    return [
        "## Alignment (held-out alignment prompts, judged by the world)", "",
        "Starting point: `runs/align-sft`. Win-rate against it counts ties as half; KL is nats per reply.", "",
        "| model | win-rate vs SFT (%) | KL to SFT | helpful (%) | forbidden requests complied with (%) | "
        "ordinary requests refused (%) | ordinary answered right (%) |", "|---|---:|---:|---:|---:|---:|---:|",
        row("SFT (start)", e["sft"]), row("PPO (reward model + KL penalty)", e["ppo"]), row("DPO", e["dpo"]),
        row("Constitutional AI, SL stage", e["cai_sl"]), row(f"Constitutional AI, final ({e['cai']['run']})", e["cai"]),
        "", f"VQA accuracy (val): SFT {e['vqa_sft']:.2f}, Constitutional AI {e['vqa_cai']:.2f}.",
        f"Reward model: held-out pair accuracy {rm.get('val_pair_accuracy', '—')} on {rm.get('val_pairs', 0)} "
        f"judge-ranked pairs. CAI preference model: agreement with the AI feedback on held-out pairs "
        f"{pm.get('val_pair_accuracy', '—')}.", "",
        "![PPO reward and KL](ppo.png)"]
