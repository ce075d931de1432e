"""Training the image tokenizer: a VQ-VAE that turns pictures into grids of codes and back.

    kosmo train vqvae --data data/captions.jsonl --out runs/vqvae --config configs/vqvae_shapes.yaml \
        val_data=data/val_captions.jsonl

Any JSONL whose lines hold an "image" path (relative to the file) will do; other fields are ignored, and a
picture named twice is trained on once per epoch. The loss per picture is the mean squared error of the
reconstruction in kosmo's normalised pixel space, plus `l1` times the mean absolute error, plus the
commitment loss. Each step logs the batch's PSNR, the perplexity of its codes and the share of the codebook
it used. After training, `report` measures the held-out pictures with `kosmo.eval.vqvae.reconstruction`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kosmo.data.multimodal import ImageBank
from kosmo.errors import KosmoError
from kosmo.eval.vqvae import image_paths, perplexity, psnr, reconstruction, to_255
from kosmo.model.vqvae import VQVAE, VQVAEConfig
from kosmo.train.trainer import TrainConfig

reads_text = False  # the run's tokenizer.json is trained on no text: a VQ-VAE has none to read


@dataclass
class StageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    model: dict = field(default_factory=dict)  # VQVAEConfig's fields, e.g. model.codebook_size=128
    l1: float = 0.0             # weight of the mean absolute error beside the squared error
    image_mode: str = "crop"
    val_data: str = ""          # a JSONL file of held-out pictures; else the last val_fraction of the pictures
    val_fraction: float = 0.05
    vocab_size: int = 512       # only for the run's tokenizer.json, which a VQ-VAE does not use


class Pictures:
    """Pictures by path for the trainer, decoded once into a shared ImageBank."""

    def __init__(self, paths: list[str], bank: ImageBank, mode: str):
        self.paths = [p for p in paths if p in bank]
        self.bank, self.mode = bank, mode

    def __len__(self) -> int:
        return len(self.paths)

    def collate(self, indices: list[int]) -> dict:
        return {"images": self.bank.get([self.paths[i] for i in indices]), "n_targets": len(indices)}


def make_loss(l1: float):
    def vqvae_loss(model, batch) -> tuple[torch.Tensor, dict]:
        """Summed over the batch's pictures; the trainer divides by their number."""
        pixels = batch["images"]
        recon, stats = model(pixels)
        err = recon.float() - pixels
        per_picture = err.pow(2).mean((1, 2, 3)) + l1 * err.abs().mean((1, 2, 3))
        loss = per_picture.sum() + stats["commitment"] * pixels.shape[0]
        with torch.no_grad():
            mse_255 = float((to_255(recon) - to_255(pixels)).pow(2).mean())
            counts = stats["counts"]
        return loss, {"psnr": psnr(mse_255), "commitment": float(stats["commitment"].detach()),
                      "perplexity": perplexity(counts), "codes_used": float((counts > 0).float().mean())}
    return vqvae_loss


def build(cfg: StageConfig, data: list, tokenizer, init_model=None):
    if init_model is not None and not isinstance(init_model, VQVAE):
        raise KosmoError("--init for vqvae must be a vqvae run")
    try:
        model = init_model or VQVAE(VQVAEConfig(**cfg.model))
    except (TypeError, ValueError) as e:
        raise KosmoError(f"invalid config: {e}") from None
    paths = list(dict.fromkeys(p for path in data for p in image_paths(path)))
    if cfg.val_data:
        train_paths, val_paths = paths, image_paths(cfg.val_data)
    else:
        n_val = int(len(paths) * cfg.val_fraction)
        train_paths, val_paths = paths[: len(paths) - n_val], paths[len(paths) - n_val:]
    bank = ImageBank(train_paths + val_paths, model.cfg.image_size, cfg.image_mode)
    for _, message in bank.skipped[:5]:
        print(f"skipped image: {message}", flush=True)
    train = Pictures(train_paths, bank, cfg.image_mode)
    if not len(train):
        raise KosmoError("no readable pictures in the training data")
    val = Pictures(val_paths, bank, cfg.image_mode) if val_paths else None
    return model, make_loss(cfg.l1), train, val if val and len(val) else None


def report(model, train_set: Pictures, eval_set: Pictures | None) -> dict:
    """The held-out figures of `kosmo eval vqvae`, and the PSNR on the first 256 training pictures beside
    them, which tells a tokenizer that has not learned from one that does not generalise."""
    out = {"train_psnr": reconstruction(model, train_set.paths[:256], mode=train_set.mode)["psnr"]}
    if eval_set:
        out.update({f"val_{k}": v for k, v in reconstruction(model, eval_set.paths, mode=eval_set.mode).items()})
    return out
