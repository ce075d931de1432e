"""Direct Preference Optimisation: the policy learns from comparisons directly, with no reward model
and no sampling, against the frozen log-probs of its starting point (the reference). With
h = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)]:

    sigmoid (DPO)  loss = -log sigmoid(beta * h)       (log-probs summed over each reply)
    ipo            loss = (h - 1 / (2 * beta))^2       (IPO: a fixed target margin, no overfitting to 0/1 labels)

IPO's log-probs are averaged over each reply's tokens, as in Azar et al. (2023) and TRL: with sums,
the margin it asks for would be the same for a reply of 3 tokens and one of 300.

    kosmo train dpo --init runs/sft --data align.jsonl beta=0.1        # pairs ranked by the world's judge
    kosmo train dpo --init runs/sft --data prefs.jsonl loss=ipo

The reference log-probs are computed once before training, so only the policy is held in memory.
With `freeze=lora` the policy trains through adapters (`kosmo.model.lora`); their zero start makes the
adapted policy its own reference at step 0, as in full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kosmo import hardware
from kosmo.align import data as A
from kosmo.align.reward import split
from kosmo.errors import KosmoError
from kosmo.model import lora
from kosmo.model.causal_lm import CausalLM
from kosmo.train.trainer import TrainConfig

LOSSES = ("sigmoid", "ipo")


@dataclass
class StageConfig(lora.LoRAStage):
    train: TrainConfig = field(default_factory=TrainConfig)
    label: A.LabelConfig = field(default_factory=A.LabelConfig)
    seq_len: int = 256
    val_fraction: float = 0.1
    beta: float = 0.1
    loss: str = "sigmoid"      # sigmoid (DPO) or ipo
    image_mode: str = "crop"

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError("beta must be positive")


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float, kind: str = "sigmoid",
             prob: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss from reply log-probs (summed for DPO, per token for IPO). A soft label `prob`
    (AI feedback) mixes in the loss of the flipped pair with weight 1 - prob (conservative DPO)."""
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    loss = -F.logsigmoid(beta * h)
    return loss if prob is None else prob * loss + (1 - prob) * -F.logsigmoid(-beta * h)


def make_loss(cfg: StageConfig):
    def loss_fn(model, batch) -> tuple[torch.Tensor, dict]:
        pi_chosen, pi_rejected = A.sequence_logprobs(model, batch, per_token=cfg.loss == "ipo").chunk(2)
        ref_chosen, ref_rejected = batch["ref"].unbind(-1)
        loss = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss, batch["prob"])
        # DPO's implicit rewards: beta * log(pi / ref) of each reply
        chosen, rejected = cfg.beta * (pi_chosen - ref_chosen), cfg.beta * (pi_rejected - ref_rejected)
        return loss.sum(), {"accuracy": (chosen > rejected).float().mean().item(),
                            "reward_chosen": chosen.mean().item(), "reward_rejected": rejected.mean().item()}
    return loss_fn


@torch.no_grad()
def reference_logprobs(model, pairs: A.PairDataset, train_cfg: TrainConfig, per_token: bool = False,
                       batch_size: int = 32) -> torch.Tensor:
    """(N, 2): the reference's log-probs of each pair's chosen and rejected reply (summed, or averaged
    `per_token`), computed in the training precision so that the policy's first step sees exactly h = 0."""
    device = hardware.pick_device(train_cfg.device)
    model.to(device)
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs.collate(list(range(start, min(start + batch_size, len(pairs)))))
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with hardware.autocast(device, train_cfg.precision):
            out.append(torch.stack(A.sequence_logprobs(model, batch, per_token).chunk(2), -1).float().cpu())
    return torch.cat(out)


def build(cfg: StageConfig, data: list, tok, init_model=None):
    if not isinstance(init_model, CausalLM):
        raise KosmoError("dpo needs --init RUN: the SFT policy it starts from (and keeps as reference)")
    context = init_model.context_length
    max_len = min(cfg.seq_len, context)
    pairs, bank = A.load_pairs(cfg.label, data, tok, init_model, max_len, cfg.train.seed)
    train_pairs, val_pairs = split(pairs, cfg.val_fraction)
    sets = [A.PairDataset(p, tok, bank, max_len) if p else None for p in (train_pairs, val_pairs)]
    for s in sets:
        if s is not None:
            s.ref = reference_logprobs(init_model, s, cfg.train, per_token=cfg.loss == "ipo")
    model = lora.adapt(init_model, cfg.lora) if cfg.freeze == "lora" else A.freeze_vision(init_model)
    return model, make_loss(cfg), sets[0], sets[1]
