"""The reward model (InstructGPT step 2) as a network: a language model's decoder without its
vocabulary head, and a linear layer that turns the final norm's hidden state at every position into
one score. The reward of prompt + reply is the score at its last token; PPO's value model is the
same network read at every reply position. Training it lives in `kosmo.align.reward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kosmo.config import ModelConfig
from kosmo.model.causal_lm import CausalLM
from kosmo.model.flamingo import Flamingo, FlamingoConfig
from kosmo.model.lm import LM, LMConfig
from kosmo.model.mllm import MLLM, MLLMConfig

BACKBONES = {"lm": (LM, LMConfig), "mllm": (MLLM, MLLMConfig), "flamingo": (Flamingo, FlamingoConfig)}


@dataclass
class RewardConfig(ModelConfig):
    backbone: str = "lm"                        # the backbone's arch: lm, mllm or flamingo
    model: dict = field(default_factory=dict)   # the backbone's own config

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")


class RewardModel(nn.Module):
    def __init__(self, cfg: RewardConfig):
        super().__init__()
        self.cfg = cfg
        cls, cfg_cls = BACKBONES[cfg.backbone]
        self.backbone: CausalLM = cls(cfg_cls.from_dict(cfg.model, "model.model."), vocab_head=False)
        dim = self.backbone.decoder.cfg.dim
        self.head = nn.Linear(dim, 1)
        nn.init.normal_(self.head.weight, std=1 / (dim + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_model(cls, model: CausalLM) -> RewardModel:
        """A reward model whose backbone starts from a copy of `model`'s weights; `model` is left as it is."""
        arch = next(name for name, (c, _) in BACKBONES.items() if isinstance(model, c))
        reward = cls(RewardConfig(arch, model.cfg.to_dict()))
        weights = {k: v for k, v in model.state_dict().items() if not k.endswith("lm_head.weight")}
        reward.backbone.load_state_dict(weights)
        p = next(model.parameters())
        return reward.to(p.device, p.dtype)

    @property
    def tokens_per_image(self) -> int:
        return self.backbone.tokens_per_image

    @property
    def vocab_size(self) -> int:
        return self.backbone.vocab_size

    def forward(self, idx: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T) scores."""
        return self.head(self.backbone.hidden(idx, images)).squeeze(-1).float()
