"""Connectors: encoder features -> vectors in the language model's embedding space (MetaLM's
"connector layer"). For images, `linear` and `mlp` (LLaVA-1.5's two layers with GELU) keep one token
per patch; `resampler` compresses any number of patches into a fixed number of tokens with learned
queries. For audio, `FrameStacker` turns every few encoder frames into one token."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("linear", "mlp", "resampler")


class Resampler(nn.Module):
    """Learned queries cross-attend to the patch features once, then a feed-forward refines them."""

    def __init__(self, in_dim: int, out_dim: int, n_tokens: int, n_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_tokens, out_dim) * 0.02)
        self.kv_norm = nn.LayerNorm(in_dim)
        self.kv = nn.Linear(in_dim, 2 * out_dim)
        self.q_norm = nn.LayerNorm(out_dim)
        self.q = nn.Linear(out_dim, out_dim)
        self.out = nn.Linear(out_dim, out_dim)
        self.mlp = nn.Sequential(nn.LayerNorm(out_dim), nn.Linear(out_dim, 4 * out_dim), nn.GELU(),
                                 nn.Linear(4 * out_dim, out_dim))
        self.n_heads = n_heads

    def forward(self, feats):  # (M, N, in_dim) -> (M, n_tokens, out_dim)
        M, N, _ = feats.shape
        h, d = self.n_heads, self.queries.shape[1] // self.n_heads
        k, v = self.kv(self.kv_norm(feats)).chunk(2, dim=-1)
        q = self.q(self.q_norm(self.queries)).expand(M, -1, -1)
        split = lambda t: t.reshape(M, t.shape[1], h, d).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(M, -1, h * d)
        x = self.queries + self.out(y)
        return x + self.mlp(x)


def make_connector(kind: str, in_dim: int, out_dim: int, n_tokens: int = 16, n_heads: int = 4) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "resampler":
        return Resampler(in_dim, out_dim, n_tokens, n_heads)
    raise ValueError(f"connector must be one of {', '.join(KINDS)}, got {kind!r}")


class FrameStacker(nn.Module):
    """Ultravox's audio projector: `stack` consecutive encoder frames side by side, then LLaVA's MLP. Whisper's
    frames come every 20 ms, far denser than speech carries words; stacking 4 gives one LM position per
    80 ms, about one per spoken character, without discarding any frame's features as pooling would."""

    def __init__(self, in_dim: int, out_dim: int, stack: int):
        super().__init__()
        self.stack = stack
        self.mlp = make_connector("mlp", in_dim * stack, out_dim)

    def forward(self, frames, n_frames):
        """(M, F, in_dim) frames of which the first n_frames (M,) are each clip's own -> (M, ceil(F / stack),
        out_dim). Frames past a clip's end are zeroed, so its last group is what it would be alone."""
        M, F_, D = frames.shape
        frames = frames * (torch.arange(F_, device=frames.device) < n_frames[:, None])[..., None]
        frames = F.pad(frames, (0, 0, 0, -F_ % self.stack))
        return self.mlp(frames.reshape(M, -1, self.stack * D))
