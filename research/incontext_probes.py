"""Where in-context learning of the shapes world's episodes stalls: three probes.

    kosmo demo --sections vision --out out        # any demo output with runs/lm and data/tokenizer.json
    .venv/bin/python research/incontext_probes.py --demo out --work /tmp/probes [--lm lm-icl]
    OMP_NUM_THREADS=1 .venv/bin/python research/incontext_probes.py --probes symbols [--symbol-copy-mix 0.5] [--symbol-format F]

1. copy: the LM trains on rows of random tokens whose second half repeats the first (a half of 12 to
   60 tokens, drawn afresh every batch), and reports the share of second-half tokens it predicts,
   every 100 steps. Predicting them needs an induction circuit (Olsson et al. 2022: find the earlier
   occurrence of the current token, copy what followed), the mechanism that naming a picture from its
   examples also needs.
2. text episodes: the world's episodes with every picture written as words ("A small red circle.
   This is a dax."), so that no vision is involved; `kosmo train lm` on them, then the 4-shot
   accuracy on 200 held-out episodes (scored by ranking the two labels), from `runs/lm` and from the
   LM after the copy probe, beside the ceiling of an ideal reasoner on the same episodes.
3. symbols (`--probes symbols`, no demo needed): the episodes at their barest, four symbols an
   example (size, colour, shape, label), learnt by a fresh 2-layer model; the 4-shot accuracy on 300
   held-out episodes every 250 steps. With `--symbol-attribute shape` the rule is a plain induction
   (find the earlier example with the query's shape, copy its label); with `--symbol-copy-mix 0.5`
   half of every batch is copy rows of random symbols, as in probe 1; `--symbol-format marker` puts
   one constant symbol between each description and its label, `world` the world's "This is a".

Prints one JSON line per measurement. The first two take about 30 minutes on one thread; symbols
about 45 minutes per 20,000 steps on one thread (55 with `--symbol-attribute shape`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kosmo import checkpoint
from kosmo.data.copying import repeated_spans
from kosmo.data.world import COLOURS, EPISODE_EXAMPLE, EPISODE_QUERY, NONCE_WORDS, SHAPES, SIZES, World
from kosmo.eval.copying import copy_accuracy
from kosmo.eval.fewshot import common_prefix, label_logprobs
from kosmo.model.lm import LM, LMConfig
from kosmo.model.load import load_run
from kosmo.tokenizer import BOS
from kosmo.train.run import run_stage
from kosmo.hardware import autocast


def copy_probe(run: Path, out: Path, steps: int, half: int = 0, batch: int = 32, lr: float = 1e-3):
    """Trains `run`'s LM on repeated random tokens and saves it as a run in `out`; yields the copy
    accuracy on the step's batch every 100 steps, then `kosmo eval copy`'s at several lengths. `half` > 0
    fixes the half's length instead of drawing it from 12..60. A plain loop, not the shared trainer:
    the rows are token ids drawn afresh every step, with no text or dataset behind them."""
    gen = torch.Generator().manual_seed(0)
    model, tok, _ = load_run(run)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps + 1):
        ids, n = repeated_spans(batch, half or (12, 60), tok.vocab_size, gen)
        with autocast(torch.device("cpu"), "auto"):
            logits = model(ids[:, :-1]).float()
        if step % 100 == 0 or step == steps:
            yield {"probe": "copy", "step": step, "half": n, "second_half_accuracy": copied(logits, ids, n),
                   "seconds": round(time.time() - t0, 1)}
        if step == steps:
            break
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with autocast(torch.device("cpu"), "auto"):
        by_length = copy_accuracy(model, tok.vocab_size, spans=(20, 36, 48, 60), rows=batch)
    yield {"probe": "copy", "step": steps, "second_half_accuracy_by_length": by_length}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(run / name, out / name)
    checkpoint.save_tensors(out / "model.safetensors", checkpoint.model_tensors(model))


def copied(logits: torch.Tensor, ids: torch.Tensor, half: int) -> float:
    """The share (%) of the repeated half, past its first token, that the logits predict."""
    return round(100 * (logits[:, half:].argmax(-1) == ids[:, half + 1:]).float().mean().item(), 1)


SYMBOLS = ("<s>", ".", *SIZES, *COLOURS, *SHAPES, *NONCE_WORDS)
# --symbol-format: what stands between an example's description and its label. "marker" is one
# constant symbol, as KOSMOS's image-end marker stands between a picture and its text; "world" is
# the world's "This is a", as in the image episodes.
LEAD_INS = {"bare": (), "marker": ("|",), "world": tuple(EPISODE_QUERY.lower().split())}


def symbols_probe(world: World, steps: int, attribute: str, copy_mix: float = 0.0, lead_in: tuple[str, ...] = (),
                  batch: int = 32, shots=(8, 12, 16), lr: float = 1e-3, every: int = 250):
    """Trains a fresh 2-layer model on episodes written as symbols, loss on every label already named
    in its row (the only ones the context can predict); yields the held-out 4-shot accuracy. With
    `copy_mix`, that share of every batch is copy rows of random symbols instead, loss on their
    repeated half. `lead_in` symbols stand between each description and its label (one of
    LEAD_INS). A plain loop, as in the copy probe: the symbols have no tokenizer or JSONL behind them."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_copy = round(batch * copy_mix)
    ix = {w: i for i, w in enumerate([*SYMBOLS, *lead_in])}
    model = LM(LMConfig(vocab_size=len(ix), dim=128, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=256))

    def draw(i: int, split: str, k: int):
        while True:  # the next episode about `attribute` from index i on
            ep = world.episode(i, split, shots=k)
            if attribute == "any" or ep.attribute == attribute:
                return ep, i
            i += 1

    def encode(ep, with_answer: bool = True):
        words, target = episode_symbols(ep, lead_in, with_answer)
        return [ix[w] for w in words], target

    val, j = [], 0
    while len(val) < 300:
        ep, j = draw(j, "val", 4)
        val.append(ep)
        j += 1
    prompts = torch.tensor([encode(ep, with_answer=False)[0] for ep in val])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    t0, i = time.time(), 0
    for step in range(1, steps + 1):
        rows = []
        for _ in range(batch - n_copy):
            ep, i = draw(i, "train", shots[step % len(shots)])
            rows.append(encode(ep))
            i += 1
        ids, target = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
        if n_copy:
            ids, target = with_copy_rows(ids, target, n_copy, gen)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1, step / 50)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].masked_fill(~target[:, 1:], -100).flatten(),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0:
            model.eval()
            with torch.no_grad():
                last = model(prompts)[:, -1]
            model.train()
            right = sum(max(ep.labels, key=lambda label: last[n, ix[label]].item()) == ep.query[1]
                        for n, ep in enumerate(val))
            yield {"probe": "symbols", "attribute": attribute, "step": step, "loss": round(loss.item(), 3),
                   "accuracy_4shot": round(100 * right / len(val), 1), "seconds": round(time.time() - t0)}


def episode_symbols(ep, lead_in: tuple[str, ...], with_answer: bool = True) -> tuple[list[str], list[bool]]:
    """An episode as symbols: "<s>", then size, colour, shape, `lead_in`, label, "." per example (the
    query's label only `with_answer`); the targets are the labels already named earlier in the row."""
    words, target = ["<s>"], [False]
    for k, (scene, label) in enumerate([*ep.support, ep.query]):
        o = scene.objects[0]
        words += [o.size, o.colour, o.shape, *lead_in]
        target += [False] * (3 + len(lead_in))
        if k == len(ep.support) and not with_answer:
            break
        words += [label, "."]
        target += [any(label == seen for _, seen in ep.support[:k]), False]
    return words, target


def with_copy_rows(ids: torch.Tensor, target: torch.Tensor, n: int, gen: torch.Generator):
    """Appends n rows of the same length: "<s>", random symbols repeated once, "." to the end; the
    targets are the repeated half past its first symbol (which nothing before it predicts)."""
    length = ids.shape[1]
    copies, half = repeated_spans(n, (8, (length - 1) // 2), len(SYMBOLS), gen, lowest_id=2)  # after "<s>" and "."
    rows = torch.ones(n, length, dtype=torch.long)  # "."
    rows[:, 0], rows[:, 1:1 + 2 * half] = 0, copies  # "<s>"
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[:, 2 + half:1 + 2 * half] = True
    return torch.cat([ids, rows]), torch.cat([target, mask])


def describe(scene) -> str:
    o = scene.objects[0]
    return f"A {o.size} {o.colour} {o.shape}."


def write_text_episodes(world: World, train: Path, val: Path, n: int, val_n: int = 200):
    """Training rows with 4, 6 or 8 examples and the query's label; held-out 4-shot prompts."""
    with train.open("w") as f:
        for i in range(n):
            ep = world.episode(i, "train", shots=(4, 6, 8)[i % 3])
            examples = [f"{describe(s)} {EPISODE_EXAMPLE.format(label=label)}" for s, label in [*ep.support, ep.query]]
            f.write(json.dumps({"text": " ".join(examples)}) + "\n")
    with val.open("w") as f:
        for i in range(val_n):
            ep = world.episode(i, "val", shots=4)
            prompt = " ".join(f"{describe(s)} {EPISODE_EXAMPLE.format(label=label)}" for s, label in ep.support)
            f.write(json.dumps({"prompt": f"{prompt} {describe(ep.query[0])} {EPISODE_QUERY}", "answer": ep.query[1],
                                "labels": ep.labels}) + "\n")


def ideal_accuracy(world: World, shots: int, n: int = 1000) -> float:
    """The ceiling: every attribute whose values the support maps one-to-one onto its labels is a
    hypothesis; each votes for the label it gives the query (a value the support never showed goes
    to the label the support never used), and ties are split."""
    right = 0.0
    for i in range(n):
        ep = world.episode(i, "val", shots=shots)
        votes = dict.fromkeys(ep.labels, 0)
        for attribute in ("shape", "colour", "size"):
            names: dict[str, str] = {}
            for scene, label in ep.support:
                names.setdefault(getattr(scene.objects[0], attribute), label)
            consistent = all(names[getattr(s.objects[0], attribute)] == label for s, label in ep.support)
            if not consistent or len(set(names.values())) < len(names):
                continue
            value = getattr(ep.query[0].objects[0], attribute)
            unused = [label for label in ep.labels if label not in names.values()]
            for label in ([names[value]] if value in names else unused):
                votes[label] += 1
        best = [label for label, v in votes.items() if v == max(votes.values())]
        right += (ep.query[1] in best) / len(best)
    return round(100 * right / n, 1)


@torch.no_grad()
def text_episode_accuracy(run: Path, val: Path) -> float:
    """Ranks each prompt's labels by likelihood, as `kosmo eval fewshot` ranks an episode's."""
    model, tok, _ = load_run(run)
    model.eval()
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    right = 0
    for r in rows:
        candidates = [[BOS, *tok.encode(f"{r['prompt']} {label}")] for label in r["labels"]]
        first = common_prefix(candidates)
        scores = label_logprobs(model, [(c, [], first) for c in candidates], batch_size=len(candidates))
        right += r["labels"][scores.index(max(scores))] == r["answer"]
    return round(100 * right / len(rows), 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probes", default="copy,text", help="comma-separated: copy, text (after copy), symbols")
    p.add_argument("--demo", help="a `kosmo demo` output folder with runs/lm (for copy and text)")
    p.add_argument("--work", help="folder for the copy and text probes' data and runs")
    p.add_argument("--lm", default="lm", help="the LM run under DEMO/runs to probe, e.g. lm-icl (default lm)")
    p.add_argument("--copy-steps", type=int, default=1000)
    p.add_argument("--copy-half", type=int, default=0,
                   help="fix the copy rows' half length, 2..128 (default 0: drawn from 12..60 for every batch)")
    p.add_argument("--episode-steps", type=int, default=600)
    p.add_argument("--episodes", type=int, default=16000)
    p.add_argument("--symbol-steps", type=int, default=20000)
    p.add_argument("--symbol-attribute", default="any", choices=("any", "shape", "colour", "size"))
    p.add_argument("--symbol-copy-mix", type=float, default=0.0,
                   help="share of each symbols batch that is copy rows (0 to 1)")
    p.add_argument("--symbol-format", default="bare", choices=tuple(LEAD_INS),
                   help='between each description and its label: nothing (bare), one constant symbol (marker) '
                        'or "This is a" (world)')
    args = p.parse_args()
    if min(args.copy_steps, args.episode_steps, args.episodes, args.symbol_steps) < 1:
        p.error("--copy-steps, --episode-steps, --episodes and --symbol-steps must be at least 1")
    if args.copy_half and not 2 <= args.copy_half <= 128:
        p.error(f"--copy-half must be 0 (drawn per batch) or a length from 2 to 128, got {args.copy_half}")
    if not 0 <= args.symbol_copy_mix < 1:
        p.error(f"--symbol-copy-mix must be at least 0 and below 1, got {args.symbol_copy_mix}")
    probes = args.probes.split(",")
    if unknown := set(probes) - {"copy", "text", "symbols"}:
        p.error(f"--probes: unknown probe {sorted(unknown)[0]!r} (expected copy, text or symbols)")
    if "text" in probes and "copy" not in probes:
        p.error("--probes: text starts from the copy probe's LM, so it needs copy too")
    world = World(image_size=36)
    if "copy" in probes:
        if not args.demo or not args.work:
            p.error("--probes copy and text need --demo and --work")
        copy_and_text_probes(Path(args.demo), Path(args.work), world, args, "text" in probes, p.error)
    if "symbols" in probes:
        for row in symbols_probe(world, args.symbol_steps, args.symbol_attribute, args.symbol_copy_mix,
                                 LEAD_INS[args.symbol_format]):
            print(json.dumps(row), flush=True)


def copy_and_text_probes(demo: Path, work: Path, world: World, args, text: bool, error):
    lm = demo / "runs" / args.lm
    for needed in (lm, demo / "data" / "tokenizer.json"):
        if not needed.exists():
            error(f"{needed} not found: --demo must be the output folder of `kosmo demo`")
    work.mkdir(parents=True, exist_ok=True)
    for row in copy_probe(lm, work / "lm_copy", args.copy_steps, args.copy_half):
        print(json.dumps(row), flush=True)
    if not text:
        return
    print(json.dumps({"probe": "ideal", "accuracy": {k: ideal_accuracy(world, k) for k in (1, 2, 4, 8)}}))
    train, val = work / "text_episodes.jsonl", work / "val_text_episodes.jsonl"
    write_text_episodes(world, train, val, args.episodes)
    for start in (lm, work / "lm_copy"):
        out = work / f"{start.name}_episodes"
        run_stage("lm", [train], out, init=start, tokenizer=demo / "data" / "tokenizer.json",
                  overrides=[f"train.max_steps={args.episode_steps}", "train.batch_size=16", "train.lr=1e-3",
                             "seq_len=192", "train.warmup_steps=20", "train.eval_every=0", "train.progress=false",
                             "train.tensorboard=false"])
        print(json.dumps({"probe": "text_episodes", "start": str(start), "steps": args.episode_steps,
                          "accuracy_4shot": text_episode_accuracy(out, val), "chance": 50.0}), flush=True)


if __name__ == "__main__":
    main()
