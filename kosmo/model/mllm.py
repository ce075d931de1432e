"""The KOSMOS-1 / MetaLM multimodal LM: image encoder -> connector -> embeddings spliced into the
token stream between <image> and </image>, then an ordinary decoder-only LM over the mixed sequence.
A model that hears does the same with audio: a Whisper-style encoder -> frame stacker -> embeddings
between <audio> and </audio>, as many positions as the clip is long. A model that draws has an image
tokenizer (a VQ-VAE) and its codes as ids beyond the text vocabulary: a drawn picture is
<|begin_of_image|>, its codes in raster order, <|end_of_image|> (Chameleon's and LlamaGen's design).

The token ids carry `<|image_pad|>` (`<|audio_pad|>`) where image (audio) embeddings go, so one tensor
of ids describes any number of images and clips anywhere in any row; the i-th image of a batch (rows
in order) fills the i-th run of pads, and the i-th clip the i-th run of audio pads. Freezing follows
KOSMOS-1 and LLaVA: the encoders frozen (optionally the image encoder but its last block), then either
the connectors alone (stage 1) or the connectors and the LM (stage 2), in full or, with `lora`, through
adapters on its linear layers (`kosmo.model.lora`, added by the stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kosmo.model.audio import AudioConfig, AudioEncoder, out_frames
from kosmo.model.causal_lm import CausalLM
from kosmo.model.connector import FrameStacker, make_connector
from kosmo.model.lm import LM
from kosmo.model.vision import ImageLMConfig, VisionTransformer
from kosmo.model.vqvae import VQVAE, VQVAEConfig
from kosmo.tokenizer import AUDIO_PAD, IMAGE_PAD

FREEZE = ("connector", "connector+lm", "all", "lora")


@dataclass
class MLLMConfig(ImageLMConfig):
    connector: str = "mlp"        # linear, mlp or resampler
    use_cls: bool = False         # keep the class token beside the patch tokens
    resampler_tokens: int = 8     # visual tokens per image with the resampler
    audio: AudioConfig | None = None  # a Whisper-style audio encoder, in a model that hears
    audio_stack: int = 4          # encoder frames (20 ms each) stacked into one LM position
    image_tokenizer: VQVAEConfig | None = None  # a VQ-VAE, in a model that draws; its codes end the vocabulary

    def __post_init__(self):
        if self.audio_stack < 1:
            raise ValueError(f"audio_stack={self.audio_stack} must be at least 1")
        if self.image_tokenizer is not None and self.lm.vocab_size <= self.image_tokenizer.codebook_size:
            raise ValueError(f"lm.vocab_size={self.lm.vocab_size} leaves no room for text beside "
                             f"{self.image_tokenizer.codebook_size} image codes")

    def audio_tokens(self, frames: int | torch.Tensor) -> int | torch.Tensor:
        """LM positions of a clip of `frames` mel frames (10 ms each): its encoder frames in stacks, rounded up."""
        return -(-out_frames(frames) // self.audio_stack)

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
        self.audio = self.audio_connector = None
        if cfg.audio is not None:
            self.audio = AudioEncoder(cfg.audio)
            self.audio_connector = FrameStacker(cfg.audio.dim, cfg.lm.dim, cfg.audio_stack)
        # never trained with the LM: its codes are the LM's targets, fixed before the LM learns them
        self.vqvae = VQVAE(cfg.image_tokenizer).requires_grad_(False) if cfg.image_tokenizer else None

    @property
    def decoder(self) -> LM:
        return self.lm

    @property
    def tokens_per_image(self) -> int:
        return self.cfg.tokens_per_image

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    @property
    def image_tokenizer(self) -> VQVAE | None:
        return self.vqvae

    @property
    def text_vocab(self) -> int:
        if self.image_tokenizer is None:
            return self.vocab_size
        return self.vocab_size - self.image_tokenizer.codebook_size  # the codes are the vocabulary's last ids

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codes (any shape) -> their token ids."""
        return codes + self.text_vocab

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.text_vocab

    @property
    def n_mels(self) -> int:
        return self.cfg.audio.n_mels if self.cfg.audio else 0

    def audio_tokens(self, frames: int) -> int:
        if self.cfg.audio is None:
            raise ValueError("this model takes no audio")
        if frames > self.cfg.audio.max_frames:
            raise ValueError(f"a clip of {frames / 100:g} s is longer than the model hears at once "
                             f"({self.cfg.audio.max_frames / 100:g} s)")
        return self.cfg.audio_tokens(frames)

    def audio_embeds(self, clips) -> torch.Tensor:
        """A `Clips` batch -> (N, lm.dim): every clip's own positions, clip after clip."""
        frames = self.audio(clips.mels, clips.lengths)
        tokens = self.audio_connector(frames, out_frames(clips.lengths))
        own = torch.arange(tokens.shape[1], device=tokens.device) < self.cfg.audio_tokens(clips.lengths)[:, None]
        return tokens[own]

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> (M, tokens_per_image, lm.dim)."""
        feats = self.vision.features(pixels, self.cfg.feature_layer)
        if not self.cfg.use_cls and self.cfg.connector != "resampler":
            feats = feats[:, 1:]
        return self.connector(feats)

    def embed_inputs(self, idx: torch.Tensor, images: torch.Tensor | None = None, audio=None) -> torch.Tensor:
        x = self.lm.embed(idx)
        slots = idx == IMAGE_PAD
        n_slots = int(slots.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_slots != n_images * self.cfg.tokens_per_image:
            raise ValueError(f"{n_slots} image positions in the tokens but {n_images} images x "
                             f"{self.cfg.tokens_per_image} tokens each = {n_images * self.cfg.tokens_per_image}")
        if n_images:
            x = x.masked_scatter(slots[..., None], self.image_embeds(images.to(x.device)).to(x.dtype))
        slots = idx == AUDIO_PAD
        n_slots, n_clips = int(slots.sum()), 0 if audio is None else len(audio)
        if n_clips and self.audio is None:
            raise ValueError("this model takes no audio")
        want = int(self.cfg.audio_tokens(audio.lengths).sum()) if n_clips else 0
        if n_slots != want:
            raise ValueError(f"{n_slots} audio positions in the tokens but {n_clips} clips that fill {want}")
        if n_clips:
            x = x.masked_scatter(slots[..., None], self.audio_embeds(audio.to(x.device)).to(x.dtype))
        return x

    def hidden(self, idx, images=None, audio=None, **kw):
        cache = kw.get("cache")
        if images is None and audio is None and cache is not None and bool(cache.lengths.any()):
            # a continuation of a cached sequence is text: a generated <|image_pad|> has no picture to show
            return self.lm.hidden(idx, **kw)
        return self.lm.transform(self.embed_inputs(idx, images, audio), **kw)

    def decode_step(self, tok: torch.Tensor, cache) -> torch.Tensor:
        # what a cached sequence continues with is text: the LM's own step, without the media checks
        return self.lm.decode_step(tok, cache)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vqvae is not None:
            self.vqvae.eval()  # its codebook's running averages must not move while the LM trains
        return self

    def freeze(self, policy: str, vision_last_block: bool = False):
        """Sets requires_grad per the policy; frozen leading encoder blocks then build no autograd graph.
        `lora` freezes as `connector` does: the LM's adapters, added after, are what train of it."""
        if policy not in FREEZE:
            raise ValueError(f"freeze must be one of {', '.join(FREEZE)}, got {policy!r}")
        self.requires_grad_(policy == "all")
        if self.vqvae is not None:
            self.vqvae.requires_grad_(False)
        self.connector.requires_grad_(True)
        if self.audio_connector is not None:
            self.audio_connector.requires_grad_(True)
        if policy == "connector+lm":
            self.lm.requires_grad_(True)
        if vision_last_block and policy != "all":
            last = len(self.vision.blocks) + self.cfg.feature_layer + 1 if self.cfg.feature_layer < 0 \
                else self.cfg.feature_layer
            self.vision.blocks[last - 1].requires_grad_(True)
        for module in self.vision.unread(self.cfg.feature_layer):
            module.requires_grad_(False)
