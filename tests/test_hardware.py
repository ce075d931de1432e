"""The precision kosmo computes in follows the hardware: bf16 where it is native, fp32 where it is emulated."""

import json
import re

import pytest
import torch
from conftest import kosmo, read_metrics

from kosmo import hardware
from kosmo.train.trainer import TrainConfig

CPU = torch.device("cpu")


@pytest.fixture
def host(monkeypatch):
    """Fakes the CPU: `host("AMX")` has native bf16 (AMX tiles), `host("AVX2")` emulates it."""
    hardware._warn_emulated.cache_clear()
    hardware.native_bf16.cache_clear()

    def fake(kind: str, slowdown: float = 80.0):
        native = kind != "AVX2"
        monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX2" if kind == "AVX2" else "AVX512")
        flags = {"AMX": {"amx_bf16"}, "AVX512_BF16": {"avx512_bf16"}, "AVX512": set(), "AVX2": set()}[kind]
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(hardware, "_onednn_bf16", lambda: kind != "AVX2")
        monkeypatch.setattr(hardware, "bf16_slowdown", lambda: slowdown)
        hardware.native_bf16.cache_clear()
        return native
    yield fake
    hardware._warn_emulated.cache_clear()
    hardware.native_bf16.cache_clear()


@pytest.mark.parametrize("kind, expected", [("AMX", "bf16"), ("AVX512_BF16", "bf16"), ("AVX512", "fp32"),
                                            ("AVX2", "fp32")])
def test_auto_runs_bf16_only_where_the_cpu_has_it_natively(host, kind, expected):
    host(kind)
    assert hardware.resolve_precision("auto", CPU) == expected
    assert hardware.resolve_precision("fp32", CPU) == "fp32"
    lin = torch.nn.Linear(4, 4)
    with hardware.autocast(CPU, "auto"):
        out = lin(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_forcing_bf16_where_it_is_emulated_warns_once_in_one_line_with_the_slowdown(host, capsys):
    host("AVX2", slowdown=83.4)
    assert hardware.resolve_precision("bf16", CPU) == "bf16"
    assert hardware.resolve_precision("bf16", CPU) == "bf16"
    with hardware.autocast(CPU, "bf16"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "bf16 is emulated on this CPU (AVX2 kernels)" in lines[0] and "83x slower than fp32" in lines[0]
    assert "precision=auto would pick fp32" in lines[0]


def test_forcing_bf16_where_it_is_native_is_silent(host, capsys):
    host("AMX")
    assert hardware.resolve_precision("bf16", CPU) == "bf16"
    assert capsys.readouterr().err == ""


def test_a_gpu_runs_bf16_where_it_supports_it(monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        hardware.native_bf16.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, s=supported: s)
        assert hardware.resolve_precision("auto", torch.device("cuda")) == expected
    hardware.native_bf16.cache_clear()


def test_the_config_takes_auto_by_default_and_names_a_bad_precision():
    assert TrainConfig().precision == "auto"
    with pytest.raises(ValueError, match="train.precision must be one of auto, bf16, fp32, got 'fp16'"):
        TrainConfig(precision="fp16")


AVX2_HOST = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # kernels held to AVX2: bf16 emulated


def train_tiny(corpus, out, *overrides):
    return kosmo("train", "lm", "--data", corpus, "--out", out, "vocab_size=300", "model.dim=32", "model.n_layers=1",
                 "model.n_heads=2", "model.n_kv_heads=1", "model.max_seq_len=32", "seq_len=32", "train.batch_size=2",
                 "train.eval_every=0", "train.progress=false", "train.tensorboard=false", *overrides, env=AVX2_HOST)


def test_a_run_records_where_it_ran_and_the_precision_auto_chose(text_corpus, tmp_path):
    """A real training run on a CPU whose kernels are held to AVX2: auto picks fp32 and says so."""
    train_tiny(text_corpus, tmp_path, "train.max_steps=2")
    where = json.loads((tmp_path / "config.json").read_text())["hardware"]
    assert where["device"] == "cpu" and where["cpu_capability"] == "AVX2" and where["precision"] == "fp32"
    assert json.loads((tmp_path / "config.json").read_text())["config"]["train"]["precision"] == "auto"
    assert [row["precision"] for row in read_metrics(tmp_path)] == ["fp32", "fp32"]


def test_bf16_forced_on_an_emulating_cpu_trains_with_one_warning_that_measured_the_cost(text_corpus, tmp_path):
    proc = train_tiny(text_corpus, tmp_path, "train.max_steps=1", "train.precision=bf16")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("kosmo: warning")]
    assert len(warnings) == 1, proc.stderr
    # the figure is measured on the spot; its size depends on what else the machine runs
    assert re.search(r"a bf16 matmul measured \d+x slower than fp32", warnings[0]), warnings[0]
    assert json.loads((tmp_path / "config.json").read_text())["hardware"]["precision"] == "bf16"


def test_generate_and_eval_take_a_precision(tmp_path):
    bad = kosmo("generate", "--model", tmp_path, "--prompt", "a", "--precision", "fp16", check=False)
    assert bad.returncode == 2 and "--precision: invalid choice: 'fp16'" in bad.stderr
    bad = kosmo("eval", "ppl", "--model", tmp_path, "--data", "x", "--precision", "half", check=False)
    assert bad.returncode == 2 and "invalid choice: 'half'" in bad.stderr


@pytest.mark.parametrize("kind", ["AMX", "AVX2"])
def test_the_serving_engine_computes_in_the_precision_auto_picks(host, kind):
    from kosmo.model.lm import LM, LMConfig
    from kosmo.serve.engine import Engine
    native = host(kind)
    model = LM(LMConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16)).eval()
    engine = Engine(model, tokenizer=None, max_batch=2)
    assert engine.precision == ("bf16" if native else "fp32")
    assert engine.cache.k.dtype == (torch.bfloat16 if native else torch.float32)


def test_training_under_a_callers_autocast_is_refused(tmp_path):
    """Autocast keeps its casts of the weights until the outermost autocast exits, so a run started
    under one would train every step on the first step's weights."""
    from test_trainer import Rows, tiny_lm

    from kosmo.errors import KosmoError
    from kosmo.train.lm import lm_loss
    from kosmo.train.trainer import Trainer
    cfg = TrainConfig(max_steps=2, progress=False, tensorboard=False, eval_every=0)
    trainer = Trainer(cfg, tiny_lm(), lm_loss, Rows(), tmp_path, {"stage": "test", "model": {}})
    with torch.autocast("cpu", torch.bfloat16), pytest.raises(KosmoError, match="outside torch.autocast"):
        trainer.fit()
