"""Training the reward model (InstructGPT step 2; the network is `kosmo.model.reward`): one score,
read at the last real token of prompt + reply, trained on comparisons with the Bradley–Terry loss

    loss = -log sigmoid(r(chosen) - r(rejected) - margin)

    kosmo train reward --init runs/sft --data align.jsonl          # the world's judge ranks sampled pairs
    kosmo train reward --init runs/sft --data prefs.jsonl margin=true center=0.01

Reward centring adds center * (r(chosen) + r(rejected))^2, which pins the rewards' mean near zero so
that PPO's KL penalty and the reward keep a stable scale. The run reports held-out pair accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kosmo.align import data as A
from kosmo.errors import KosmoError
from kosmo.model import lora
from kosmo.model.reward import RewardModel
from kosmo.tokenizer import PAD
from kosmo.train.trainer import TrainConfig


def rewards(model, idx: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
    """The reward of each right-padded row: the model's score at its last real token, (B,)."""
    last = (idx != PAD).sum(-1) - 1
    return model(idx, images).gather(1, last[:, None]).squeeze(1)


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  prob: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair -log P(chosen beats rejected) under Bradley–Terry, with an optional required margin.
    `prob`, a soft label (AI feedback), is the chance that `chosen` is the better reply: the loss
    is then the cross-entropy against it."""
    diff = r_chosen - r_rejected - (margin if margin is not None else 0)
    if prob is None:
        return -F.logsigmoid(diff)
    return -(prob * F.logsigmoid(diff) + (1 - prob) * F.logsigmoid(-diff))


@dataclass
class StageConfig(lora.LoRAStage):
    train: TrainConfig = field(default_factory=TrainConfig)
    label: A.LabelConfig = field(default_factory=A.LabelConfig)
    seq_len: int = 256
    val_fraction: float = 0.1
    margin: bool = False       # use each pair's 'margin' field
    center: float = 0.0        # reward-centring coefficient
    image_mode: str = "crop"


def make_loss(cfg: StageConfig):
    def reward_loss(model, batch) -> tuple[torch.Tensor, dict]:
        r_chosen, r_rejected = rewards(model, batch["input"], batch["images"]).chunk(2)
        loss = bradley_terry(r_chosen, r_rejected, batch["margin"] if cfg.margin else None, batch["prob"]).sum()
        if cfg.center:
            loss = loss + cfg.center * ((r_chosen + r_rejected) ** 2).sum()
        return loss, {"accuracy": (r_chosen > r_rejected).float().mean().item(),
                      "reward_margin": (r_chosen - r_rejected).mean().item()}
    return reward_loss


def adapted(model: RewardModel, cfg: StageConfig) -> RewardModel:
    """The reward model to train: its backbone through adapters (`freeze=lora`) and its head whole, or
    everything but an image encoder."""
    return lora.adapt(model, cfg.lora, train=(model.head,)) if cfg.freeze == "lora" else A.freeze_vision(model)


def split(pairs: list, val_fraction: float) -> tuple[list, list]:
    """Held-out pairs are whole prompts, so no prompt is both trained and tested on. A prompt is its
    tokens and images: pairs read from a file hold one copy of it per line."""
    def key(p):
        return tuple(p.prompt.ids), tuple(p.prompt.images)
    keys = list(dict.fromkeys(map(key, pairs)))
    held = set(keys[len(keys) - int(len(keys) * val_fraction):]) if val_fraction > 0 else set()
    return [p for p in pairs if key(p) not in held], [p for p in pairs if key(p) in held]


def build(cfg: StageConfig, data: list, tok, init_model=None):
    if init_model is None:
        raise KosmoError("reward needs --init RUN (the SFT model whose backbone it starts from)")
    sampler = init_model.backbone if isinstance(init_model, RewardModel) else init_model
    context = sampler.context_length
    if isinstance(init_model, RewardModel) and not A.has_pairs(data):
        raise KosmoError("--init is a reward model, which cannot sample replies: give preference pairs")
    pairs, bank = A.load_pairs(cfg.label, data, tok, sampler, min(cfg.seq_len, context), cfg.train.seed)
    model = init_model if isinstance(init_model, RewardModel) else RewardModel.from_model(init_model)
    model = adapted(model, cfg)
    train, val = split(pairs, cfg.val_fraction)
    if not train:
        raise KosmoError(f"no training pairs left after holding out val_fraction={cfg.val_fraction}")
    max_len = min(cfg.seq_len, context)
    return (model, make_loss(cfg), A.PairDataset(train, tok, bank, max_len),
            A.PairDataset(val, tok, bank, max_len) if val else None)


@torch.no_grad()
def pair_accuracy(model: RewardModel, pairs: A.PairDataset, batch_size: int = 32) -> float:
    """Share of pairs whose chosen reply out-scores the rejected one."""
    device = next(model.parameters()).device
    model.eval()
    wins = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs.collate(list(range(start, min(start + batch_size, len(pairs)))))
        images = batch["images"].to(device) if batch["images"] is not None else None
        r_chosen, r_rejected = rewards(model, batch["input"].to(device), images).chunk(2)
        wins += int((r_chosen > r_rejected).sum())
    return wins / len(pairs)


def report(model, train_set, eval_set) -> dict:
    return {"train_pairs": len(train_set), **({"val_pairs": len(eval_set),
                                               "val_pair_accuracy": round(pair_accuracy(model, eval_set), 4)}
                                              if eval_set else {})}
