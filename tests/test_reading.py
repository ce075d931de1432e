"""Reading text in pictures: signs set in a real font, their questions, held-out text, and the evaluation."""
import json

import numpy as np
import pytest
import torch
from conftest import kosmo

from kosmo.data.world import SIGN_KINDS, WORDS, World, font_path, fonts, write_signs
from kosmo.data.world import signs as signs_module
from kosmo.errors import KosmoError


@pytest.fixture(scope="module")
def world():
    return World(seed=0, image_size=48)


def test_a_sign_is_its_text_in_the_font_a_character_to_a_cell(world):
    from PIL import Image, ImageDraw, ImageFont
    sign = next(s for s in map(world.sign, range(30)) if s.kind == "price")
    pixels = np.asarray(world.render_sign(sign))
    plate, ink = signs_module.PLATES[sign.plate]
    cell = 48 // signs_module.GRID
    font = ImageFont.truetype(str(font_path(sign.bold)), sign.font_size)
    for i, char in enumerate(sign.text):
        top, left = sign.row * cell, (sign.col + i) * cell
        # the cell drawn by hand: the character from the font file at the cell's centre plus the sign's shift
        own = Image.new("RGB", (cell, cell), plate)
        ImageDraw.Draw(own).text((cell // 2 + sign.shift[0], cell // 2 + sign.shift[1]), char, font=font,
                                 fill=ink, anchor="mm")
        assert (pixels[top:top + cell, left:left + cell] == np.asarray(own)).all()
        assert (np.asarray(own) == ink).all(-1).sum() >= 5  # solid ink inside the glyph
    # beyond the plate's cells (and the pixel or two a tall glyph such as "$" reaches past them) is background
    outside = np.ones((48, 48), bool)
    outside[max(0, sign.row * cell - 2):(sign.row + 1) * cell + 2,
            max(0, sign.col * cell - 2):(sign.col + len(sign.text)) * cell + 2] = False
    assert (pixels[outside] == sign.background).all()
    # another text at the same place and size draws other pixels
    swapped = signs_module.Sign(sign.kind, "$11" if sign.text != "$11" else "$88", sign.plate, sign.background,
                                sign.row, sign.col, sign.shift, sign.font_size, sign.bold)
    assert (np.asarray(world.render_sign(swapped)) != pixels).any()


def test_signs_are_deterministic_and_fit_the_grid():
    a, b = World(seed=3, image_size=48), World(seed=3, image_size=48)
    for i in range(30):
        sa, sb = a.sign(i, "val"), b.sign(i, "val")
        assert sa == sb and a.render_sign(sa).tobytes() == b.render_sign(sb).tobytes()
        assert sa.kind == SIGN_KINDS[i % 3] and 0 <= sa.col <= signs_module.GRID - len(sa.text)
    assert [World(seed=4, image_size=48).sign(i) for i in range(10)] != [a.sign(i) for i in range(10)]


def test_heldout_numbers_never_appear_in_training_and_every_digit_does(world):
    train = {s.text.lstrip("$") for s in map(world.sign, range(1500)) if s.kind != "word"}
    val = {s.text.lstrip("$") for s in (world.sign(i, "val") for i in range(300)) if s.kind != "word"}
    assert val and val <= world.heldout_numbers and not train & world.heldout_numbers
    assert len(world.heldout_numbers) == 18
    for place in range(2):
        assert {n[place] for n in train} == {n[place] for n in world.heldout_numbers} | {n[place] for n in train}
    assert {world.sign(i).text for i in range(0, 300, 3)} <= set(WORDS)


def test_longer_training_numbers_never_hold_a_heldout_one():
    world = World(seed=0, image_size=48, sign_digits=4)
    train = [s.text.lstrip("$") for s in map(world.sign, range(1500)) if s.kind != "word"]
    assert {len(n) for n in train} == {2, 3, 4} and len(set(train)) > 500  # too many to learn as wholes
    assert not any(n[i:i + 2] in world.heldout_numbers for n in train for i in range(len(n) - 1))
    prices = [s for s in map(world.sign, range(2, 1500, 3))]
    assert max(len(s.text) for s in prices) == signs_module.GRID and all(s.text[1] != "0" for s in prices)
    # held-out pictures are those of the default world: the option changes training alone
    default = World(seed=0, image_size=48)
    assert [world.sign(i, "val") for i in range(30)] == [default.sign(i, "val") for i in range(30)]
    with pytest.raises(KosmoError, match="sign_digits must be 2 to 4"):
        World(seed=0, image_size=48, sign_digits=5)


def test_files_agree_with_the_rendered_text(world, tmp_path):
    paths = write_signs(world, tmp_path, n=12, val=6)
    for key, split in (("signs", "train"), ("val_signs", "val")):
        caps = [json.loads(line) for line in paths[key].open()]
        vqa = [json.loads(line) for line in paths[f"{key}_vqa"].open()]
        for i, (cap, q) in enumerate(zip(caps, vqa)):
            sign = world.sign(i, split)
            assert cap["image"] == q["image"] == f"images/{sign.id}.png"
            assert (tmp_path / q["image"]).is_file()
            assert q["answers"][0] == sign.text and q["qtype"] == sign.kind
            assert all(sign.text in c for c in cap["captions"])


def test_a_missing_font_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(fonts, "FONT_DIRS", ("/nonexistent",))
    monkeypatch.setattr(fonts.shutil, "which", lambda name: None)
    fonts.clear_cache()
    fresh = World(seed=0, image_size=48)
    try:
        with pytest.raises(KosmoError, match="fonts-dejavu-core"):
            fresh.render_sign(fresh.sign(0))
    finally:
        fonts.clear_cache()


def test_a_picture_too_small_for_text_is_refused(tmp_path):
    with pytest.raises(KosmoError, match="image_size"):
        World(seed=0, image_size=32).sign(0)
    proc = kosmo("world", "--out", tmp_path, "--n", 5, "--signs", 3, check=False)  # the default 32 px
    assert proc.returncode != 0 and "image_size must be at least 40" in proc.stderr
    assert not (tmp_path / "text.jsonl").exists()  # refused before writing anything


def test_reading_evaluation_runs_on_a_random_model(world, tmp_path):
    from kosmo.eval.vision import evaluate
    from kosmo.model.lm import LMConfig
    from kosmo.model.mllm import MLLM, MLLMConfig
    from kosmo.model.vision import VisionConfig
    from kosmo.tokenizer import Tokenizer
    paths = write_signs(world, tmp_path, n=3, val=9)
    tok = Tokenizer.train([], vocab_size=272)  # bytes alone: a number is spelled digit by digit
    torch.manual_seed(0)
    model = MLLM(MLLMConfig(vision=VisionConfig(image_size=48, patch_size=16, dim=32, n_layers=2, n_heads=2,
                                                mlp_dim=64),
                            lm=LMConfig(vocab_size=272, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                        max_seq_len=128))).eval()
    result = evaluate("vqa", model, tok, paths["val_signs_vqa"])
    assert result["n"] == 9 and set(result["by_type"]) == set(SIGN_KINDS)
    assert 0 <= result["vqa_accuracy"] <= 100 and "vqa_accuracy" in result["blind"]


def test_sign_digits_without_signs_is_refused(tmp_path, capsys):
    from kosmo.cli import main
    assert main(["world", "--out", str(tmp_path / "w"), "--n", "4", "--sign-digits", "3"]) == 2
    assert "--sign-digits shapes the signs' numbers: give it with --signs N" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
