"""The shared trainer: exact resume after SIGKILL, DDP/FSDP parity, accumulation, non-finite steps."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import kill_after, kosmo, read_metrics

from kosmo import checkpoint
from kosmo.errors import KosmoError
from kosmo.model.lm import LM, LMConfig
from kosmo.train.lm import lm_loss
from kosmo.train.trainer import TrainConfig, Trainer, lr_at

QUIET = ["train.progress=false", "train.tensorboard=false"]
SMALL = ["seq_len=64", "vocab_size=600", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"]


@pytest.fixture(scope="module")
def tokenizer_dir(text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    kosmo("tokenizer", "--data", text_corpus, "--vocab-size", 600, "--out", out)
    return out


def test_sigkill_then_resume_reproduces_every_step(text_corpus, tokenizer_dir, tmp_path):
    args = ["train", "lm", "--data", text_corpus, "--tokenizer", tokenizer_dir, *QUIET, *SMALL,
            "train.max_steps=40", "train.save_every=8", "train.eval_every=10", "train.warmup_steps=4"]
    kosmo(*args, "--out", tmp_path / "straight")

    run = tmp_path / "killed"
    saved = kill_after(args, run, 19)  # mid-way: after a checkpoint and steps beyond it
    assert 8 <= saved < 40, "the kill must land mid-run"
    resumed = kosmo(*args, "--out", run)
    assert f"from step {saved}" in resumed.stderr

    a, b = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 41))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("eval_loss") for r in a] == [r.get("eval_loss") for r in b]
    assert (tmp_path / "straight" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_at_the_same_global_batch(parallel, text_corpus, tokenizer_dir, tmp_path):
    common = ["train", "lm", "--data", text_corpus, "--tokenizer", tokenizer_dir, *QUIET, *SMALL,
              "train.max_steps=5", "train.precision=fp32", "train.eval_every=5", "train.warmup_steps=2"]
    kosmo(*common, "train.batch_size=4", "--out", tmp_path / "one")
    port = 29500 + (os.getpid() % 500) + (parallel == "fsdp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "kosmo", *map(str, common), "train.batch_size=2",
                           f"train.parallel={parallel}", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert one[-1]["eval_loss"] == pytest.approx(two[-1]["eval_loss"], rel=1e-5)


class Rows:
    """Random token rows, as a Dataset for the trainer."""

    def __init__(self, n=64, T=16, vocab=50):
        self.rows = torch.randint(0, vocab, (n, T + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.rows)

    def collate(self, idx):
        r = self.rows[idx]
        return {"input": r[:, :-1], "labels": r[:, 1:], "n_targets": r[:, 1:].numel()}


def tiny_lm():
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32))


def fit(tmp_path, loss_fn=lm_loss, **kw):
    cfg = TrainConfig(**{"max_steps": 4, "precision": "fp32", "progress": False, "tensorboard": False,
                         "eval_every": 0, "warmup_steps": 1, **kw})
    trainer = Trainer(cfg, tiny_lm(), loss_fn, Rows(), tmp_path, {"stage": "test", "model": {}})
    return trainer, trainer.fit()


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    _, big = fit(tmp_path / "a", batch_size=8)
    _, acc = fit(tmp_path / "b", batch_size=2, grad_accum=4)
    assert read_metrics(tmp_path / "a")[0]["loss"] == pytest.approx(read_metrics(tmp_path / "b")[0]["loss"], rel=1e-6)
    assert big["loss"] == pytest.approx(acc["loss"], rel=1e-5)


def test_non_finite_steps_are_skipped_and_counted_then_stop_the_run(tmp_path):
    calls = {"n": 0}

    def flaky(model, batch):
        loss, m = lm_loss(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), m

    trainer, last = fit(tmp_path / "a", loss_fn=flaky)
    rows = read_metrics(tmp_path / "a")
    assert math.isnan(rows[1]["loss"]) and last["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    def broken(model, batch):
        loss, m = lm_loss(model, batch)
        return loss * float("inf"), m

    with pytest.raises(KosmoError, match="non-finite for 3 steps in a row"):
        fit(tmp_path / "b", loss_fn=broken, max_nonfinite=3)


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    fit(tmp_path, save_every=2)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "tb" not in p.parts]
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".jsonl"}
    weights = checkpoint.load_tensors(tmp_path / "model.safetensors")
    assert "blocks.0.attn.qkv.weight" in weights and "lm_head.weight" not in weights  # tied, stored once


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.json"
    checkpoint.write_json(target, {"v": 1})

    def crash(path):
        path.write_text('{"v": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(target, crash)
    assert checkpoint.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_packing_puts_eos_and_bos_between_documents():
    from kosmo.tokenizer import BOS, EOS
    from kosmo.train.lm import PackedText

    class Chars:
        def encode_batch(self, texts):
            return [[100 + ord(c) - 97 for c in t] for t in texts]

    packed = PackedText.from_texts(["abc", "de", "fghij"], Chars(), seq_len=4)
    stream = [BOS, 100, 101, 102, EOS, BOS, 103, 104, EOS, BOS, 105, 106, 107, 108, 109, EOS]
    assert packed.rows.tolist() == [stream[0:5], stream[4:9], stream[8:13]]
    batch = packed.collate([1])
    assert batch["input"].tolist() == [stream[4:8]] and batch["labels"].tolist() == [stream[5:9]]


def test_metrics_reach_tensorboard(tmp_path):
    fit(tmp_path, tensorboard=True, eval_every=2)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    rows = read_metrics(tmp_path)
    assert {"loss", "lr", "grad_norm", "tok_per_s"} <= rows[0].keys()


def test_lr_scale_gives_a_parameter_group_its_own_learning_rate(tmp_path):
    """A key is a name prefix or a glob: here all of block 0, and every block's attention output."""
    trainer, _ = fit(tmp_path, lr=1e-2, lr_scale={"blocks.0.": 0.0, "*.attn.proj.weight": 0.0}, max_steps=3)
    before = tiny_lm().state_dict()
    after = trainer.model.state_dict()
    frozen = [k for k in before if k.startswith("blocks.0.") or k.endswith(".attn.proj.weight")]
    assert "blocks.1.attn.proj.weight" in frozen
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["blocks.1.mlp.down.weight"], after["blocks.1.mlp.down.weight"])


@pytest.mark.parametrize("scale", ["abc", -1, True])
def test_an_lr_scale_that_is_not_a_rate_is_refused(scale):
    with pytest.raises(ValueError, match=r"train.lr_scale.\*_gate must be a number of at least 0"):
        TrainConfig(lr_scale={"*_gate": scale})


def test_without_max_steps_the_run_lasts_epochs_of_its_data(tmp_path):
    """The default budget scales with the data: 3 passes; train.epochs sets another, train.max_steps wins."""
    assert (TrainConfig().max_steps, TrainConfig().epochs) == (0, 3.0)
    trainer, _ = fit(tmp_path / "a", max_steps=0, epochs=2, batch_size=8)  # 64 rows, 8 a step
    assert len(read_metrics(tmp_path / "a")) == 16 == trainer.cfg.max_steps
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["budget"] == {"steps": 16, "epochs": 2.0, "rows": 64, "rows_per_step": 8, "from": "epochs"}
    trainer, _ = fit(tmp_path / "b", max_steps=0, batch_size=10, grad_accum=2)  # 3 epochs: ceil(192 / 20)
    assert trainer.cfg.max_steps == 10 and trainer.budget["epochs"] == 3.12
    with pytest.raises(ValueError, match="train.epochs must be positive when train.max_steps is 0, got 0"):
        TrainConfig(epochs=0)


def test_mfu_is_logged_from_the_models_counted_flops_over_the_measured_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("KOSMO_CACHE", str(tmp_path / "cache"))
    trainer, last = fit(tmp_path / "run", batch_size=4)
    # PaLM's count for a decoder: 6 FLOPs a parameter a token (forward 2, backward 4) over every weight
    # matrix (the tied embedding is the head's), plus attention's two matmuls (2 x 2 x T x dim a token forward,
    # as SDPA computes them, causal or not; x 3 with backward) in each layer
    cfg, T = trainer.model.cfg, Rows().rows.shape[1] - 1
    matrices = sum(p.numel() for p in trainer.model.parameters() if p.ndim == 2)
    expected = 6 * matrices + 12 * cfg.n_layers * T * cfg.dim
    assert trainer.flops_per_token == pytest.approx(expected, rel=0.01)
    peak = json.loads((tmp_path / "cache" / "matmul_peak.json").read_text())
    assert list(peak.values()) == [trainer.peak_flops] and trainer.peak_flops > 1e8
    rows = read_metrics(tmp_path / "run")
    assert all(r["mfu"] == pytest.approx(trainer.flops_per_token * r["tok_per_s"] / trainer.peak_flops, rel=1e-3)
               for r in rows)
    assert 0 < last["mfu"] < 1


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run_and_counts_the_same_flops(tmp_path, monkeypatch):
    monkeypatch.setenv("KOSMO_CACHE", str(tmp_path / "cache"))
    eager, _ = fit(tmp_path / "eager", batch_size=4)
    compiled, _ = fit(tmp_path / "compiled", batch_size=4, compile=True)
    assert compiled.flops_per_token == eager.flops_per_token
    for a, b in zip(read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
