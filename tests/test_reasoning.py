"""The world's counting questions with worked answers, and `kosmo eval reasoning`."""
import json
import re

import pytest
import torch

from kosmo.data.world import SHAPES, THINK, World, WorldConfig, parse_answer, reasoning_item, write_reasoning
from kosmo.data.world.reasoning import IN_DISTRIBUTION, LABELS, MAX_ANSWER, OUT_OF_DISTRIBUTION, PLACES, plural
from tests.conftest import kosmo

QUESTION = re.compile(r"^How many (.+?) are (left|right) of the (\w+ \w+)\?")
SINGULAR = {plural(s): s for s in SHAPES}
ENTRY = re.compile(r"([A-L]) (\w+ \w+) (left|here|right) (\w+) (yes|no) (\d+)\.")


def scene_of(prompt: str) -> dict[str, str]:
    """Place label -> what is there, read back from the prompt's text alone."""
    scene = prompt[prompt.index("Row: ") + len("Row: "):-1]
    return dict(part.split(" ", 1) for part in scene.split("; "))


def check_worked(prompt: str, worked: str) -> str:
    """Grades a worked answer against the scene and question in the prompt, independently of the generator:
    every place has an entry copying what is there, its side of the anchor, 'yes' exactly for the objects the
    question counts, the running count, and the final answer equal to the true count. Returns the true count."""
    scene = scene_of(prompt)
    what, relation, anchor = QUESTION.search(prompt).groups()
    value = what.removesuffix(" objects") if what.endswith(" objects") else SINGULAR[what]
    labels = list(scene)
    at = labels.index(next(label for label, name in scene.items() if name == anchor))
    assert worked.startswith(f"count {value} {relation} of the {anchor} at {labels[at]}. ")
    entries = ENTRY.findall(worked)
    assert [e[0] for e in entries] == labels == list(LABELS)
    n = 0
    for i, (label, name, side, counted, verdict, running) in enumerate(entries):
        assert name == scene[label] and counted == value
        assert side == ("left" if i < at else "here" if i == at else "right")
        counts = name != "empty place" and value in name.split() and side == relation
        n += counts
        assert verdict == ("yes" if counts else "no") and int(running) == n
    assert worked.endswith(f"so the answer is {n}.")
    return str(n)


@pytest.mark.parametrize("ood", [False, True])
def test_worked_answers_are_right_and_ood_has_more_objects(ood):
    low, high = OUT_OF_DISTRIBUTION if ood else IN_DISTRIBUTION
    objects, answers = set(), []
    for i in range(300):
        item = reasoning_item(0, "val", i, ood)
        assert check_worked(item.prompt, item.scratchpad) == item.answer == parse_answer(item.scratchpad)
        assert low <= item.n_objects <= high
        objects.add(item.n_objects)
        answers.append(int(item.answer))
        # every worked answer has one entry per place whatever the number of objects: the same length in words
        assert len(item.scratchpad.split()) == 9 + 7 * PLACES + 5
    assert objects == set(range(low, high + 1))
    assert OUT_OF_DISTRIBUTION[0] > IN_DISTRIBUTION[1]
    # every answer, and so every running count, out of distribution is one that training writes, and no
    # constant reply scores much
    assert set(answers) == set(range(MAX_ANSWER + 1))
    assert max(map(answers.count, set(answers))) < 0.35 * len(answers)


def test_items_are_deterministic_and_splits_differ():
    assert reasoning_item(3, "train", 7) == reasoning_item(3, "train", 7)
    assert reasoning_item(3, "train", 7) != reasoning_item(3, "val", 7)
    assert reasoning_item(3, "val", 7) != reasoning_item(3, "val", 7, ood=True)


def test_parse_answer():
    assert parse_answer("A red circle left circle no 0. so the answer is 3.") == "3"
    assert parse_answer(" so the answer is 12 ") == "12"
    assert parse_answer("answer is 1. answer is 2.") == "2"
    assert parse_answer("2") == "2"
    assert parse_answer("2.") == "2"
    assert parse_answer("so the answer is") == "so the answer is"
    assert parse_answer("two") == "two"


def test_written_files_differ_only_in_targets(tmp_path):
    paths = write_reasoning(World(WorldConfig(seed=1)), tmp_path, n=40, val=5)
    direct, worked, chat, val = ([json.loads(line) for line in paths[k].read_text().splitlines()]
                                 for k in ("reasoning_direct", "reasoning_worked", "reasoning_chat", "val_reasoning"))
    for d, w in zip(direct, worked):
        assert d["messages"][:-1] == w["messages"][:-1] and d["messages"][0]["role"] == "user"
        assert check_worked(w["messages"][0]["content"], w["messages"][-1]["content"]) == d["messages"][-1]["content"]
    for i, c in enumerate(chat):  # the system prompt, and it alone, asks for the worked answer
        assert (c["messages"][0] == {"role": "system", "content": THINK}) == (i % 2 == 0)
        assert c["messages"][-1]["content"] == (worked if i % 2 == 0 else direct)[i]["messages"][-1]["content"]
    assert [v["ood"] for v in val] == [False] * 5 + [True] * 5
    assert all(v["messages"][-1]["role"] == "user" and v["answer"].isdigit() for v in val)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random tiny LM with a tokenizer trained on the questions, and the held-out questions."""
    from kosmo.data.jsonl import iter_texts
    from kosmo.model.lm import LM, LMConfig
    from kosmo.model.load import save_run
    from kosmo.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("reasoning")
    paths = write_reasoning(World(), root, n=200, val=4)
    tok = Tokenizer.train(iter_texts([paths["reasoning_worked"]]), 400)
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=256)
    save_run(root / "run", LM(cfg), tok, {"stage": "init", "arch": "lm", "model": cfg.to_dict()})
    return root / "run", paths["val_reasoning"]


@pytest.mark.parametrize("think", [False, True])
def test_eval_reasoning_end_to_end(tiny_run, think):
    run, val = tiny_run
    proc = kosmo("eval", "reasoning", "--model", run, "--data", val, "--device", "cpu",
                 *(["--think"] if think else []))
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["n"] == 8 and m["n_ood"] == 4 and m["think"] is think
    assert 0 <= m["accuracy_id"] <= 100 and 0 <= m["accuracy_ood"] <= 100
    assert set(m["by_objects"]) <= {str(n) for n in range(3, 11)}
    assert 20 <= m["constant_id"] <= 100 and 20 <= m["constant_ood"] <= 100


def test_eval_reasoning_needs_answers(tiny_run, tmp_path):
    run, _ = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    proc = kosmo("eval", "reasoning", "--model", run, "--data", bad, check=False)
    assert proc.returncode == 2 and f"{bad}:1: eval reasoning needs 'answer'" in proc.stderr
