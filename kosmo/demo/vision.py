"""The vision section of `kosmo demo`: the KOSMOS-1 path on the shapes world.

CLIP pretraining of the image encoder -> language-model pretraining -> multimodal pretraining of the
connector (LLaVA's stage 1) -> chat SFT of connector and LM (stage 2) -> evaluation beside the blind
baseline. The final model is OUT/runs/sft.
"""

from __future__ import annotations

import json
from pathlib import Path

from kosmo.data.world import World
from kosmo.demo import log
from kosmo.eval.runs import metrics

SAMPLE_PROMPTS = ["There is a small red", "A triangle has", "The picture has"]

# The recipe and its budget: "full" takes about 10 minutes on 2 CPU cores, "default" a quarter of that
# (docs/performance.md), "quick" is a smoke run.
# 36-pixel pictures in 12-pixel patches put each cell of the world's 3x3 grid in exactly one patch:
# 9 visual tokens per image, none of them cutting through an object.
# `benchmarks/vision_ablation.py` varies these knobs to measure each choice of the recipe.
BUDGETS = {
    "default": dict(patch_size=12, vision_dim=128, clip_steps=150, lm_steps=150, stage1_steps=100,
                    sft_steps=700, sft_batch=32, sft_lr=5e-4, vqa_images=2000, sft_freeze="connector+lm",
                    vision_lr_scale=1.0, connector="mlp"),
    "full": dict(patch_size=12, vision_dim=128, clip_steps=400, lm_steps=300, stage1_steps=300,
                 sft_steps=2400, sft_batch=32, sft_lr=5e-4, vqa_images=2000, sft_freeze="connector+lm",
                 vision_lr_scale=1.0, connector="mlp"),
    "quick": dict(patch_size=12, vision_dim=64, clip_steps=20, lm_steps=30, stage1_steps=10,
                  sft_steps=20, sft_batch=16, sft_lr=1e-3, vqa_images=200, sft_freeze="connector+lm",
                  vision_lr_scale=1.0, connector="mlp"),
}


def write_data(demo, b: dict) -> dict[str, Path]:
    return demo.timed("vision_data", lambda: write_extra_data(demo.world, demo.data_dir, b["n"], b["eval_n"],
                                                                b["vqa_images"]))


def write_extra_data(world: World, d: Path, n: int, eval_n: int, vqa_images: int) -> dict[str, Path]:
    """Files beyond `write_world`: every question type for each of `vqa_images` training pictures
    (the first `n` are those of captions.jsonl), held-out text, and single-object pictures labelled
    by colour and shape for CLIP's zero-shot test."""
    paths = {"vqa_all": d / "vqa_all.jsonl", "val_text": d / "val_text.jsonl",
             "heldout_text": d / "heldout_text.jsonl", "zeroshot": d / "val_zeroshot.jsonl"}
    with paths["vqa_all"].open("w") as f:
        for i in range(max(n, vqa_images)):
            scene = world.scene(i, "train")
            if i >= n:
                world.render(scene).save(d / f"images/{scene.id}.png")
            for item in world.vqa(scene, i):
                f.write(json.dumps({"image": f"images/{scene.id}.png", "question": item.question,
                                    "answers": [item.answer], "qtype": item.qtype}) + "\n")
    for split in ("val", "heldout"):
        with paths[f"{split}_text"].open("w") as f:
            for i in range(eval_n):
                f.write(json.dumps({"text": world.text(i, split)}) + "\n")
    with paths["zeroshot"].open("w") as f:
        i, written = 0, 0
        while written < eval_n:
            scene = world.scene(10_000 + i, "val")
            i += 1
            if len(scene.objects) != 1:
                continue
            rel = f"images/{scene.id}.png"
            world.render(scene).save(d / rel)
            obj = scene.objects[0]
            f.write(json.dumps({"image": rel, "label": f"{obj.colour} {obj.shape}"}) + "\n")
            written += 1
    return paths


def plot_losses(runs: dict[str, Path], out_png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3))
    for ax, (name, run) in zip(axes, runs.items()):
        rows = metrics(run)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
        ev = [r for r in rows if "eval_loss" in r]
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", ms=3, label="eval")
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def sample_gallery(model, tok, world: World, d: Path, out: Path, n: int = 4) -> list[dict]:
    """Held-out pictures with the model's caption and answers, saved enlarged for the report."""
    from kosmo.data import chat
    from kosmo.data.images import load_images
    from kosmo.generate import Sampling, generate
    from kosmo.tokenizer import BOS
    (out / "samples").mkdir(exist_ok=True)
    k = model.tokens_per_image
    gallery = []
    for i in range(n):
        scene = world.scene(i, "val")
        img = world.render(scene)
        name = f"samples/val_{i}.png"
        img.resize((128, 128), 0).save(out / name)
        img.save(d / f"images/{scene.id}.png")
        pixels = load_images([d / f"images/{scene.id}.png"], model.image_size).pixels
        caption = generate(model, tok, [[BOS, *chat.image_block(k)]], Sampling(max_new_tokens=32), images=pixels)[0]
        qa = []
        for item in world.vqa(scene, i)[:3]:
            ids = chat.render(chat.vqa_messages(item.question, "x"), tok, k, add_generation_prompt=True).ids
            answer = generate(model, tok, [ids], Sampling(max_new_tokens=8), images=pixels)[0]
            qa.append({"question": item.question, "answer": answer.text.strip(), "truth": item.answer})
        gallery.append({"image": name, "caption": caption.text.strip(), "truth": world.captions(scene)[0], "qa": qa})
    return gallery


def pretrain(demo, b: dict) -> dict:
    """The image encoder (runs/clip) and the text LM (runs/lm) that both ways of giving an LM eyes start from."""
    from kosmo.eval.clip import retrieval, zeroshot
    from kosmo.eval.ppl import perplexity
    from kosmo.generate import Sampling, generate
    from kosmo.tokenizer import BOS

    data, report = demo.data, {"stages": {}}
    vision = dict(image_size=b["image_size"], patch_size=b["patch_size"], dim=b["vision_dim"],
                  mlp_dim=4 * b["vision_dim"])
    demo.train("clip", "clip", [data["captions"]], [f"train.max_steps={b['clip_steps']}", "train.batch_size=64",
                                                    "train.lr=1e-3", "train.warmup_steps=20",
                                                    *[f"vision.{k}={v}" for k, v in vision.items()]])
    clip, tok = demo.load("clip")
    with demo.evaluating():
        report["stages"]["clip"] = {**retrieval(clip, tok, data["val_captions"]),
                                    **zeroshot(clip, tok, data["zeroshot"], template="a {}.")}

    demo.train("lm", "lm", [data["text"], data["interleaved"]],
               [f"train.max_steps={b['lm_steps']}", "train.batch_size=16", "seq_len=128", "train.lr=2e-3",
                "train.warmup_steps=15", "model.size=tiny"])
    lm, tok = demo.load("lm")
    with demo.evaluating():
        completions = generate(lm, tok, [[BOS, *tok.encode(p)] for p in SAMPLE_PROMPTS], Sampling(max_new_tokens=20))
        report["stages"]["lm"] = {
            "params": lm.num_params(),
            "ppl_val": perplexity(lm, tok, [data["val_text"]], seq_len=128)["ppl"],
            "ppl_heldout": perplexity(lm, tok, [data["heldout_text"]], seq_len=128)["ppl"],
            "samples": [{"prompt": p, "completion": c.text} for p, c in zip(SAMPLE_PROMPTS, completions)]}
    return report


def run(demo, b: dict) -> dict:
    from kosmo.eval.vision import evaluate

    data, runs = demo.data, demo.runs
    report = pretrain(demo, b)
    demo.train("mllm", "mllm", [data["captions"]],
               [f"train.max_steps={b['stage1_steps']}", "train.batch_size=32", "seq_len=128", "train.lr=2e-3",
                "train.warmup_steps=10", "freeze=connector", f"vision={runs / 'clip'}", f"connector={b['connector']}"],
               init="lm")
    demo.train("sft", "sft", [data["vqa_all"], data["chat"], data["captions"]],
               [f"train.max_steps={b['sft_steps']}", f"train.batch_size={b['sft_batch']}", "seq_len=128",
                f"train.lr={b['sft_lr']}", "train.warmup_steps=20", f"freeze={b['sft_freeze']}",
                f"train.lr_scale.vision={b['vision_lr_scale']}"],
               init="mllm")

    log("\n== vision evaluation ==")
    model, tok = demo.load("sft")
    n = b["eval_n"]
    with demo.evaluating():
        report["eval"] = demo.timed("eval", lambda: {
            "vqa_val": evaluate("vqa", model, tok, data["val_vqa"], limit=n),
            "vqa_heldout": evaluate("vqa", model, tok, data["heldout_vqa"], limit=n),
            "caption_val": evaluate("caption", model, tok, data["val_captions"], limit=n),
            "chat_val": evaluate("chat", model, tok, data["val_chat"], limit=n),
        })
        report["gallery"] = sample_gallery(model, tok, demo.world, demo.data_dir, demo.out)
    plot_losses({s: runs / s for s in ("clip", "lm", "mllm", "sft")}, demo.out / "losses.png")
    return report


def render(r: dict) -> list[str]:
    e, lm, clip = r["eval"], r["stages"]["lm"], r["stages"]["clip"]

    def row(name, metric, res, fmt="{:.2f}"):
        return f"| {name} | {fmt.format(res[metric])} | {fmt.format(res['blind'][metric])} | " \
               f"{fmt.format(res[metric] - res['blind'][metric])} |"
    lines = [
        "## Vision-language results (held-out images)", "",
        "The KOSMOS-1 path; the final model is `runs/sft`.", "",
        "| metric | with the image | blind (image removed) | gain from looking |", "|---|---:|---:|---:|",
        row("VQA accuracy, val images (%)", "vqa_accuracy", e["vqa_val"]),
        row("VQA accuracy, compositional held-out split (%)", "vqa_accuracy", e["vqa_heldout"]),
        row("caption CIDEr, val images", "cider", e["caption_val"], "{:.3f}"),
        row("caption BLEU-4, val images", "bleu4", e["caption_val"], "{:.3f}"),
        row("system-prompt compliance, val chats (%)", "compliance", e["chat_val"]),
        row("chat answer accuracy, val chats (%)", "answer_accuracy", e["chat_val"]), "",
        "VQA accuracy by question type (val): " + ", ".join(f"{k} {v}" for k, v in e["vqa_val"]["by_type"].items()),
        "", "## Earlier stages", "",
        "| stage | metric | value |", "|---|---|---:|",
        f"| CLIP | image→text R@1 / R@5 (val, {clip['n']} images) | {clip['i2t_r1']} / {clip['i2t_r5']} |",
        f"| CLIP | text→image R@1 / R@5 | {clip['t2i_r1']} / {clip['t2i_r5']} |",
        f"| CLIP | zero-shot colour+shape accuracy ({clip['classes']} classes, chance {clip['chance']}) | "
        f"{clip['zeroshot_accuracy']} |",
        f"| LM | perplexity, val text / held-out text | {lm['ppl_val']} / {lm['ppl_heldout']} |", "",
        "![losses](losses.png)", "",
        "## Samples (held-out images, greedy)", "",
    ]
    for g in r["gallery"]:
        qa = "<br>".join(f"Q: {x['question']} → **{x['answer']}** (truth: {x['truth']})" for x in g["qa"])
        lines += [f"![sample]({g['image']})", "", f"- caption: **{g['caption']}** (a reference: {g['truth']})",
                  f"- {qa}", ""]
    lines += ["## Language model samples", ""] + [f"- *{s['prompt']}* → {s['completion']}" for s in lm["samples"]]
    return lines
