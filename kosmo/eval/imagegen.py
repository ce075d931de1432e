"""Judging drawn pictures of the shapes world: a fixed detector, GenEval-style checks per category, a
shuffled-prompt baseline, and the Fréchet distance between embedded picture sets.

The detector learns nothing. It reads a picture as the world draws one: every pixel is either background (light,
nearly grey) or one of the world's six colours, possibly blended with the background at an edge (as a VQ-VAE's
reconstruction blurs it). Each colour's connected regions are objects; each is named by the world's own rendering
mask of every shape and size that overlaps it best, aligned at the region's centroid, and placed in the grid cell
under its centre. A region that no mask fits well is an object of unknown shape: it counts as an object, but never
as a circle, square, triangle or cross.

An evaluation item (kosmo.data.world.drawing) holds a prompt, its category and a spec; `satisfied` checks a
spec against what `detect` finds, and `evaluate` draws every prompt through an injected `draw` callable at each
classifier-free guidance scale and reports the accuracy by category beside what pictures get when judged against
another prompt of their category, and the Fréchet distance to held-out real pictures beside that of real to real.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import linalg, ndimage

from kosmo.data.images import preprocess
from kosmo.data.world.drawing import CATEGORIES, DrawItem
from kosmo.data.world.scenes import COLOURS, SHAPES, SIZES, shape_masks
from kosmo.errors import KosmoError

_RGB = np.array(list(COLOURS.values()), dtype=np.float64)  # (6, 3)
_NAMES = list(COLOURS)
MIN_IOU = 0.5        # below this overlap with its best mask, a region's shape is unknown
_MAX_OFF_LINE = 48.0  # RGB distance beyond which a pixel is no blend of the background and any one colour
_SPECK = 0.35         # regions smaller than this share of the world's smallest shape are dropped
# Every mask is also matched blurred by a Gaussian of these widths (in pixels): a decoder's reconstruction blurs
# edges, and a blurred large square is nearer a blurred large square than any sharp mask.
_BLURS = (0.0, 0.8, 1.5)


@dataclass(frozen=True)
class Found:
    """An object the detector found: its colour, its shape and size (None when no mask fits), its grid cell,
    how well the best mask fits (IoU), its area in pixels and its centre (y, x) in pixels."""
    colour: str
    shape: str | None
    size: str | None
    row: int
    col: int
    iou: float
    area: int
    centre: tuple[float, float]

    def matches(self, want: dict[str, Any]) -> bool:
        """Whether this object has every attribute `want` gives (shape, colour, size, row, col)."""
        return all(getattr(self, k) == v for k, v in want.items())


def _pixels(picture) -> np.ndarray:
    arr = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise KosmoError(f"detect: expected an RGB picture (H, W, 3), got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1] or arr.shape[0] < 12:
        raise KosmoError(f"detect: the world's pictures are square and at least 12 pixels a side, got {arr.shape[:2]}")
    return arr.astype(np.float64)


def _background(px: np.ndarray) -> np.ndarray:
    """The picture's background colour: the median of its light, nearly grey pixels (a mid grey if none)."""
    flat = px.reshape(-1, 3)
    grey = flat[(np.ptp(flat, axis=1) < 48) & (flat.mean(axis=1) > 140)]
    return np.median(grey, axis=0) if len(grey) else np.full(3, 215.0)


def colour_map(picture) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pixel's colour index into COLOURS, or -1 for background; the colour whose blend with the background
    it is nearest; and how much of that colour it holds (0 to 1, 0 for a pixel no such blend comes near).

    A pixel p is read as a blend t * colour + (1 - t) * background. For each colour the best t (clipped to [0, 1])
    and the distance of p from that blend are computed; the colour with the nearest blend wins if its t is at
    least one half, so a blurred edge keeps its own colour instead of passing for a neighbouring one (half red
    and half background is nearer orange than red, but lies on red's line).
    """
    px = _pixels(picture)
    bg = _background(px)
    d = _RGB - bg                                   # (6, 3): background towards each colour
    rel = px - bg                                   # (H, W, 3)
    t = np.clip(rel @ d.T / (d * d).sum(1), 0, 1)   # (H, W, 6)
    off = np.linalg.norm(rel[..., None, :] - t[..., None] * d, axis=-1)
    best = off.argmin(-1)
    t_best = np.take_along_axis(t, best[..., None], -1)[..., 0]
    near = off.min(-1) <= _MAX_OFF_LINE
    return np.where(near & (t_best >= 0.5), best, -1), best, np.where(near, t_best, 0.0)


@dataclass(frozen=True)
class _Template:
    shape: str
    size: str
    mask: np.ndarray              # (s, s) float in [0, 1]: the shape drawn in the centre cell, maybe blurred
    centroid: tuple[float, float]
    centre: tuple[float, float]   # the centre cell's centre, (y, x)


_TEMPLATES: dict[int, list[_Template]] = {}


def _templates(s: int) -> list[_Template]:
    if s not in _TEMPLATES:
        masks, c = shape_masks(s), float(round(1.5 * s / 3))
        out = []
        for shape in SHAPES:
            for size in SIZES:
                m = masks[shape, size, 1, 1]
                ys, xs = np.nonzero(m)
                for sigma in _BLURS:
                    soft = ndimage.gaussian_filter(m.astype(np.float64), sigma) if sigma else m.astype(np.float64)
                    out.append(_Template(shape, size, soft, (ys.mean() + 0.5, xs.mean() + 0.5), (c, c)))
        _TEMPLATES[s] = out
    return _TEMPLATES[s]


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    s = mask.shape[0]
    ys, yd = (slice(0, s - dy), slice(dy, s)) if dy >= 0 else (slice(-dy, s), slice(0, s + dy))
    xs, xd = (slice(0, s - dx), slice(dx, s)) if dx >= 0 else (slice(-dx, s), slice(0, s + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _best_mask(cover: np.ndarray, centroid: tuple[float, float]) -> tuple[_Template, float, tuple[int, int]]:
    """The (shape, size) mask with the highest IoU with a region's coverage map, moved so that its centroid
    falls on the region's (give or take a pixel), with its IoU and the move.

    The IoU is the soft one, sum(min) / sum(max) of coverage and mask: a blurred edge pixel counts for the
    share of the colour it holds, so a thin arm blurred to below one half still tells a cross from a
    triangle. On an unblurred picture coverage is 0 or 1 and this is the ordinary IoU."""
    best = (None, -1.0, (0, 0))
    for tpl in _templates(cover.shape[0]):
        y0, x0 = round(centroid[0] - tpl.centroid[0]), round(centroid[1] - tpl.centroid[1])
        for dy in (y0 - 1, y0, y0 + 1):
            for dx in (x0 - 1, x0, x0 + 1):
                m = _shifted(tpl.mask, dy, dx)
                iou = np.minimum(cover, m).sum() / np.maximum(cover, m).sum()
                if iou > best[1]:
                    best = (tpl, float(iou), (dy, dx))
    return best


def detect(picture) -> list[Found]:
    """The objects in a picture of the world (a PIL image or a uint8 (H, W, 3) array, any square size), in
    reading order of their centres."""
    labels, nearest, amount = colour_map(picture)
    s = labels.shape[0]
    cell = s / 3
    speck = _SPECK * min(np.count_nonzero(m) for m in shape_masks(s).values())
    found = []
    for k, name in enumerate(_NAMES):
        regions, n = ndimage.label(labels == k)
        for i in range(1, n + 1):
            region = regions == i
            area = int(np.count_nonzero(region))
            if area < speck:
                continue
            ys, xs = np.nonzero(region)
            centroid = (ys.mean() + 0.5, xs.mean() + 0.5)
            # The region and its fringe: neighbours too faint to be labelled, but nearest this colour's blend.
            fringe = ndimage.binary_dilation(region, iterations=2) & (labels < 0) & (nearest == k)
            tpl, iou, (dy, dx) = _best_mask(np.where(region | fringe, amount, 0.0), centroid)
            if iou >= MIN_IOU:  # the centre the matched shape was drawn around, not its centroid
                centre, shape, size = (tpl.centre[0] + dy, tpl.centre[1] + dx), tpl.shape, tpl.size
            else:
                centre, shape, size = centroid, None, None
            row, col = (min(2, max(0, int(v // cell))) for v in centre)
            found.append(Found(name, shape, size, row, col, round(iou, 4), area, centre))
    return sorted(found, key=lambda f: (f.row, f.col, f.centre))


def _relation_holds(a: Found, b: Found, rel: str) -> bool:
    return {"to the left of": a.col < b.col, "to the right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[rel]


def satisfied(spec: dict[str, Any], found: Sequence[Found], category: str | None = None) -> bool:
    """Whether the objects found in a picture satisfy an evaluation item's spec (GenEval's rules).

    Every spec object must be matched by a different found object having all its attributes (other objects
    may be present too); a spec with "count" instead wants exactly that many found objects matching its
    single object; one with "relation" wants its first object in that relation, by grid cell, to its second.
    `category` is only checked against the spec's form.
    """
    wants = spec["objects"]
    if "count" in spec:
        if len(wants) != 1 or category not in (None, "count"):
            raise KosmoError(f"imagegen: a count spec has one object and the count category, got {spec}")
        return sum(f.matches(wants[0]) for f in found) == spec["count"]
    rel = spec.get("relation")
    if rel is not None and len(wants) != 2:
        raise KosmoError(f"imagegen: a relation is between two objects, got {spec}")
    for chosen in permutations(found, len(wants)):
        if all(f.matches(w) for f, w in zip(chosen, wants)) and (rel is None or _relation_holds(*chosen, rel)):
            return True
    return False


def _fields(item) -> tuple[str, dict[str, Any]]:
    if isinstance(item, DrawItem):
        return item.category, item.spec
    return item["category"], item["spec"]


def score(items: Sequence[DrawItem | dict], pictures: Sequence) -> dict[str, Any]:
    """{"accuracy": % of pictures satisfying their item's spec, "by_category": {category: %}, "n": items}.

    The overall accuracy is the mean of the categories' (GenEval's), so a category's share of items does not weigh
    on it; items are DrawItems or {"category", "spec"} dicts, as in val_draw.jsonl."""
    if len(items) != len(pictures):
        raise KosmoError(f"imagegen: {len(items)} items but {len(pictures)} pictures")
    hits: dict[str, list[bool]] = {}
    for item, picture in zip(items, pictures):
        category, spec = _fields(item)
        hits.setdefault(category, []).append(satisfied(spec, detect(picture), category))
    by = {c: round(100 * float(np.mean(hits[c])), 2) for c in CATEGORIES if c in hits}
    by.update({c: round(100 * float(np.mean(v)), 2) for c, v in hits.items() if c not in by})
    return {"accuracy": round(float(np.mean(list(by.values()))), 2) if by else 0.0, "by_category": by,
            "n": len(items)}


def shuffled(items: Sequence[DrawItem | dict]) -> list[dict[str, Any]]:
    """Each item's category with the spec of the next item of its category (the last takes the first's): a fixed
    derangement within every category with two items or more. A picture judged against it shows the accuracy
    pictures get without following their own prompt."""
    fields = [_fields(it) for it in items]
    by: dict[str, list[int]] = {}
    for i, (c, _) in enumerate(fields):
        by.setdefault(c, []).append(i)
    out: list[dict[str, Any]] = [{}] * len(items)
    for c, idx in by.items():
        for j, i in enumerate(idx):
            out[i] = {"category": c, "spec": fields[idx[(j + 1) % len(idx)]][1]}
    return out


def shuffled_score(items: Sequence[DrawItem | dict], pictures: Sequence) -> dict[str, Any]:
    """score() of the pictures against shuffled(items): the shuffled-prompt baseline."""
    return score(shuffled(items), pictures)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of feature vectors (N, D) (FID's formula):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise KosmoError(f"frechet_distance: need two (N, D) feature sets of one D and N >= 2, got "
                         f"{a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # singular products are expected and handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        # With fewer samples than dimensions the covariances are singular, and so is their product; the root
        # of a singular matrix can come out as inf or nan. A small ridge on both diagonals makes them
        # positive definite and moves the distance by about eps per dimension.
        ridge = eps * np.eye(len(cov_a))
        root = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    # The product of two covariances is similar to a positive semi-definite matrix, so its eigenvalues are real
    # and non-negative and so is the trace of its principal root; an imaginary part is rounding error, largest
    # where eigenvalues are near zero, and is dropped.
    tr_root = float(np.trace(root).real)
    d = mu_a - mu_b
    return max(0.0, float(d @ d + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_root))


@torch.no_grad()
def image_features(vision: torch.nn.Module, pictures: Sequence[Image.Image], batch: int = 128) -> np.ndarray:
    """Pooled features (N, dim) of PIL pictures from a kosmo vision encoder: a VisionTransformer, or anything
    holding one as `.vision` (a CLIP run's image tower), after the encoder's own preprocessing."""
    tower = getattr(vision, "vision", vision)
    size = tower.cfg.image_size
    device = next(tower.parameters()).device
    was_training = tower.training
    tower.eval()
    try:
        out = [tower(torch.stack([preprocess(p, size) for p in pictures[i:i + batch]]).to(device)).float().cpu()
               for i in range(0, len(pictures), batch)]
    finally:
        tower.train(was_training)
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, tower.cfg.dim))


Draw = Callable[[list[str], float, int], list[Image.Image]]


def evaluate(draw: Draw, items: Sequence[DrawItem | dict], scales: Sequence[float] = (1.0, 3.0),
             real_pictures: Sequence[Image.Image] | None = None,
             features: Callable[[Sequence[Image.Image]], np.ndarray] | None = None, *, seed: int = 0,
             references: Sequence[Image.Image] | None = None) -> dict[str, Any]:
    """Draw every item's prompt at each guidance scale and judge the pictures.

    `draw(prompts, cfg_scale, seed)` returns one picture a prompt (scale 1 is guidance off). The report has a row
    per scale: the accuracy overall and by category, the shuffled-prompt baseline's accuracy on the same
    pictures and, given `features` (pictures -> (N, D) array, e.g. image_features with an encoder bound) and
    held-out `real_pictures`, the Fréchet distance between the drawn pictures and a first half of the real ones.
    A last row holds the real-vs-real distance (the second half against the first, the same number of
    pictures) and, given `references` (the items' own scenes rendered), their accuracy: what a perfect drawer
    scores under this detector.
    """
    prompts = [it.prompt if isinstance(it, DrawItem) else it["prompt"] for it in items]
    m = 0
    if features is not None and real_pictures is not None:
        m = min(len(prompts), len(real_pictures) // 2)
        if m < 2:
            raise KosmoError(f"imagegen: the Fréchet distance needs at least 4 real pictures, "
                             f"got {len(real_pictures)}")
        real = features(list(real_pictures[:2 * m]))
        real_a, real_b = real[:m], real[m:]
    categories = [c for c in CATEGORIES if any(_fields(it)[0] == c for it in items)]

    def row(name: str, pictures: Sequence[Image.Image] | None, fid: float | None) -> dict[str, Any]:
        r: dict[str, Any] = {"pictures": name}
        if pictures is not None:
            s = score(items, pictures)
            r.update({"accuracy": s["accuracy"], **s["by_category"],
                      "shuffled": shuffled_score(items, pictures)["accuracy"]})
        else:
            r.update({"accuracy": None, **dict.fromkeys(categories), "shuffled": None})
        r["frechet"] = None if fid is None else round(fid, 4)
        return r

    rows = []
    for scale in scales:
        pictures = draw(list(prompts), float(scale), seed)
        if len(pictures) != len(prompts):
            raise KosmoError(f"imagegen: draw returned {len(pictures)} pictures for {len(prompts)} prompts")
        fid = frechet_distance(features(list(pictures[:m])), real_a) if m else None
        rows.append(row(f"cfg {scale:g}", pictures, fid))
    if references is not None or m:
        rows.append(row("real", references, frechet_distance(real_b, real_a) if m else None))
    return {"n": len(prompts), "frechet_n": m, "columns": ["pictures", "accuracy", *categories, "shuffled", "frechet"],
            "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    """evaluate()'s report as a markdown table."""
    cols = report["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def read_items(path: str | Path, limit: int | None = None) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The items of a val_draw.jsonl file ({"prompt", "category", "spec"}, and optionally "image", a real picture
    that satisfies the spec), and those real pictures."""
    from kosmo.data.images import open_image
    from kosmo.data.jsonl import read_jsonl
    path = Path(path)
    items, real = [], []
    for lineno, obj in read_jsonl(path):
        if limit is not None and len(items) >= limit:
            break
        if not (isinstance(obj.get("prompt"), str) and obj.get("category") in CATEGORIES
                and isinstance(obj.get("spec"), dict) and isinstance(obj["spec"].get("objects"), list)):
            raise KosmoError(f"{path}:{lineno}: an imagegen line needs 'prompt' (a string), 'category' (one of "
                             f"{', '.join(CATEGORIES)}) and 'spec' ({{'objects': [...]}})")
        items.append(obj)
        if isinstance(obj.get("image"), str):
            real.append(open_image(path.parent / obj["image"]))
    if not items:
        raise KosmoError(f"{path}: no imagegen items")
    return items, real


def evaluate_run(model, tokenizer, path: str | Path, limit: int | None = None, scales: Sequence[float] = (1.0, 3.0),
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0, batch: int = 64) -> dict[str, Any]:
    """`evaluate` for a model that draws, on a val_draw.jsonl file: its pictures are drawn by `kosmo.draw` in
    batches, and embedded for the Fréchet distance by the model's own image encoder (kosmo's CLIP tower). The
    real pictures are the items' own, when the file names them."""
    from kosmo.draw import DrawSampling, check_can_draw, draw
    try:
        check_can_draw(model)
    except ValueError as e:
        raise KosmoError(str(e)) from None
    items, real = read_items(path, limit)

    def drawn(prompts: list[str], scale: float, seed: int) -> list[Image.Image]:
        return [p for i in range(0, len(prompts), batch) for p in draw(
            model, tokenizer, prompts[i:i + batch],
            DrawSampling(cfg=scale, temperature=temperature, top_k=top_k, seed=seed + i))]

    report = evaluate(drawn, items, scales, real or None, lambda pics: image_features(model.vision, pics),
                      seed=seed, references=real if len(real) == len(items) else None)
    return {**report, "temperature": temperature, "top_k": top_k}
