"""VQ-VAE: pictures as grids of discrete codes, and back (van den Oord et al., 2017; Razavi et al., 2019).

A convolutional encoder maps an S x S picture to a (S/d) x (S/d) grid of vectors, each vector is replaced by
its nearest entry of a learned codebook, and a convolutional decoder paints the picture back from those
entries. The codes (indices into the codebook, in raster order) are what a language model learns to write
when it draws; the decoder turns them into pixels.

The codebook is not learned by gradients but as an exponential moving average of the encoder outputs
assigned to each entry (the paper's appendix A.1): entry k is the running mean of the vectors whose nearest
entry is k. The encoder is pulled towards its chosen entries by the commitment loss, and gradients reach it
through the quantizer by the straight-through estimator. An entry that stops being chosen is re-seeded
from an encoder output of the current batch, so that the whole codebook stays in use.

Pixels are kosmo image tensors: CLIP-normalised (B, 3, S, S) floats, as `kosmo.data.images` makes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kosmo.config import ModelConfig


@dataclass
class VQVAEConfig(ModelConfig):
    image_size: int = 36         # pictures are image_size x image_size
    downsample: int = 4          # pixels per code along each side (2s and 3s multiplied): the grid is image_size / it
    channels: int = 128          # width at the code grid; each finer level has half as many, at least 16
    n_res_blocks: int = 2        # residual blocks at the code grid, in the encoder and in the decoder
    codebook_size: int = 256     # K: how many different codes there are
    code_dim: int = 32           # D: the length of a codebook entry
    ema_decay: float = 0.99      # the codebook's moving average keeps this much of itself per step
    commitment: float = 0.25     # beta: the weight of ||z - sg[e]||^2, which keeps the encoder near its codes
    dead_threshold: float = 1.0  # an entry whose average assignments per batch fall below this is re-seeded
    eps: float = 1e-5            # Laplace smoothing of the assignment counts, so no entry divides by zero

    def __post_init__(self):
        d = self.downsample
        if d < 1 or math.prod(self.factors) != d:
            raise ValueError(f"downsample must be a product of 2s and 3s (1, 2, 3, 4, 6, 8, 12, ...), got {d}")
        if self.image_size < 1 or self.image_size % d:
            raise ValueError(f"image_size ({self.image_size}) must be a positive multiple of downsample ({d})")
        for name in ("channels", "n_res_blocks", "codebook_size", "code_dim"):
            if getattr(self, name) < (0 if name == "n_res_blocks" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.commitment < 0 or self.dead_threshold < 0 or self.eps <= 0:
            raise ValueError("commitment and dead_threshold must be 0 or more, and eps positive")

    @property
    def factors(self) -> list[int]:
        """The stride of each down-sampling stage, finest first: the halvings, then the thirds."""
        d, out = self.downsample, []
        for f in (2, 3):
            while d > 1 and d % f == 0:
                d //= f
                out.append(f)
        return out

    @property
    def levels(self) -> int:
        return len(self.factors)

    def width(self, level: int) -> int:
        """Channels after `level` down-sampling stages: `channels` at the code grid, halved per finer level."""
        return max(16, self.channels >> (self.levels - level))


class ResBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(x)))): the VQ-VAE paper's residual block."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def down(c_in: int, c_out: int, stride: int) -> nn.Conv2d:
    """A stride-2 4x4 convolution (overlapping windows, the VQ-VAE paper's), or a stride-3 3x3 one (a third)."""
    return nn.Conv2d(c_in, c_out, 4, stride=2, padding=1) if stride == 2 else nn.Conv2d(c_in, c_out, 3, stride=3)


def up(c_in: int, c_out: int, stride: int) -> nn.ConvTranspose2d:
    """The transpose of `down`."""
    if stride == 2:
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    return nn.ConvTranspose2d(c_in, c_out, 3, stride=3)


class Encoder(nn.Module):
    """(B, 3, S, S) -> (B, D, S/d, S/d): a 3x3 stem, one strided conv per down-sampling stage, residual blocks."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.stem = nn.Conv2d(3, cfg.width(0), 3, padding=1)
        self.down = nn.ModuleList(down(cfg.width(i), cfg.width(i + 1), f) for i, f in enumerate(cfg.factors))
        self.blocks = nn.ModuleList(ResBlock(cfg.channels) for _ in range(cfg.n_res_blocks))
        self.out = nn.Conv2d(cfg.channels, cfg.code_dim, 1)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.down:
            x = conv(F.silu(x))
        for block in self.blocks:
            x = block(x)
        return self.out(F.silu(x))


class Decoder(nn.Module):
    """The encoder mirrored: (B, D, S/d, S/d) -> (B, 3, S, S), up-sampling with strided transposed convs."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.inp = nn.Conv2d(cfg.code_dim, cfg.channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(cfg.channels) for _ in range(cfg.n_res_blocks))
        stages = list(enumerate(cfg.factors))
        self.up = nn.ModuleList(up(cfg.width(i + 1), cfg.width(i), f) for i, f in reversed(stages))
        self.out = nn.Conv2d(cfg.width(0), 3, 3, padding=1)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        for conv in self.up:
            x = conv(F.silu(x))
        return self.out(F.silu(x))


def _all_reduce(*tensors):
    """Sums over processes, so that every rank's codebook learns from the whole global batch."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


class EMACodebook(nn.Module):
    """Nearest-entry quantisation with an EMA-learned codebook and the re-seeding of dead entries.

    Everything here runs in fp32 whatever the autocast: a squared distance is a difference of large sums,
    and a moving average with decay 0.99 adds updates a hundredth of its size, both of which bf16's 8-bit
    mantissa would swallow. The buffers are persistent, so checkpoints carry them and resume is exact.
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        K, D = cfg.codebook_size, cfg.code_dim
        self.register_buffer("embed", torch.randn(K, D))
        # counts start at 0, under any dead_threshold > 0, so the first training step seeds every entry from
        # encoder outputs: the codebook starts where the data is
        self.register_buffer("ema_count", torch.zeros(K))
        self.register_buffer("ema_sum", torch.zeros(K, D))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N,) index of the nearest entry: argmin ||z||^2 - 2 z.e + ||e||^2."""
        embed = self.embed.float()
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed.T + embed.pow(2).sum(1)
        return dist2.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, H, W) codes -> (B, D, H, W) entries."""
        return F.embedding(codes, self.embed.float()).permute(0, 3, 1, 2)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, codes: torch.Tensor):
        """One EMA step towards the mean of the vectors assigned to each entry, then re-seeding of the dead."""
        K, cfg = self.cfg.codebook_size, self.cfg
        counts = torch.bincount(codes, minlength=K).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, flat)
        _all_reduce(counts, sums)
        self.ema_count.mul_(cfg.ema_decay).add_(counts, alpha=1 - cfg.ema_decay)
        self.ema_sum.mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + cfg.eps) / (total + K * cfg.eps) * total
        self.embed.copy_(self.ema_sum / smoothed.clamp(min=cfg.eps)[:, None])
        # Dead entries restart at random encoder outputs of this batch. K draws are made every step, however
        # many entries are dead, so the RNG stream (which checkpoints save) never depends on the data; rank
        # 0's draws are everyone's, so ranks keep one codebook.
        dead = self.ema_count < cfg.dead_threshold
        fresh = flat[torch.randint(0, flat.shape[0], (K,), device=flat.device)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(fresh, 0)
        # a re-seeded entry counts as just alive: it is re-seeded again next step unless something picks it
        self.embed.copy_(torch.where(dead[:, None], fresh, self.embed))
        self.ema_sum.copy_(torch.where(dead[:, None], fresh * cfg.dead_threshold, self.ema_sum))
        self.ema_count.copy_(torch.where(dead, torch.full_like(self.ema_count, cfg.dead_threshold), self.ema_count))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D, H, W) encoder outputs -> (quantised (B, D, H, W), codes (B, H, W), commitment loss, counts (K,))."""
        B, D, H, W = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            flat = z.permute(0, 2, 3, 1).reshape(-1, D)
            codes = self.nearest(flat.detach())
            q = self.lookup(codes.view(B, H, W))  # the entries as they were when chosen
            counts = torch.bincount(codes, minlength=self.cfg.codebook_size)
            if self.training:
                self.update(flat.detach(), codes)
            commitment = F.mse_loss(z, q)  # q is a buffer's copy: the gradient reaches the encoder only
            # straight-through: the value is exactly q (z - z is 0), the gradient to z is the decoder's
            quantised = q + (z - z.detach())
        return quantised, codes.view(B, H, W), commitment, counts


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = EMACodebook(cfg)
        self.decoder = Decoder(cfg)

    @property
    def grid(self) -> int:
        """Codes per side of a picture."""
        return self.cfg.image_size // self.cfg.downsample

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def _check_pixels(self, pixels: torch.Tensor):
        S = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"expected pixels of shape (B, 3, {S}, {S}), got {tuple(pixels.shape)}")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP-normalised pixels -> (B, grid, grid) codes (int64)."""
        self._check_pixels(pixels)
        z = self.encoder(pixels)
        with torch.autocast(z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            return self.quantizer.nearest(flat).view(z.shape[0], self.grid, self.grid)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, grid, grid) or (B, grid * grid) codes in raster order -> (B, 3, S, S) CLIP-normalised pixels."""
        g = self.grid
        if codes.dim() not in (2, 3) or codes.shape[1:].numel() != g * g or (codes.dim() == 3 and codes.shape[1] != g):
            raise ValueError(f"expected codes of shape (B, {g}, {g}) or (B, {g * g}), got {tuple(codes.shape)}")
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got {int(codes.min())}..{int(codes.max())}")
        return self.decoder(self.quantizer.lookup(codes.reshape(-1, g, g).long()))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """-> (reconstruction (B, 3, S, S), {"commitment": beta-weighted loss, "codes": (B, grid, grid),
        "counts": (K,) how often each code was chosen in the batch})."""
        self._check_pixels(pixels)
        quantised, codes, commitment, counts = self.quantizer(self.encoder(pixels))
        return self.decoder(quantised), {"commitment": self.cfg.commitment * commitment, "codes": codes,
                                         "counts": counts}
