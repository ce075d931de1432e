"""PPO against a reward model with a per-token KL penalty to the SFT reference (InstructGPT step 3).

    kosmo train ppo --init runs/sft --data align.jsonl reward=runs/reward kl_coef=0.05

Each trainer step is one PPO iteration: sample a reply to `train.batch_size` prompts, score them,
then `epochs` passes of clipped updates over `minibatches` slices of that experience.

- Reward per reply token t: -kl_coef * (log pi - log ref)(t), plus at the last token the reward
  model's score (minus `missing_end_penalty` when the reply ran out of room before <|end|>).
  The coefficient is fixed, or adapts towards `kl_target` nats per reply (Ziegler et al. 2019).
- Advantages by GAE(gamma, lambda) from a value model (initialised from the reward model, as in
  InstructGPT), whitened over the batch; clipped policy and value losses.
- Log-probs are taken at the sampling temperature, so that the ratio compares the distribution the
  replies were actually drawn from. The models have no dropout, and all run in eval mode anyway, so
  the log-probs of the rollout and of the first update agree exactly.

The run publishes the policy (model.safetensors loads like any LM or multimodal run); its resumable
state also holds the value model and the KL coefficient. With `freeze=lora` the policy and the value
model's backbone train through adapters (the value head whole), the run publishes the policy's
adapters, and the reference is the policy with its adapters switched off rather than a copy of it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kosmo import checkpoint, hardware
from kosmo.align import data as A
from kosmo.align.reward import rewards
from kosmo.errors import KosmoError
from kosmo.generate import Sampling
from kosmo.model import lora
from kosmo.model.causal_lm import CausalLM
from kosmo.model.reward import RewardModel
from kosmo.tokenizer import END_OF_TURN
from kosmo.train import distributed as D
from kosmo.train.trainer import TrainConfig, lr_at, to_device
from kosmo.train.trainer import Trainer as BaseTrainer


@dataclass
class StageConfig(lora.LoRAStage):
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, warmup_steps=0, max_steps=100,
                                                                   batch_size=32, weight_decay=0.0))
    reward: str = ""                 # the reward-model run
    seq_len: int = 256
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.05            # the starting coefficient of the KL penalty
    kl_target: float = 0.0           # > 0: adapt the coefficient towards this KL (nats per reply)
    kl_horizon: int = 1000           # adaptive controller's horizon, in replies
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2                # policy ratio clip
    value_clip: float = 0.2
    vf_coef: float = 0.5
    epochs: int = 4
    minibatches: int = 4
    whiten: bool = True
    missing_end_penalty: float = 1.0
    image_mode: str = "crop"


# ---- the maths -----------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over (B, T) steps; steps outside `mask` hold no reward and no
    value, so the step after a reply's last token is terminal. Returns (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def policy_loss(logp, old_logp, advantages, mask, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, -min(r A, clip(r, 1-e, 1+e) A), and the share of steps clipped."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values, old_values, returns, mask, clip: float) -> torch.Tensor:
    """Clipped value loss: the value may move at most `clip` from its rollout estimate per update."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def adapt_kl(coef: float, kl: float, target: float, n: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller, its error clipped to +-20%."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * n / horizon)


# ---- the models --------------------------------------------------------------------------------------------------
class ActorCritic(nn.Module):
    """The trained pair: the policy and its value model (and the KL coefficient, so that a resumed run
    continues with the coefficient it had reached)."""

    def __init__(self, policy: nn.Module, value: RewardModel, kl_coef: float):
        super().__init__()
        self.policy, self.value = policy, value
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef)))

    def forward(self, ids, images=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(ids, images), self.value(ids, images)


@dataclass
class Experience:
    """One rollout on the (B, T-1) grid of next-token steps; `mask` marks the reply's tokens."""
    ids: torch.Tensor
    images: torch.Tensor | None
    image_counts: list[int]
    mask: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def minibatches(self, n: int, gen: torch.Generator):
        B = self.ids.shape[0]
        order = torch.randperm(B, generator=gen).tolist()
        starts = [sum(self.image_counts[:i]) for i in range(B)]
        for chunk in (order[i::n] for i in range(min(n, B))):
            images = None
            if self.images is not None:
                rows = [j for i in chunk for j in range(starts[i], starts[i] + self.image_counts[i])]
                images = self.images[rows] if rows else None
            yield {"ids": self.ids[chunk], "images": images, "mask": self.mask[chunk], "logp": self.logp[chunk],
                   "values": self.values[chunk], "advantages": self.advantages[chunk], "returns": self.returns[chunk]}


class PPO:
    """Rollouts and the PPO loss: what the trainer's loss function is for the other stages."""

    def __init__(self, cfg: StageConfig, reference: Callable, reward_model: RewardModel, bank, max_len: int):
        self.cfg, self.reference, self.reward_model = cfg, reference, reward_model
        self.bank, self.max_len = bank, max_len

    @torch.no_grad()
    def rollout(self, model: ActorCritic, prompts: list[A.Prompt], seed: int) -> tuple[Experience, dict]:
        cfg = self.cfg
        s = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)
        replies = A.sample(model.policy, prompts, self.bank, s, batch_size=len(prompts))
        rows = [(p.ids + toks + [END_OF_TURN] * ended, len(p.ids)) for p, (toks, ended) in zip(prompts, replies)]
        device = next(model.parameters()).device
        ids, reply = (t.to(device) for t in A.pad_right(rows, self.max_len))
        paths = [x for p in prompts for x in p.images]
        images = self.bank.get(paths).to(device) if paths else None
        logits, values = model(ids, images)
        logp = A.token_logprobs(logits, ids, cfg.temperature)
        ref_logp = A.token_logprobs(self.reference(ids, images), ids, cfg.temperature)
        mask = reply[:, 1:].float()
        values = values[:, :-1] * mask
        ended = torch.tensor([e for _, e in replies], device=device)
        score = rewards(self.reward_model, ids, images) - cfg.missing_end_penalty * (~ended).float()
        kl = (logp - ref_logp) * mask
        step_rewards = -model.kl_coef * kl
        n_prompt = torch.tensor([len(p.ids) for p in prompts], device=device)
        last = n_prompt + reply.sum(-1) - 2  # the step that emits the reply's last token
        step_rewards[torch.arange(len(prompts), device=device), last] += score
        advantages, returns = gae(step_rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten:
            advantages = whiten(advantages, mask)
        logp_all = (logits[:, :-1].float() / cfg.temperature).log_softmax(-1)
        entropy = masked_mean(-(logp_all.exp() * logp_all).sum(-1), mask)
        stats = {"reward": score.mean().item(), "kl": kl.sum(-1).mean().item(), "entropy": entropy.item(),
                 "reply_len": mask.sum(-1).mean().item(), "end_rate": ended.float().mean().item(),
                 "kl_coef": model.kl_coef.item()}
        return Experience(ids, images, [len(p.images) for p in prompts], mask, logp, values,
                          advantages, returns), stats

    def __call__(self, model, mb: dict) -> tuple[torch.Tensor, dict]:
        logits, values = model(mb["ids"], mb["images"])
        logp = A.token_logprobs(logits, mb["ids"], self.cfg.temperature)
        pg_loss, clipfrac = policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], self.cfg.clip)
        vf_loss = value_loss(values[:, :-1], mb["values"], mb["returns"], mb["mask"], self.cfg.value_clip)
        log_ratio = (logp - mb["logp"]) * mb["mask"]
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mb["mask"])  # Schulman's k2 estimator of KL(old || new)
        return pg_loss + self.cfg.vf_coef * vf_loss, {
            "policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "clipfrac": clipfrac.item(),
            "approx_kl": approx_kl.item()}


class Prompts:
    """The prompt set as the trainer's Dataset: a batch is a list of prompts to roll out."""

    def __init__(self, prompts: list[A.Prompt]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def collate(self, indices: list[int]) -> dict:
        return {"prompts": [self.prompts[i] for i in indices], "n_targets": len(indices)}


class Trainer(BaseTrainer):
    """The shared trainer (optimizer, schedule, checkpoints, metrics, progress), with a PPO iteration as
    its step."""

    def _train_step(self) -> dict:
        cfg, model, ppo = self.cfg, self.model, self.loss_fn
        actor_critic: ActorCritic = D.unwrap(model)
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        model.eval()  # dropout off, in rollout and update alike
        prompts = self.train_set.collate(self._rows(self.step, 0))["prompts"]
        seed = cfg.seed * 1_000_003 + self.step  # a resumed run samples the same replies
        with hardware.autocast(self.env.device, self.precision):
            exp, stats = ppo.rollout(actor_critic, prompts, seed)
        gen = torch.Generator().manual_seed(seed)
        sums: dict[str, float] = {}
        n_updates = 0
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(ppo.cfg.epochs):
            for mb in exp.minibatches(ppo.cfg.minibatches, gen):
                with hardware.autocast(self.env.device, self.precision):
                    loss, metrics = ppo(model, to_device(mb, self.env.device))
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    raise KosmoError(f"PPO loss or gradient became non-finite at step {self.step + 1}; "
                                     "lower train.lr or use train.precision=fp32")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": loss.item(), "grad_norm": float(grad_norm), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        if ppo.cfg.kl_target > 0:
            actor_critic.kl_coef.fill_(adapt_kl(actor_critic.kl_coef.item(), stats["kl"], ppo.cfg.kl_target,
                                                len(prompts), ppo.cfg.kl_horizon))
        return {"step": self.step + 1, "lr": lr, "tokens": int(exp.mask.sum().item()), **stats,
                **{k: v / n_updates for k, v in sums.items()}}

    def save(self):
        super().save()
        if self.env.main:  # the run's model is the policy; the critic lives in the resumable state only
            policy = D.unwrap(self.model).policy
            tensors = lora.trained_tensors(policy) if self.adapted else checkpoint.model_tensors(policy)
            checkpoint.save_tensors(self.out / self.weights_file, tensors)


def build(cfg: StageConfig, data: list, tok, init_model=None):
    from kosmo.model.load import load_run
    if not isinstance(init_model, CausalLM):
        raise KosmoError("ppo needs --init RUN: the SFT policy it starts from (and keeps as reference)")
    if not cfg.reward:
        raise KosmoError("ppo needs reward=RUN: a reward model trained with `kosmo train reward`")
    reward_model, _, config = load_run(cfg.reward)
    if not isinstance(reward_model, RewardModel):
        raise KosmoError(f"reward={cfg.reward}: a {config.get('arch')} run, not a reward model")
    k = init_model.tokens_per_image
    if reward_model.tokens_per_image != k:
        raise KosmoError(f"reward={cfg.reward}: its backbone reads {reward_model.tokens_per_image} tokens per image, "
                         f"the policy {k}")
    context = init_model.context_length
    max_len = min(cfg.seq_len, context)
    prompts = A.read_prompts(data, tok, k, max_len - cfg.max_new_tokens)
    bank = A.image_bank(init_model, prompts, cfg.image_mode)
    device = hardware.pick_device(cfg.train.device)
    reward_model.requires_grad_(False).eval().to(device)
    value, _, _ = load_run(cfg.reward)
    if cfg.freeze == "lora":
        policy, value = lora.adapt(init_model, cfg.lora), lora.adapt(value, cfg.lora, train=(value.head,))
        reference = lora.without_adapters(policy)
    else:
        reference = copy.deepcopy(init_model).requires_grad_(False).eval().to(device)
        policy, value = A.freeze_vision(init_model), A.freeze_vision(value)
    model = ActorCritic(policy, value, cfg.kl_coef)
    return model, PPO(cfg, reference, reward_model, bank, max_len), Prompts(prompts), None
