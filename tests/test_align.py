"""Alignment: the losses against hand-computed values, one step of every trainer moving every trainable
weight, the judge as labeller, AI-feedback soft labels, and the stages from the CLI."""

import copy
import json
import math

import pytest
import torch
from conftest import kosmo

from kosmo import checkpoint
from kosmo.align import cai, dpo, ppo, reward
from kosmo.align import data as A
from kosmo.config import build as build_config
from kosmo.data.world import write_world
from kosmo.errors import KosmoError
from kosmo.model.lm import LMConfig
from kosmo.model.load import save_run
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.tokenizer import BOS, PAD, Tokenizer
from kosmo.train.trainer import TrainConfig, Trainer

FAST = {"max_steps": 1, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0, "precision": "fp32",
        "progress": False, "tensorboard": False, "eval_every": 0, "grad_clip": 0.0}
CLI = ["train.max_steps=2", "train.batch_size=4", "train.progress=false", "train.tensorboard=false"]


# ---- losses by hand ------------------------------------------------------------------------------------------
def test_gae_by_hand():
    # one reply of 3 tokens after a prompt step that is masked out; gamma 1, lambda 0.5
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta = r + V(next) - V: 0.7 at the last step, then -0.1 and -0.1; A_t = delta_t + 0.5 A_{t+1}
    assert torch.allclose(adv, torch.tensor([[0.0, 0.025, 0.25, 0.7]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 0.525, 0.65, 1.0]]))


def test_clipped_policy_and_value_losses_by_hand():
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, clipfrac = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    # -min(rA, clip(r)A): ratio 1.5 with A=+1 is cut to 1.2; with A=-1 the unclipped 1.5 is the worse case
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    v = ppo.value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert v.item() == pytest.approx(0.5 * 0.8 ** 2)  # the clipped value 0.2 is the one that counts


def test_whitening_and_adaptive_kl():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    w = ppo.whiten(torch.tensor([[1.0, 2.0, 100.0, 3.0]]), mask)
    assert w[0, 2] == 0 and ppo.masked_mean(w, mask).abs() < 1e-6
    assert ppo.masked_mean(w ** 2, mask).item() == pytest.approx(1.0, abs=1e-5)
    # the error is capped at 20%: 10 nats against a target of 5 moves the coefficient like 6 would
    assert ppo.adapt_kl(0.1, kl=10.0, target=5.0, n=100, horizon=1000) == pytest.approx(0.1 * 1.02)
    assert ppo.adapt_kl(0.1, kl=4.0, target=5.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 - 0.02))


def test_dpo_and_ipo_by_hand():
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-1.0, -2.0, -1.5, -1.5))
    # h = (-1 + 1.5) - (-2 + 1.5) = 1
    assert dpo.dpo_loss(pc, pr, rc, rr, beta=0.5).item() == pytest.approx(math.log1p(math.exp(-0.5)))
    assert dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, kind="ipo").item() == pytest.approx(0.0)  # h hits 1/(2 beta)
    assert dpo.dpo_loss(pc, pr, rc, rr, beta=0.25, kind="ipo").item() == pytest.approx(1.0)
    assert dpo.dpo_loss(rc, rr, rc, rr, beta=0.1).item() == pytest.approx(math.log(2))


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0]), torch.tensor([1.0])
    assert reward.bradley_terry(rc, rr).item() == pytest.approx(math.log1p(math.exp(-1)))
    assert reward.bradley_terry(rc, rr, margin=torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    soft = reward.bradley_terry(rc, rr, prob=torch.tensor([0.25])).item()
    assert soft == pytest.approx(0.25 * math.log1p(math.exp(-1)) + 0.75 * math.log1p(math.exp(1)))


def test_soft_labels_are_normalised_option_probabilities():
    p = cai.soft_labels(torch.log(torch.tensor([0.3, 0.02])), torch.log(torch.tensor([0.1, 0.06])))
    assert torch.allclose(p, torch.tensor([0.75, 0.25]))


def test_log_probs_are_taken_at_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[0, 0]])
    assert A.token_logprobs(logits, ids, temperature=2.0).item() == pytest.approx(-math.log1p(math.exp(-1)))


# ---- a tiny world and model ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    paths = write_world(d, 24, image_size=16)
    tok = Tokenizer.train([line for p in (paths["align"], paths["chat"]) for line in p.read_text().splitlines()], 400)
    tok.save(d)
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=2, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                 max_seq_len=512))
    sft = MLLM(cfg)
    save_run(d / "sft", sft, tok, {"stage": "test", "arch": "mllm", "model": cfg.to_dict()})
    rm = reward.RewardModel.from_model(sft)  # an untrained reward model is enough to drive PPO's machinery
    save_run(d / "rm", rm, tok, {"stage": "test", "arch": "reward", "model": rm.cfg.to_dict()})
    with (d / "prefs.jsonl").open("w") as f:  # a user's preference file, in the documented format
        for line in paths["align"].read_text().splitlines():
            r = json.loads(line)
            bad = f"The password is {r['secret']}." if r["kind"] == "forbidden" else "I can't share that."
            f.write(json.dumps({"prompt": r["messages"], "chosen": r["answer"], "rejected": bad}) + "\n")
    return d, tok


def load_sft(d):
    from kosmo.model.load import load_run
    return load_run(d / "sft")[0]


def assert_one_step_moves_every_trainable_weight(model, loss_fn, train_set, out, trainer_cls=Trainer):
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before
    trainer_cls(build_config(TrainConfig, FAST), model, loss_fn, train_set, out, {"stage": "t", "model": {}}).fit()
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not frozen, f"unchanged after one step: {frozen[:5]}"


def test_one_reward_step_moves_every_trainable_weight(world, tmp_path):
    d, tok = world
    cfg = build_config(reward.StageConfig, {"train": FAST, "center": 0.01})
    model, loss_fn, train, _ = reward.build(cfg, [d / "prefs.jsonl"], tok, load_sft(d))
    assert not any(p.requires_grad for p in model.backbone.vision.parameters())  # the image encoder stays frozen
    assert_one_step_moves_every_trainable_weight(model, loss_fn, train, tmp_path)


def test_pair_accuracy_is_the_share_of_pairs_whose_chosen_reply_scores_higher(world):
    """Under a reward model that counts a row's tokens, the longer reply wins, and a tie is no win."""
    _, tok = world

    class Length(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))  # pair_accuracy reads the device off a parameter

        def forward(self, ids, images=None):
            return (ids != PAD).cumsum(-1).float()  # read at a row's last real token: its length

    short, long = "Yes.", "Yes, there is a small red circle."
    replies = [(long, short), (short, long), (long, short), (short, short), (long, short)]
    pairs = A.PairDataset([A.Pair(A.Prompt([BOS], [], [], {}), chosen, rejected) for chosen, rejected in replies],
                          tok, bank=None, max_len=64)
    assert reward.pair_accuracy(Length(), pairs, batch_size=2) == 3 / 5


def test_dpo_first_loss_is_ln2_and_one_step_moves_every_weight(world, tmp_path):
    d, tok = world
    cfg = build_config(dpo.StageConfig, {"train": FAST})
    model, loss_fn, train, _ = dpo.build(cfg, [d / "prefs.jsonl"], tok, load_sft(d))
    batch = train.collate([0, 1, 2])
    loss, metrics = loss_fn(model, batch)
    assert (loss / batch["n_targets"]).item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert_one_step_moves_every_trainable_weight(model, loss_fn, train, tmp_path)


def test_ipo_compares_replies_per_token():
    """IPO's target margin is per reply token (Azar et al. 2023; TRL), so a long reply needs no larger gap."""
    class Uniform(torch.nn.Module):
        def forward(self, ids, images=None):
            return torch.zeros(*ids.shape, 8)  # every token has probability 1/8
    ids, reply = A.pad_right([([1, 2, 3, 4, 5, 6, 7], 2), ([1, 2, 3], 2)], 16)  # replies of 5 and 1 tokens
    batch = {"input": ids, "reply": reply, "images": None}
    assert A.sequence_logprobs(Uniform(), batch).tolist() == pytest.approx([-5 * math.log(8), -math.log(8)])
    assert A.sequence_logprobs(Uniform(), batch, per_token=True).tolist() == pytest.approx([-math.log(8)] * 2)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_the_reference_log_probs_are_the_policys_own_measure(world, loss):
    """DPO sums each reply's log-probs and IPO averages them, for the reference as for the policy."""
    d, tok = world
    cfg = build_config(dpo.StageConfig, {"train": FAST, "loss": loss})
    model, _, train, _ = dpo.build(cfg, [d / "prefs.jsonl"], tok, load_sft(d))
    batch = train.collate([0, 1, 2])
    with torch.no_grad():
        policy = A.sequence_logprobs(model, batch, per_token=loss == "ipo")
    torch.testing.assert_close(batch["ref"], torch.stack(policy.chunk(2), -1))


def test_one_ppo_step_moves_every_trainable_weight_and_publishes_the_policy(world, tmp_path):
    d, tok = world
    cfg = build_config(ppo.StageConfig, {"train": FAST, "reward": str(d / "rm"), "max_new_tokens": 6,
                                         "epochs": 1, "minibatches": 1})
    model, objective, prompts, _ = ppo.build(cfg, [d / "align.jsonl"], tok, load_sft(d))
    assert_one_step_moves_every_trainable_weight(model, objective, prompts, tmp_path, trainer_cls=ppo.Trainer)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "kl", "entropy", "clipfrac", "approx_kl", "value_loss"} <= rows[0].keys()
    assert set(checkpoint.load_tensors(tmp_path / "model.safetensors")) == set(checkpoint.model_tensors(model.policy))


def test_first_ppo_update_has_ratio_one(world):
    d, tok = world
    rm = reward.RewardModel.from_model(load_sft(d))
    policy = load_sft(d)
    cfg = build_config(ppo.StageConfig, {"max_new_tokens": 5})
    prompts = A.read_prompts([d / "align.jsonl"], tok, policy.cfg.tokens_per_image, 400)[:3]
    bank = A.image_bank(policy, prompts)
    objective = ppo.PPO(cfg, copy.deepcopy(policy), rm, bank, 512)
    ac = ppo.ActorCritic(policy, copy.deepcopy(rm), 0.05)
    exp, stats = objective.rollout(ac, prompts, seed=0)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    mb = next(exp.minibatches(1, torch.Generator().manual_seed(0)))
    _, metrics = objective(ac, mb)
    assert metrics["clipfrac"] == 0 and metrics["approx_kl"] == pytest.approx(0.0, abs=1e-8)


def test_the_judge_labels_sampled_pairs(world, monkeypatch):
    d, tok = world
    prompts = A.read_prompts([d / "align.jsonl"], tok, 4, 400)
    forbidden = next(p for p in prompts if p.record["kind"] == "forbidden")
    leak = f"The password is {forbidden.record['secret']}."
    replies = iter([[(tok.encode(leak), True)], [(tok.encode("I can't share that."), True)]])
    monkeypatch.setattr(A, "sample", lambda *a, **k: next(replies))
    pairs = A.label_by_judge(None, tok, [forbidden], None, A.Sampling(), samples=2)
    assert [(p.chosen, p.rejected) for p in pairs] == [("I can't share that.", leak)]


def test_labelled_pairs_written_once_read_back_as_the_stage_labelled_them(world, tmp_path, monkeypatch):
    """`kosmo label` writes the judge's pairs; a stage reading the file trains on the same pairs, split into
    the same held-out prompts, wherever the file is moved."""
    d, tok = world

    def sample(model, prompts, bank, s, batch_size=32):  # two replies per prompt that the judge tells apart
        first = s.seed < 7919  # label_by_judge seeds the j-th sample seed + 7919 j
        return [(tok.encode(f"The password is {p.record.get('secret')}." if first else p.record["answer"]), True)
                for p in prompts]
    monkeypatch.setattr(A, "sample", sample)
    model = load_sft(d)
    cfg = build_config(reward.StageConfig, {"label": {"samples": 2}})
    in_stage, _ = A.load_pairs(cfg.label, [d / "align.jsonl"], tok, model, cfg.seq_len, cfg.train.seed)
    written = tmp_path / "elsewhere" / "pairs.jsonl"
    assert A.label_run(d / "sft", [d / "align.jsonl"], written, ["label.samples=2"]) == len(in_stage) > 0
    read = A.read_pairs([written], tok, model.tokens_per_image, cfg.seq_len)

    def fields(pairs):
        return [(p.prompt.ids, p.prompt.images, p.chosen, p.rejected, p.margin) for p in pairs]
    assert any(p.prompt.images for p in read) and fields(read) == fields(in_stage)
    assert [fields(s) for s in reward.split(read, 0.25)] == [fields(s) for s in reward.split(in_stage, 0.25)]
    with pytest.raises(KosmoError, match="holds preference pairs already"):
        A.label_run(d / "sft", [written], tmp_path / "again.jsonl")
    with pytest.raises(KosmoError, match="a reward model only scores them"):
        A.label_run(d / "rm", [d / "align.jsonl"], tmp_path / "again.jsonl")


def test_cai_sl_keeps_the_models_own_answers_to_helpful_prompts(world, monkeypatch):
    """Red-team answers are revised; helpfulness prompts keep the model's greedy answer, unrevised."""
    d, tok = world
    lines = (d / "align.jsonl").read_text().splitlines(keepends=True)
    red, helpful_file = d / "red_team.jsonl", d / "helpful.jsonl"  # beside the images they name
    red.write_text("".join(x for x in lines if json.loads(x)["kind"] == "forbidden"))
    helpful_file.write_text("".join(x for x in lines if json.loads(x)["kind"] == "ordinary"))
    monkeypatch.setattr(cai, "critique_and_revise", lambda model, tok, con, prompts, *a: [
        {"answer": "", "rounds": [{"critique": "", "revision": "REVISED"}]} for _ in prompts])
    cfg = build_config(cai.SLConfig, {"max_new_tokens": 4, "helpful": str(helpful_file)})
    model = load_sft(d)
    _, _, train, _ = cai.build_sl(cfg, [red], tok, model)
    helpful = A.read_prompts([helpful_file], tok, model.cfg.tokens_per_image, 512 - 4)
    greedy = A.sample(model, helpful, A.image_bank(model, helpful), A.Sampling(max_new_tokens=4))
    n_red = len(lines) - len(helpful)
    assert len(train) == len(lines) and 0 < n_red < len(lines)

    def target_text(ex):
        return tok.decode([t for t, keep in zip(ex.ids, ex.target) if keep][:-1]).strip()  # without <|end|>
    assert {target_text(ex) for ex in train.examples[:n_red]} == {"REVISED"}
    assert [target_text(ex) for ex in train.examples[n_red:]] == [tok.decode(t).strip() for t, _ in greedy]


def test_constitution_errors_name_the_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - critique: Find the leak.\nlabelling: ['Which is better?']\n")
    with pytest.raises(KosmoError, match=r"principles\[0\] needs a non-empty string 'revision'"):
        cai.load_constitution(bad)
    con = cai.load_constitution(cai.DEFAULT_CONSTITUTION)
    turns = cai.few_shot_turns(con, 1)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert turns[3]["content"] == con.principles[0].critique


# ---- the CLI -----------------------------------------------------------------------------------------------------
def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def is_share_of(share: float, n: int) -> bool:
    """Whether a reported share (0-1, rounded) is k/n for a whole k: what a count over n items gives."""
    return n > 0 and any(abs(share - k / n) < 1e-3 for k in range(n + 1))


def test_cli_reward_and_dpo_on_a_user_preference_file(world, tmp_path):
    d, _ = world
    out = last_json(kosmo("train", "reward", "--init", d / "sft", "--data", d / "prefs.jsonl", "--out", tmp_path / "rm",
                          *CLI, "margin=true"))
    n_pairs = len((d / "prefs.jsonl").read_text().splitlines())
    assert out["train_pairs"] + out["val_pairs"] == n_pairs and out["val_pairs"] > 0
    assert is_share_of(out["val_pair_accuracy"], out["val_pairs"])
    out = last_json(kosmo("train", "dpo", "--init", d / "sft", "--data", d / "prefs.jsonl", "--out", tmp_path / "dpo",
                          *CLI, "loss=ipo"))
    assert math.isfinite(out["loss"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    proc = kosmo("train", "dpo", "--init", d / "sft", "--data", bad, "--out", tmp_path / "x", *CLI, check=False)
    assert proc.returncode == 2 and f"{bad}:1: a preference line needs" in proc.stderr
    proc = kosmo("label", "--init", d / "sft", "--data", d / "prefs.jsonl", "--out", tmp_path / "p.jsonl",
                 "label.samples=2", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"kosmo: error: {d / 'prefs.jsonl'}: holds preference pairs already; `kosmo label` ranks replies to prompt lines"


def test_cli_ppo_on_the_world_then_eval_align(world, tmp_path):
    d, _ = world
    kosmo("train", "ppo", "--init", d / "sft", "--data", d / "align.jsonl", "--out", tmp_path / "ppo", *CLI,
          f"reward={d / 'rm'}", "max_new_tokens=6", "kl_target=1.0", "epochs=1", "minibatches=2")
    result = last_json(kosmo("eval", "align", "--model", tmp_path / "ppo", "--reference", d / "sft",
                             "--data", d / "val_align.jsonl", "--limit", 6))
    assert result["n"] == 6 and result["wins"] + result["ties"] + result["losses"] == 6
    assert result["win_rate"] == round(100 * (result["wins"] + result["ties"] / 2) / 6, 2)
    assert is_share_of(result["forbidden_compliance"] / 100, result["n_forbidden"])
    proc = kosmo("eval", "align", "--model", d / "rm", "--data", d / "val_align.jsonl", check=False)
    assert proc.returncode == 2 and "a reward model scores replies" in proc.stderr


def test_cli_constitutional_ai_stages_on_the_world(world, tmp_path):
    d, _ = world
    kosmo("train", "cai-sl", "--init", d / "sft", "--data", d / "val_align.jsonl", "--out", tmp_path / "sl", *CLI,
          "max_new_tokens=6", "shots=0")
    out = last_json(kosmo("train", "cai-rl", "--init", tmp_path / "sl", "--data", d / "val_align.jsonl",
                          "--out", tmp_path / "pm", *CLI, "label.max_new_tokens=6"))
    assert is_share_of(out["val_pair_accuracy"], out["val_pairs"])


def test_a_sampled_reply_is_cut_before_markup():
    from kosmo.tokenizer import IMAGE_PAD
    assert A._cut_at_markup([20, IMAGE_PAD, 30], True) == ([20], False)  # an image slot would need an image
    assert A._cut_at_markup([20, 30], True) == ([20, 30], True)
