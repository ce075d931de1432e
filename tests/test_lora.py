"""LoRA: only adapters (and what a policy trains whole) move, merging changes nothing, a LoRA run saves small,
loads merged, exports like its merged model, resumes exactly, and trains in the alignment stages."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import read_metrics

from kosmo import checkpoint
from kosmo import config as C
from kosmo.align import dpo, ppo, reward
from kosmo.cli import main as cli
from kosmo.data.jsonl import iter_texts
from kosmo.errors import KosmoError
from kosmo.interop.hf_llama import export_hf
from kosmo.model import lora
from kosmo.model.lm import LM, LMConfig
from kosmo.model.load import load_run, save_run
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.tokenizer import BOS, IMAGE_PAD, SPECIAL_TOKENS, Tokenizer
from kosmo.train import lm as lm_stage
from kosmo.train import mllm as mllm_stage
from kosmo.train.lm import PackedText, lm_loss
from kosmo.train.mllm import mllm_loss
from kosmo.train.run import run_stage
from kosmo.train.trainer import TrainConfig, Trainer

FAST = dict(batch_size=4, lr=1e-2, warmup_steps=0, precision="fp32", progress=False, tensorboard=False,
            eval_every=0)
QUIET = ["train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.eval_every=0",
         "train.warmup_steps=0", "train.lr=1e-2", "train.batch_size=4"]


def tiny_lm(vocab: int = 64, seed: int = 0) -> LM:
    torch.manual_seed(seed)
    return LM(LMConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                       tie_embeddings=False))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def moved(model, before: dict) -> set[str]:
    return {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}


def random_rows(n: int, length: int, vocab: int, seed: int = 0) -> PackedText:
    return PackedText(torch.randint(0, vocab, (n, length + 1), generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def runs(text_corpus, tmp_path_factory):
    """A base LM run and a LoRA run (`kosmo train lm --init base freeze=lora`) on top of it."""
    d = tmp_path_factory.mktemp("lora")
    tok = Tokenizer.train(iter_texts([text_corpus]), 400)
    tok.save(d)
    base = tiny_lm(tok.vocab_size)
    save_run(d / "base", base, tok, {"stage": "test", "arch": "lm", "model": base.cfg.to_dict()})
    run_stage("lm", [text_corpus], d / "lora", init=d / "base", overrides=[
        *QUIET, "freeze=lora", "lora.rank=4", "lora.targets=[qkv,gate_up,down]", "seq_len=32", "train.max_steps=3"])
    return d, tok


def test_only_the_adapters_move_and_every_one_does(tmp_path):
    model = lora.adapt(tiny_lm(), lora.LoRAConfig(rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 4 * 2 and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    before = snapshot(model)
    Trainer(TrainConfig(max_steps=2, **FAST), model, lm_loss, random_rows(32, 16, 64), tmp_path,
            {"stage": "t", "model": {}}).fit()
    assert moved(model, before) == trainable  # every base tensor bit for bit as it was


def test_the_mllm_lora_policy_trains_the_connector_whole_and_the_lm_through_adapters(tmp_path):
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=2, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64))
    model = MLLM(cfg)
    model.freeze("lora")
    lora.add_adapters(model, lora.LoRAConfig(rank=4))
    before = snapshot(model)

    class Captions:
        def __len__(self):
            return 8

        def collate(self, rows):
            g = torch.Generator().manual_seed(sum(rows))
            k = model.tokens_per_image
            ids = torch.cat([torch.full((len(rows), 1), BOS), torch.full((len(rows), k), IMAGE_PAD),
                             torch.randint(len(SPECIAL_TOKENS), 64, (len(rows), 8), generator=g)], 1)
            labels = torch.cat([torch.full((len(rows), k), -100), ids[:, k + 1:], torch.full((len(rows), 1), -100)], 1)
            return {"input": ids, "labels": labels, "images": torch.randn(len(rows), 3, 16, 16, generator=g),
                    "n_targets": int((labels != -100).sum())}

    Trainer(TrainConfig(max_steps=3, **FAST), model, mllm_loss, Captions(), tmp_path, {"stage": "t", "model": {}}).fit()
    changed = moved(model, before)
    assert {n.split(".")[0] for n in changed} == {"connector", "lm"}
    assert all(n.endswith((".lora_a", ".lora_b")) for n in changed if n.startswith("lm."))
    assert {n for n in before if n.startswith("connector.")} <= changed
    assert not (tmp_path / "model.safetensors").exists()
    saved = checkpoint.load_tensors(tmp_path / "adapter.safetensors")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(saved)


def test_merged_model_computes_what_the_adapted_one_does():
    model = lora.add_adapters(tiny_lm(), lora.LoRAConfig(rank=4, alpha=8))
    for layer in lora.adapters(model):
        torch.nn.init.normal_(layer.lora_b, std=0.1)  # a trained adapter: B no longer zero
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        adapted = model(ids)
        with lora.disabled(model):
            base = model(ids)
        merged = lora.merge(model)(ids)
    assert not lora.adapters(model) and (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_a_lora_run_saves_its_adapters_small_and_loads_merged(runs):
    d, tok = runs
    run = d / "lora"
    config = checkpoint.read_json(run / "config.json")
    assert config["lora"]["targets"] == ["qkv", "gate_up", "down"] and config["base"] == str((d / "base").resolve())
    assert not (run / "model.safetensors").exists()
    adapter = checkpoint.load_tensors(run / "adapter.safetensors")
    assert set(adapter) == {f"blocks.{i}.{t}.lora_{ab}" for i in range(2) for t in ("attn.qkv", "mlp.gate_up",
                                                                                     "mlp.down") for ab in "ab"}
    assert (run / "adapter.safetensors").stat().st_size * 5 < (d / "base" / "model.safetensors").stat().st_size

    # the same function as the base with the adapters on, unmerged
    unmerged = load_run(d / "base")[0]
    lora.add_adapters(unmerged, lora.LoRAConfig(**config["lora"]))
    assert not unmerged.load_state_dict(adapter, strict=False).unexpected_keys
    model, _, _ = load_run(run)
    assert not lora.adapters(model)
    ids = torch.tensor([tok.encode("a red circle above a blue square")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), unmerged(ids), atol=1e-5, rtol=0)
        assert (model(ids) - load_run(d / "base")[0](ids)).abs().max() > 1e-3  # the adapters did train


def test_export_of_a_lora_run_is_the_merged_model_and_transformers_agrees(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    d, tok = runs
    assert cli(["export", "--model", str(d / "lora"), "--out", str(tmp_path / "hf")]) == 0
    adapted = lora.add_adapters(load_run(d / "base")[0], lora.LoRAConfig(rank=4, targets=["qkv", "gate_up", "down"]))
    assert not adapted.load_state_dict(checkpoint.load_tensors(d / "lora" / "adapter.safetensors"),
                                       strict=False).unexpected_keys
    with pytest.raises(KosmoError, match="merge them"):
        export_hf(adapted, tmp_path / "unmerged")
    export_hf(lora.merge(adapted), tmp_path / "merged")
    a, b = (checkpoint.load_tensors(tmp_path / name / "model.safetensors") for name in ("hf", "merged"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.tensor([tok.encode("two green triangles")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_run(d / "lora")[0](ids), atol=1e-4, rtol=0)


def test_the_adapters_export_for_peft_over_the_base_export(runs, tmp_path):
    """q/k/v (and gate/up) share one adapter in kosmo; PEFT's per-projection pairs compute the same."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    d, tok = runs
    assert cli(["export", "--model", str(d / "base"), "--out", str(tmp_path / "base")]) == 0
    assert cli(["export", "--model", str(d / "lora"), "--adapter", "--out", str(tmp_path / "adapter")]) == 0
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    unmerged, _, _ = load_run(d / "lora", merge=False)
    assert lora.adapters(unmerged)
    ids = torch.tensor([tok.encode("three small yellow circles")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged(ids), atol=1e-5, rtol=0)
        with model.disable_adapter():
            assert (model(ids).logits - unmerged(ids)).abs().max() > 1e-3
    assert cli(["export", "--model", str(d / "base"), "--adapter", "--out", str(tmp_path / "x")]) == 2


def test_a_lora_run_resumes_exactly(tmp_path):
    """A crash after the checkpoint at step 2; the resumed run rebuilds the base, whose adapters start
    elsewhere (another seed) until the state restores them, and its dropout draws from the saved RNG."""
    cfg, rows = TrainConfig(max_steps=5, save_every=2, **FAST), random_rows(64, 16, 64)
    lora_cfg = lora.LoRAConfig(rank=4, dropout=0.1)

    def adapted(seed):
        model = tiny_lm()
        torch.manual_seed(seed)
        return lora.adapt(model, lora_cfg)

    run_config = {"stage": "t", "model": {}, "lora": lora_cfg.__dict__}
    Trainer(cfg, adapted(1), lm_loss, rows, tmp_path / "straight", run_config).fit()
    calls = []

    def crashing(model, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return lm_loss(model, batch)

    with pytest.raises(RuntimeError, match="killed"):
        Trainer(cfg, adapted(1), crashing, rows, tmp_path / "crashed", run_config).fit()
    assert checkpoint.read_json(tmp_path / "crashed" / "state" / "latest.json")["step"] == 2
    Trainer(cfg, adapted(2), lm_loss, rows, tmp_path / "crashed", run_config).fit()

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "straight") == losses(tmp_path / "crashed") and len(losses(tmp_path / "straight")) == 5
    assert ((tmp_path / "straight" / "adapter.safetensors").read_bytes()
            == (tmp_path / "crashed" / "adapter.safetensors").read_bytes())
    state = tmp_path / "crashed" / "state" / "step-00000005"
    assert sorted(p.name for p in state.iterdir()) == ["adapter.safetensors", "optimizer.safetensors",
                                                       "rng-rank0.safetensors", "trainer.json"]


@pytest.mark.parametrize("override, message", [
    ("lora.targets=[qkv,o_proj]", "lora.targets must be distinct names among qkv, proj, gate_up, down"),
    ("lora.targets=[]", "lora.targets"),
    ("lora.rank=0", "lora.rank must be at least 1"),
    ("lora.dropout=1", "lora.dropout"),
    ("freeze=lroa", "freeze must be one of none, lora"),
])
def test_bad_lora_options_are_refused_by_name(override, message):
    for stage in (lm_stage, dpo, ppo, reward):
        with pytest.raises(KosmoError, match=message):
            C.load(stage.StageConfig, overrides=["freeze=lora", override])


def test_lora_needs_a_model_to_adapt(runs, text_corpus, tmp_path):
    d, tok = runs
    cfg = C.load(lm_stage.StageConfig, overrides=["freeze=lora", "seq_len=32"])
    with pytest.raises(KosmoError, match="freeze=lora adapts a trained model"):
        lm_stage.build(cfg, [text_corpus], tok)
    cfg = C.load(mllm_stage.StageConfig, overrides=["freeze=lora", "vision=runs/clip"])
    with pytest.raises(KosmoError, match="give a new encoder"):
        mllm_stage.build(cfg, [], tok, tiny_lm())
    moved_run = tmp_path / "orphan"
    moved_run.mkdir()
    for f in ("config.json", "adapter.safetensors", "tokenizer.json"):
        (moved_run / f).write_bytes((d / "lora" / f).read_bytes())
    config = checkpoint.read_json(moved_run / "config.json")
    checkpoint.write_json(moved_run / "config.json", {**config, "base": str(tmp_path / "gone")})
    with pytest.raises(KosmoError, match="holds only its adapters, and its base run"):
        load_run(moved_run)


def test_sft_on_a_text_lm_trains_adapters_alone(runs, tmp_path):
    d, tok = runs
    with (tmp_path / "chat.jsonl").open("w") as f:
        for i in range(16):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Name shape {i}."},
                                             {"role": "assistant", "content": ["A circle.", "A square."][i % 2]}]})
                    + "\n")
    run_stage("sft", [tmp_path / "chat.jsonl"], tmp_path / "sft", init=d / "base",
              overrides=["freeze=lora", "seq_len=32", "val_fraction=0", "train.max_steps=2", *QUIET])
    adapter = checkpoint.load_tensors(tmp_path / "sft" / "adapter.safetensors")
    assert adapter and all(n.endswith((".lora_a", ".lora_b")) for n in adapter)
    assert not lora.adapters(load_run(tmp_path / "sft")[0])


@pytest.fixture(scope="module")
def prefs(runs):
    d, _ = runs
    path = d / "prefs.jsonl"
    with path.open("w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"How many circles are there in scene {i}?",
                                "chosen": f"There are {i % 4 + 1} circles.", "rejected": "I like squares."}) + "\n")
    return path


def test_dpo_trains_adapters_on_a_lora_run_and_its_run_loads_through_both(runs, prefs, tmp_path):
    """DPO with adapters over the LoRA run of `runs`: its base is itself a LoRA run, loaded merged."""
    d, tok = runs
    cfg = C.load(dpo.StageConfig, overrides=["freeze=lora", "lora.rank=4", "val_fraction=0", *QUIET])
    model, loss_fn, train, _ = dpo.build(cfg, [prefs], tok, load_run(d / "lora")[0])
    assert all(n.endswith((".lora_a", ".lora_b")) for n, p in model.named_parameters() if p.requires_grad)
    batch = train.collate([0, 1, 2])
    assert (loss_fn(model, batch)[0] / batch["n_targets"]).item() == pytest.approx(math.log(2), abs=1e-5)

    run_stage("dpo", [prefs], tmp_path / "dpo", init=d / "lora",
              overrides=["freeze=lora", "lora.rank=4", "val_fraction=0", "train.max_steps=3", *QUIET])
    assert checkpoint.read_json(tmp_path / "dpo" / "config.json")["base"] == str((d / "lora").resolve())
    with torch.no_grad():
        pi = dpo.A.sequence_logprobs(load_run(tmp_path / "dpo")[0], batch).chunk(2)
        ref = dpo.A.sequence_logprobs(load_run(d / "lora")[0], batch).chunk(2)
    assert ((pi[0] - ref[0]) - (pi[1] - ref[1])).min() > 0  # every pair's chosen reply gained on its rejected one


def test_reward_lora_trains_the_head_whole_and_its_run_loads_on_the_lm_base(runs, prefs, tmp_path):
    d, tok = runs
    cfg = C.load(reward.StageConfig, overrides=["freeze=lora", "val_fraction=0"])
    model, _, _, _ = reward.build(cfg, [prefs], tok, load_run(d / "base")[0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.endswith((".lora_a", ".lora_b")) for n in trainable - {"head.weight", "head.bias"})

    run_stage("reward", [prefs], tmp_path / "rm", init=d / "base",
              overrides=["freeze=lora", "val_fraction=0", "train.max_steps=2", *QUIET])
    adapter = checkpoint.load_tensors(tmp_path / "rm" / "adapter.safetensors")
    assert set(adapter) == trainable
    loaded = load_run(tmp_path / "rm")[0]
    assert isinstance(loaded, reward.RewardModel) and torch.equal(loaded.head.weight, adapter["head.weight"])


def test_ppo_lora_takes_the_policy_without_adapters_as_its_reference(runs, prefs, tmp_path):
    d, tok = runs
    rm = reward.RewardModel.from_model(load_run(d / "base")[0])
    save_run(d / "rm", rm, tok, {"stage": "test", "arch": "reward", "model": rm.cfg.to_dict()})
    cfg = C.load(ppo.StageConfig, overrides=["freeze=lora", "lora.rank=4", f"reward={d / 'rm'}", "max_new_tokens=4",
                                             "seq_len=48", *QUIET])
    model, rollout, prompts, _ = ppo.build(cfg, [prefs], tok, load_run(d / "base")[0])
    for layer in lora.adapters(model.policy):
        torch.nn.init.normal_(layer.lora_b, std=0.1)  # a policy that has moved away from its base
    ids = torch.tensor([tok.encode("one blue square")])
    with torch.no_grad():
        torch.testing.assert_close(rollout.reference(ids), load_run(d / "base")[0](ids), atol=1e-5, rtol=0)
        assert (model.policy(ids) - rollout.reference(ids)).abs().max() > 1e-3
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"policy", "value"}

    run_stage("ppo", [prefs], tmp_path / "ppo", init=d / "base", overrides=[
        "freeze=lora", "lora.rank=4", f"reward={d / 'rm'}", "max_new_tokens=4", "seq_len=48", "epochs=1",
        "minibatches=2", "train.max_steps=1", *QUIET])
    published = checkpoint.load_tensors(tmp_path / "ppo" / "adapter.safetensors")
    assert set(published) == {n for n, p in model.policy.named_parameters() if p.requires_grad}  # the policy's alone
    assert not lora.adapters(load_run(tmp_path / "ppo")[0])


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_adapters_as_one_does(parallel, runs, text_corpus, tmp_path):
    d, _ = runs
    common = ["train", "lm", "--init", d / "base", "--data", text_corpus, *QUIET, "freeze=lora", "seq_len=32",
              "train.max_steps=4"]
    run_stage("lm", [text_corpus], tmp_path / "one", init=d / "base", overrides=common[6:])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29000 + os.getpid() % 500 + (parallel == "fsdp")), "-m", "kosmo", *map(str, common),
                           "train.batch_size=2", f"train.parallel={parallel}", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], rel=1e-5)
    for name, t in checkpoint.load_tensors(tmp_path / "one" / "adapter.safetensors").items():
        torch.testing.assert_close(t, checkpoint.load_tensors(tmp_path / "two" / "adapter.safetensors")[name])
