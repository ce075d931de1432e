"""CLIP: an image tower and a text tower trained to agree, by contrastive learning (Radford et al., 2021).

Both towers embed into one space through bias-free projections; a batch of N image-text pairs gives an
N x N matrix of cosine similarities times a learned temperature, and the loss asks each image to pick
out its own caption among the N and each caption its own image. Weights map onto transformers'
`CLIPModel` (see `kosmo.interop.hf_clip`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kosmo.config import ModelConfig
from kosmo.model.vision import Block, TowerConfig, VisionConfig, VisionTransformer, init_tower

MAX_LOGIT_SCALE = math.log(100.0)  # the paper clips the temperature so logits never exceed 100 x cosine


@dataclass
class TextConfig(TowerConfig):
    key = "text"
    vocab_size: int = 4096
    max_len: int = 77
    eos_token_id: int = 2  # kosmo's "</s>"; the text is pooled at its first occurrence in each row
    # transformers pools checkpoints whose config says eos_token_id == 2 at argmax(input_ids) instead (the
    # original CLIP's EOT was the largest id); the importer sets this so that such checkpoints keep parity.
    legacy_argmax_pool: bool = False


@dataclass
class CLIPConfig(ModelConfig):
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    logit_scale_init: float = math.log(1 / 0.07)


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_heads, cfg.mlp_dim, cfg.act, cfg.norm_eps, causal=True)
                                    for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        init_tower(self, cfg.dim, cfg.n_layers)
        nn.init.normal_(self.pos_embed, std=0.01)

    def hidden(self, ids):
        """(B, T) token ids -> (B, T, dim), every position LayerNormed."""
        T = ids.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"{T} tokens exceed the text tower's context of {self.cfg.max_len}")
        x = self.token_embed(ids) + self.pos_embed[:T]
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def eos_positions(self, ids):
        if self.cfg.legacy_argmax_pool:
            return ids.argmax(-1)
        is_eos = ids == self.cfg.eos_token_id
        # First EOS (padding may repeat it). A row truncated before its EOS pools at its last token
        # (transformers would pool at position 0 there); no host sync, so this stays cheap on GPUs.
        return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), ids.shape[1] - 1)

    def forward(self, ids):
        """(B, T) -> pooled (B, dim): the causal stream at the EOS token has read the whole text."""
        x = self.hidden(ids)
        return x[torch.arange(x.shape[0], device=x.device), self.eos_positions(ids)]


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.visual_projection = nn.Linear(cfg.vision.dim, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        nn.init.normal_(self.visual_projection.weight, std=cfg.vision.dim ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=cfg.text.dim ** -0.5)

    def encode_image(self, pixels):
        """(B, C, H, W) -> (B, embed_dim), not normalised (transformers' `get_image_features`)."""
        return self.visual_projection(self.vision(pixels))

    def encode_text(self, ids):
        """(B, T) -> (B, embed_dim), not normalised (transformers' `get_text_features`)."""
        return self.text_projection(self.text(ids))

    def forward(self, pixels, ids):
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)): scaled cosine similarities."""
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(ids), dim=-1)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        logits_per_image = scale * image @ text.T
        return logits_per_image, logits_per_image.T


def clip_loss(logits_per_image):
    """Symmetric InfoNCE: pair i is the right answer for row i and for column i."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2
