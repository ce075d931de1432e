"""The command line as a user meets it: the documented verbs work, bad input gets one clear line."""

import dataclasses
import json
import math

import pytest
import yaml

from conftest import ROOT, kosmo
from kosmo.tokenizer import Tokenizer

QUICK = ["train.max_steps=3", "train.progress=false", "train.tensorboard=false", "seq_len=32", "vocab_size=400",
         "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1"]


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    kosmo("world", "--out", out, "--n", 60)
    return out


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lm"
    proc = kosmo("train", "lm", "--data", world / "text.jsonl", "--out", out, "--config", "configs/lm_tiny.yaml",
                 *QUICK)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 3
    return out


def test_train_writes_a_complete_run_directory(run):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "state/latest.json"):
        assert (run / name).is_file(), name
    used = json.loads((run / "config.json").read_text())["config"]["train"]
    written = yaml.safe_load((ROOT / "configs" / "lm_tiny.yaml").read_text())["train"]
    assert used["batch_size"] == written["batch_size"]  # from the --config file
    assert used["max_steps"] == 3 != written["max_steps"]  # a key=value override wins over the file


def test_eval_ppl_prints_json_last(run, world):
    proc = kosmo("eval", "ppl", "--model", run, "--data", world / "text.jsonl")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = Tokenizer.load(run)
    stream = sum(len(tok.encode(json.loads(line)["text"])) + 2 for line in (world / "text.jsonl").open())  # <s> </s>
    assert set(metrics) == {"loss", "ppl", "tokens"}
    assert metrics["tokens"] == (stream - 1) // 256 * 256  # every target of the whole rows of --seq-len 256
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-4)
    assert metrics["ppl"] == pytest.approx(tok.vocab_size, rel=0.05)  # 3 steps: no better than a uniform guess


def test_eval_copy_prints_the_share_of_each_repeat_predicted(world, tmp_path):
    """An LM of one layer with smeared keys, trained on repeated spans of 12 to 32 tokens alone,
    copies most of a repeat, of longer spans too; copying needs no --data, the other kinds do."""
    kosmo("train", "lm", "--data", world / "text.jsonl", "--out", tmp_path / "copier", "copy_rows=1",
          "model.smear_keys=true", "model.dim=64", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2",
          "model.max_seq_len=128", "seq_len=64", "vocab_size=400", "train.max_steps=150", "train.batch_size=16",
          "train.lr=1e-2", "train.warmup_steps=10", "train.weight_decay=0", "train.precision=fp32",
          "train.eval_every=0", "train.progress=false", "train.tensorboard=false")
    copied = json.loads(kosmo("eval", "copy", "--model", tmp_path / "copier").stdout.strip().splitlines()[-1])
    assert set(copied) == {"20", "48"} and copied["20"] > 85 and copied["48"] > 50
    one_line_error(kosmo("eval", "copy", "--model", tmp_path / "copier", "--spans", "20,65", check=False),
                   "a span of 65 tokens and its repeat need 129 positions, more than the model's context of 128")
    one_line_error(kosmo("eval", "copy", "--model", tmp_path / "copier", "--spans", "20,1", check=False),
                   "--spans: expected comma-separated whole numbers of at least 2 like 20,48, got '20,1'")
    one_line_error(kosmo("eval", "ppl", "--model", tmp_path / "copier", check=False), "eval ppl needs --data")


def test_eval_refuses_bad_arguments_before_loading_and_bad_files_by_line(run, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "a red circle"}\n')
    binary = tmp_path / "picture.jsonl"
    binary.write_bytes(b'{"text": "a"}\n\x89PNG\r\n\x1a\n\xff\xfe\n')
    one_line_error(kosmo("eval", "ppl", "--model", run, "--data", text, "--seq-len", 0, check=False),
                   "--seq-len must be at least 2, got 0")
    one_line_error(kosmo("eval", "ppl", "--model", run, "--data", binary, check=False),
                   f"{binary}:2: not UTF-8 text")
    one_line_error(kosmo("eval", "copy", "--model", run, "--device", "bogus", check=False),
                   "--device: 'bogus' is not a device")


def test_generate_with_sampling_options(run):
    proc = kosmo("generate", "--model", run, "--prompt", "There is a", "--prompt", "A red",
                 "--max-new-tokens", 5, "--temperature", 0.8, "--top-k", 20, "--top-p", 0.9, "--seed", 1)
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["There is a", "A red"] and all(r["tokens"] <= 5 for r in rows)
    again = kosmo("generate", "--model", run, "--prompt", "There is a", "--prompt", "A red",
                  "--max-new-tokens", 5, "--temperature", 0.8, "--top-k", 20, "--top-p", 0.9, "--seed", 1)
    assert again.stdout == proc.stdout


def test_export_then_import_round_trips(run, world, tmp_path):
    kosmo("export", "--model", run, "--out", tmp_path / "hf")
    kosmo("import", "--hf", tmp_path / "hf", "--out", tmp_path / "back")
    a = kosmo("eval", "ppl", "--model", run, "--data", world / "text.jsonl").stdout
    b = kosmo("eval", "ppl", "--model", tmp_path / "back", "--data", world / "text.jsonl").stdout
    assert a == b


def test_tokenizer_command(world, tmp_path):
    proc = kosmo("tokenizer", "--data", world / "text.jsonl", world / "chat.jsonl", "--vocab-size", 500,
                 "--out", tmp_path)
    assert json.loads(proc.stdout)["vocab_size"] <= 500 and (tmp_path / "tokenizer.json").is_file()


def test_missing_file(tmp_path):
    one_line_error(kosmo("train", "lm", "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "r", check=False),
                   "nope.jsonl", "file not found")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    one_line_error(kosmo("tokenizer", "--data", bad, "--out", tmp_path / "t", check=False), "bad.jsonl:3", "malformed JSON")
    bad.write_text('{"text": 5}\n')
    one_line_error(kosmo("tokenizer", "--data", bad, "--out", tmp_path / "t", check=False), "bad.jsonl:1", "'text'")


def test_unknown_config_key_and_bad_value(world, tmp_path):
    args = ("train", "lm", "--data", world / "text.jsonl", "--out", tmp_path / "r")
    one_line_error(kosmo(*args, "train.lrr=1", check=False), "unknown config key 'train.lrr'")
    one_line_error(kosmo(*args, "train.lr=fast", check=False), "'train.lr' must be float")
    one_line_error(kosmo(*args, "model.size=huge", check=False), "model.size='huge'")
    one_line_error(kosmo(*args, "copy_rows=2", check=False), "copy_rows must be between 0 and 1, got 2")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  batch_size: [1\n")
    one_line_error(kosmo(*args, "--config", cfg, check=False), "c.yaml:", "invalid YAML")


def test_prompt_longer_than_context(run):
    one_line_error(kosmo("generate", "--model", run, "--prompt", "word " * 400, check=False), "exceeds the context")


def test_checkpoint_of_the_wrong_shape(run, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["dim"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    one_line_error(kosmo("eval", "ppl", "--model", bad, "--data", "x.jsonl", check=False), "wrong shape")


@pytest.mark.parametrize("key, value, message", [("dimm", 64, "unknown config key 'model.dimm'"),
                                                   ("n_layers", "four", "config key 'model.n_layers' must be int")])
def test_a_run_config_with_an_unknown_or_mistyped_key_is_refused_by_name(run, tmp_path, key, value, message):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"][key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    one_line_error(kosmo("generate", "--model", bad, "--prompt", "a", check=False), f"{bad / 'config.json'}: {message}")


def test_resume_refuses_a_different_model(world, run, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(run, other)
    proc = kosmo("train", "lm", "--data", world / "text.jsonl", "--out", other, *QUICK, "model.dim=64", check=False)
    one_line_error(proc, "another 'model' config")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_into_its_stage(path):
    from kosmo import config as C
    from kosmo.train.run import stages
    stage = {"llava15_stage1": "mllm", "llava15_stage2": "sft"}.get(path.stem) or path.stem.split("_")[0]
    cfg = dataclasses.asdict(C.load(stages()[stage].StageConfig, path))

    def flat(d: dict, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    got = dict(flat(cfg))
    for key, value in flat(yaml.safe_load(path.read_text())):  # every value of the file reaches the config
        assert got[key] == value, key


def test_a_prompt_that_looks_like_an_override_stays_a_prompt(run):
    proc = kosmo("generate", "--model", run, "--prompt", "size=large", "--max-new-tokens", 2)
    assert json.loads(proc.stdout.strip())["prompt"] == "size=large"
