"""CLIP contrastive pretraining of an image tower and a text tower on image-caption pairs.

    kosmo train clip --data captions.jsonl --out runs/clip vision.dim=128 vision.patch_size=8

Every caption of an image (the `captions` list, else `text`) makes a pair. Under DDP each process
contrasts its own batch (no all-gather of embeddings), as in small-scale CLIP training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kosmo.data.formats import parse_source, read_records
from kosmo.data.images import EncodedImage
from kosmo.data.multimodal import ImageBank
from kosmo.errors import KosmoError
from kosmo.model.clip import CLIP, CLIPConfig, TextConfig, clip_loss
from kosmo.model.vision import VisionConfig
from kosmo.tokenizer import BOS, EOS, PAD
from kosmo.train.trainer import TrainConfig


@dataclass
class StageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    vision: dict = field(default_factory=lambda: {"image_size": 32, "patch_size": 8, "dim": 128, "n_layers": 4,
                                                  "n_heads": 4, "mlp_dim": 512})
    text: dict = field(default_factory=lambda: {"max_len": 48, "dim": 128, "n_layers": 3, "n_heads": 4,
                                                "mlp_dim": 512})
    embed_dim: int = 128
    image_mode: str = "crop"
    val_fraction: float = 0.02
    vocab_size: int = 4096


class Pairs:
    """(image, caption) pairs for the trainer: one row per caption, images decoded once."""

    def __init__(self, pairs: list[tuple[str, list[int]]], bank: ImageBank):
        self.pairs = [(p, ids) for p, ids in pairs if p in bank]
        self.bank = bank

    def __len__(self) -> int:
        return len(self.pairs)

    def collate(self, indices: list[int]) -> dict:
        rows = [self.pairs[i] for i in indices]
        ids = torch.full((len(rows), max(len(r[1]) for r in rows)), PAD, dtype=torch.long)
        for r, (_, toks) in enumerate(rows):
            ids[r, : len(toks)] = torch.tensor(toks)
        return {"images": self.bank.get([r[0] for r in rows]), "ids": ids, "n_targets": len(rows)}


def read_pairs(paths: list, tokenizer, max_len: int) -> list[tuple[str, list[int]]]:
    pairs = []
    for spec in paths:
        base = parse_source(spec).images
        for where, obj in read_records(spec):
            caps = obj.get("captions") or ([obj["text"]] if "text" in obj else [])
            image = obj.get("image")
            if not isinstance(image, (str, EncodedImage)) or not caps or not all(isinstance(c, str) for c in caps):
                raise KosmoError(f"{where}: a caption line needs 'image' (a path) and 'text' or 'captions' (strings)")
            image = image if isinstance(image, EncodedImage) else str((base / image).resolve())
            for cap in caps:
                pairs.append((image, [BOS, *tokenizer.encode(cap)[: max_len - 2], EOS]))
    if not pairs:
        raise KosmoError("no image-caption pairs in the data")
    return pairs


def contrastive_loss(model, batch) -> tuple[torch.Tensor, dict]:
    logits, _ = model(batch["images"], batch["ids"])
    n = logits.shape[0]
    acc = (logits.argmax(-1) == torch.arange(n, device=logits.device)).float().mean()
    return clip_loss(logits.float()) * n, {"i2t_acc": float(acc)}


def build(cfg: StageConfig, data: list, tokenizer, init_model=None):
    if init_model is not None and not isinstance(init_model, CLIP):
        raise KosmoError("--init for clip must be a CLIP run")
    try:
        model = init_model or CLIP(CLIPConfig(
            vision=VisionConfig(**cfg.vision), embed_dim=cfg.embed_dim,
            text=TextConfig(**{**cfg.text, "vocab_size": tokenizer.vocab_size, "eos_token_id": EOS})))
    except (TypeError, ValueError) as e:
        raise KosmoError(f"invalid config: {e}") from None
    pairs = read_pairs(data, tokenizer, model.cfg.text.max_len)
    bank = ImageBank([p for p, _ in pairs], model.cfg.vision.image_size, cfg.image_mode)
    for _, message in bank.skipped[:5]:
        print(f"skipped image: {message}", flush=True)
    n_val = int(len(pairs) * cfg.val_fraction)
    train = Pairs(pairs[: len(pairs) - n_val], bank)
    val = Pairs(pairs[len(pairs) - n_val:], bank) if n_val else None
    return model, contrastive_loss, train, val
