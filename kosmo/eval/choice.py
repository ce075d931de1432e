"""Multiple-choice accuracy by log-likelihood, and the same items as an lm-evaluation-harness task.

Items are JSONL lines {"context", "choices", "answer"} (the answer is the right choice's index). Each choice is
scored after its context, the likeliest wins. A choice's tokens are cut as lm-eval's `TemplateLM._encode_pair`
cuts them: <s>, then the text context + " " + choice encoded whole, the context's own tokens taken from its front.
So the sums here and lm-eval's `acc` through `kosmo serve` (kosmo/eval/lm_eval_tasks/shapes_qa.yaml) add the same
log-probabilities of the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from kosmo.data.jsonl import read_jsonl
from kosmo.data.world import World
from kosmo.errors import KosmoError
from kosmo.eval.fewshot import label_logprobs
from kosmo.tokenizer import BOS

TASK = Path(__file__).parent / "lm_eval_tasks" / "shapes_qa.yaml"


def read_items(path: str | Path, limit: int | None = None) -> list[dict]:
    items = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        choices, answer = obj.get("choices"), obj.get("answer")
        if not (isinstance(obj.get("context"), str) and isinstance(choices, list) and choices
                and all(isinstance(c, str) for c in choices)):
            raise KosmoError(f"{where}: a multiple-choice item needs a 'context' string and a list of 'choices' "
                             "strings")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise KosmoError(f"{where}: 'answer' must be the index of the right choice (0 to {len(choices) - 1}), "
                             f"got {answer!r}")
        items.append(obj)
        if len(items) == limit:
            break
    return items


def choice_rows(tokenizer, context: str, choices: list[str]) -> list[tuple[list[int], list, int]]:
    """(ids, no images, index of the first scored token) of each choice after the context, cut as lm-eval cuts."""
    ctx = [BOS] + tokenizer.encode(context)
    return [(ctx + ([BOS] + tokenizer.encode(f"{context} {c}"))[len(ctx):], [], len(ctx)) for c in choices]


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, items: list[dict], batch_size: int = 16) -> list[list[float]]:
    """Each item's log-likelihood of each of its choices."""
    rows = [row for it in items for row in choice_rows(tokenizer, it["context"], it["choices"])]
    scores = iter(label_logprobs(model, rows, batch_size))
    return [[next(scores) for _ in it["choices"]] for it in items]


def choice_accuracy(model, tokenizer, items: list[dict], batch_size: int = 16) -> dict:
    """acc: the share (%) of items whose likeliest choice is the right one."""
    lls = choice_loglikelihoods(model, tokenizer, items, batch_size)
    correct = sum(max(range(len(ll)), key=ll.__getitem__) == it["answer"] for ll, it in zip(lls, items))
    return {"acc": round(100 * correct / len(items), 2), "n": len(items)}


def write_lm_eval_task(world: World, out_dir: str | Path, n: int) -> dict[str, Path]:
    """`n` text questions of the world's val split as out_dir/shapes_qa.jsonl, and the lm-eval task over them
    (the shipped task, its data file named by its absolute path, so lm-eval finds it from anywhere)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "shapes_qa.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(world.text_question(i))) + "\n" for i in range(n))
    task = yaml.safe_load(TASK.read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(data.resolve())
    header = f"# {TASK.name} of kosmo (kosmo/eval/lm_eval_tasks), over the items beside it\n"
    (out / TASK.name).write_text(header + yaml.safe_dump(task, sort_keys=False))
    return {"lm_eval_items": data, "lm_eval_task": out / TASK.name}
