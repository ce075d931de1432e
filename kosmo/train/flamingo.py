"""The Flamingo stage: a Perceiver resampler and gated cross-attention blocks learn to feed images to
a frozen LM, on the KOSMOS path's three data kinds (text, image-caption pairs, interleaved documents).

    kosmo train flamingo --init runs/lm vision=runs/clip --data captions.jsonl interleaved.jsonl fewshot.jsonl

`--init` is the LM to freeze (a kosmo LM run, e.g. one made by `kosmo import` from a Hugging Face
Llama) or a Flamingo run to continue; `vision` is a kosmo CLIP run or a Hugging Face CLIP directory.
Only the resampler, the cross-attention blocks and the image-marker embeddings train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kosmo.errors import KosmoError
from kosmo.model.flamingo import Flamingo, FlamingoConfig
from kosmo.model.lm import LM
from kosmo.train import distributed as D
from kosmo.train.mllm import KINDS as MLLM_KINDS
from kosmo.train.mllm import build_data, load_vision, mllm_loss
from kosmo.train.trainer import TrainConfig

KINDS = tuple(k for k in MLLM_KINDS if k != "draw")  # Flamingo reads pictures; it does not draw them


@dataclass
class StageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int = 256
    val_fraction: float = 0.02
    vision: str = ""                   # image encoder source, when --init is an LM
    feature_layer: int = -2
    latents: int = 8                   # visual tokens per image
    resampler_layers: int = 2
    resampler_heads: int = 4
    cross_every: int = 1               # a gated cross-attention block before every N-th LM layer
    xattn_heads: int = 4
    attend: str = "latest"             # latest or previous (every preceding image)
    gated_ffw: bool = True             # a gated feed-forward after each cross-attention
    image_mode: str = "crop"           # crop or pad to square
    mix: dict = field(default_factory=dict)  # weight per data kind, e.g. {captions: 1, interleaved: 2}
    pack: bool = True                  # pack each batch's examples into rows of seq_len tokens


def make_model(cfg: StageConfig, init_model) -> Flamingo:
    if isinstance(init_model, Flamingo):
        return init_model
    if not isinstance(init_model, LM):
        raise KosmoError("the flamingo stage needs --init: the LM run to freeze (or a flamingo run to continue)")
    vision = load_vision(cfg.vision)
    try:
        fcfg = FlamingoConfig(vision=vision.cfg, lm=init_model.cfg, feature_layer=cfg.feature_layer,
                              latents=cfg.latents, resampler_layers=cfg.resampler_layers,
                              resampler_heads=cfg.resampler_heads, cross_every=cfg.cross_every,
                              xattn_heads=cfg.xattn_heads, attend=cfg.attend, gated_ffw=cfg.gated_ffw)
    except ValueError as e:
        raise KosmoError(f"invalid config: {e}") from None
    return Flamingo(fcfg, vision=vision, lm=init_model)


def flamingo_loss(model, batch):
    """The token loss, with every gate's tanh in the step's metrics (metrics.jsonl): whether the pictures
    reach the LM is decided by the attention gates, and a run's log shows them open or stay shut."""
    loss, metrics = mllm_loss(model, batch)
    for name, block in D.unwrap(model).xattn.items():
        for kind, gate in (("attn", block.attn_gate), ("ffw", block.ffw_gate)):
            if gate is not None:
                gate = gate.detach()
                gate = gate.full_tensor() if hasattr(gate, "full_tensor") else gate  # FSDP shards even a gate
                metrics[f"{kind}_gate.{name}"] = gate.tanh()
    return loss, metrics


def build(cfg: StageConfig, data: list, tokenizer, init_model=None):
    model = make_model(cfg, init_model)
    model.freeze()
    if cfg.seq_len > model.context_length:
        raise KosmoError(f"seq_len={cfg.seq_len} exceeds the model's context of {model.context_length}")
    train, val = build_data(cfg, data, tokenizer, model, KINDS)
    return model, flamingo_loss, train, val
