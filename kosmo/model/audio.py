"""An audio encoder with exactly the architecture of Whisper's, in plain PyTorch.

Log-mel features (B, n_mels, T) pass two convolutions of width 3 with GELU, the second of stride 2, so
each output frame covers 20 ms of audio (two 10 ms mel hops). Fixed sinusoidal positions are added and
the sequence runs through pre-norm blocks, the image tower's (`kosmo.model.vision.Block`), then a
final LayerNorm. Whisper's attention has no key bias; here the key bias is imported as zeros, and
it stays harmless however it trains, as it adds the same amount to every score of a query, which the
softmax cancels. Whisper was trained on 30 s windows (3000 mel
frames); a shorter clip takes the first positions of the table, which is what Whisper would compute on a
window truncated to that length. Weights map onto transformers' `WhisperModel` encoder
(see `kosmo.interop.hf_whisper`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kosmo.model.vision import Block, TowerConfig, init_tower


@dataclass
class AudioConfig(TowerConfig):
    key = "audio"
    act: str = "gelu"     # of the MLP; the convolutions always use exact GELU, as Whisper does
    n_mels: int = 80
    max_frames: int = 3000  # mel frames (10 ms each): 30 s, Whisper's window

    def __post_init__(self):
        super().__post_init__()
        if self.dim % 2 or self.dim < 4:
            raise ValueError(f"audio.dim={self.dim} must be even and at least 4 (half sines, half cosines)")
        if self.max_frames < 1:
            raise ValueError(f"audio.max_frames={self.max_frames} must be positive")

    @property
    def max_positions(self) -> int:
        return out_frames(self.max_frames)


def out_frames(n_frames: int) -> int:
    """Encoder frames for n_frames mel frames: the stride-2 convolution (width 3, padding 1) rounds up."""
    return (n_frames + 1) // 2


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's position table: sines then cosines (not interleaved), timescales geometric from 1 to
    max_timescale across the channels // 2 frequencies."""
    half = channels // 2
    inv_timescales = torch.exp(-math.log(max_timescale) / (half - 1) * torch.arange(half))
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        # A buffer, not a parameter: fixed by the formula, but saved with the weights as Whisper saves it
        self.register_buffer("positions", sinusoids(cfg.max_positions, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        init_tower(self, cfg.dim, cfg.n_layers)

    def forward(self, mels, lengths=None):
        """(B, n_mels, T) log-mel features, T <= max_frames -> (B, (T + 1) // 2, dim).

        `lengths` (B,): each clip's own mel frames, for clips of different lengths zero-padded to T. A clip
        then gets what it gets alone: its padding is zeroed between the convolutions, as their own zero
        padding would be, and no frame attends to it. Frames past `out_frames(length)` are padding.
        """
        if mels.shape[-1] > self.cfg.max_frames:
            raise ValueError(f"{mels.shape[-1]} mel frames exceed audio.max_frames={self.cfg.max_frames}")
        x = F.gelu(self.conv1(mels.to(self.conv1.weight.dtype)))
        key_mask = None
        if lengths is not None:
            x = x * (torch.arange(x.shape[-1], device=x.device) < lengths[:, None])[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, frames, dim)
        if lengths is not None:
            key_mask = torch.arange(x.shape[1], device=x.device) < out_frames(lengths)[:, None]
        x = x + self.positions[:x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)
