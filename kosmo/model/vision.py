"""A Vision Transformer with exactly the architecture of CLIP's vision tower, in plain PyTorch.

Patches are embedded by a strided convolution without bias, a class token is prepended, learned
position embeddings added and the sequence LayerNormed once more before the blocks ("pre_layrnorm" in
transformers). Blocks are pre-norm: LayerNorm -> multi-head self-attention -> residual, LayerNorm ->
MLP -> residual, every projection with a bias. The pooled output is the class token after a final
LayerNorm. Weights map onto transformers' `CLIPVisionModel` (see `kosmo.interop.hf_clip`); q/k/v are
stored fused, as in `kosmo.model.lm`, because one wide matmul beats three narrow ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from kosmo.config import ModelConfig
from kosmo.model.lm import LMConfig


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's sigmoid approximation of GELU


ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class TowerConfig(ModelConfig):
    """The shape of a transformer tower, which the vision, text and audio towers share."""
    key: ClassVar[str]  # the tower's key in its model's config, for messages about its fields
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 4
    mlp_dim: int = 768
    act: str = "quick_gelu"
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"{self.key}.dim={self.dim} is not divisible by {self.key}.n_heads={self.n_heads}")
        if self.act not in ACTS:
            raise ValueError(f"{self.key}.act={self.act!r} is not one of {', '.join(ACTS)}")


@dataclass
class VisionConfig(TowerConfig):
    key = "vision"
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size={self.image_size} is not a multiple of "
                             f"vision.patch_size={self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, causal: bool = False):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_mask=None):
        """key_mask: optional (B, T) bool, False at keys no query may read (padding)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """CLIP's encoder layer, shared by the image tower and the (causal) text tower."""

    def __init__(self, dim: int, n_heads: int, mlp_dim: int, act: str, eps: float, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_heads, causal)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)

    def forward(self, x, key_mask=None):
        x = x + self.attn(self.norm1(x), key_mask)
        x = x + self.mlp(self.norm2(x))
        return x


def init_tower(module: nn.Module, dim: int, n_layers: int):
    """OpenAI CLIP's init: std dim^-0.5 into attention, (2 dim)^-0.5 into the MLP, and what writes to the
    residual stream scaled down with depth so its variance stays flat."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        elif name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            nn.init.normal_(p, std=dim ** -0.5 * (2 * n_layers) ** -0.5)
        elif name.endswith("attn.qkv.weight"):
            nn.init.normal_(p, std=dim ** -0.5)
        elif name.endswith("mlp.fc1.weight"):
            nn.init.normal_(p, std=(2 * dim) ** -0.5)
        else:  # embeddings and the patch convolution
            nn.init.normal_(p, std=0.02)


@dataclass
class ImageLMConfig(ModelConfig):
    """What every language model with an image encoder shares: the two towers' configs and the feature layer."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    feature_layer: int = -2       # which encoder block's output the LM side reads (HF hidden_states index)

    @property
    def max_seq_len(self) -> int:
        return self.lm.max_seq_len


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_token = nn.Parameter(torch.zeros(cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1 + cfg.num_patches, cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
                                    for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        init_tower(self, cfg.dim, cfg.n_layers)
        nn.init.normal_(self.class_token, std=cfg.dim ** -0.5)

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a rows x cols patch grid: bicubic over the trained grid when it differs,
        as transformers' `interpolate_pos_encoding` (the class token's embedding is kept as is)."""
        g = self.cfg.grid
        if (rows, cols) == (g, g):
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:1], self.pos_embed[1:].T.reshape(1, -1, g, g)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.reshape(self.cfg.dim, -1).T], dim=0)

    def embed(self, pixels):
        """(B, C, H, W) -> (B, 1 + n_patches, dim): HF's hidden_states[0]."""
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (B, dim, rows, cols)
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return self.pre_norm(x + self.positions(rows, cols))

    def features(self, pixels, layer: int = -2):
        """Hidden state after block `layer`, numbered as transformers' `hidden_states`: 0 is the embedding
        (after the pre-norm), i the output of block i, negative counts from the end; -2, the penultimate,
        is what LLaVA feeds its connector. Blocks after `layer` are not run."""
        n = self.cfg.n_layers
        if not -(n + 1) <= layer <= n:
            raise IndexError(f"layer {layer} is out of range for a {n}-layer vision tower ({-(n + 1)}..{n})")
        x = self.embed(pixels)
        for block in self.blocks[:layer % (n + 1)]:
            x = block(x)
        return x

    def unread(self, layer: int) -> list[nn.Module]:
        """The modules `features(pixels, layer)` never runs: the blocks after `layer` and the post-norm. A model
        that reads that layer gives them no gradient, so they must not count as trained (an optimizer keeps
        no state for them, and a resumed run would find none)."""
        return [*self.blocks[layer % (self.cfg.n_layers + 1):], self.post_norm]

    def forward(self, pixels):
        """(B, C, H, W) -> pooled (B, dim): the class token of the last layer, LayerNormed."""
        return self.post_norm(self.features(pixels, -1)[:, 0])
