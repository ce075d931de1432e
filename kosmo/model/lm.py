"""A decoder-only transformer of the Llama family, in plain PyTorch.

RMSNorm, rotary position embeddings, SwiGLU feed-forward, grouped-query attention (through
`scaled_dot_product_attention`, or on CPU in bf16 over short sequences two matmuls around a softmax:
see `attention`), optional tied embeddings and a preallocated KV cache. The weights
map 1:1 onto transformers' `LlamaForCausalLM` (see `kosmo.interop.hf_llama`); q/k/v and gate/up are
stored fused because one wide matmul beats three narrow ones, on CPU above all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kosmo.config import ModelConfig
from kosmo.model.cache import KVCache
from kosmo.model.causal_lm import CausalLM


@dataclass
class LMConfig(ModelConfig):
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 0  # 0: Llama's rule, about 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style long-context RoPE scaling ({"rope_type": "yarn", "factor": 4, ...})
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    smear_keys: bool = False  # each key blends in its predecessor's: an induction head fits in one layer

    def __post_init__(self):
        if self.hidden_dim == 0:
            self.hidden_dim = 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# Named sizes. `tiny` trains in CPU minutes; the 1B-class ones follow TinyLlama-1.1B and Llama-3.2-1B.
SIZES: dict[str, dict] = {
    "tiny": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512),
    "small": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=1024),
    "base": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048,
               vocab_size=32000, tie_embeddings=False),
    "llama3-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, max_seq_len=8192,
                      vocab_size=128256, rope_theta=500000.0, tie_embeddings=True),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 like Llama (bf16 sums of squares lose too much precision), in one fused op.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: dict | None = None):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    kind, attention = (scaling or {}).get("rope_type", (scaling or {}).get("type")), 1.0
    if kind == "llama3":
        inv_freq = llama3_scaled(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq, attention = yarn_scaled(inv_freq, scaling, theta, max_len)
    elif kind == "linear":  # position interpolation: positions squeezed by `factor`
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3, yarn)")
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # the rotate-half layout of HF Llama checkpoints
    return angles.cos() * attention, angles.sin() * attention


def llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's rule: keep high frequencies, divide low ones by `factor`, blend smoothly between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def yarn_scaled(inv_freq: torch.Tensor, s: dict, theta: float, max_len: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023), as transformers computes it: returns (inv_freq, attention factor).

    With L = `original_max_position_embeddings` (default `max_len`) and F = `factor` (default max_len / L),
    dimension pair i of d = head_dim turns r_i = L * inv_freq_i / 2pi times over L tokens. The pairs that turn more
    than `beta_fast` (32) times keep their frequency (extrapolation), those turning fewer than `beta_slow` (1) times
    are divided by F (interpolation), and between them the share kept falls linearly in i from the index where
    r = beta_fast to the one where r = beta_slow, i(r) = d * ln(L / (2pi r)) / (2 ln theta), floored and ceiled
    unless `truncate` is false, clipped to [0, d-1]. cos and sin are multiplied by `attention_factor`, by default
    0.1 ln F + 1 (or mscale(F, `mscale`) / mscale(F, `mscale_all_dim`) when both are given; 1 when F <= 1),
    which sharpens attention logits by its square.
    """
    old_len = s.get("original_max_position_embeddings") or max_len
    factor = s.get("factor") or max_len / old_len
    d = 2 * inv_freq.numel()

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        both = s.get("mscale") and s.get("mscale_all_dim")
        attention = mscale(s["mscale"]) / mscale(s["mscale_all_dim"]) if both else mscale()

    def index(rotations):
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = index(s.get("beta_fast") or 32), index(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low or 1e-3)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention)


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Smeared keys (Olsson et al. 2022): a key mixes in the key of the token before it, by a learnt
        # weight per kv head. A query can then find "the token after an earlier copy of me" in one layer,
        # where plain attention needs a previous-token head below an induction head, a circuit that small
        # models form only after a long plateau.
        self.smear = nn.Parameter(torch.zeros(cfg.n_kv_heads)) if cfg.smear_keys else None

    def smeared(self, k, before, follows):
        """k (B, H, T, d) unrotated keys; before (B, H, 1, d) the key of the position before k's first;
        follows (B|1, 1, T, 1): whether each position's predecessor is visible to it (same document, not padding)."""
        previous = torch.cat([before.to(k.dtype), k[:, :, :-1]], dim=2) * follows
        a = torch.sigmoid(self.smear).view(1, -1, 1, 1).to(k.dtype)
        return a * k + (1 - a) * previous

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.smear is not None:
            k = self.smear_with_cache(k, cache, layer) if cache is not None else \
                self.smeared(k, k.new_zeros(B, self.n_kv_heads, 1, self.head_dim), predecessor_visible(mask, T))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            y = cache.attend(layer, q, k, v)
        else:
            y = attention(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def smear_with_cache(self, k, cache: KVCache, layer: int):
        """Smeared keys that continue each row of the cache: a row's first key follows its last cached
        one (none for an empty row), and the cache keeps each row's last real key, unblended."""
        pos, n_new = cache.step.pos, cache.step.n_new
        out = self.smeared(k, cache.last_k[layer], (pos > 0)[:, None, :, None])
        last = (n_new - 1).clamp(min=0).view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        # a row with no real token here (done in an earlier chunk of a ragged prefill) keeps its own
        fed = (n_new > 0).view(-1, 1, 1, 1)
        cache.last_k[layer] = torch.where(fed, k.gather(2, last).to(cache.last_k.dtype), cache.last_k[layer])
        return out


# The longest sequence whose bf16 attention runs on CPU as two matmuls around a softmax (`matmul_attention`).
MATMUL_ATTENTION_MAX_LEN = 512


def attention(q, k, v, mask):
    """Causal attention of q (B, H, T, d) over k and v (B, H_kv, T, d), under `mask` (B|1, 1, T, T) bool
    or, when it is None, causally.

    On CPU in bf16, short sequences take `matmul_attention`: there the flash kernel's forward and backward
    take about twice as long as two bf16 matmuls and a softmax that autograd differentiates, and the
    (T, T) scores are small. In fp32 the flash kernel is the faster, and GPUs have better kernels, so
    everything else takes `scaled_dot_product_attention`.
    """
    T = q.shape[2]
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and 1 < T <= MATMUL_ATTENTION_MAX_LEN:
        return matmul_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                          enable_gqa=q.shape[1] != k.shape[1])


def matmul_attention(q, k, v, mask):
    """`attention` as softmax(q k^T / sqrt(d)) v, with the probabilities in q's dtype (fp32 sums inside
    the softmax), as transformers' eager attention keeps them. Each key/value head attends for its
    group of query heads in one matmul, so k and v are never repeated."""
    B, H, T, d = q.shape
    kv = k.shape[1]
    group = H // kv
    q = (q * d**-0.5).reshape(B, kv, group * T, d)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        mask = mask.unsqueeze(1)  # (B|1, 1, 1, T, T), over the key/value heads and their groups
    # an added bias rather than masked_fill: the sum's backward passes the gradient on without a copy
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = (q @ k.transpose(-1, -2)).view(B, kv, group, T, T) + bias
    return (scores.softmax(-1).view(B, kv, group * T, T) @ v).view(B, H, T, d)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class LM(CausalLM):
    def __init__(self, cfg: LMConfig, vocab_head: bool = True):
        """vocab_head=False builds the bare decoder, whose hidden states a reward model reads."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if vocab_head else None
        if vocab_head and cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat in depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    @property
    def decoder(self) -> LM:
        return self

    def embed_inputs(self, idx, images=None, audio=None):
        if images is not None or audio is not None:
            raise ValueError("a text-only LM takes no images or audio")
        return self.embed(idx)

    def hidden(self, idx, images=None, audio=None, **kw):
        return self.transform(self.embed_inputs(idx, images, audio), **kw)

    def transform(self, x, *, cache: KVCache | None = None, n_new=None, segments=None, last_only: bool = False,
                  logits_at=None):
        """The decoder over input embeddings x (B, T, dim): the final norm's hidden states.

        cache: each row continues its row of the cache, of which the first n_new ((B,), or all T)
        tokens are real; padding after them is overwritten later. segments: (B, T) document ids of
        packed training rows; a token sees only its own document, whose positions start at 0.
        last_only: the last position only. logits_at: (B, T) bool; only those positions, flattened to
        (N, dim): training needs no others.
        """
        rope, mask = self.context(x, cache, n_new, segments)
        for i, block in enumerate(self.blocks):
            x = block(x, *rope, mask, cache, i)
        return self.finish(x, cache, last_only, logits_at)

    def context(self, x, cache: KVCache | None = None, n_new=None, segments=None):
        """The rotary tables (cos, sin) at each position of input x (B, T, dim) and the attention mask
        (None: causal, or the cache's own); with a cache, starts its forward."""
        B, T, _ = x.shape
        mask = None
        # positions never exceed T - 1 without a cache, so only a cached forward reads them back to check
        end = T
        if cache is not None:
            pos = cache.begin(T, n_new)
            # a static cache's forward reads nothing back to the host; its caller keeps within its room
            end = 0 if cache.static and T == 1 else int(pos[:, -1].max()) + 1 if T else 0
        elif segments is not None:
            pos, mask = segment_positions(segments), segment_mask(segments)
        else:
            pos = torch.arange(T, device=x.device).expand(B, T)
        if end > self.cfg.max_seq_len:
            raise ValueError(f"{end} positions exceed the context of {self.cfg.max_seq_len} tokens")
        # rotate in the activations' dtype (bf16 under autocast), as Llama does
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return (self.rope_cos[pos].unsqueeze(1).to(dtype), self.rope_sin[pos].unsqueeze(1).to(dtype)), mask

    def finish(self, x, cache: KVCache | None = None, last_only: bool = False, logits_at=None):
        """Ends the cache's forward, keeps the positions asked for (see `transform`) and applies the final norm."""
        if cache is not None:
            cache.end()
        if logits_at is not None:
            x = x[logits_at]
        elif last_only:
            x = x[:, -1:]
        return self.norm(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once


def predecessor_visible(mask, T: int) -> torch.Tensor:
    """(B|1, 1, T, 1) bool: whether each of T queries sees the position before it, under `mask`
    (B, 1, T, T) or, when it is None, plain causal attention."""
    prev = torch.arange(-1, T - 1)
    if mask is None:
        return (prev >= 0).view(1, 1, T, 1)
    return (mask[:, :, torch.arange(T), prev.clamp(min=0)] & (prev >= 0).to(mask.device)).unsqueeze(-1)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask for packed rows: causal, and within each document only."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (segments[:, :, None] == segments[:, None, :])[:, None] & causal


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where each packed document begins."""
    t = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values
