"""What every kosmo language model offers, text-only or multimodal: generation, serving, alignment
and evaluation use this interface and nothing else of a model.

    decoder            the `LM` that holds the blocks, the vocabulary head and the context
    context_length     positions a sequence may use, prompt and reply together
    vocab_size         rows of the vocabulary head
    text_vocab         the ids text generation may write: those below it (a model that draws has its
                       image codes above them, written only when drawing)
    image_tokenizer    the VQ-VAE whose codes the model writes to draw (`kosmo.draw`); None if it cannot
    tokens_per_image   positions one image fills in the sequence (`<|image_pad|>` ids); 0 where an
                       image fills none (a text model, or Flamingo, which cross-attends to images)
    image_size         the side of the square pictures the model reads; 0 for a text-only model
    n_mels             the mel bins of the log-mel features the model hears; 0 for a model without ears
    audio_tokens(frames)       positions a clip of that many mel frames fills (`<|audio_pad|>` ids)
    embed_inputs(idx, images, audio)  the input embeddings, images and audio spliced in where the model
                       puts them there; `audio` is a `kosmo.data.audio.Clips` batch
    hidden(idx, images, audio, cache=..., ...)   the final norm's hidden states (a reward model reads these)
    forward(idx, images, audio, cache=..., ...)  the vocabulary logits
    new_cache(batch, max_len, ...)        a KV cache this model's forward can extend
    decode_step(tok, cache)               the (B, V) logits after one more token per row of the cache

Images and audio come with the first chunk of a sequence; what a cached sequence continues with is
text, even an `<|image_pad|>` the model generated, which has no picture to show.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kosmo.model.cache import KVCache
from kosmo.model.linear_ce import linear_cross_entropy

# Targets whose vocabulary logits the loss holds at once: the head and the cross-entropy run over
# chunks of this many positions (at 32k positions the (N, V) fp32 logits would otherwise be most of
# a step's memory).
LOSS_CHUNK = 4096


class CausalLM(nn.Module):
    tokens_per_image: int = 0
    image_size: int = 0
    n_mels: int = 0

    @property
    def decoder(self):
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        return self.decoder.cfg.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.decoder.cfg.vocab_size

    @property
    def text_vocab(self) -> int:
        return self.vocab_size

    @property
    def image_tokenizer(self):
        return None

    def audio_tokens(self, frames: int) -> int:
        raise ValueError("this model takes no audio")

    def embed_inputs(self, idx: torch.Tensor, images: torch.Tensor | None = None, audio=None) -> torch.Tensor:
        raise NotImplementedError

    def hidden(self, idx: torch.Tensor, images: torch.Tensor | None = None, audio=None, **kw) -> torch.Tensor:
        """The final norm's hidden states; the keywords are `LM.transform`'s."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, images: torch.Tensor | None = None, audio=None, labels=None,
                loss_chunk: int = LOSS_CHUNK, **kw) -> torch.Tensor:
        """Logits for ids (B, T) and the images and audio clips their markers call for; see `LM.transform`
        for the keywords.

        labels: (N,) targets of the N positions `logits_at` keeps; the summed fp32 cross-entropy is
        returned instead of the logits, computed with its gradients `loss_chunk` positions at a time
        (`kosmo.model.linear_ce`), so at most one chunk's (chunk, V) logits are held.
        (It lives in forward so that a DDP or FSDP wrapper's hooks see the head's use.)
        """
        head = self.decoder.lm_head
        if head is None:
            raise TypeError("this model was built without a vocabulary head (a reward model's backbone)")
        h = self.hidden(idx, images, audio, **kw)
        if labels is None:
            return head(h)
        return linear_cross_entropy(h, head.weight, labels, loss_chunk)

    def new_cache(self, batch: int, max_len: int, dtype=torch.float32, device=None, max_images: int = 0,
                  static: bool = False) -> KVCache:
        """A cache of `batch` rows of `max_len` positions; `max_images`: the most images a row brings
        (a model that keeps images beside the keys needs room for them); `static`: see `KVCache`."""
        return KVCache(self.decoder.cfg, batch, max_len, dtype, device, static)

    def decode_step(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The (B, V) logits after feeding tok (B,), one token to each row of the cache."""
        return self(tok[:, None], cache=cache, last_only=True)[:, -1]
