"""How well an image tokenizer (a VQ-VAE run) keeps pictures: PSNR of its reconstructions, and how much of
its codebook the pictures use.

    kosmo eval vqvae --model runs/vqvae --data data/val_captions.jsonl

PSNR is measured as a viewer sees the picture: both sides denormalised to 0..255, clamped and rounded, one
mean squared error over every pixel and channel of the set, 10 log10(255^2 / MSE). `codes_used` is the share
of the codebook that occurs at least once on the set, `perplexity` exp(entropy) of the codes' frequencies:
K when every code is equally common, 1 when one code is all there is.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kosmo.data.images import CLIP_MEAN, CLIP_STD, load_images
from kosmo.data.jsonl import read_jsonl
from kosmo.errors import KosmoError


def to_255(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised (B, 3, H, W) -> float 0..255 as a saved picture would hold them (clamped, rounded)."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() * std + mean).clamp(0, 1).mul(255).round()


def psnr(mse: float) -> float:
    """dB for a mean squared error on 0..255 pixels."""
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the distribution given by `counts`."""
    p = counts.double() / counts.sum().clamp(min=1)
    return math.exp(-float((p[p > 0] * p[p > 0].log()).sum()))


def image_paths(source, limit: int | None = None) -> list[str]:
    """A JSONL file's "image" paths (relative to the file), or a list of paths as given; repeats dropped."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        paths = []
        for lineno, obj in read_jsonl(path):
            if not isinstance(obj.get("image"), str):
                raise KosmoError(f"{path}:{lineno}: a line needs 'image' (a path)")
            paths.append(str((path.parent / obj["image"]).resolve()))
    else:
        paths = [str(p) for p in source]
    paths = list(dict.fromkeys(paths))
    return paths[:limit] if limit else paths


@torch.no_grad()
def reconstruction(model, paths_or_jsonl, limit: int | None = None, mode: str = "crop", batch_size: int = 64) -> dict:
    """{"psnr", "codes_used", "perplexity", "n"} of `model` on the pictures of a JSONL file or a list of paths,
    preprocessed as `mode` says (`kosmo.data.images.preprocess`)."""
    paths = image_paths(paths_or_jsonl, limit)
    if not paths:
        raise KosmoError(f"{paths_or_jsonl}: no pictures to evaluate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sq_err, n_values, n = 0.0, 0, 0
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    try:
        for s in range(0, len(paths), batch_size):
            pixels, _, skipped = load_images(paths[s:s + batch_size], model.cfg.image_size, mode)
            if skipped:
                raise KosmoError(skipped[0][1])
            pixels = pixels.to(device)
            codes = model.encode(pixels)
            recon = model.decode(codes)
            diff = to_255(recon) - to_255(pixels)
            sq_err += float(diff.pow(2).sum())
            n_values += diff.numel()
            n += pixels.shape[0]
            counts += torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size)
    finally:
        model.train(was_training)
    return {"psnr": round(psnr(sq_err / n_values), 3), "codes_used": round(float((counts > 0).float().mean()), 4),
            "perplexity": round(perplexity(counts), 2), "n": n}
