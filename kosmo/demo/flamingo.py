"""The architectures section of `kosmo demo`: KOSMOS-1 and Flamingo side by side, on equal terms.

Both start from the vision section's CLIP encoder (runs/clip), which this section trains by the
vision recipe when it runs alone, and from an LM that can copy (runs/lm-icl): the world's text
with rows of random tokens written again and again mixed into its batches, and smeared keys, so
that it continues a pattern it has read earlier in its context. Few-shot learning is that ability
put to work on pictures. Both arms then train on the same files for the same number of steps:
captions, interleaved documents, VQA as "Question: … Answer: …" documents, few-shot episodes and
picture-recall documents. KOSMOS (runs/kosmos) trains its connector and the whole LM on image tokens
spliced into the sequence; Flamingo (runs/flamingo) keeps the LM frozen and trains a Perceiver
resampler and gated cross-attention. Both are then measured the same way, each figure beside its
blind baseline, and the few-shot curves are drawn on one plot (OUT/fewshot.png).
"""

from __future__ import annotations

from pathlib import Path

from kosmo.data.world import write_fewshot, write_vqa_documents
from kosmo.demo import log, vision

ARMS = {"kosmos": "mllm", "flamingo": "flamingo"}  # run name -> training stage

# The same steps, batch and learning rate for both arms; docs/performance.md gives the timings.
# Flamingo's attention gates learn 30x faster, and its blocks have no gated feed-forward
# (docs/architectures.md measures why: learning, those take the text's adaptation to themselves and
# leave the pictures out). The default trains the copying LM and each arm a third of the full budget's
# steps or less and evaluates on fewer documents and shots; at that budget both arms answer VQA above
# blind, but few-shot learning stays at chance (docs/performance.md).
BUDGETS = {
    "default": dict(copy_lm_steps=200, copy_lm_batch=16, arch_steps=300, arch_batch=16, arch_lr=1e-3,
                    train_shots=(2, 3, 4, 6, 8), train_episodes=1500, recall_docs=1500, eval_shots=(0, 2, 4),
                    arch_eval_n=100, latents=8, cross_every=1, attn_gate_lr=30.0, gated_ffw=False),
    "full": dict(copy_lm_steps=800, copy_lm_batch=32, arch_steps=1200, arch_batch=16, arch_lr=1e-3,
                 train_shots=(2, 3, 4, 6, 8), train_episodes=4000, recall_docs=4000, eval_shots=(0, 2, 4, 8),
                 arch_eval_n=200, latents=8, cross_every=1, attn_gate_lr=30.0, gated_ffw=False),
    "quick": dict(copy_lm_steps=20, copy_lm_batch=32, arch_steps=10, arch_batch=8, arch_lr=1e-3,
                  train_shots=(1, 2, 4), train_episodes=200, recall_docs=100, eval_shots=(0, 2, 4), arch_eval_n=20,
                  latents=4, cross_every=2, attn_gate_lr=30.0, gated_ffw=False),
}


def write_data(demo, b: dict) -> dict[str, Path]:
    """Beyond the world's files: training episodes and picture-recall documents, held-out ones of each (the
    episodes with max(eval_shots) examples, for the curve), and the training VQA as documents."""
    paths = {} if "vision" in demo.report["sections"] else vision.write_data(demo, vision_budget(demo, b))
    return {**paths, **demo.timed("architectures_data", lambda: {
        **write_fewshot(demo.world, demo.data_dir, episodes=b["train_episodes"], shots=b["train_shots"],
                        recall=b["recall_docs"], val=b["arch_eval_n"], val_shots=max(b["eval_shots"])),
        "vqa_docs": write_vqa_documents(demo.data_dir)})}


def vision_budget(demo, b: dict) -> dict:
    """Run alone, this section trains the encoder and the LM itself, by the vision section's recipe."""
    return {**vision.BUDGETS[demo.report["budget"]], **b}


def run(demo, b: dict) -> dict:
    from kosmo.eval.fewshot import fewshot, plot_curves
    from kosmo.eval.runs import training_throughput
    from kosmo.eval.vision import evaluate

    data, runs = demo.data, demo.runs
    report = {"arms": {}}
    if "vision" not in demo.report["sections"]:
        report["pretrain"] = vision.pretrain(demo, vision_budget(demo, b))
    report["lm"] = demo.ahead("flamingo", b)
    train_files = [data[k] for k in ("captions", "interleaved", "vqa_docs", "episodes", "recall")]
    common = [f"train.max_steps={b['arch_steps']}", f"train.batch_size={b['arch_batch']}", f"train.lr={b['arch_lr']}",
              "seq_len=192", "train.warmup_steps=20", f"vision={runs / 'clip'}"]
    demo.train("mllm", "kosmos", train_files, common + ["freeze=connector+lm", "connector=mlp"], init="lm-icl")
    demo.train("flamingo", "flamingo", train_files,
               common + [f"latents={b['latents']}", f"cross_every={b['cross_every']}",
                         f"train.lr_scale.*attn_gate={b['attn_gate_lr']}",
                         f"gated_ffw={str(b['gated_ffw']).lower()}"], init="lm-icl")

    log("\n== architectures evaluation ==")
    n, shots = b["arch_eval_n"], list(b["eval_shots"])
    for name, stage in ARMS.items():
        model, tok = demo.load(name)
        with demo.evaluating():
            report["arms"][name] = demo.timed(f"eval_{name}", lambda: {
                "stage": stage,
                "params_total": sum(p.numel() for p in model.parameters()),
                "params_trainable": trainable_params(model),
                "tokens_per_image": model.tokens_per_image,
                "train_tok_per_s": training_throughput(runs / name),
                "caption_val": evaluate("caption", model, tok, data["val_captions"], limit=n),
                # a recall document names four pictures, so its query is asked after all four or none
                "fewshot": {task: fewshot(model, tok, data[f"val_{task}"], task_shots, limit=n)
                            for task, task_shots in (("episodes", shots), ("recall", [0, 4]), ("vqa", shots))},
            })
    # recall documents are episodes to `fewshot`; the task key gives them a panel of their own
    plot_curves([(name, {**r["fewshot"][task], "task": task}) for name, r in report["arms"].items()
                 for task in r["fewshot"]], demo.out / "fewshot.png")
    return report


def prepare(demo, b: dict) -> dict:
    """runs/lm-icl: three quarters of every batch are rows of random tokens written again and again
    (`copy_rows`), the rest the world's text; smeared keys let one layer find where the current token
    occurred before and read what followed. Returns its perplexity and how much of a repeat it copies."""
    from kosmo.eval.copying import copy_accuracy
    from kosmo.eval.ppl import perplexity

    demo.train("lm", "lm-icl", [demo.data["text"], demo.data["interleaved"]],
               [f"train.max_steps={b['copy_lm_steps']}", f"train.batch_size={b['copy_lm_batch']}", "seq_len=128",
                "train.lr=1e-3",
                "train.warmup_steps=20", "train.min_lr_ratio=1", "train.beta2=0.999", "train.weight_decay=0",
                "model.size=tiny", "model.smear_keys=true", "copy_rows=0.75"])
    lm, tok = demo.load("lm-icl")
    with demo.evaluating():
        return {"ppl_val": perplexity(lm, tok, [demo.data["val_text"]], seq_len=128)["ppl"],
                "copy": copy_accuracy(lm, tok.vocab_size)}


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
    episodes, lm = k["fewshot"]["episodes"], r["lm"]

    def row(name, cell):
        return f"| {name} | {cell(k)} | {cell(f)} |"

    def fewshot_cell(task, shots):
        return lambda a: f"{a['fewshot'][task]['curve'][shots]} (blind {a['fewshot'][task]['blind'][shots]})"
    lines = [
        "## KOSMOS-1 vs Flamingo (same data, same steps)", "",
        f"Both from `runs/clip` and `runs/lm-icl`, an LM trained to copy (it predicts {lm['copy']['20']}% of a "
        f"repeated span of 20 random tokens; text perplexity {lm['ppl_val']}), trained on captions, interleaved "
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
        *[row(f"picture recall, {s}-shot accuracy (%)", fewshot_cell("recall", s)) for s in ("0", "4")],
        "", f"Episodes: {episodes['n']['0']} held-out documents with two nonce labels each (chance "
            f"{episodes['chance']}%); picture recall: four named pictures, then one of them again (chance "
            f"{k['fewshot']['recall']['chance']}%). Both are scored by ranking the labels. "
            "docs/architectures.md discusses the trade-off.",
        "", "![few-shot curves](fewshot.png)"]
    return lines
