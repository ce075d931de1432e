"""The KOSMOS-1 / MetaLM multimodal LM: image encoder -> connector -> embeddings spliced into the
token stream between <image> and </image>, then an ordinary decoder-only LM over the mixed sequence.

The token ids carry `<|image_pad|>` where image embeddings go, so one tensor of ids describes any
number of images anywhere in any row; the i-th image of a batch (rows in order) fills the i-th run
of pads. Freezing follows KOSMOS-1 and LLaVA: the encoder frozen (optionally but its last block),
then either the connector alone (stage 1) or the connector and the LM (stage 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kosmo.model.causal_lm import CausalLM
from kosmo.model.connector import make_connector
from kosmo.model.lm import LM
from kosmo.model.vision import ImageLMConfig, VisionTransformer
from kosmo.tokenizer import IMAGE_PAD

FREEZE = ("connector", "connector+lm", "all")


@dataclass
class MLLMConfig(ImageLMConfig):
    connector: str = "mlp"        # linear, mlp or resampler
    use_cls: bool = False         # keep the class token beside the patch tokens
    resampler_tokens: int = 8     # visual tokens per image with the resampler

    @property
    def tokens_per_image(self) -> int:
        if self.connector == "resampler":
            return self.resampler_tokens
        return (self.vision.image_size // self.vision.patch_size) ** 2 + int(self.use_cls)


class MLLM(CausalLM):
    def __init__(self, cfg: MLLMConfig, vision: VisionTransformer | None = None, lm: LM | None = None,
                 vocab_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.vision = vision or VisionTransformer(cfg.vision)
        self.lm = lm or LM(cfg.lm, vocab_head)
        self.connector = make_connector(cfg.connector, cfg.vision.dim, cfg.lm.dim, cfg.resampler_tokens,
                                        n_heads=max(1, cfg.lm.n_heads))

    @property
    def decoder(self) -> LM:
        return self.lm

    @property
    def tokens_per_image(self) -> int:
        return self.cfg.tokens_per_image

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> (M, tokens_per_image, lm.dim)."""
        feats = self.vision.features(pixels, self.cfg.feature_layer)
        if not self.cfg.use_cls and self.cfg.connector != "resampler":
            feats = feats[:, 1:]
        return self.connector(feats)

    def embed_inputs(self, idx: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        x = self.lm.embed(idx)
        slots = idx == IMAGE_PAD
        n_slots = int(slots.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_slots != n_images * self.cfg.tokens_per_image:
            raise ValueError(f"{n_slots} image positions in the tokens but {n_images} images x "
                             f"{self.cfg.tokens_per_image} tokens each = {n_images * self.cfg.tokens_per_image}")
        if n_images == 0:
            return x
        feats = self.image_embeds(images.to(x.device))
        return x.masked_scatter(slots[..., None], feats.to(x.dtype))

    def hidden(self, idx, images=None, **kw):
        cache = kw.get("cache")
        if images is None and cache is not None and bool(cache.lengths.any()):
            # a continuation of a cached sequence is text: a generated <|image_pad|> has no picture to show
            return self.lm.hidden(idx, **kw)
        return self.lm.transform(self.embed_inputs(idx, images), **kw)

    def freeze(self, policy: str, vision_last_block: bool = False):
        """Sets requires_grad per the policy; frozen leading encoder blocks then build no autograd graph."""
        if policy not in FREEZE:
            raise ValueError(f"freeze must be one of {', '.join(FREEZE)}, got {policy!r}")
        self.requires_grad_(policy == "all")
        self.connector.requires_grad_(True)
        if policy == "connector+lm":
            self.lm.requires_grad_(True)
        if vision_last_block and policy != "all":
            last = len(self.vision.blocks) + self.cfg.feature_layer + 1 if self.cfg.feature_layer < 0 \
                else self.cfg.feature_layer
            self.vision.blocks[last - 1].requires_grad_(True)
