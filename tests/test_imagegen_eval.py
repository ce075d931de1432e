"""Tests for judging drawn pictures: the fixed detector, the GenEval-style checks, the shuffled-prompt baseline,
the Fréchet distance and the evaluation report."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from kosmo.cli import main
from kosmo.data.world import CATEGORIES, COLOURS, World, write_drawing
from kosmo.eval.imagegen import (detect, evaluate, frechet_distance, image_features, markdown, satisfied, score,
                                 shuffled, shuffled_score)
from kosmo.model.vision import VisionConfig, VisionTransformer


def _truth(scene):
    return sorted((o.colour, o.shape, o.size, o.row, o.col) for o in scene.objects)


def _found(found):
    return sorted(((f.colour, f.shape, f.size, f.row, f.col) for f in found), key=str)


def _box_blur(img):
    """A 3x3 box blur, edges repeated: roughly what a small VQ-VAE's reconstruction does to edges."""
    a = np.asarray(img, np.float64)
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(p[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3)) / 9
    return Image.fromarray(np.round(out).astype(np.uint8))


def _shift(img, dy, dx):
    """The picture moved by (dy, dx) pixels, the uncovered strip filled with its corner's background."""
    a = np.asarray(img)
    out = np.empty_like(a)
    out[:] = a[0, 0] if dy >= 0 and dx >= 0 else a[-1, -1]
    h, w = a.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = a[max(-dy, 0):h - max(dy, 0),
                                                                   max(-dx, 0):w - max(dx, 0)]
    return Image.fromarray(out)


@pytest.mark.parametrize("size,noise", [(32, 0), (36, 0), (32, 6), (36, 6)])
def test_detector_names_every_object(size, noise):
    world = World(image_size=size, noise=noise)
    for i in range(150):
        scene = world.scene(i, "val")
        picture = world.render(scene)
        found = detect(picture if i % 2 else np.asarray(picture))  # a PIL image or a uint8 array
        assert _found(found) == _truth(scene), i
        assert all(f.iou == 1.0 for f in found) or noise


@pytest.mark.parametrize("size", [32, 36])
def test_detector_survives_blur_and_shift(size):
    world = World(image_size=size)
    hits = total = 0
    for i in range(120):
        scene = world.scene(i, "val")
        picture = world.render(scene)
        truth = set(_truth(scene))
        for seen in (_box_blur(picture), _shift(picture, 1, -1), _shift(_box_blur(picture), -1, 1)):
            hits += len(truth & set(_found(detect(seen))))
            total += len(truth)
    assert hits / total >= 0.95


def test_detector_finds_nothing_in_background_and_noise():
    assert detect(Image.new("RGB", (36, 36), (214, 219, 210))) == []
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
    assert all(f.shape is None for f in detect(noise))
    # a blob no mask fits is an object of unknown shape: it counts as an object but never as a named shape
    a = np.full((36, 36, 3), 215, np.uint8)
    a[2:34, 5:9] = COLOURS["red"]
    (f,) = detect(a)
    assert (f.colour, f.shape, f.size) == ("red", None, None)
    assert satisfied({"objects": [{}], "count": 1}, [f]) and not satisfied({"objects": [{"shape": "square"}],
                                                                            "count": 1}, [f])


@pytest.fixture(scope="module")
def items():
    world = World(image_size=36)
    return world, [world.draw_item(i) for i in range(120)]


def test_items_satisfied_by_their_scene_and_not_by_wrong_pictures(items):
    world, its = items
    blank = Image.new("RGB", (36, 36), (220, 220, 220))
    for it in its:
        assert satisfied(it.spec, detect(world.render(it.scene)), it.category), it
        assert not satisfied(it.spec, detect(blank), it.category), it
        objs = it.scene.objects
        if it.category == "attribute_binding":  # the same shapes and cells with the colours swapped
            a, b = objs
            swapped = replace(it.scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))
            assert not satisfied(it.spec, detect(world.render(swapped)), it.category), it
        if it.category == "position":  # mirrored and flipped: every relation turns round
            turned = replace(it.scene, objects=tuple(replace(o, row=2 - o.row, col=2 - o.col) for o in objs))
            assert not satisfied(it.spec, detect(world.render(turned)), it.category), it
        if it.category == "count":  # one object more of what is counted, or one fewer
            n = it.spec["count"]
            assert not satisfied({**it.spec, "count": n + 1}, detect(world.render(it.scene)))
            assert not satisfied({**it.spec, "count": n - 1}, detect(world.render(it.scene)))
        if it.category == "single_object":  # the right object in the wrong cell, or the wrong size
            (o,) = objs
            moved = replace(o, row=(o.row + 1) % 3)
            smaller = replace(o, size="small" if o.size == "large" else "large")
            for wrong in (moved, smaller):
                assert not satisfied(it.spec, detect(world.render(replace(it.scene, objects=(wrong,)))))


def test_score_and_shuffled_baseline(items):
    world, its = items
    pictures = [world.render(it.scene) for it in its]
    s = score(its, pictures)
    assert s == {"accuracy": 100.0, "by_category": dict.fromkeys(CATEGORIES, 100.0), "n": len(its)}
    lines = [{"category": it.category, "spec": json.loads(json.dumps(it.spec))} for it in its]
    assert score(lines, pictures) == s  # the JSONL lines score as the items do
    mixed = shuffled(its)
    assert [m["category"] for m in mixed] == [it.category for it in its]
    assert all(m["spec"] is not it.spec for m, it in zip(mixed, its))  # a derangement within each category
    base = shuffled_score(its, pictures)
    assert base["accuracy"] < 50
    assert base["by_category"]["single_object"] < 10


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(1.0, 2.0, size=(400, 8))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)

    def exact(n, mean, root):
        """n samples whose mean and covariance are exactly `mean` and root @ root.T."""
        z = rng.normal(size=(n, len(mean)))
        z -= z.mean(0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
        return mean + z @ root.T

    # Covariances sharing their eigenvectors: the trace term is the sum of (sqrt(l_a) - sqrt(l_b))^2.
    q = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    la, lb = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 1.0, 4.0])
    ma, mb = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, -1.0, 2.0, 0.5])
    fa, fb = exact(300, ma, q @ np.diag(np.sqrt(la))), exact(200, mb, q @ np.diag(np.sqrt(lb)))
    closed = ((ma - mb) ** 2).sum() + ((np.sqrt(la) - np.sqrt(lb)) ** 2).sum()
    assert frechet_distance(fa, fb) == pytest.approx(closed, rel=1e-6)
    # fewer samples than dimensions: singular covariances still give a finite distance
    small = frechet_distance(rng.normal(size=(10, 32)), rng.normal(size=(10, 32)))
    assert np.isfinite(small) and small >= 0


def test_evaluate_reports_each_scale_beside_baselines(items):
    world, its = items
    its = its[:24]
    torch.manual_seed(0)
    vision = VisionTransformer(VisionConfig(image_size=36, patch_size=6, dim=32, n_layers=1, n_heads=2, mlp_dim=64))
    feats = image_features(vision, [world.render(it.scene) for it in its[:5]])
    assert feats.shape == (5, 32) and np.isfinite(feats).all()

    def draw(prompts, cfg_scale, seed):  # guidance on: the prompt's own scene; off: a blank background
        assert prompts == [it.prompt for it in its]
        if cfg_scale > 1:
            return [world.render(it.scene) for it in its]
        return [Image.new("RGB", (36, 36), (215, 215, 215))] * len(prompts)

    real = [world.render(world.scene(i, "test")) for i in range(48)]
    report = evaluate(draw, its, (1, 3), real, lambda pics: image_features(vision, pics),
                      references=[world.render(it.scene) for it in its])
    off, on, ref = report["rows"]
    assert (off["pictures"], on["pictures"], ref["pictures"]) == ("cfg 1", "cfg 3", "real")
    assert off["accuracy"] == 0 and on["accuracy"] == ref["accuracy"] == 100
    assert on["shuffled"] < 60 and report["frechet_n"] == 24
    assert off["frechet"] > on["frechet"] > 0 and ref["frechet"] > 0
    table = markdown(report)
    assert table.count("\n") == 4 and "| cfg 3 | 100.0 |" in table


def test_write_drawing_and_cli(tmp_path):
    world = World(image_size=36)
    paths = write_drawing(world, tmp_path, n=12, val=3)
    train = [json.loads(line) for line in paths["draw"].read_text().splitlines()]
    val = [json.loads(line) for line in paths["val_draw"].read_text().splitlines()]
    assert len(train) == 12 and set(train[0]) == {"prompt", "image"}
    assert len(val) == 18 and [v["category"] for v in val[:6]] == list(CATEGORIES)
    for v in val:  # the reference picture of every line satisfies its spec
        assert satisfied(v["spec"], detect(Image.open(tmp_path / v["image"])), v["category"])
    assert main(["world", "--out", str(tmp_path / "w"), "--n", "4", "--draw", "40"]) == 0
    assert len((tmp_path / "w" / "val_draw.jsonl").read_text().splitlines()) == 2 * len(CATEGORIES)
