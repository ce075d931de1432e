"""Can a sign's characters be read off an image encoder's patch features? A linear probe per character cell.

    python research/reading_probe.py /tmp/reading/runs/clip            # after research/reading.sh
    python research/reading_probe.py /tmp/reading/runs/sft --layer 0   # any run with an encoder; 0: patch embeddings

Encodes 3,000 training and 600 held-out signs of seed 0 (at the encoder's picture size, a character to each
patch), takes the feature of each character's cell at `--layer` (transformers' hidden_states numbering, as
`feature_layer`), fits a linear classifier over the 32 characters on the training cells and prints its
accuracy on the held-out cells, whose numbers training never shows. It tells an encoder that cannot see the
glyphs from an LM that does not use what the encoder sees (docs/reading.md).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from kosmo.data.images import CLIP_MEAN, CLIP_STD
from kosmo.data.world import World
from kosmo.data.world.signs import GRID
from kosmo.model.load import load_run


def cells(vision, world: World, split: str, n: int, layer: int) -> tuple[torch.Tensor, list[str]]:
    """Every character of the split's first n signs: its cell's feature and the character."""
    signs = [world.sign(i, split) for i in range(n)]
    pixels = torch.from_numpy(np.stack([np.asarray(world.render_sign(s)) for s in signs])).permute(0, 3, 1, 2)
    pixels = (pixels.float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    with torch.no_grad():
        feats = vision.features(pixels, layer)[:, 1:]  # without the class token: one row per cell
    rows, chars = [], []
    for k, s in enumerate(signs):
        for i, char in enumerate(s.text):
            rows.append(feats[k, s.row * GRID + s.col + i])
            chars.append(char)
    return torch.stack(rows), chars


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a CLIP run or a multimodal run whose patches are a quarter of the picture's side")
    p.add_argument("--layer", type=int, default=-2)
    args = p.parse_args()
    torch.manual_seed(0)
    model, _, _ = load_run(args.run)
    vision = model.vision.eval().float()
    size, patch = vision.cfg.image_size, vision.cfg.patch_size
    if size != GRID * patch:
        p.error(f"the encoder's {patch} px patches are not a quarter of its {size} px pictures")
    world = World(seed=0, image_size=size)
    x_train, c_train = cells(vision, world, "train", 3000, args.layer)
    x_val, c_val = cells(vision, world, "val", 600, args.layer)
    alphabet = {c: i for i, c in enumerate(sorted(set(c_train) | set(c_val)))}
    y_train, y_val = (torch.tensor([alphabet[c] for c in cs]) for cs in (c_train, c_val))
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mu) / sd, (x_val - mu) / sd
    probe = torch.nn.Linear(x_train.shape[1], len(alphabet))
    opt = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(300):  # full-batch: a few thousand rows
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        right = probe(x_val).argmax(-1) == y_val
        train_acc = (probe(x_train).argmax(-1) == y_train).float().mean().item()
    digits = torch.tensor([c.isdigit() for c in c_val])
    print(f"layer {args.layer}: {len(alphabet)} characters; train cells {train_acc:.3f}; held-out cells "
          f"{right.float().mean().item():.3f}, their digits {right[digits].float().mean().item():.3f}")


if __name__ == "__main__":
    main()
