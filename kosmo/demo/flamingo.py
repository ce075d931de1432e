"""The architectures section of `kosmo demo`: KOSMOS-1 and Flamingo side by side, on equal terms.

Both start from the vision section's CLIP encoder (runs/clip) and text LM (runs/lm), which this
section trains by the vision recipe when it runs alone. Both then train on the same files for the
same number of steps: captions, interleaved documents, VQA as interleaved "Question: … Answer: …"
documents and few-shot episodes. KOSMOS (runs/kosmos) trains its connector and the whole LM on image
tokens spliced into the sequence; Flamingo (runs/flamingo) keeps the LM frozen and trains a Perceiver
resampler and gated cross-attention. Both are then measured the same way, each figure beside its
blind baseline, and the few-shot curves are drawn on one plot (OUT/fewshot.png).
"""

from __future__ import annotations

import json
from pathlib import Path

from kosmo.data.world import EPISODE_EXAMPLE, World
from kosmo.demo import log, vision

ARMS = {"kosmos": "mllm", "flamingo": "flamingo"}  # run name -> training stage

# The same steps, batch and learning rate for both arms; docs/architectures.md gives the default's timings.
BUDGETS = {
    "default": dict(arch_steps=300, arch_batch=16, arch_lr=1e-3, train_shots=(2, 3, 4, 6, 8), train_episodes=4000,
                    eval_shots=(0, 2, 4, 8), latents=8, cross_every=1),
    "quick": dict(arch_steps=10, arch_batch=8, arch_lr=1e-3, train_shots=(1, 2, 4), train_episodes=200,
                  eval_shots=(0, 2, 4), latents=4, cross_every=2),
}


def write_data(demo, b: dict) -> dict[str, Path]:
    paths = {} if "vision" in demo.report["sections"] else vision.write_data(demo, vision_budget(demo, b))
    return {**paths, **demo.timed("architectures_data", lambda: write_episode_data(demo.world, demo.data_dir, b))}


def vision_budget(demo, b: dict) -> dict:
    """Run alone, this section trains the encoder and the LM itself, by the vision section's recipe."""
    return {**vision.BUDGETS[demo.report["budget"]], **b}


def write_episode_data(world: World, d: Path, b: dict) -> dict[str, Path]:
    """Training episodes with the query's label written out (the model learns to name it from context),
    held-out episodes with max(eval_shots) examples for the curve, and the training VQA as documents."""
    paths = {"episodes": d / "episodes.jsonl", "val_episodes": d / "val_episodes.jsonl",
             "vqa_docs": d / "vqa_docs.jsonl"}

    def content(ep) -> list[dict]:
        segments, _ = ep.document()
        return [image_part(world, d, s.scene) if s.scene else {"text": s.text} for s in segments]

    with paths["episodes"].open("w") as f:
        for i in range(b["train_episodes"]):
            ep = world.episode(i, "train", shots=b["train_shots"][i % len(b["train_shots"])])
            doc = content(ep)
            doc[-1] = {"text": EPISODE_EXAMPLE.format(label=ep.query[1])}
            f.write(json.dumps({"content": doc}) + "\n")
    with paths["val_episodes"].open("w") as f:
        for i in range(b["eval_n"]):
            ep = world.episode(i, "val", shots=max(b["eval_shots"]))
            f.write(json.dumps({"content": content(ep), "answer": ep.query[1], "labels": ep.labels,
                                "attribute": ep.attribute}) + "\n")
    with paths["vqa_docs"].open("w") as f, (d / "vqa.jsonl").open() as vqa:
        for line in vqa:
            item = json.loads(line)
            f.write(json.dumps({"content": [{"image": item["image"]}, {
                "text": f"Question: {item['question']} Answer: {item['answers'][0]}."}]}) + "\n")
    return paths


def image_part(world: World, d: Path, scene) -> dict:
    """A document's image part for `scene`, rendered into d/images once."""
    rel = f"images/{scene.id}.png"
    if not (d / rel).is_file():
        world.render(scene).save(d / rel)
    return {"image": rel}


def trained_tokens_per_s(run: Path) -> float:
    """The median training throughput, past the first steps' warm-up."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tok_per_s"] for r in rows[len(rows) // 5:] if "tok_per_s" in r)
    return round(rates[len(rates) // 2], 1)


def run(demo, b: dict) -> dict:
    from kosmo.eval.fewshot import fewshot, plot_curves
    from kosmo.eval.vision import evaluate
    from kosmo.model.load import load_run

    data, runs = demo.data, demo.runs
    report = {"arms": {}}
    if "vision" not in demo.report["sections"]:
        report["pretrain"] = vision.pretrain(demo, vision_budget(demo, b))
    train_files = [data["captions"], data["interleaved"], data["vqa_docs"], data["episodes"]]
    common = [f"train.max_steps={b['arch_steps']}", f"train.batch_size={b['arch_batch']}", f"train.lr={b['arch_lr']}",
              "seq_len=192", "train.warmup_steps=20", f"vision={runs / 'clip'}"]
    demo.train("mllm", "kosmos", train_files, common + ["freeze=connector+lm", "connector=mlp"], init="lm")
    demo.train("flamingo", "flamingo", train_files,
               common + [f"latents={b['latents']}", f"cross_every={b['cross_every']}"], init="lm")

    log("\n== architectures evaluation ==")
    n, shots = b["eval_n"], list(b["eval_shots"])
    for name, stage in ARMS.items():
        model, tok, _ = load_run(runs / name)
        report["arms"][name] = demo.timed(f"eval_{name}", lambda: {
            "stage": stage,
            "params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": trainable_params(model),
            "tokens_per_image": model.cfg.tokens_per_image,
            "train_tok_per_s": trained_tokens_per_s(runs / name),
            "caption_val": evaluate("caption", model, tok, data["val_captions"], limit=n),
            "fewshot": {task: fewshot(model, tok, data[key], shots, limit=n)
                        for task, key in (("episodes", "val_episodes"), ("vqa", "val_vqa"))},
        })
    plot_curves([(name, r["fewshot"][task]) for name, r in report["arms"].items() for task in r["fewshot"]],
                demo.out / "fewshot.png")
    return report


def trainable_params(model) -> int:
    """What each arm's recipe trains: KOSMOS its connector and the LM, Flamingo only what it adds."""
    from kosmo.model.flamingo import Flamingo
    if isinstance(model, Flamingo):
        model.freeze()
    else:
        model.freeze("connector+lm")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def render(r: dict) -> list[str]:
    k, f = r["arms"]["kosmos"], r["arms"]["flamingo"]
    episodes = k["fewshot"]["episodes"]

    def row(name, cell):
        return f"| {name} | {cell(k)} | {cell(f)} |"

    def fewshot_cell(task, shots):
        return lambda a: f"{a['fewshot'][task]['curve'][shots]} (blind {a['fewshot'][task]['blind'][shots]})"
    lines = [
        "## KOSMOS-1 vs Flamingo (same data, same steps)", "",
        "Both from `runs/clip` and `runs/lm`, trained on captions, interleaved documents, VQA documents and "
        "few-shot episodes. In brackets, the blind baseline: the same prompts with the images removed.", "",
        "| | KOSMOS-1 (`runs/kosmos`) | Flamingo (`runs/flamingo`) |", "|---|---:|---:|",
        row("parameters, trainable / total", lambda a: f"{a['params_trainable'] / 1e6:.2f}M / "
                                                       f"{a['params_total'] / 1e6:.2f}M"),
        row("sequence positions per image", lambda a: a["tokens_per_image"] + 2),
        row("training throughput (text tokens learned per s)", lambda a: a["train_tok_per_s"]),
        row("VQA accuracy, 0-shot, val (%)", fewshot_cell("vqa", "0")),
        row("caption CIDEr, val", lambda a: f"{a['caption_val']['cider']:.3f} "
                                            f"(blind {a['caption_val']['blind']['cider']:.3f})"),
        *[row(f"episodes, {s}-shot accuracy (%)", fewshot_cell("episodes", s)) for s in episodes["curve"]],
        "", f"Episodes: {episodes['n']['0']} held-out documents with two nonce labels each (chance "
            f"{episodes['chance']}%), scored by ranking the labels. docs/architectures.md discusses the trade-off.",
        "", "![few-shot curves](fewshot.png)"]
    return lines
