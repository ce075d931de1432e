"""Mockups turned into HTML: the mockup world, its canonical pages, and their judge in headless Chromium."""
import json
import shutil

import numpy as np
import pytest

from kosmo.cli import main
from kosmo.data.world import fonts
from kosmo.data.world import mockups as M
from kosmo.errors import KosmoError
from kosmo.eval import html as H

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test does)")


def _with_action(action: str) -> M.Mockup:
    """The first validation mockup whose one button with an action does `action`."""
    return next(m for m in (M.mockup(0, "val", i) for i in range(200))
                if [e.action for e in m.elements if e.action] == [action])


def test_mockups_are_pure_functions_of_seed_split_and_index():
    a, b = M.mockup(3, "train", 7), M.mockup(3, "train", 7)
    assert a == b and a.html() == b.html()
    assert M.render_mockup(a).tobytes() == M.render_mockup(b).tobytes()
    assert M.mockup(3, "val", 7) != a and M.mockup(4, "train", 7) != a
    for i in range(100):
        m = M.mockup(0, "train", i)
        assert 3 <= len(m.elements) <= 6 and m.elements[0].type == "header"
        cells = [(e.row, c) for e in m.elements for c in range(e.col, e.col + e.span)]
        assert len(cells) == len(set(cells))  # no two elements share a cell
        types = {e.type for e in m.elements}
        assert all(e.action in (None, "joke", "count") or {"clear": "input", "hide": "image"}[e.action] in types
                   for e in m.elements)
        assert not M.held_out(m.html()) and M.held_out(M.mockup(0, "val", i).html())  # no page is in both


def test_mockup_is_sketched_with_the_dejavu_font(monkeypatch, tmp_path):
    m = M.mockup(0, "train", 0)
    picture = M.render_mockup(m, 128)
    assert picture.size == (128, 128) and picture.mode == "RGB"
    assert len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 20  # text is antialiased: many shades of ink on paper
    fonts.clear_cache()
    monkeypatch.setattr(fonts, "FONT_DIRS", (str(tmp_path),))
    monkeypatch.setattr(fonts.shutil, "which", lambda name: None)
    try:
        with pytest.raises(KosmoError, match=r"DejaVuSans.*fonts-dejavu-core"):
            M.render_mockup(m, 128)
    finally:
        fonts.clear_cache()


def test_parse_error_names_what_is_wrong():
    assert H.parse_error(M.mockup(0, "val", 0).html()) is None
    assert H.parse_error('<main><img style="x"><input placeholder="a"></main>') is None
    assert "never closed" in H.parse_error("<main><h1>Shop</h1>")
    assert H.parse_error("<main><ul><li>tea</ul></main>") == "</ul> before </li>"
    assert H.parse_error("</main>") == "</main> closes nothing"
    assert "outside <main>" in H.parse_error("<main></main><h1>x</h1>")
    assert H.parse_error("hello") == "text outside <main>"
    assert H.parse_error("") == "no <main>"


def test_world_writes_mockup_chats_and_their_ground_truth(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path), "--n", "4", "--mockups", "20"]) == 0
    train = [json.loads(line) for line in (tmp_path / "mockups.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "val_mockups.jsonl").read_text().splitlines()]
    assert len(train) == 20 and len(val) == 2
    user, assistant = train[0]["messages"]
    assert user["content"][0]["text"] == M.PROMPT and (tmp_path / user["content"][1]["image"]).is_file()
    assert assistant["content"] == M.mockup(0, "train", 0).html()
    assert val[1]["html"] == M.mockup(0, "val", 1).html() and val[1]["spec"] == M.mockup(0, "val", 1).spec()
    assert main(["world", "--out", str(tmp_path), "--n", "4", "--mockups", "5", "--mockup-size", "32"]) == 2
    assert "--mockup-size must be at least 64" in capsys.readouterr().err


@pytest.fixture(scope="class")
def browser():
    """One browser for a class's tests: Playwright's sync API runs one at a time in a thread, and the tests
    outside the class launch their own."""
    with H.Browser() as b:
        yield b


@needs_chromium
class TestJudge:
    """Pages judged against their mockups' specs in one browser."""

    def test_canonical_pages_score_perfectly_and_their_boxes_are_chromiums(self, browser):
        """The oracle: each canonical page, every action among them, renders every element where the spec says."""
        shown = [M.mockup(0, "val", i) for i in range(3)] + [_with_action(a) for a in M.ACTIONS]
        result = H.score([{"spec": m.spec()} for m in shown], [m.html() for m in shown], browser)
        assert result["ok"] == result["parses"] == 100.0 and result["buttons_working"] == 100.0
        assert result["buttons"] >= len(M.ACTIONS)
        assert all(item["iou"] > 0.998 and item["extra"] == 0 for item in result["items"])


    def test_broken_pages_score_accordingly(self, browser):
        m = _with_action("hide")
        spec, page = m.spec(), m.html()
        button = next(e for e in m.elements if e.action == "hide")
        moved = button.html().replace(f"grid-area:{button.row}/", f"grid-area:{button.row % 4 + 1}/")
        assert moved != button.html()
        cases = {
            "missing": page.replace(button.html(), ""),
            "wrong_text": page.replace(f">{button.text}<", ">Nope<"),
            "moved": page.replace(button.html(), moved),
            "no_action": page.replace(' data-action="hide"', ""),
            "wrong_action": page.replace(' data-action="hide"', ' data-action="joke"'),
            "unclosed": page.replace("</main>", ""),
            "garbage": "Here is your page: lorem <<>> ipsum",
        }
        r = {k: browser.check(p, spec) for k, p in cases.items()}
        n = len(m.elements)
        assert r["missing"]["parses"] and not r["missing"]["ok"] and r["missing"]["buttons"] == [False]
        assert r["missing"]["missing"] == [f"button {button.text!r}"]
        assert abs(r["missing"]["iou"] - (n - 1) / n) < 0.01
        assert not r["wrong_text"]["ok"] and r["wrong_text"]["extra"] == 1
        assert r["moved"]["ok"] and r["moved"]["iou"] < (n - 0.9) / n
        assert r["no_action"]["ok"] and r["no_action"]["buttons"] == [False]
        assert r["wrong_action"]["buttons"] == [False]
        # Chromium closes the <main> itself, so every element is there; the page still fails to parse
        assert not r["unclosed"]["parses"] and not r["unclosed"]["ok"] and r["unclosed"]["present"] == n
        assert r["garbage"] == {**r["garbage"], "parses": False, "ok": False, "present": 0, "iou": 0.0}


@needs_chromium
def test_eval_html_judges_a_file_of_pages_and_writes_screenshots(tmp_path, capsys):
    from kosmo.data.world import write_mockups
    data = write_mockups(tmp_path, n=0, val=2)["val_mockups"]
    (tmp_path / "pages.jsonl").write_text(json.dumps({"html": "<main></main>"}) + "\n"
                                          + data.read_text().splitlines()[1] + "\n")
    assert main(["eval", "html", "--data", str(data), "--pages", str(tmp_path / "pages.jsonl"),
                 "--screenshots", str(tmp_path / "shots")]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["n"] == 2 and result["ok"] == 50.0 and result["items"][0]["present"] == 0
    assert sorted(p.name for p in (tmp_path / "shots").iterdir()) == ["page-0.png", "page-1.png"]
    (tmp_path / "short.jsonl").write_text(json.dumps({"html": "<main></main>"}) + "\n")
    assert main(["eval", "html", "--data", str(data), "--pages", str(tmp_path / "short.jsonl")]) == 2
    assert "short.jsonl: 1 pages for 2 mockups" in capsys.readouterr().err
    assert main(["eval", "html", "--data", str(data)]) == 2
    assert "needs --model (or --pages)" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [], "image": "a.png"}) + "\n")
    assert main(["eval", "html", "--data", str(tmp_path / "bad.jsonl"), "--pages", str(data)]) == 2
    assert "bad.jsonl:1: a mockup line needs 'spec'" in capsys.readouterr().err


@needs_chromium
def test_eval_html_generates_pages_with_a_model(tmp_path, capsys):
    import torch

    from kosmo.data.world import World, write_mockups
    from kosmo.model.lm import LMConfig
    from kosmo.model.load import save_run
    from kosmo.model.mllm import MLLM, MLLMConfig
    from kosmo.model.vision import VisionConfig
    from kosmo.tokenizer import Tokenizer

    data = write_mockups(tmp_path, n=0, val=2)["val_mockups"]
    tok = Tokenizer.train((World().text(i, "train") for i in range(200)), vocab_size=300)
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                 max_seq_len=96))
    save_run(tmp_path / "run", MLLM(cfg), tok, {"stage": "test", "arch": "mllm", "model": cfg.to_dict()})
    assert main(["eval", "html", "--model", str(tmp_path / "run"), "--data", str(data), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["n"] == 2 and result["ok"] == 0.0 and set(result["blind"]) >= {"ok", "mean_iou"}
    assert all(isinstance(item["page"], str) for item in result["items"])
