"""A user's own images (any size, any format) through the documented commands: CLIP, LM, KOSMOS-1
pretraining, SFT and evaluation."""

import json

import pytest
from PIL import Image

from conftest import kosmo

TINY = ["train.max_steps=3", "train.progress=false", "train.tensorboard=false", "train.batch_size=4"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("mine")
    (d / "pics").mkdir()
    caps, vqa = [], []
    for i, colour in enumerate(COLOURS):
        name = f"pics/{colour}.{'jpg' if i % 2 else 'png'}"
        Image.new("RGB", (300 + 37 * i, 180 + 11 * i), colour).save(d / name)
        caps.append({"image": name, "text": f"a photo that is all {colour}", "captions": [f"all {colour}", colour]})
        vqa.append({"image": name, "question": "what colour is this?", "answers": [colour] * 10})
    (d / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    (d / "vqa.jsonl").write_text("".join(json.dumps(v) + "\n" for v in vqa))
    return d


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_own_data_trains_and_evaluates_through_every_stage(folder, tmp_path):
    caps, vqa = folder / "captions.jsonl", folder / "vqa.jsonl"
    kosmo("tokenizer", "--data", caps, vqa, "--vocab-size", 300, "--out", tmp_path / "tok")
    tok = ["--tokenizer", tmp_path / "tok"]
    kosmo("train", "clip", "--data", caps, "--out", tmp_path / "clip", *tok, *TINY, "vision.dim=32", "vision.n_layers=2",
          "vision.mlp_dim=64", "text.dim=32", "text.n_layers=1", "text.mlp_dim=64", "embed_dim=16")
    assert last_json(kosmo("eval", "retrieval", "--model", tmp_path / "clip", "--data", caps))["n"] == 6
    wrong = kosmo("eval", "vqa", "--model", tmp_path / "clip", "--data", vqa, check=False)
    assert wrong.returncode == 2 and "needs a language-model run" in wrong.stderr
    kosmo("train", "lm", "--data", caps, vqa, "--out", tmp_path / "lm", *tok, *TINY, "seq_len=16", "model.dim=32",
          "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1")
    kosmo("train", "mllm", "--data", caps, "--out", tmp_path / "mllm", "--init", tmp_path / "lm", *TINY,
          f"vision={tmp_path / 'clip'}", "seq_len=64", "vision_last_block=true")
    kosmo("train", "sft", "--data", vqa, caps, "--out", tmp_path / "sft", "--init", tmp_path / "mllm", *TINY,
          "seq_len=64", "train.lr_scale.vision=0.1", "train.lr_scale.*_norm*=0.5", "freeze=all")
    lr_scale = json.loads((tmp_path / "sft" / "config.json").read_text())["config"]["train"]["lr_scale"]
    assert lr_scale == {"vision": 0.1, "*_norm*": 0.5}  # a glob key is an override too, wherever it stands
    result = last_json(kosmo("eval", "vqa", "--model", tmp_path / "sft", "--data", vqa))
    assert result["n"] == 6 and 0 <= result["vqa_accuracy"] <= 100 and "vqa_accuracy" in result["blind"]
    result = last_json(kosmo("eval", "caption", "--model", tmp_path / "sft", "--data", caps))
    assert {"cider", "bleu4"} <= result.keys() and "cider" in result["blind"]


def test_mllm_needs_an_image_encoder(folder, tmp_path):
    kosmo("train", "lm", "--data", folder / "captions.jsonl", "--out", tmp_path / "lm", *TINY, "seq_len=16",
          "vocab_size=300", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1")
    proc = kosmo("train", "mllm", "--data", folder / "captions.jsonl", "--out", tmp_path / "m",
                 "--init", tmp_path / "lm", *TINY, check=False)
    assert proc.returncode == 2 and "needs an image encoder" in proc.stderr


def test_unreadable_image_in_eval_is_a_one_line_error(folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad.write_text(json.dumps({"image": "x.png", "question": "q?", "answers": ["a"]}) + "\n")
    kosmo("train", "lm", "--data", folder / "captions.jsonl", "--out", tmp_path / "lm", *TINY, "seq_len=16",
          "vocab_size=300", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1")
    proc = kosmo("eval", "vqa", "--model", tmp_path / "lm", "--data", bad, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
