"""The Flamingo path: a frozen LM that looks at images through tanh-gated cross-attention.

image encoder (frozen) -> Perceiver resampler (a fixed number of visual tokens per image) ->
gated cross-attention blocks inserted before every N-th decoder layer of a frozen LM. The gates
start at 0, so before training the model *is* the LM, bit for bit.

The token stream marks an image with `<image></image>` where it appears (the KOSMOS stream with no
`<|image_pad|>` slots): the pixels never enter the sequence. The `<image>` token opens a chunk that
lasts until the next `<image>`, so no `<|endofchunk|>` token is needed. Every token of a chunk,
`<image>` included, cross-attends to that chunk's image only (with attend="previous": to every image
so far); tokens before a row's first image see no image, and the gated blocks pass them through
untouched. The two marker tokens get their own trainable embeddings, initialised to the LM's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kosmo.model.cache import KVCache
from kosmo.model.causal_lm import CausalLM
from kosmo.model.lm import LM, LMConfig
from kosmo.model.vision import ImageLMConfig, VisionTransformer
from kosmo.tokenizer import IMAGE, IMAGE_END

ATTEND = ("latest", "previous")


@dataclass
class FlamingoConfig(ImageLMConfig):
    latents: int = 8              # visual tokens per image
    resampler_layers: int = 2
    resampler_heads: int = 4
    max_frames: int = 1           # > 1: media-time embeddings for inputs of several frames
    cross_every: int = 1          # a gated cross-attention block before every N-th decoder layer
    xattn_heads: int = 4
    attend: str = "latest"        # latest: the latest preceding image; previous: every preceding image
    gated_ffw: bool = True        # a gated feed-forward after each cross-attention, as in Flamingo

    def __post_init__(self):
        if self.attend not in ATTEND:
            raise ValueError(f"attend must be one of {', '.join(ATTEND)}, got {self.attend!r}")
        if not 1 <= self.cross_every <= self.lm.n_layers:
            raise ValueError(f"cross_every must be between 1 and the LM's {self.lm.n_layers} layers")
        for name, dim, heads in (("resampler_heads", self.vision.dim, self.resampler_heads),
                                 ("xattn_heads", self.lm.dim, self.xattn_heads)):
            if dim % heads:
                raise ValueError(f"{name}={heads} does not divide the width {dim}")

    @property
    def tokens_per_image(self) -> int:
        return 0  # images are cross-attended to, not spliced into the sequence


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                         nn.Linear(mult * dim, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents query the media features and themselves: keys and values are [media; latents]."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.media_norm = nn.LayerNorm(dim)
        self.latent_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, media, latents):  # (M, N, dim), (M, L, dim) -> (M, L, dim)
        latents = self.latent_norm(latents)
        k, v = self.kv(torch.cat([self.media_norm(media), latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.n_heads) for t in (self.q(latents), k, v))
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class PerceiverResampler(nn.Module):
    """Any number of patch features (of one or several frames) -> `n_latents` visual tokens."""

    def __init__(self, dim: int, n_latents: int, n_layers: int, n_heads: int, max_frames: int = 1):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)
        # media-time embeddings tell the frames of a video apart; a still image needs none
        self.frame_embed = nn.Parameter(torch.randn(max_frames, 1, dim) * 0.02) if max_frames > 1 else None
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, n_heads), FeedForward(dim)])
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats):
        """(M, N, dim) patch features, or (M, F, N, dim) for F frames -> (M, n_latents, dim)."""
        if feats.dim() == 4:
            frames = feats.shape[1]
            if self.frame_embed is None or frames > self.frame_embed.shape[0]:
                raise ValueError(f"{frames} frames per input but the resampler has media-time embeddings for "
                                 f"{0 if self.frame_embed is None else self.frame_embed.shape[0]} (max_frames)")
            feats = (feats + self.frame_embed[:frames]).flatten(1, 2)
        x = self.latents.expand(feats.shape[0], -1, -1)
        for attn, ffw in self.layers:
            x = x + attn(feats, x)
            x = x + ffw(x)
        return self.norm(x)


class MaskedCrossAttention(nn.Module):
    """Text queries, visual keys and values; `visible` says which visual tokens each text token sees."""

    def __init__(self, dim: int, media_dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(media_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, media, visible):  # (B, T, dim), (B, S, media_dim), (B, 1, T, S) bool
        k, v = self.kv(media).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.n_heads) for t in (self.q(self.norm(x)), k, v))
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=visible)))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(a) * xattn(x), then (with `gated_ffw`) + tanh(b) * ffw(.), with a = b = 0 at the start
    of training."""

    def __init__(self, dim: int, media_dim: int, n_heads: int, gated_ffw: bool = True):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, media_dim, n_heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffw = FeedForward(dim) if gated_ffw else None
        self.ffw_gate = nn.Parameter(torch.zeros(1)) if gated_ffw else None

    def forward(self, x, media, visible, sees_media):
        y = x + self.attn_gate.tanh() * self.attn(x, media, visible)
        if self.ffw is not None:
            y = y + self.ffw_gate.tanh() * self.ffw(y)
        # a token that sees no image is passed through exactly, whatever the gates have learnt
        return torch.where(sees_media[..., None], y, x)


class FlamingoCache(KVCache):
    """The LM's KV cache plus what decoding needs of the images: every row's visual tokens, in room
    for `max_images` per row, the image each belongs to (-1: none), and how many of the row's images
    the sequence has reached. The room is fixed, so a row's cross-attention has the same shape
    whatever the other rows hold."""

    def __init__(self, cfg: LMConfig, batch: int, max_len: int, dtype, device, media_tokens: int, media_dim: int,
                 static: bool = False):
        super().__init__(cfg, batch, max_len, dtype, device, static)
        self.media = torch.zeros(batch, media_tokens, media_dim, dtype=dtype, device=device)
        self.media_image = torch.full((batch, media_tokens), -1, dtype=torch.long, device=device)
        self.images_seen = torch.zeros(batch, dtype=torch.long, device=device)

    def reset(self):
        super().reset()
        self.media_image.fill_(-1)
        self.images_seen.zero_()

    @property
    def holds_images(self) -> bool:
        return self.media_image.shape[1] > 0 and bool((self.media_image[:, 0] >= 0).any())

    def store(self, media: torch.Tensor, media_image: torch.Tensor):
        """Keeps a batch's visual tokens (B, S, dim) and their image indices (B, S)."""
        if self.holds_images:
            raise ValueError("images must all come with the first chunk of a cached sequence")
        if media.shape[1] > self.media.shape[1]:
            raise ValueError(f"{media.shape[1]} visual tokens in a row but the cache has room for "
                             f"{self.media.shape[1]} (max_images)")
        self.media[:, :media.shape[1]] = media
        self.media_image[:, :media.shape[1]] = media_image


class Flamingo(CausalLM):
    def __init__(self, cfg: FlamingoConfig, vision: VisionTransformer | None = None, lm: LM | None = None,
                 vocab_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.vision = vision or VisionTransformer(cfg.vision)
        self.lm = lm or LM(cfg.lm, vocab_head)
        self.resampler = PerceiverResampler(cfg.vision.dim, cfg.latents, cfg.resampler_layers, cfg.resampler_heads,
                                            cfg.max_frames)
        self.xattn = nn.ModuleDict({str(i): GatedCrossAttentionBlock(cfg.lm.dim, cfg.vision.dim, cfg.xattn_heads,
                                                                         cfg.gated_ffw)
                                    for i in range(0, cfg.lm.n_layers, cfg.cross_every)})
        # A text-only LM may never have trained the marker tokens' rows; copies keep the start exact.
        self.marker_embed = nn.Parameter(self.lm.embed.weight[[IMAGE, IMAGE_END]].detach().clone())

    def freeze(self):
        """Flamingo's recipe: the LM and the image encoder stay as they are; only the new parts learn."""
        self.requires_grad_(False)
        for part in (self.resampler, self.xattn, self.marker_embed):
            part.requires_grad_(True)

    @property
    def decoder(self) -> LM:
        return self.lm

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    def new_cache(self, batch: int, max_len: int, dtype=torch.float32, device=None,
                  max_images: int = 0, static: bool = False) -> FlamingoCache:
        return FlamingoCache(self.cfg.lm, batch, max_len, dtype, device, max_images * self.cfg.latents,
                             self.cfg.vision.dim, static)

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> (M, latents, vision.dim)."""
        return self.resampler(self.vision.features(pixels, self.cfg.feature_layer))

    def embed_inputs(self, idx: torch.Tensor, images: torch.Tensor | None = None, audio=None) -> torch.Tensor:
        """The token embeddings, with the markers' own; the images enter through cross-attention."""
        if audio is not None:
            raise ValueError("a Flamingo model takes no audio")
        x = self.lm.embed(idx)
        for row, token in zip(self.marker_embed, (IMAGE, IMAGE_END)):
            x = torch.where((idx == token)[..., None], row.to(x.dtype), x)
        return x

    def hidden(self, idx, images=None, audio=None, *, cache: FlamingoCache | None = None, n_new=None,
               segments=None, last_only: bool = False, logits_at=None):
        """The LM's own pass over ids (B, T) whose `<image>` markers take `images` (M, 3, H, W) in
        order, rows first, with the gated blocks between its layers; the keywords are `LM.transform`'s.
        With a cache, images come with the first chunk and later chunks keep attending to them. In
        packed rows (`segments`) a document sees only its own images.
        """
        x = self.embed_inputs(idx, audio=audio)
        media = self.media_for(idx, images, cache, segments)
        rope, mask = self.lm.context(x, cache, n_new, segments)
        for i, block in enumerate(self.lm.blocks):
            if media is not None and str(i) in self.xattn:
                x = self.xattn[str(i)](x, *media)
            x = block(x, *rope, mask, cache, i)
        return self.lm.finish(x, cache, last_only, logits_at)

    def media_for(self, idx, images, cache: FlamingoCache | None, segments=None):
        """(visual tokens (B, S, dim), visible (B, 1, T, S), sees_media (B, T)), or None without images."""
        markers = idx == IMAGE
        if images is not None:
            if int(markers.sum()) != images.shape[0]:
                raise ValueError(f"{int(markers.sum())} <image> markers in the tokens but {images.shape[0]} images")
            media, media_image = self.rows_of_media(self.visual_tokens(images.to(idx.device)), markers.sum(1))
            if cache is not None:
                cache.store(media, media_image)
                media, media_image = cache.media.to(media.dtype), cache.media_image
        elif cache is not None and cache.holds_images:
            media, media_image = cache.media.to(self.marker_embed.dtype), cache.media_image
        else:
            if markers.any():
                raise ValueError(f"{int(markers.sum())} <image> markers in the tokens but no images")
            return None
        seen = cache.images_seen[:, None] if cache is not None else 0
        # the image each token belongs to: that of the latest <image> at or before it (-1: none yet);
        # a marker generated past the row's last image still means that last image
        latest = torch.minimum(seen + markers.cumsum(1) - 1, media_image.max(1).values[:, None])
        if cache is not None:
            cache.images_seen += markers.sum(1)
        key = media_image[:, None, :]
        query = latest[:, :, None]
        visible = key == query if self.cfg.attend == "latest" else (key >= 0) & (key <= query)
        sees_media = latest >= 0
        if segments is not None:
            # packed rows: an image belongs to the document of its marker and is seen by that one only
            image_doc = torch.full((idx.shape[0], int(markers.sum(1).max()) + 1), -1, dtype=torch.long,
                                   device=idx.device)
            rows, cols = markers.nonzero(as_tuple=True)
            image_doc[rows, (markers.cumsum(1) - 1)[rows, cols]] = segments[rows, cols]
            key_doc = image_doc.gather(1, media_image.clamp(min=0))
            visible = visible & (key_doc[:, None, :] == segments[:, :, None])
            sees_media = sees_media & (image_doc.gather(1, latest.clamp(min=0)) == segments)
        # tokens that see no image attend anywhere (an all-masked softmax is NaN); the block drops their output
        visible = visible | ~sees_media[..., None]
        return media, visible[:, None], sees_media

    def rows_of_media(self, tokens: torch.Tensor, per_row: torch.Tensor):
        """(M, L, dim) visual tokens of a batch's images in order -> each row's, padded: (B, S, dim) and
        the (B, S) index within its row of the image each token belongs to (-1 for padding)."""
        B, (M, L, dim) = per_row.shape[0], tokens.shape
        width = max(int(per_row.max()), 1)
        media = tokens.new_zeros(B, width, L, dim)
        media_image = torch.full((B, width, L), -1, dtype=torch.long, device=tokens.device)
        row = torch.repeat_interleave(torch.arange(B, device=tokens.device), per_row)
        within = torch.arange(M, device=tokens.device) - (per_row.cumsum(0) - per_row)[row]
        media[row, within] = tokens
        media_image[row, within] = within[:, None]
        return media.flatten(1, 2), media_image.flatten(1, 2)
