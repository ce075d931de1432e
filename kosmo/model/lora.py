"""LoRA (Hu et al. 2021): a frozen linear layer W plus a trainable low-rank update, y = W x + (alpha / r) B A x,
with A (r, in) random and B (out, r) zero, so that an adapted model starts as exactly the model it adapts.

kosmo writes its own rather than using PEFT. The layer is a few lines; PEFT finds layers by the module
names of Hugging Face models, while kosmo's decoder stores q/k/v and gate/up fused. Here one adapter pair
spans each fused layer's whole output (B's rows for q, k and v share one A), which spends a rank-r budget
on the three projections together, as LoRA over a fused `c_attn` does in GPT-2. The adapter keeps the base
layer's parameter under its own name (`attn.qkv.weight`), so base checkpoints load into an adapted model
unchanged, DDP and FSDP shard it like any block, and `torch.compile` traces it as plain matmuls.

A LoRA run stores only what it trained (`adapter.safetensors`) beside a reference to its base run;
`kosmo.model.load.load_run` rebuilds the base, adds the adapters and merges them into the weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kosmo.model.lm import LM

TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "gate_up": "mlp.gate_up", "down": "mlp.down"}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0          # the update is scaled by alpha / rank
    dropout: float = 0.0         # on the adapter's input only
    targets: list[str] = field(default_factory=lambda: list(TARGETS))  # which of the LM's linear layers

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be at least 0 and below 1, got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets must be distinct names among {', '.join(TARGETS)}, got {self.targets}")


FREEZE = ("none", "lora")


@dataclass
class LoRAStage:
    """The options of a stage that trains a whole model or adapters on its LM (stages with connectors
    have their own `freeze` policies, `lora` among them)."""
    freeze: str = "none"         # none: the weights train themselves; lora: the LM's linear layers through adapters
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if self.freeze not in FREEZE:
            raise ValueError(f"freeze must be one of {', '.join(FREEZE)}, got {self.freeze!r}")


class LoRALinear(nn.Module):
    """`base`'s weight (shared, not copied) and bias, plus the adapter pair `lora_a`, `lora_b`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the weight, in fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain linear layer with the update folded into its weight (summed in fp32)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            weight = (self.weight.float() + self.delta()).to(self.weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        return linear


def add_adapters(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wraps the `cfg.targets` layers of every block of every LM decoder in `model` (a policy's, a reward
    model's backbone's) with trainable adapters. Other parameters keep their `requires_grad`."""
    decoders = [m for m in model.modules() if isinstance(m, LM)]
    if not decoders:
        raise ValueError(f"a {type(model).__name__} has no language-model decoder to adapt")
    for lm in decoders:
        for block in lm.blocks:
            for target in cfg.targets:
                parent, name = TARGETS[target].split(".")
                owner = getattr(block, parent)
                setattr(owner, name, LoRALinear(getattr(owner, name), cfg.rank, cfg.alpha, cfg.dropout))
    return model


def adapt(model: nn.Module, cfg: LoRAConfig, train: tuple[nn.Module | None, ...] = ()) -> nn.Module:
    """Freezes `model`, adds adapters, and lets the modules in `train` (a new head, a connector) train whole."""
    model.requires_grad_(False)
    add_adapters(model, cfg)
    for m in train:
        if m is not None:
            m.requires_grad_(True)
    return model


def adapters(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge(model: nn.Module) -> nn.Module:
    """Replaces every adapted layer by its merged plain linear layer: the model computes the same function
    with no adapter left, and loads, exports and serves like any model of its architecture."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.merged())
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """The base model: every adapter of `model` off inside the block (PPO's reference costs no copy)."""
    layers = adapters(model)
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def without_adapters(model: nn.Module):
    """`model`'s forward with its adapters off: the base model it adapts, sharing its weights."""
    def base(*args, **kw):
        with disabled(model):
            return model(*args, **kw)
    return base


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run keeps of `model`: the parameters that train (adapters, and whatever else the stage
    trains whole) and the saved buffers; the frozen rest is its base run's."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {n: t for n, t in model.state_dict().items() if n in keep}
