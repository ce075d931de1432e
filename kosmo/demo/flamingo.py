"""The architectures section of `kosmo demo`: KOSMOS-1 and Flamingo side by side, on equal terms.

Both start from the vision section's CLIP encoder (runs/clip), which this section trains by the
vision recipe when it runs alone, and from one LM that this section pretrains (runs/lm-icl): the
vision section's LM with smeared keys and induction documents in its text, so that it can already
continue a pattern it has seen earlier in its context. Flamingo's premise is such a frozen LM; the
vision section's LM, trained on the world's short sentences alone, never learns to copy.

Both arms then train on the same files for the same steps, in two phases: picture-recall documents
with captions (runs/ARM-recall), where naming a picture a second time rewards matching it with its
copy; then captions, interleaved documents, VQA as "Question: … Answer: …" documents and few-shot
episodes (runs/ARM). KOSMOS (runs/kosmos) trains its connector and the whole LM on image tokens
spliced into the sequence; Flamingo (runs/flamingo) keeps the LM frozen and trains a Perceiver
resampler and gated cross-attention. Both are then measured the same way, each figure beside its
blind baseline, and the few-shot curves are drawn on one plot (OUT/fewshot.png).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kosmo.data.world import EPISODE_EXAMPLE, EPISODE_QUERY, NONCE_WORDS, World
from kosmo.demo import log, vision

ARMS = {"kosmos": "mllm", "flamingo": "flamingo"}  # run name -> training stage

# The same steps, batch and learning rate for both arms; docs/architectures.md gives the default's timings.
# gate_lr_scale: Flamingo's tanh gates are scalars that must travel O(1) from 0, while Adam moves a
# parameter about one learning rate per step; at the base rate they stay nearly shut for the whole run.
BUDGETS = {
    "default": dict(induction_steps=800, icl_lm_steps=400, induction_docs=8000, recall_docs=4000, recall_steps=800,
                    arch_steps=800, arch_batch=16, arch_lr=1e-3, train_shots=(2, 3, 4, 6, 8), train_episodes=4000,
                    eval_shots=(0, 2, 4, 8), latents=8, cross_every=1, gate_lr_scale=30),
    "quick": dict(induction_steps=10, icl_lm_steps=10, induction_docs=200, recall_docs=50, recall_steps=5,
                  arch_steps=10, arch_batch=8, arch_lr=1e-3, train_shots=(1, 2, 4), train_episodes=200,
                  eval_shots=(0, 2, 4), latents=4, cross_every=2, gate_lr_scale=30),
}


def write_data(demo, b: dict) -> dict[str, Path]:
    paths = {} if "vision" in demo.report["sections"] else vision.write_data(demo, vision_budget(demo, b))
    return {**paths, **demo.timed("architectures_data", lambda: {
        **write_episode_data(demo.world, demo.data_dir, b),
        **dict(zip(("recall", "val_recall"), write_recall(demo.world, demo.data_dir, b["recall_docs"], b["eval_n"])))})}


def vision_budget(demo, b: dict) -> dict:
    """Run alone, this section trains the encoder itself, by the vision section's recipe."""
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


def write_recall(world: World, data: Path, n_train: int = 4000, n_val: int = 200,
                 pictures: int = 4) -> tuple[Path, Path]:
    """Picture-recall documents beside the demo's data, sharing its images folder: training documents
    name every picture twice; held-out ones end at a repeated picture, with its word as the answer."""
    train, val = data / "recall.jsonl", data / "val_recall.jsonl"

    def document(i: int, split: str) -> tuple[list[tuple], list[tuple]]:
        """The pictures with their words, then the same pairs shuffled."""
        rng = random.Random(f"recall-{split}-{i}")
        named = list(zip([world.scene(pictures * i + j, split) for j in range(pictures)],
                         rng.sample(NONCE_WORDS, pictures)))
        return named, rng.sample(named, pictures)

    def parts(pairs: list[tuple]) -> list[dict]:
        return [part for scene, label in pairs
                for part in (image_part(world, data, scene), {"text": EPISODE_EXAMPLE.format(label=label)})]

    with train.open("w") as f:
        for i in range(n_train):
            named, again = document(i, "train")
            f.write(json.dumps({"content": parts(named + again)}) + "\n")
    with val.open("w") as f:
        for i in range(n_val):
            named, again = document(i, "val")
            scene, label = again[0]
            f.write(json.dumps({"content": parts(named) + [image_part(world, data, scene), {"text": EPISODE_QUERY}],
                                "answer": label, "labels": [word for _, word in named]}) + "\n")
    return train, val


def trained_tokens_per_s(run: Path) -> float:
    """The median training throughput, past the first steps' warm-up."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tok_per_s"] for r in rows[len(rows) // 5:] if "tok_per_s" in r)
    return round(rates[len(rates) // 2], 1)


def run(demo, b: dict) -> dict:
    from kosmo.data.induction import write_induction_documents
    from kosmo.eval.fewshot import fewshot, plot_curves
    from kosmo.eval.vision import evaluate
    from kosmo.model.load import load_run
    from kosmo.tokenizer import Tokenizer

    data, runs = demo.data, demo.runs
    report = {"arms": {}}
    if "vision" not in demo.report["sections"]:
        report["pretrain"] = vision.pretrain(demo, vision_budget(demo, b), lm=False)
    induction = write_induction_documents(Tokenizer.load(demo.data_dir / "tokenizer.json"),
                                          demo.data_dir / "induction.jsonl", b["induction_docs"])
    # Induction documents alone first: beside the world's text from the start, the copying circuit had
    # not formed after 800 steps (docs/architectures.md); the text phase keeps them in the mix so it stays.
    lm_args = ["train.batch_size=32", "seq_len=128", "train.lr=1e-3", "train.warmup_steps=15", "model.size=tiny",
               "model.smear_keys=true"]
    demo.train("lm", "lm-induction", [induction], [f"train.max_steps={b['induction_steps']}", *lm_args])
    demo.train("lm", "lm-icl", [data["text"], data["interleaved"], induction],
               [f"train.max_steps={b['icl_lm_steps']}", *lm_args], init="lm-induction")
    phases = [("-recall", b["recall_steps"], [data["captions"], data["recall"]]),
              ("", b["arch_steps"], [data["captions"], data["interleaved"], data["vqa_docs"], data["episodes"]])]
    arms = {"kosmos": ("mllm", ["freeze=connector+lm", "connector=mlp"]),
            "flamingo": ("flamingo", [f"latents={b['latents']}", f"cross_every={b['cross_every']}",
                                      f"train.lr_scale.*_gate={b['gate_lr_scale']}"])}
    for name, (stage, extra) in arms.items():
        init = "lm-icl"
        for suffix, steps, files in phases:
            demo.train(stage, name + suffix, files,
                       [f"train.max_steps={steps}", f"train.batch_size={b['arch_batch']}", f"train.lr={b['arch_lr']}",
                        "seq_len=192", "train.warmup_steps=20", f"vision={runs / 'clip'}", *extra], init=init)
            init = name + suffix

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
            "fewshot": {task: fewshot(model, tok, data[key], task_shots, limit=n) for task, key, task_shots in
                        (("episodes", "val_episodes", shots), ("vqa", "val_vqa", shots), ("recall", "val_recall", [0, 4]))},
        })
    plot_curves([(name, r["fewshot"][task]) for name, r in report["arms"].items() for task in ("episodes", "vqa")],
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
        "Both from `runs/clip` and `runs/lm-icl`, trained on picture-recall documents and captions, then on "
        "captions, interleaved documents, VQA documents and few-shot episodes. In brackets, the blind baseline: "
        "the same prompts with the images removed.", "",
        "| | KOSMOS-1 (`runs/kosmos`) | Flamingo (`runs/flamingo`) |", "|---|---:|---:|",
        row("parameters, trainable / total", lambda a: f"{a['params_trainable'] / 1e6:.2f}M / "
                                                       f"{a['params_total'] / 1e6:.2f}M"),
        row("sequence positions per image", lambda a: a["tokens_per_image"] + 2),
        row("training throughput (text tokens learned per s)", lambda a: a["train_tok_per_s"]),
        row("VQA accuracy, 0-shot, val (%)", fewshot_cell("vqa", "0")),
        row("caption CIDEr, val", lambda a: f"{a['caption_val']['cider']:.3f} "
                                            f"(blind {a['caption_val']['blind']['cider']:.3f})"),
        *[row(f"episodes, {s}-shot accuracy (%)", fewshot_cell("episodes", s)) for s in episodes["curve"]],
        *[row(f"picture recall, {s}-shot accuracy (%)", fewshot_cell("recall", s)) for s in ("0", "4")],
        "", f"Episodes: {episodes['n']['0']} held-out documents with two nonce labels each (chance "
            f"{episodes['chance']}%), scored by ranking the labels. docs/architectures.md discusses the trade-off.",
        "", "![few-shot curves](fewshot.png)"]
    return lines
