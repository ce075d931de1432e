"""Few-shot in-context evaluation: k solved examples, then the query, in one interleaved prompt.

Prompts follow OpenFlamingo's evaluation prompts, each example an image and its text:

    captions   <s> <image>…</image>{caption} …  <image>…</image>                       -> a caption
    VQA        <s> <image>…</image>Question: {q} Answer: {a}. …  <image>…</image>Question: {q} Answer:
    episodes   <s> <image>…</image>This is a {label}. …  <image>…</image>This is a     -> a label

Captions and VQA draw their k examples at random (seeded) from the other lines of the same file and
are scored by CIDEr and VQA accuracy. An episode (the shapes world's `fewshot` lines) brings its own
examples, whose nonce labels are bound afresh in every document, so only the context can tell which
word names the query; it is scored by ranking its labels by likelihood, so chance is 1 / labels.
k examples of an episode are taken round-robin over its labels, so every label shows once k reaches
their number. Beside each curve stands the blind baseline: the same prompts with the images removed.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from kosmo.data import chat
from kosmo.data.images import load_images
from kosmo.data.jsonl import read_jsonl
from kosmo.errors import KosmoError
from kosmo.eval.metrics import caption_scores, vqa_accuracy
from kosmo.eval.vision import complete, sees_images
from kosmo.tokenizer import BOS, END_OF_TURN, EOS, IMAGE, PAD

STOP = (EOS, END_OF_TURN, IMAGE)  # an answer ends where the next example would begin


def parse_counts(text: str, flag: str, minimum: int, example: str) -> list[int]:
    """A command-line list of counts like 0,2,4,8, sorted and without repeats, each at least `minimum`."""
    try:
        counts = [int(s) for s in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < minimum:
        raise KosmoError(f"{flag}: expected comma-separated whole numbers of at least {minimum} like {example}, "
                         f"got {text!r}")
    return sorted(set(counts))


def task_of(obj: dict, where: str) -> str:
    if isinstance(obj.get("content"), list) and isinstance(obj.get("labels"), list) and "answer" in obj:
        return "episodes"
    if "question" in obj and "image" in obj:
        return "vqa"
    if "image" in obj and ("captions" in obj or "text" in obj):
        return "captions"
    raise KosmoError(f"{where}: not a few-shot line (expected a caption, a VQA item or an episode with "
                     "'content', 'labels' and 'answer')")


@torch.no_grad()
def fewshot(model, tok, path, shots: list[int], limit: int | None = None, blind: bool = True,
            seed: int = 0, batch_size: int = 16) -> dict:
    """The curve of `path`'s task over `shots`: {"task", "metric", "curve": {k: score}, "n": {k: queries},
    and "blind": {k: score}}, plus "chance" for episodes."""
    path = Path(path)
    records = [(f"{path}:{n}", obj) for n, obj in read_jsonl(path)]
    if not records:
        raise KosmoError(f"{path}: no lines to evaluate")
    task = task_of(records[0][1], records[0][0])
    for where, obj in records:
        if task_of(obj, where) != task:
            raise KosmoError(f"{where}: a {task_of(obj, where)} line in a file of {task}")
    run = {"episodes": _episodes, "vqa": _vqa, "captions": _captions}[task]
    out = {"task": task, "metric": {"episodes": "accuracy", "vqa": "vqa_accuracy", "captions": "cider"}[task],
           "curve": {}, "n": {}}
    if blind and sees_images(model):
        out["blind"] = {}
    for k in shots:
        score, n = run(model, tok, path, records, k, limit, False, seed, batch_size)
        out["curve"][str(k)], out["n"][str(k)] = score, n
        if "blind" in out:
            out["blind"][str(k)] = run(model, tok, path, records, k, limit, True, seed, batch_size)[0]
    if task == "episodes":
        out["chance"] = round(100 * sum(1 / len(o["labels"]) for _, o in records) / len(records), 2)
    return out


class Prompt:
    """Token ids and the images their markers stand for, built part by part; blind, without images."""

    def __init__(self, model, tok, base: Path, blind: bool):
        self.ids, self.images = [BOS], []
        self.tok, self.base, self.blind = tok, base, blind or not sees_images(model)
        self.k = 0 if self.blind else model.tokens_per_image

    def image(self, ref: str, where: str):
        if not isinstance(ref, str):
            raise KosmoError(f"{where}: an image must be a path string")
        if not self.blind:
            self.ids += chat.image_block(self.k)
            self.images.append(str((self.base / ref).resolve()))
        return self

    def text(self, text: str):
        self.ids += self.tok.encode(text)
        return self


def _support(records: list, i: int, k: int, seed: int) -> list[dict]:
    others = [j for j in range(len(records)) if j != i]
    return [records[j][1] for j in random.Random(seed * 1_000_003 + i).sample(others, min(k, len(others)))]


def _captions(model, tok, path, records, k, limit, blind, seed, batch_size):
    prompts, images, refs = [], [], {}
    for i, (where, obj) in enumerate(records[:limit]):
        p = Prompt(model, tok, path.parent, blind)
        for ex in _support(records, i, k, seed):
            p.image(ex["image"], where).text(_caption_of(ex, where)[0])
        p.image(obj["image"], where)
        prompts.append(p.ids)
        images.append(p.images)
        refs[str(i)] = _caption_of(obj, where)
    preds = complete(model, tok, prompts, images, False, 32, batch_size, stop_ids=STOP)
    return caption_scores({str(i): p for i, p in enumerate(preds)}, refs)["cider"], len(preds)


def _caption_of(obj: dict, where: str) -> list[str]:
    caps = obj.get("captions") or [obj.get("text")]
    if not all(isinstance(c, str) for c in caps):
        raise KosmoError(f"{where}: 'captions' must be a list of strings")
    return caps


def _vqa(model, tok, path, records, k, limit, blind, seed, batch_size):
    prompts, images, answers = [], [], []
    for i, (where, obj) in enumerate(records[:limit]):
        if not isinstance(obj.get("answers"), list) or not obj["answers"]:
            raise KosmoError(f"{where}: a VQA line needs 'answers': [str, …]")
        p = Prompt(model, tok, path.parent, blind)
        for ex in _support(records, i, k, seed):
            p.image(ex["image"], where).text(f"Question: {ex['question']} Answer: {ex['answers'][0]}.")
        p.image(obj["image"], where).text(f"Question: {obj['question']} Answer:")
        prompts.append(p.ids)
        images.append(p.images)
        answers.append(obj["answers"])
    preds = complete(model, tok, prompts, images, False, 8, batch_size, stop_ids=STOP)
    scores = [vqa_accuracy(pred.rstrip("."), a) for pred, a in zip(preds, answers)]
    return round(100 * sum(scores) / len(scores), 2), len(scores)


def _episodes(model, tok, path, records, k, limit, blind, seed, batch_size):
    """Rank classification: the label whose tokens after the query's text are likeliest wins."""
    rows, answers, n_labels = [], [], []  # rows: (ids, image paths, index of the first scored token), one a label
    for where, obj in records:
        parts = _pairs(obj["content"], where)
        support, (query_image, query_text) = parts[:-1], parts[-1]
        if len(support) < k:
            continue  # this episode has too few examples for k shots
        p = Prompt(model, tok, path.parent, blind)
        for image, text in _round_robin(support, obj["labels"], k):
            p.image(image, where).text(text)
        p.image(query_image, where)
        candidates = [tok.encode(f"{query_text} {label}") for label in obj["labels"]]
        shared = common_prefix(candidates)
        rows += [(p.ids + c, p.images, len(p.ids) + shared) for c in candidates]
        if obj["answer"] not in obj["labels"]:
            raise KosmoError(f"{where}: 'answer' {obj['answer']!r} is not one of the 'labels'")
        answers.append(obj["labels"].index(obj["answer"]))
        n_labels.append(len(candidates))
        if len(answers) == limit:
            break
    if not answers:
        return None, 0
    scores = label_logprobs(model, rows, batch_size)
    correct, start = 0, 0
    for answer, n in zip(answers, n_labels):
        correct += int(max(range(n), key=lambda j: scores[start + j]) == answer)
        start += n
    return round(100 * correct / len(answers), 2), len(answers)


def _pairs(content: list, where: str) -> list[tuple[str, str]]:
    """An episode's content as (image, text) pairs; the last pair is the query."""
    if len(content) < 2 or len(content) % 2 or not all("image" in a and "text" in b
                                                       for a, b in zip(content[::2], content[1::2])):
        raise KosmoError(f"{where}: an episode's 'content' must alternate {{'image'}} and {{'text'}} parts")
    return [(a["image"], b["text"]) for a, b in zip(content[::2], content[1::2])]


def _round_robin(support: list[tuple[str, str]], labels: list[str], k: int) -> list[tuple[str, str]]:
    """k of the support, the first example of each label first, then the second of each …, kept in order."""
    by_label: dict[str, list[int]] = {}
    for i, (_, text) in enumerate(support):
        label = next((lab for lab in labels if lab in text.replace(".", " ").split()), text)
        by_label.setdefault(label, []).append(i)
    order = [idx[r] for r in range(len(support)) for idx in by_label.values() if r < len(idx)]
    return [support[i] for i in sorted(order[:k])]


def common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all `seqs` share: where ranked candidates start to differ."""
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def label_logprobs(model, rows, batch_size: int) -> list[float]:
    """Sum of log-probabilities of each row's tokens from its scored index on, in right-padded batches."""
    device = next(model.parameters()).device
    out = []
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        width = max(len(ids) for ids, _, _ in batch)
        idx = torch.full((len(batch), width), PAD, dtype=torch.long)
        for r, (ids, _, _) in enumerate(batch):
            idx[r, :len(ids)] = torch.tensor(ids)
        paths = [p for _, images, _ in batch for p in images]
        kw = {}
        if paths:
            pixels, _, skipped = load_images(paths, model.image_size)
            if skipped:
                raise KosmoError(skipped[0][1])
            kw["images"] = pixels
        if width > model.context_length:
            raise KosmoError(f"a prompt of {width} tokens exceeds the context of {model.context_length}; "
                             "ask for fewer --shots")
        logp = F.log_softmax(model(idx.to(device), **kw).float(), dim=-1)
        for r, (ids, _, first) in enumerate(batch):
            targets = torch.tensor(ids[first:], device=device)
            out.append(float(logp[r, first - 1:len(ids) - 1].gather(-1, targets[:, None]).sum()))
    return out


def plot_curves(results: list[tuple[str, dict]], png: str | Path):
    """One panel per task; a line per (label, result), e.g. per architecture, its blind baseline dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for _, r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        chance = None
        for label, r in results:
            if r["task"] != task:
                continue
            ks = [k for k, v in r["curve"].items() if v is not None]
            line, = ax.plot([int(k) for k in ks], [r["curve"][k] for k in ks], "o-", label=label)
            if "blind" in r:
                ax.plot([int(k) for k in ks], [r["blind"][k] for k in ks], "x--", color=line.get_color(), alpha=0.6,
                        label=f"{label}, blind")
            chance = r.get("chance", chance)
        if chance is not None:
            ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
        ax.set_title(task)
        ax.set_xlabel("shots")
        ax.set_ylabel(next(r["metric"] for _, r in results if r["task"] == task))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
