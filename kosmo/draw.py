"""Drawing: prompts to pictures. After `<s> prompt <|begin_of_image|>` the LM writes a picture's
image-tokenizer codes, one per position in raster order, and the tokenizer's decoder turns them into
pixels. Between the markers only codes can be written, and exactly grid x grid of them.

Classifier-free guidance (Ho & Salimans 2022, as Parti and LlamaGen use it for token models): every
picture is decoded twice in one batch, after its prompt and after no prompt (`<s> <|begin_of_image|>`,
which training shows a share of the time), and the next code is sampled from

    logits = uncond + scale * (cond - uncond)

so scale 1 is the prompt alone (one row per picture) and larger scales push the picture further towards
what the prompt adds. Both rows then take the sampled code: they describe one picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from kosmo.data.images import denormalize
from kosmo.generate import Sampling, filter_logits, right_pad
from kosmo.model.causal_lm import CausalLM
from kosmo.tokenizer import BEGIN_OF_IMAGE, BOS

UNCONDITIONAL = [BOS, BEGIN_OF_IMAGE]  # a prompt of nothing: what guidance contrasts each prompt with


@dataclass
class DrawSampling:
    cfg: float = 3.0          # classifier-free guidance scale; 1: no guidance
    temperature: float = 1.0  # 0: the likeliest code at every position
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.cfg >= 1:
            raise ValueError(f"the guidance scale must be at least 1, got {self.cfg}")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids, up to the marker after which the codes come."""
    if not prompt.strip():
        raise ValueError("the prompt is empty: say what to draw")
    return [BOS, *tokenizer.encode(prompt), BEGIN_OF_IMAGE]


def check_can_draw(model: CausalLM):
    if getattr(model, "image_tokenizer", None) is None:
        raise ValueError("this model cannot draw: it has no image tokenizer "
                         "(teach it with `kosmo train sft … image_tokenizer=RUN` and draw lines)")


@torch.no_grad()
def draw_codes(model: CausalLM, prompts: list[list[int]], s: DrawSampling) -> torch.Tensor:
    """(N, grid, grid) codes for N tokenised prompts, each ending in <|begin_of_image|>; one batched
    forward per code for all pictures, their unconditional twins included."""
    check_can_draw(model)
    coder = model.image_tokenizer
    n, n_codes, first = len(prompts), coder.grid ** 2, model.text_vocab
    guided = s.cfg != 1
    rows = prompts + [UNCONDITIONAL] * n if guided else prompts
    device = next(model.parameters()).device
    idx, lengths = right_pad(rows, device)
    if idx.shape[1] + n_codes > model.context_length:
        raise ValueError(f"a prompt of {idx.shape[1]} tokens and {n_codes} codes exceed the context of "
                         f"{model.context_length} tokens")
    cache = model.new_cache(len(rows), idx.shape[1] + n_codes, next(model.parameters()).dtype, device)
    last = torch.arange(idx.shape[1], device=device) == (lengths - 1)[:, None]
    logits = model(idx, cache=cache, n_new=lengths, logits_at=last)
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    codes = []
    for i in range(n_codes):
        z = logits[:, first:first + coder.codebook_size].float()  # nothing but codes can be written here
        if guided:
            z = z[n:] + s.cfg * (z[:n] - z[n:])
        code = z.argmax(-1) if s.temperature <= 0 else \
            torch.multinomial(filter_logits(z, sampling).softmax(-1), 1, generator=gen).squeeze(-1)
        codes.append(code)
        if i < n_codes - 1:
            token = model.codes_to_ids(code).repeat(2 if guided else 1)
            logits = model(token[:, None], cache=cache, last_only=True)[:, -1]
    return torch.stack(codes, 1).view(n, coder.grid, coder.grid)


@torch.no_grad()
def pictures(model: CausalLM, codes: torch.Tensor) -> list[Image.Image]:
    """(N, grid, grid) codes -> N RGB pictures of the image tokenizer's size."""
    return [denormalize(p) for p in model.image_tokenizer.decode(codes)]


def draw(model: CausalLM, tokenizer, prompts: list[str], s: DrawSampling) -> list[Image.Image]:
    """One picture per prompt."""
    return pictures(model, draw_codes(model, [prompt_ids(tokenizer, p) for p in prompts], s))
