"""Streaming a text corpus from parquet shards: rank split, packing parity, exact resume after SIGKILL."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import kill_after, kosmo, read_metrics

from kosmo import checkpoint
from kosmo.cli import main
from kosmo.data.formats import parse_source
from kosmo.data.stream import TextStream, write_shards
from kosmo.errors import KosmoError
from kosmo.tokenizer import Tokenizer
from kosmo.train.lm import PackedText

QUIET = ["train.progress=false", "train.tensorboard=false"]
SMALL = ["seq_len=64", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"]


@pytest.fixture(scope="module")
def docs(text_corpus):
    return [json.loads(line)["text"] for line in text_corpus.read_text().splitlines()[:120]]


@pytest.fixture(scope="module")
def tokenizer(docs):
    return Tokenizer.train(iter(docs), 400)


@pytest.fixture(scope="module")
def shards(docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "corpus"
    write_shards(iter(docs), out, rows_per_shard=20, row_group=8)
    return out


def test_shards_hold_every_document_in_order(docs, shards):
    files = sorted(shards.glob("*.parquet"))
    assert [f.name for f in files] == [f"shard-{i:05d}.parquet" for i in range(6)]
    assert [t for f in files for t in pq.read_table(f)["text"].to_pylist()] == docs
    assert not list(shards.glob("*.tmp"))
    with pytest.raises(KosmoError, match="already holds parquet shards"):
        write_shards(iter(docs), shards, 20)


def test_kosmo_shard_writes_the_text_of_any_source(text_corpus, tmp_path, capsys):
    assert main(["shard", "--data", str(text_corpus), "--out", str(tmp_path / "s"), "--rows-per-shard", "600"]) == 0
    assert json.loads(capsys.readouterr().out) == {"shards": 3, "out": str(tmp_path / "s")}
    assert sum(pq.read_metadata(f).num_rows for f in (tmp_path / "s").glob("*.parquet")) == 1500
    assert main(["shard", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "t")]) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err


def test_two_ranks_read_disjoint_shards_that_cover_the_corpus(docs, shards, tokenizer):
    seen = []
    for rank in (0, 1):
        stream = TextStream(parse_source(shards), tokenizer, 64, rank=rank, world=2, seed=3)
        assert stream.reader.docs.n_shards == 3  # its own files, not every file filtered row by row
        seen.append([row["text"] for row in stream.reader.docs])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(docs)


def test_ranks_that_do_not_divide_the_shards_still_split_the_rows(docs, shards, tokenizer, capsys):
    streams = [TextStream(parse_source(shards), tokenizer, 64, rank=rank, world=4) for rank in range(4)]
    assert "6 shards do not divide among 4 ranks" in capsys.readouterr().err
    seen = [[row["text"] for row in s.reader.docs] for s in streams]
    assert sorted(sum(seen, [])) == sorted(docs) and len(set(sum(seen, []))) == len(docs)


def test_the_stream_packs_rows_as_packed_text_does(shards, tokenizer):
    stream = TextStream(parse_source(shards), tokenizer, 64, seed=1, batch_docs=7)
    epoch0 = [t for f in stream.reader.shard_order(0) for t in pq.read_table(f)["text"].to_pylist()]
    packed = PackedText.from_texts(epoch0, tokenizer, 64)
    assert stream.reader.shard_order(0) != stream.reader.shard_order(1)  # each epoch: its own shard order
    assert torch.equal(stream.next_rows(len(packed)), packed.rows)
    batch = stream.next_batch(4)  # and reads on into the next epoch
    assert stream.reader.epoch == 1 and batch["input"].shape == (4, 64) and batch["n_targets"] == 256


def test_a_saved_position_resumes_at_the_exact_token_even_across_epochs(shards, tokenizer):
    stream = TextStream(parse_source(shards), tokenizer, 64, batch_docs=5)
    states, rows = [], []
    for _ in range(12):  # more than an epoch, 40 rows at a time
        state = stream.state_dict()  # as a checkpoint keeps it: JSON and a tensor
        states.append((json.loads(json.dumps({k: v for k, v in state.items() if k != "tokens"})), state["tokens"]))
        rows.append(stream.next_rows(40))
    assert stream.reader.epoch >= 1
    for k in (3, 7, 11):
        fresh = TextStream(parse_source(shards), tokenizer, 64, batch_docs=5)
        fresh.load_state_dict({**states[k][0], "tokens": states[k][1]})
        assert torch.equal(torch.cat([fresh.next_rows(40) for _ in range(k, 12)]), torch.cat(rows[k:]))


def test_a_missing_text_column_is_named(shards, tokenizer):
    with pytest.raises(KosmoError, match=r"shard-00000\.parquet: no column 'body'.*columns: text"):
        TextStream(parse_source(f"{shards}?text=body"), tokenizer, 64)


def test_sigkill_then_resume_reproduces_every_step(shards, tokenizer, tmp_path):
    tok = tokenizer.save(tmp_path / "tok")
    args = ["train", "lm", "--data", shards, "--tokenizer", tok, *QUIET, *SMALL, "train.max_steps=30",
            "train.save_every=6", "train.warmup_steps=4", "train.batch_size=8"]
    kosmo(*args, "--out", tmp_path / "straight")

    run = tmp_path / "killed"
    saved = kill_after(args, run, 15)
    assert 6 <= saved < 30, "the kill must land mid-run"
    resumed = kosmo(*args, "--out", run)
    assert f"from step {saved}" in resumed.stderr

    position = checkpoint.read_json(run / "state" / "step-00000030" / "stream-rank0.json")
    assert position["epoch"] >= 1, "the run should read on into a second epoch"
    a, b = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 31))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert (tmp_path / "straight" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_a_stream_needs_max_steps_and_to_be_the_only_data(shards, tokenizer, text_corpus, tmp_path, capsys):
    tok = str(tokenizer.save(tmp_path / "tok"))
    common = ["--tokenizer", tok, *QUIET, *SMALL]
    assert main(["train", "lm", "--data", str(shards), "--out", str(tmp_path / "a"), *common]) == 2
    assert "streamed data has no length to count epochs in: set train.max_steps" in capsys.readouterr().err
    assert main(["train", "lm", "--data", str(shards), str(text_corpus), "--out", str(tmp_path / "b"), *common,
                 "train.max_steps=2"]) == 2
    assert "must be the only --data" in capsys.readouterr().err


def test_a_streamed_run_evaluates_on_val_data(shards, tokenizer, text_corpus, tmp_path):
    tok = str(tokenizer.save(tmp_path / "tok"))
    assert main(["train", "lm", "--data", str(shards), "--tokenizer", tok, "--out", str(tmp_path / "run"), *QUIET,
                 *SMALL, f"val_data={text_corpus}", "train.max_steps=2", "train.eval_every=2"]) == 0
    assert read_metrics(tmp_path / "run")[-1]["eval_loss"] > 0


@pytest.mark.slow
def test_two_processes_each_save_their_own_position_and_resume_only_as_two(shards, tokenizer, tmp_path):
    tok = tokenizer.save(tmp_path / "tok")
    args = ["train", "lm", "--data", shards, "--tokenizer", tok, *QUIET, *SMALL, "train.max_steps=3",
            "train.batch_size=2", "train.parallel=ddp"]
    port = 29700 + os.getpid() % 200
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "kosmo", *map(str, args), "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = tmp_path / "two" / "state" / "step-00000003"
    read_ahead = [checkpoint.load_tensors(state / f"stream-rank{r}.safetensors")["tokens"] for r in (0, 1)]
    assert (state / "stream-rank1.json").is_file() and not torch.equal(*read_ahead)  # their own shards
    one = kosmo(*args, "train.max_steps=4", "--out", tmp_path / "two", check=False)
    assert one.returncode == 2 and "saved by 2 processes; resume with 2, not 1" in one.stderr


@pytest.fixture(scope="module")
def picture_shards(tmp_path_factory):
    """LLaVA rows with their pictures inline, three shards, one picture that is not a picture."""
    import io

    import pyarrow as pa
    from PIL import Image as PILImage
    out = tmp_path_factory.mktemp("pictures") / "shards"
    out.mkdir()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    for s in range(3):
        pictures, chats = [], []
        for k in range(4):
            buf = io.BytesIO()
            PILImage.new("RGB", (6 + k, 5), colours[(s + k) % 6]).save(buf, "PNG")
            pictures.append({"bytes": b"not a png" if (s, k) == (1, 2) else buf.getvalue(), "path": None})
            chats.append([{"from": "human", "value": f"<image>\nshard {s} picture {k}: colour?"},
                          {"from": "gpt", "value": colours[(s + k) % 6]}])
        pq.write_table(pa.table({"image": pa.array(pictures, image), "conversations": pa.array(chats, pa.list_(turn))}),
                       out / f"shard-{s:05d}.parquet")
    return out


def example_stream(shards, tokenizer, **kw):
    from kosmo.data.images import ImageCache
    from kosmo.data.multimodal import example_from_record
    from kosmo.data.stream import ExampleStream
    source = parse_source(shards)
    return ExampleStream(source, lambda obj, where: example_from_record(obj, tokenizer, 4, source.images, where),
                         ImageCache(8, max_items=4), pack_len=0, **kw)


def test_a_picture_stream_reads_each_good_row_once_an_epoch_and_resumes_exactly(picture_shards, tokenizer):
    stream = example_stream(picture_shards, tokenizer)
    first = stream.next_batch(11)  # the 11 good rows of 12: one epoch
    assert first["images"].shape == (11, 3, 8, 8) and stream.reader.epoch == 0
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    answers = [tokenizer.decode([t for t in row.tolist() if t >= 0]) for row in first["labels"]]
    assert sorted(answers) == sorted(colours[(s + k) % 6] for s in range(3) for k in range(4) if (s, k) != (1, 2))
    state = json.loads(json.dumps(stream.state_dict()))  # as a checkpoint keeps it
    later = [stream.next_batch(3) for _ in range(6)]  # on into epochs 1 and 2
    resumed = example_stream(picture_shards, tokenizer)
    resumed.load_state_dict(state)
    for a in later:
        b = resumed.next_batch(3)
        assert all(torch.equal(a[k], b[k]) for k in ("input", "labels", "images"))


@pytest.fixture
def llava_init(tmp_path):
    """A tiny imported Llama and CLIP tower, as the LLaVA recipe's test makes them."""
    pytest.importorskip("transformers")
    from test_llava_recipe import hf_checkpoints
    tok = Tokenizer.train(["shard picture colour red green blue yellow white black"] * 20, vocab_size=300)
    tok.save(tmp_path / "tok.json")
    llama, clip = hf_checkpoints(tmp_path, tok.vocab_size)
    assert main(["import", "--hf", str(llama), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "lm")]) == 0
    return tmp_path / "lm", clip


def sft_args(picture_shards, llava_init):
    from test_llava_recipe import TINY
    lm, clip = llava_init
    return ["train", "sft", "--init", lm, f"vision={clip}", "--data", picture_shards, *TINY, "train.max_steps=6",
            "train.save_every=2", "train.batch_size=5", "train.precision=fp32"]


def test_sft_streams_a_folder_of_llava_rows(picture_shards, llava_init, tmp_path):
    assert main([*map(str, sft_args(picture_shards, llava_init)), "--out", str(tmp_path / "run")]) == 0
    assert len(read_metrics(tmp_path / "run")) == 6
    position = checkpoint.read_json(tmp_path / "run" / "state" / "step-00000006" / "stream-rank0.json")
    assert position["epoch"] == 2  # 30 rows read, of 11 good ones an epoch


@pytest.mark.slow
def test_sft_on_a_stream_resumes_exactly_after_sigkill(picture_shards, llava_init, tmp_path):
    args = sft_args(picture_shards, llava_init)
    kosmo(*args, "--out", tmp_path / "straight")
    run = tmp_path / "killed"
    saved = kill_after(args, run, 3)
    assert 2 <= saved < 6, "the kill must land mid-run"
    assert f"from step {saved}" in kosmo(*args, "--out", run).stderr
    assert [r["loss"] for r in read_metrics(tmp_path / "straight")] == [r["loss"] for r in read_metrics(run)]
    assert (tmp_path / "straight" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
