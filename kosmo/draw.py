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
from kosmo.generate import Sampling, filter_logits, is_greedy, prefill, right_pad
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


def guide(model: CausalLM, logits: torch.Tensor, cfg: float) -> torch.Tensor:
    """(N, K) fp32 code logits of N pictures from their rows' (R, V) logits: R = N unguided (cfg 1), else R = 2N,
    the prompts' rows first and their unconditional twins after, mixed as uncond + cfg * (cond - uncond). Only
    the codes' logits count: between the markers nothing else can be written."""
    first = model.text_vocab
    z = logits[:, first:first + model.image_tokenizer.codebook_size].float()
    if cfg == 1:
        return z
    n = len(z) // 2
    return z[n:] + cfg * (z[:n] - z[n:])


def sample_codes(z: torch.Tensor, s: DrawSampling, generators: list[torch.Generator | None]) -> torch.Tensor:
    """(N,) next codes from (N, K) guided code logits: the likeliest at temperature 0, else one draw per picture
    from its own generator (None: torch's global one), so a seeded picture's codes do not depend on the pictures
    drawn beside it."""
    if is_greedy(s.temperature):
        return z.argmax(-1)
    probs = filter_logits(z, Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)).softmax(-1)
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)])


def generators(s: DrawSampling, n: int, device) -> list[torch.Generator | None]:
    """One generator per picture: picture i of a seeded batch draws from seed + i."""
    if s.seed is None:
        return [None] * n
    return [torch.Generator(device=device).manual_seed((s.seed + i) % 2**64) for i in range(n)]


@torch.no_grad()
def draw_codes(model: CausalLM, prompts: list[list[int]], s: DrawSampling) -> torch.Tensor:
    """(N, grid, grid) codes for N tokenised prompts, each ending in <|begin_of_image|>; one batched
    forward per code for all pictures, their unconditional twins included."""
    check_can_draw(model)
    coder = model.image_tokenizer
    n, n_codes = len(prompts), coder.grid ** 2
    guided = s.cfg != 1
    rows = prompts + [UNCONDITIONAL] * n if guided else prompts
    device = next(model.parameters()).device
    idx, lengths = right_pad(rows, device)
    if idx.shape[1] + n_codes > model.context_length:
        raise ValueError(f"a prompt of {idx.shape[1]} tokens and {n_codes} codes exceed the context of "
                         f"{model.context_length} tokens")
    cache = model.new_cache(len(rows), idx.shape[1] + n_codes, next(model.parameters()).dtype, device)
    logits = prefill(model, idx, lengths, cache)
    gens = generators(s, n, device)
    codes = []
    for i in range(n_codes):
        code = sample_codes(guide(model, logits, s.cfg), s, gens)
        codes.append(code)
        if i < n_codes - 1:
            token = model.codes_to_ids(code).repeat(2 if guided else 1)
            logits = model(token[:, None], cache=cache, last_only=True)[:, -1]
    return torch.stack(codes, 1).view(n, coder.grid, coder.grid)


@torch.no_grad()
def pictures(model: CausalLM, codes: torch.Tensor) -> list[Image.Image]:
    """(N, grid, grid) codes -> N RGB pictures of the image tokenizer's size. A model loaded in bf16 has a bf16
    decoder but an fp32 codebook: autocast carries the looked-up entries into the decoder's precision."""
    coder = model.image_tokenizer
    weights = next(coder.decoder.parameters())
    with torch.autocast(weights.device.type, torch.bfloat16, enabled=weights.dtype == torch.bfloat16):
        return [denormalize(p) for p in coder.decode(codes)]


def draw(model: CausalLM, tokenizer, prompts: list[str], s: DrawSampling) -> list[Image.Image]:
    """One picture per prompt."""
    return pictures(model, draw_codes(model, [prompt_ids(tokenizer, p) for p in prompts], s))
