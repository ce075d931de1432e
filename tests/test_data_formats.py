"""Data in the formats people have: LLaVA conversation JSON and Hugging Face `datasets` parquet/arrow files."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from kosmo.cli import main
from kosmo.data.formats import read_records
from kosmo.data.images import EncodedImage, load_image
from kosmo.data.jsonl import iter_texts
from kosmo.data.multimodal import ImageBank, read_examples
from kosmo.errors import KosmoError
from kosmo.tokenizer import ASSISTANT, IMAGE, IMAGE_END, SYSTEM, USER, Tokenizer


def png(colour, size=(9, 5)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def llava(tmp_path):
    """An annotation folder apart from its image folder, as LLaVA's downloads come."""
    (tmp_path / "coco" / "train").mkdir(parents=True)
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        (tmp_path / "coco" / "train" / name).write_bytes(png(colour))
    items = [
        {"id": "0", "image": "train/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "1", "image": "train/b.png", "conversations": [
            {"from": "system", "value": "Answer in one word."},
            {"from": "human", "value": "Look: <image>\nand say its colour."}, {"from": "gpt", "value": "Blue"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there"}]},
    ]
    (tmp_path / "ann").mkdir()
    path = tmp_path / "ann" / "llava.json"
    path.write_text(json.dumps(items))
    return path, tmp_path / "coco", items


def test_llava_items_become_chats_with_each_image_where_its_mark_stands(llava):
    path, images, _ = llava
    records = [obj for _, obj in read_records(f"{path}?images={images}")]
    assert records[0] == {"messages": [
        {"role": "user", "content": [{"type": "image", "image": str(images / "train/a.png")},
                                     {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "Red."}]}
    assert [m["role"] for m in records[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert records[1]["messages"][1]["content"] == [
        {"type": "text", "text": "Look: "}, {"type": "image", "image": str(images / "train/b.png")},
        {"type": "text", "text": "and say its colour."}]
    assert records[2] == {"messages": [{"role": "user", "content": "Hello"},
                                       {"role": "assistant", "content": "Hi there"}]}


def test_llava_jsonl_reads_as_the_json_list_does(llava):
    path, images, items = llava
    lines = path.with_suffix(".jsonl")
    lines.write_text("".join(json.dumps(item) + "\n" for item in items))
    assert [o for _, o in read_records(f"{lines}?images={images}")] == [o for _, o in read_records(
        f"{path}?images={images}")]
    assert [w for w, _ in read_records(f"{lines}?images={images}")][1] == f"{lines}:2"


def test_llava_examples_learn_the_answers_and_read_the_pictures(llava):
    path, images, _ = llava
    tok = Tokenizer.train(["What colour is it? Red. Blue Look and say its colour"] * 20, vocab_size=300)
    examples, dropped = read_examples([f"{path}?images={images}"], tok, tokens_per_image=3, max_len=200)
    assert dropped == 0 and [e.kind for e in examples] == ["chat"] * 3
    first = examples[0]
    assert first.images == [str((images / "train/a.png").resolve())]
    assert first.ids[1:3] == [USER, IMAGE] and first.ids[6] == IMAGE_END
    answer = first.ids.index(ASSISTANT) + 1
    assert tok.decode([t for t, learn in zip(first.ids, first.target) if learn][:-1]) == "Red."
    assert not any(first.target[:answer])
    assert examples[1].ids[1] == SYSTEM and examples[2].images == []
    bank = ImageBank([p for e in examples for p in e.images], 8)
    assert torch.equal(bank.get(first.images)[0], load_image(images / "train/a.png", 8))


@pytest.mark.parametrize("item, message", [
    ({"image": "train/zzz.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
     r"item 1: image file .*coco/train/zzz\.png not found"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, r"item 1: conversation turn 0 is from 'bot'"),
    ({"image": "train/a.png", "conversations": [{"from": "human", "value": "hi"}]},
     r"item 1: the item has 1 image\(s\) but 0 <image> mark\(s\)"),
    ({"conversations": [{"from": "human", "value": "<image> hi"}]}, r"item 1: conversation turn 0 has more <image>"),
    ({"image": "train/a.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt",
                                                                                      "value": "<image>"}]},
     r"item 1: conversation turn 1: an <image> mark in a gpt turn"),
    ({"conversations": [{"from": "human", "value": 3}]}, r"item 1: conversation turn 0 needs 'value' as a string"),
    ({"conversations": []}, r"item 1: 'conversations' must be a non-empty list"),
])
def test_bad_llava_items_are_named_by_file_and_index(llava, item, message):
    path, images, items = llava
    path.write_text(json.dumps([items[0], item]))
    with pytest.raises(KosmoError, match=rf"{path}: {message}"):
        list(read_records(f"{path}?images={images}"))


def test_llava_images_default_to_the_files_folder_and_bad_json_names_its_line(llava, tmp_path):
    path, _, _ = llava
    with pytest.raises(KosmoError, match=r"ann/train/a\.png not found .*set \?images=DIR"):
        list(read_records(path))
    path.write_text('[\n{"conversations": [}\n]')
    with pytest.raises(KosmoError, match=rf"{path}:2: malformed JSON"):
        list(read_records(path))
    with pytest.raises(KosmoError, match="unknown data option 'image_folder'"):
        list(read_records(f"{path}?image_folder=x"))


@pytest.fixture
def captions_parquet(tmp_path):
    """A `datasets` file as `Dataset.to_parquet` writes it: an Image column of {bytes, path} structs."""
    features = Features({"img": Image(), "caption": Value("string"), "url": Value("string")})
    ds = Dataset.from_dict({"img": [{"bytes": png("red"), "path": None}, {"bytes": png("green", (4, 12)),
                                                                           "path": None}],
                            "caption": ["a red picture", "a green one"], "url": ["u0", "u1"]}, features=features)
    path = tmp_path / "captions.parquet"
    ds.to_parquet(str(path))
    return path, ds


def test_parquet_image_structs_become_images_under_the_mapped_names(captions_parquet, tmp_path):
    path, _ = captions_parquet
    rows = list(read_records(f"{path}?image=img&text=caption"))
    assert [w for w, _ in rows] == [f"{path}: row 0", f"{path}: row 1"]
    first = rows[0][1]
    assert first["text"] == "a red picture" and first["url"] == "u0" and "img" not in first
    assert isinstance(first["image"], EncodedImage) and first["image"].data == png("red")
    (tmp_path / "red.png").write_bytes(png("red"))
    pixels = ImageBank([r["image"] for _, r in rows], 8).get([first["image"]])
    assert torch.equal(pixels[0], load_image(tmp_path / "red.png", 8))
    assert list(iter_texts([f"{path}?image=img&text=caption"])) == ["a red picture", "a green one"]


def test_a_raw_bytes_column_and_an_arrow_file_read_the_same(captions_parquet, tmp_path):
    path, ds = captions_parquet
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"jpg": pa.array([png("red"), png("green", (4, 12))], pa.binary()),
                             "txt": ["a red picture", "a green one"]}), raw)
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    a = [r for _, r in read_records(f"{raw}?image=jpg&text=txt")]
    b = [r for _, r in read_records(f"{arrow}?image=img&text=caption")]
    assert [(r["text"], r["image"].data) for r in a] == [(r["text"], r["image"].data) for r in b]


def test_llava_rows_in_parquet_carry_their_image_bytes(tmp_path):
    path = tmp_path / "llava.parquet"
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": png("red"), "path": None}, None], image),
        "conversations": pa.array([[{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red"}],
                                   [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]],
                                  pa.list_(turn))}), path)
    (with_image, _), (text_only, _) = [(r, w) for w, r in read_records(path)]
    picture = with_image["messages"][0]["content"][0]["image"]
    assert isinstance(picture, EncodedImage) and picture.data == png("red") and str(picture) == f"{path}: row 0: image"
    assert text_only == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def test_a_mapped_column_that_is_not_there_is_named(captions_parquet):
    path, _ = captions_parquet
    with pytest.raises(KosmoError, match=r"captions\.parquet: no column 'jpg' for image= \(columns: img, caption, url"):
        list(read_records(f"{path}?image=jpg"))
    with pytest.raises(KosmoError, match=r"nope\.parquet: file not found"):
        list(read_records(path.with_name("nope.parquet")))


def test_a_stage_trains_on_a_parquet_file(captions_parquet, tmp_path, capsys):
    path, _ = captions_parquet
    tiny = ["vision.image_size=16", "vision.patch_size=8", "vision.dim=32", "vision.n_layers=1", "vision.n_heads=2",
            "vision.mlp_dim=64", "text.max_len=16", "text.dim=32", "text.n_layers=1", "text.n_heads=2",
            "text.mlp_dim=64", "embed_dim=32", "vocab_size=300", "train.max_steps=2", "train.batch_size=2",
            "train.progress=false", "train.tensorboard=false", "train.eval_every=0"]
    assert main(["train", "clip", "--data", f"{path}?image=img&text=caption", "--out", str(tmp_path / "run"),
                 *tiny]) == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_the_llava_recipe_trains_on_llavas_own_json(tmp_path):
    """LLaVA's files, as LLaVA ships them (annotations apart from the pictures), through the README's two stages."""
    pytest.importorskip("transformers")
    from conftest import ROOT
    from test_llava_recipe import TINY, hf_checkpoints, same

    from kosmo.data.world import write_world
    from kosmo.model.load import load_run
    world = write_world(tmp_path / "world", n=24)
    captions, vqa = ([json.loads(line) for line in world[k].read_text().splitlines()] for k in ("captions", "vqa"))
    pretrain = [{"id": str(i), "image": o["image"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": o["text"]}]}
        for i, o in enumerate(captions)]
    instruct = [{"id": str(i), "image": o["image"], "conversations": [
        {"from": "human", "value": f"<image>\n{o['question']}"}, {"from": "gpt", "value": o["answers"][0]},
        {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "Yes."}]} for i, o in enumerate(vqa)]
    (tmp_path / "ann").mkdir()
    for name, items in (("pretrain", pretrain), ("instruct", instruct)):
        (tmp_path / "ann" / f"{name}.json").write_text(json.dumps(items))
    tok = Tokenizer.train(iter_texts([world["text"], world["vqa"]]), vocab_size=300)
    tok.save(tmp_path / "tok.json")
    llama, clip = hf_checkpoints(tmp_path, tok.vocab_size)
    runs = tmp_path / "runs"
    assert main(["import", "--hf", str(llama), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(runs / "lm")]) == 0
    images = f"?images={tmp_path / 'world'}"
    assert main(["train", "sft", "--init", str(runs / "lm"), f"vision={clip}", "--config",
                 str(ROOT / "configs/llava15_stage1.yaml"), "--data", f"{tmp_path / 'ann/pretrain.json'}{images}",
                 "--out", str(runs / "stage1"), *TINY]) == 0
    assert main(["train", "sft", "--init", str(runs / "stage1"), "--config", str(ROOT / "configs/llava15_stage2.yaml"),
                 "--data", f"{tmp_path / 'ann/instruct.json'}{images}", "--out", str(runs / "stage2"), *TINY]) == 0
    lm, stage1, stage2 = (load_run(runs / r)[0] for r in ("lm", "stage1", "stage2"))
    assert same(stage1.lm, lm) and not same(stage2.lm, lm)  # stage 1 moves the connector alone
    assert not same(stage2.connector, stage1.connector)
