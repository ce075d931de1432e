"""Needle in a haystack: passkey retrieval over a grid of context lengths and needle depths.

    kosmo eval needle --model runs/long [--lengths 1k,2k,4k,8k,16k,32k --depths 0,0.25,0.5,0.75,1 --trials 4
                                         --plot needle.png]

Each cell of the grid asks for `trials` random keys (kosmo.data.passkey) in prompts that fill the
context to that length, greedy, and scores the share answered exactly. The prompts go in as chunked
prefills, so a 32k-token prompt needs one chunk's activations, not the whole prompt's.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kosmo.data.passkey import PasskeyPrompts, random_key
from kosmo.errors import KosmoError
from kosmo.generate import Sampling, generate_ids

ANSWER_TOKENS = 8  # room after the prompt for the key (at most a few tokens) and the token after it


def parse_lengths(text: str) -> list[int]:
    """A command-line list of lengths like 1k,2k,32k or 1000,4096 (k: 1024 tokens), sorted."""
    try:
        lengths = [int(float(s[:-1]) * 1024) if s.lower().endswith("k") else int(s) for s in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise KosmoError(f"--lengths: expected comma-separated token counts like 1k,4k,32k, got {text!r}")
    return sorted(set(lengths))


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(s) for s in text.split(",")]
    except ValueError:
        depths = []
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise KosmoError(f"--depths: expected comma-separated fractions from 0 to 1 like 0,0.5,1, got {text!r}")
    return sorted(set(depths))


def answered(text: str, key: str) -> bool:
    """Whether a reply starts with the key as a whole number ('12345.' yes, '123456' no)."""
    found = re.match(r"\s*(\d+)", text)
    return found is not None and found.group(1) == key


@torch.no_grad()
def needle(model, tok, lengths: list[int], depths: list[float], trials: int = 4, seed: int = 0,
           prefill_chunk: int = 2048) -> dict:
    """{"accuracy": {length: {depth: %}}, "by_length": {length: %}, "overall": %} over the grid."""
    too_long = [n for n in lengths if n > model.context_length]
    if too_long:
        raise KosmoError(f"--lengths {too_long[0]} exceeds the model's context of {model.context_length} tokens; "
                         f"extend it with RoPE scaling (docs/long_context.md)")
    prompts = PasskeyPrompts(tok)
    shortest = prompts.minimum() + ANSWER_TOKENS
    if lengths[0] < shortest:
        raise KosmoError(f"--lengths {lengths[0]} is shorter than a passkey prompt with no filler ({shortest} tokens)")
    gen = torch.Generator().manual_seed(seed)
    grid: dict[str, dict[str, float]] = {}
    for length in lengths:
        grid[str(length)] = {}
        for depth in depths:
            cases = [prompts.prompt(length - ANSWER_TOKENS, depth, random_key(gen)) for _ in range(trials)]
            out, _ = generate_ids(model, [c.ids for c in cases], Sampling(max_new_tokens=ANSWER_TOKENS),
                                  prefill_chunk=prefill_chunk)
            right = sum(answered(tok.decode(ids), c.key) for ids, c in zip(out, cases))
            grid[str(length)][str(depth)] = round(100 * right / trials, 1)
    by_length = {n: round(sum(row.values()) / len(row), 1) for n, row in grid.items()}
    return {"accuracy": grid, "by_length": by_length, "overall": round(sum(by_length.values()) / len(by_length), 1),
            "trials": trials}


def plot_heatmap(result: dict, png: str | Path, title: str = "passkey retrieval") -> None:
    """Accuracy as a depth x length heatmap, each cell labelled with its %."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = list(result["accuracy"])
    depths = list(result["accuracy"][lengths[0]])
    acc = [[result["accuracy"][n][d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 1.6, 0.55 * len(depths) + 1.4))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [f"{int(n) / 1024:g}k" if int(n) % 256 == 0 else n for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
