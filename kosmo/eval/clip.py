"""CLIP evaluation: zero-shot classification by text prompts, and image-text retrieval R@1/R@5."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kosmo.data.images import load_images
from kosmo.data.jsonl import read_jsonl
from kosmo.errors import KosmoError
from kosmo.tokenizer import BOS, EOS, PAD


def _text_ids(tok, texts: list[str], max_len: int) -> torch.Tensor:
    rows = [[BOS, *tok.encode(t)[: max_len - 2], EOS] for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids


@torch.no_grad()
def _embed(model, tok, image_paths: list[str], texts: list[str], batch: int = 256):
    """Unit image and text embeddings, on the CPU whatever device the model is on."""
    size, device = model.cfg.vision.image_size, next(model.parameters()).device
    imgs, txts = [], []
    for s in range(0, len(image_paths), batch):
        pixels, _, skipped = load_images(image_paths[s:s + batch], size)
        if skipped:
            raise KosmoError(skipped[0][1])
        imgs.append(F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1).cpu())
    for s in range(0, len(texts), batch):
        ids = _text_ids(tok, texts[s:s + batch], model.cfg.text.max_len).to(device)
        txts.append(F.normalize(model.encode_text(ids).float(), dim=-1).cpu())
    return torch.cat(imgs), torch.cat(txts)


def zeroshot(model, tok, path, template: str = "a picture of a {}.") -> dict:
    """Accuracy of picking each image's `label` among all labels of the file, by prompt similarity."""
    path = Path(path)
    images, labels = [], []
    for n, obj in read_jsonl(path):
        if not isinstance(obj.get("image"), str) or not isinstance(obj.get("label"), str):
            raise KosmoError(f"{path}:{n}: a zero-shot line needs 'image' and 'label'")
        images.append(str((path.parent / obj["image"]).resolve()))
        labels.append(obj["label"])
    classes = sorted(set(labels))
    img, txt = _embed(model, tok, images, [template.format(c) for c in classes])
    pred = (img @ txt.T).argmax(-1)
    target = torch.tensor([classes.index(label) for label in labels])
    return {"zeroshot_accuracy": round(100 * float((pred == target).float().mean()), 2),
            "classes": len(classes), "chance": round(100 / len(classes), 2), "n": len(labels)}


def retrieval(model, tok, path) -> dict:
    """Image->text and text->image recall at 1 and 5, with each image's first caption."""
    path = Path(path)
    images, texts = [], []
    for n, obj in read_jsonl(path):
        caps = obj.get("captions") or [obj.get("text")]
        if not isinstance(obj.get("image"), str) or not isinstance(caps[0], str):
            raise KosmoError(f"{path}:{n}: a retrieval line needs 'image' and 'text' or 'captions'")
        images.append(str((path.parent / obj["image"]).resolve()))
        texts.append(caps[0])
    img, txt = _embed(model, tok, images, texts)
    sim = img @ txt.T
    truth = torch.arange(len(images))

    def recall(s, k):
        return round(100 * float((s.topk(min(k, s.shape[1]), dim=-1).indices == truth[:, None]).any(-1).float().mean()), 2)
    return {"i2t_r1": recall(sim, 1), "i2t_r5": recall(sim, 5), "t2i_r1": recall(sim.T, 1),
            "t2i_r5": recall(sim.T, 5), "n": len(images)}
