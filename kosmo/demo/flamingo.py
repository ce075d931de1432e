"""The architectures section of `kosmo demo`: KOSMOS-1 and Flamingo side by side, on equal terms.

Both start from the vision section's CLIP encoder (runs/clip, trained by the vision recipe when this
section runs alone) and from an LM that can copy (runs/lm-icl): the vision section's recipe with
smeared keys, and with three quarters of every batch given to copy rows, so that an induction circuit
forms beside the world's text. Both arms then train on the same files for the same number of steps:
captions, interleaved documents, VQA as interleaved "Question: … Answer: …" documents, few-shot
episodes and picture-recall documents. KOSMOS (runs/kosmos) trains its connector and the whole LM on
image tokens spliced into the sequence; Flamingo (runs/flamingo) keeps the LM frozen and trains a
Perceiver resampler and gated cross-attention. Both are then measured the same way, each figure
beside its blind baseline, and the few-shot curves are drawn on one plot (OUT/fewshot.png).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kosmo.data.world import EPISODE_EXAMPLE, EPISODE_QUERY, NONCE_WORDS, World
from kosmo.demo import log, vision

ARMS = {"kosmos": "mllm", "flamingo": "flamingo"}  # run name -> training stage

# The same steps, batch and learning rate for both arms; docs/architectures.md gives the default's timings.
BUDGETS = {
    "default": dict(icl_steps=800, icl_batch=32, copy_rows=0.75, arch_steps=1600, arch_batch=16, arch_lr=1e-3,
                    gate_lr_scale=30, train_shots=(2, 3, 4, 6, 8), train_episodes=4000, recall_docs=4000,
                    eval_shots=(0, 2, 4, 8), latents=8, cross_every=1),
    "quick": dict(icl_steps=10, icl_batch=8, copy_rows=0.75, arch_steps=10, arch_batch=8, arch_lr=1e-3,
                  gate_lr_scale=30, train_shots=(1, 2, 4), train_episodes=200, recall_docs=200,
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
    held-out episodes with max(eval_shots) examples for the curve, picture-recall documents, and the
    training VQA as documents."""
    paths = {"episodes": d / "episodes.jsonl", "val_episodes": d / "val_episodes.jsonl",
             "vqa_docs": d / "vqa_docs.jsonl"}
    paths["recall"], paths["val_recall"] = write_recall(world, d, b["recall_docs"], b["eval_n"])

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


def write_recall(world: World, data: Path, n_train: int = 4000, n_val: int = 200,
                 pictures: int = 4) -> tuple[Path, Path]:
    """Picture recall, the barest binding of a word to a picture: four pictures, each named by its own
    nonce word ("This is a kiki."), then the same four again, shuffled. Naming one the second time needs
    no rule, only finding the identical picture earlier and copying the word after it. Training
    documents name every picture twice; held-out ones end at a repeated picture, its word the answer."""
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
    # The LM both arms start from. The vision section's LM cannot copy, and it does not learn to from
    # copy rows alone afterwards; trained beside the text from its first step, copy rows form the
    # induction circuit that naming a picture from its examples needs (docs/architectures.md).
    demo.train("lm", "lm-icl", [data["text"], data["interleaved"]], [
        f"train.max_steps={b['icl_steps']}", f"train.batch_size={b['icl_batch']}", "seq_len=128", "train.lr=1e-3",
        "train.warmup_steps=20", "train.min_lr_ratio=1", "train.beta2=0.999", "train.weight_decay=0",
        "model.size=tiny", "model.smear_keys=true", f"copy_rows={b['copy_rows']}"])
    report["lm_icl"] = {name: demo.timed(f"eval_{name}", lambda: lm_report(*load_run(runs / name)[:2], data))
                        for name in ("lm", "lm-icl")}

    train_files = [data["captions"], data["interleaved"], data["vqa_docs"], data["episodes"], data["recall"]]
    common = [f"train.max_steps={b['arch_steps']}", f"train.batch_size={b['arch_batch']}", f"train.lr={b['arch_lr']}",
              "seq_len=192", "train.warmup_steps=20", f"vision={runs / 'clip'}"]
    demo.train("mllm", "kosmos", train_files, common + ["freeze=connector+lm", "connector=mlp"], init="lm-icl")
    # Each tanh gate is one number that must grow from 0 to order 1; Adam moves it by about one
    # learning rate a step, so the gates learn faster than the weights they open onto.
    demo.train("flamingo", "flamingo", train_files, common + [
        f"latents={b['latents']}", f"cross_every={b['cross_every']}", f"train.lr_scale.*_gate={b['gate_lr_scale']}"],
        init="lm-icl")

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
            "fewshot": {task: fewshot(model, tok, data[key], task_shots, limit=n)
                        for task, key, task_shots in (("episodes", "val_episodes", shots), ("vqa", "val_vqa", shots),
                                                      ("recall", "val_recall", [0, 4]))},
        })
    plot_curves([(name, {**r["fewshot"][task], "task": task}) for name, r in report["arms"].items()
                 for task in r["fewshot"]], demo.out / "fewshot.png")
    return report


def lm_report(model, tok, data) -> dict:
    """Held-out text perplexity, and the share of a repeated span the LM predicts (copy_accuracy)."""
    from kosmo.eval.ppl import copy_accuracy, perplexity
    return {"ppl_val": perplexity(model, tok, [data["val_text"]], seq_len=128)["ppl"],
            "copy": copy_accuracy(model, tok.vocab_size)}


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
    episodes, icl, lm = k["fewshot"]["episodes"], r["lm_icl"]["lm-icl"], r["lm_icl"]["lm"]

    def row(name, cell):
        return f"| {name} | {cell(k)} | {cell(f)} |"

    def fewshot_cell(task, shots):
        return lambda a: f"{a['fewshot'][task]['curve'][shots]} (blind {a['fewshot'][task]['blind'][shots]})"

    def copies(m):
        return " / ".join(f"{v}%" for v in m["copy"].values()) + " of spans of " + " / ".join(m["copy"]) + " tokens"
    lines = [
        "## KOSMOS-1 vs Flamingo (same data, same steps)", "",
        f"Both from `runs/clip` and `runs/lm-icl`, an LM with smeared keys trained on the world's text with copy "
        f"rows in every batch: it predicts {copies(icl)} repeated (`runs/lm`: {copies(lm)}), at held-out "
        f"perplexity {icl['ppl_val']} (`runs/lm`: {lm['ppl_val']}). Both arms train on captions, interleaved "
        "documents, VQA documents, few-shot episodes and picture-recall documents. In brackets, the blind "
        "baseline: the same prompts with the images removed.", "",
        "| | KOSMOS-1 (`runs/kosmos`) | Flamingo (`runs/flamingo`) |", "|---|---:|---:|",
        row("parameters, trainable / total", lambda a: f"{a['params_trainable'] / 1e6:.2f}M / "
                                                       f"{a['params_total'] / 1e6:.2f}M"),
        row("sequence positions per image", lambda a: a["tokens_per_image"] + 2),
        row("training throughput (text tokens learned per s)", lambda a: a["train_tok_per_s"]),
        row("VQA accuracy, 0-shot, val (%)", fewshot_cell("vqa", "0")),
        row("caption CIDEr, val", lambda a: f"{a['caption_val']['cider']:.3f} "
                                            f"(blind {a['caption_val']['blind']['cider']:.3f})"),
        *[row(f"episodes, {s}-shot accuracy (%)", fewshot_cell("episodes", s)) for s in episodes["curve"]],
        row("picture recall, 4-shot accuracy (%)", fewshot_cell("recall", "4")),
        "", f"Episodes: {episodes['n']['0']} held-out documents with two nonce labels each (chance "
            f"{episodes['chance']}%), scored by ranking the labels; recall: four named pictures, then one of them "
            f"again (chance {k['fewshot']['recall']['chance']}%). docs/architectures.md discusses the trade-off.",
        "", "![few-shot curves](fewshot.png)"]
    return lines
