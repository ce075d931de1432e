"""Exact-answer accuracy on the world's counting questions (val_reasoning.jsonl), in and out of distribution.

Replies are greedy. The answer is read by `parse_answer`: what follows the last "answer is" of a worked answer, or
the whole reply of a direct one, so one command scores a model of either form, and a reply counts only if that
answer is exactly the true number. `think` puts the system prompt THINK before each question, the switch that
asks a chat model trained on both forms for the worked one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kosmo.data.chat import render
from kosmo.data.jsonl import read_jsonl
from kosmo.data.world.reasoning import THINK, parse_answer
from kosmo.errors import KosmoError
from kosmo.generate import Sampling, generate

MAX_NEW_TOKENS = 128  # a worked answer of the world's 12 places is about 90 tokens


def read_items(path: str | Path, limit: int | None = None) -> list[dict]:
    items = []
    for lineno, obj in read_jsonl(Path(path)):
        for key in ("messages", "answer", "ood"):
            if key not in obj:
                raise KosmoError(f"{path}:{lineno}: eval reasoning needs '{key}' on every line, as in "
                                 "val_reasoning.jsonl (`kosmo world --reasoning N`)")
        items.append(obj)
    return items[:limit]


def _accuracy(rows: list[dict]) -> float:
    return round(100 * sum(r["correct"] for r in rows) / len(rows), 2) if rows else 0.0


def constant_accuracy(items: list[dict]) -> float:
    """The accuracy of the best constant reply: what a model that ignores the scene can reach at most."""
    answers = [str(it["answer"]) for it in items]
    return round(100 * max(map(answers.count, set(answers))) / len(answers), 2) if answers else 0.0


@torch.no_grad()
def evaluate_reasoning(model, tok, path, think: bool = False, limit: int | None = None, batch_size: int = 64,
                       max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Accuracy overall, in distribution, out of distribution and by number of objects, beside the best constant
    reply's in and out of distribution; the share of replies that were worked answers, and their mean length in
    tokens."""
    items = read_items(path, limit)
    if not items:
        raise KosmoError(f"{path}: no questions to evaluate")
    system = [{"role": "system", "content": THINK}] if think else []
    prompts = [render(system + it["messages"], tok, model.tokens_per_image, add_generation_prompt=True,
                      where=f"{path}: line {i + 1}").ids for i, it in enumerate(items)]
    s = Sampling(max_new_tokens=max_new_tokens)
    replies = []
    for start in range(0, len(prompts), batch_size):
        try:
            replies += generate(model, tok, prompts[start:start + batch_size], s)
        except ValueError as e:
            raise KosmoError(f"{path}: {e}") from None
    rows = [{"ood": bool(it["ood"]), "objects": it.get("objects"), "correct": parse_answer(r.text) == str(it["answer"]),
             "worked": "answer is" in r.text, "tokens": len(r.tokens)} for it, r in zip(items, replies)]
    by_objects = {}
    for n in sorted({r["objects"] for r in rows if r["objects"] is not None}):
        by_objects[str(n)] = _accuracy([r for r in rows if r["objects"] == n])
    return {"n": len(rows), "n_ood": sum(r["ood"] for r in rows), "think": think, "accuracy": _accuracy(rows),
            "accuracy_id": _accuracy([r for r in rows if not r["ood"]]),
            "accuracy_ood": _accuracy([r for r in rows if r["ood"]]), "by_objects": by_objects,
            "constant_id": constant_accuracy([it for it in items if not it["ood"]]),
            "constant_ood": constant_accuracy([it for it in items if it["ood"]]),
            "worked": round(100 * sum(r["worked"] for r in rows) / len(rows), 2),
            "reply_tokens": round(sum(r["tokens"] for r in rows) / len(rows), 1), "example": replies[0].text}
