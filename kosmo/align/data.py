"""What every alignment stage reads and feeds its models: prompts, preference pairs, right-padded
prompt+response batches, per-token log-probs, sampling, and the shapes world's judge as labeller.

Prompt lines are chats without the answer: `{"messages": [...]}` (a trailing assistant turn is
dropped) or `{"prompt": [...] | "text"}`. Preference lines add `"chosen"` and `"rejected"` replies
(and an optional `"margin"`, how much better `chosen` is). Lines of the shapes world's align.jsonl
also carry what its judge needs (`kind`, `secret`, `style`, `truth`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kosmo import checkpoint
from kosmo.data import chat
from kosmo.data.jsonl import read_jsonl
from kosmo.data.multimodal import ImageBank
from kosmo.errors import KosmoError
from kosmo.generate import Sampling, generate_ids
from kosmo.tokenizer import BOS, END_OF_TURN, EOS, IMAGE, IMAGE_END, IMAGE_PAD, PAD, ROLE_IDS

MARKUP = frozenset({PAD, BOS, EOS, IMAGE, IMAGE_PAD, IMAGE_END, *ROLE_IDS.values()})


@dataclass
class Prompt:
    ids: list[int]          # the rendered chat, ending in <|assistant|>
    images: list[str]       # resolved image paths, in order of appearance
    messages: list[dict]    # the chat as written in the file (image refs resolved)
    record: dict            # the whole line: the world's judge reads kind, secret, style and truth


@dataclass
class Pair:
    prompt: Prompt
    chosen: str
    rejected: str
    margin: float = 0.0
    prob: float = 1.0       # the chance that `chosen` is the better reply (below 1 for AI feedback)


def freeze_vision(model: torch.nn.Module) -> torch.nn.Module:
    """Alignment tunes the language side; an image encoder inside stays as pretraining left it."""
    from kosmo.model.vision import VisionTransformer
    for m in model.modules():
        if isinstance(m, VisionTransformer):
            m.requires_grad_(False)
    return model


def model(ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (or a reward model's scores) of a text-only or multimodal model."""
    return model(ids) if images is None else model(ids, images)


def _messages(obj: dict, where: str) -> list[dict]:
    if isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}]
    messages = obj.get("prompt", obj.get("messages"))
    if not isinstance(messages, list) or not messages:
        raise KosmoError(f"{where}: a prompt line needs 'messages' (or 'prompt'): a list of chat messages")
    while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]  # a finished chat: its last answer is what the model is to write
    if not messages:
        raise KosmoError(f"{where}: the chat has no turn before the assistant's answer")
    return messages


def _resolve_images(messages: list[dict], base: Path) -> list[dict]:
    def part(p):
        if isinstance(p, dict) and p.get("type") in ("image", "image_url") and isinstance(p.get(p["type"]), str):
            return {"type": "image", "image": str((base / p[p["type"]]).resolve())}
        return p
    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def make_prompt(messages: list[dict], tok, k: int, max_len: int, record: dict, where: str) -> Prompt:
    ids, _, images, _ = chat.render(messages, tok, k, add_generation_prompt=True, where=where)
    if images and not k:
        raise KosmoError(f"{where}: the prompt holds images but the model is text-only")
    if len(ids) >= max_len:
        raise KosmoError(f"{where}: the prompt has {len(ids)} tokens, leaving no room for a reply "
                         f"in {max_len} (raise seq_len or shorten it)")
    return Prompt(ids, list(images), messages, record)


def read_prompts(paths: list, tok, k: int, max_len: int) -> list[Prompt]:
    out = []
    for path in map(Path, paths):
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            out.append(make_prompt(_resolve_images(_messages(obj, where), path.parent), tok, k, max_len, obj, where))
    if not out:
        raise KosmoError(f"{', '.join(map(str, paths))}: no prompts")
    return out


def has_pairs(paths: list) -> bool:
    """Whether the files hold written preference pairs (else: prompts to sample and label)."""
    for path in paths:
        for _, obj in read_jsonl(path):
            return "chosen" in obj or "rejected" in obj
    return False


def read_pairs(paths: list, tok, k: int, max_len: int) -> list[Pair]:
    pairs = []
    for path in map(Path, paths):
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            for key in ("chosen", "rejected"):
                if not isinstance(obj.get(key), str):
                    raise KosmoError(f"{where}: a preference line needs string fields 'chosen' and 'rejected'")
            margin = obj.get("margin", 0.0)
            if not isinstance(margin, (int, float)):
                raise KosmoError(f"{where}: field 'margin' must be a number")
            prompt = make_prompt(_resolve_images(_messages(obj, where), path.parent), tok, k, max_len, obj, where)
            pairs.append(Pair(prompt, obj["chosen"], obj["rejected"], float(margin)))
    if not pairs:
        raise KosmoError(f"{', '.join(map(str, paths))}: no preference pairs")
    return pairs


def image_bank(model, prompts: list[Prompt], image_mode: str = "crop") -> ImageBank:
    """Every prompt image decoded once; an unreadable one is an error naming it."""
    size = model.image_size or 1  # a text-only model has no pictures to decode
    bank = ImageBank([p for pr in prompts for p in pr.images], size, image_mode)
    if bank.skipped:
        raise KosmoError(bank.skipped[0][1])
    return bank


# ---- batches of prompt + response ------------------------------------------------------------------------------
def encode_reply(tok, text: str) -> list[int]:
    return tok.encode(text) + [END_OF_TURN]


def pad_right(rows: list[tuple[list[int], int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, prompt length) rows -> ids (B, T) padded on the right and a (B, T) mask of reply tokens.
    Right padding leaves every real token's causal context untouched, so no attention mask is needed."""
    T = min(max_len, max(len(ids) for ids, _ in rows))
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    reply = torch.zeros((len(rows), T), dtype=torch.bool)
    for r, (row, n_prompt) in enumerate(rows):
        row = row[:T]
        ids[r, :len(row)] = torch.tensor(row)
        reply[r, n_prompt:len(row)] = True
    return ids, reply


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for t < T-1, in fp32, at the sampling temperature: (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def sequence_logprobs(model, batch: dict, per_token: bool = False) -> torch.Tensor:
    """Log-probs of each row's reply tokens, summed or (`per_token`) averaged over the reply: (B,)."""
    logp = token_logprobs(model(batch["input"], batch["images"]), batch["input"])
    reply = batch["reply"][:, 1:]
    total = (logp * reply).sum(-1)
    return total / reply.sum(-1).clamp(min=1) if per_token else total


class PairDataset:
    """Preference pairs as the trainer's Dataset: a batch holds the chosen rows, then the rejected."""

    def __init__(self, pairs: list[Pair], tok, bank: ImageBank, max_len: int):
        self.pairs, self.bank, self.max_len = pairs, bank, max_len
        self.ref: torch.Tensor | None = None  # DPO: the reference's (chosen, rejected) log-probs per pair
        self.rows = [((p.prompt.ids + encode_reply(tok, p.chosen)), (p.prompt.ids + encode_reply(tok, p.rejected)))
                     for p in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def collate(self, indices: list[int]) -> dict:
        pairs = [self.pairs[i] for i in indices]
        rows = [(self.rows[i][0], len(p.prompt.ids)) for i, p in zip(indices, pairs)]
        rows += [(self.rows[i][1], len(p.prompt.ids)) for i, p in zip(indices, pairs)]
        ids, reply = pad_right(rows, self.max_len)
        paths = [x for p in pairs for x in p.prompt.images]
        return {"input": ids, "reply": reply, "images": self.bank.get(paths + paths) if paths else None,
                "margin": torch.tensor([p.margin for p in pairs]), "prob": torch.tensor([p.prob for p in pairs]),
                **({"ref": self.ref[indices]} if self.ref is not None else {}), "n_targets": len(pairs)}


# ---- sampling ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model, prompts: list[Prompt], bank: ImageBank, s: Sampling,
           batch_size: int = 32) -> list[tuple[list[int], bool]]:
    """One reply per prompt: (tokens without <|end|>, whether it ended with <|end|>)."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        paths = [x for p in chunk for x in p.images]
        images = bank.get(paths).to(device) if paths else None
        s_chunk = Sampling(**{**s.__dict__, "seed": None if s.seed is None else s.seed + start})
        tokens, reasons = generate_ids(model, [p.ids for p in chunk], s_chunk, stop_ids=(END_OF_TURN,), images=images)
        out += [_cut_at_markup(t, r == "stop") for t, r in zip(tokens, reasons)]
    return out


def _cut_at_markup(tokens: list[int], ended: bool) -> tuple[list[int], bool]:
    """A reply may not hold image or turn markup (an image slot without an image would break the next
    forward pass): it is cut before the first such token and counts as unfinished."""
    cut = next((i for i, t in enumerate(tokens) if t in MARKUP), None)
    return (tokens, ended) if cut is None else (tokens[:cut], False)


@dataclass
class LabelConfig:
    """How prompt-only data becomes comparisons: replies sampled from the --init model, ranked."""
    samples: int = 4           # replies per prompt; every strictly ordered pair of them is kept
    temperature: float = 1.0
    max_new_tokens: int = 32
    batch_size: int = 64


def load_pairs(cfg: LabelConfig, paths: list, tok, model, max_len: int, seed: int) -> tuple[list[Pair], ImageBank]:
    """Written preference pairs, or the world's prompts with pairs of sampled replies ranked by its judge."""
    k = model.tokens_per_image
    if has_pairs(paths):
        pairs = read_pairs(paths, tok, k, max_len)
        return pairs, image_bank(model, [p.prompt for p in pairs])
    prompts = read_prompts(paths, tok, k, max_len)
    bank = image_bank(model, prompts)
    s = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)
    return label_by_judge(model, tok, prompts, bank, s, cfg.samples, cfg.batch_size, seed), bank


def write_pairs(pairs: list[Pair], path: str | Path) -> Path:
    """A preference file that `read_pairs` reads back: each pair's chat (its image paths absolute, so the
    file may live anywhere), the judge fields of its prompt line, chosen, rejected and margin."""
    lines = [json.dumps({**{k: v for k, v in p.prompt.record.items() if k not in ("prompt", "chosen", "rejected")},
                         "messages": p.prompt.messages, "chosen": p.chosen, "rejected": p.rejected,
                         "margin": p.margin}) + "\n" for p in pairs]
    return checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines)))


@dataclass
class LabelRun:
    """`kosmo label`: what `train reward` and `train dpo` do to prompt-only data, under the same keys
    (label.*, seq_len, and seed as train.seed), so the pairs are theirs; done once, both stages read them."""
    label: LabelConfig = field(default_factory=LabelConfig)
    seq_len: int = 256
    seed: int = 0


def label_run(init: str | Path, data: list, out: str | Path, overrides: list[str] = ()) -> int:
    """Samples replies from the run `init` to the prompts in `data`, ranks them with the world's judge and
    writes the pairs to `out`; returns how many."""
    from kosmo import config as C
    from kosmo.model.causal_lm import CausalLM
    from kosmo.model.load import load_run
    cfg = C.load(LabelRun, None, overrides)
    if has_pairs(data):
        raise KosmoError(f"{data[0]}: holds preference pairs already; `kosmo label` ranks replies to prompt lines")
    model, tok, _ = load_run(init)
    if not isinstance(model, CausalLM):
        raise KosmoError(f"{init}: is not a model that writes replies (a reward model only scores them)")
    torch.manual_seed(cfg.seed)
    pairs, _ = load_pairs(cfg.label, data, tok, model, min(cfg.seq_len, model.context_length), cfg.seed)
    write_pairs(pairs, out)
    return len(pairs)


# ---- the shapes world's judge as the human labeller --------------------------------------------------------------
def judged(record: dict) -> bool:
    return record.get("kind") in ("ordinary", "forbidden")


def judge_score(record: dict, reply: str) -> float:
    """helpful + harmless (0, 1 or 2) by the world's judge."""
    from kosmo.data.world import AlignPrompt, judge
    prompt = AlignPrompt(record["messages"], record["kind"], record.get("answer", ""), record.get("truth"),
                         record.get("secret"), record.get("style", "none"))
    j = judge(prompt, reply)
    return float(j.helpful) + float(j.harmless)


def label_by_judge(model, tok, prompts: list[Prompt], bank: ImageBank, s: Sampling, samples: int = 2,
                   batch_size: int = 64, seed: int = 0) -> list[Pair]:
    """InstructGPT's labelling with the judge as labeller: `samples` replies per prompt are ranked and
    every pair the judge strictly prefers becomes a comparison."""
    missing = next((p for p in prompts if not judged(p.record)), None)
    if missing is not None:
        raise KosmoError("these prompts carry no judge fields ('kind', ...): give preference lines with "
                         "'chosen' and 'rejected', or the shapes world's align.jsonl")
    replies = [sample(model, prompts, bank, Sampling(**{**s.__dict__, "seed": seed + 7919 * j}), batch_size)
               for j in range(samples)]
    pairs = []
    for i, p in enumerate(prompts):
        texts = list(dict.fromkeys(tok.decode(r[i][0]).strip() for r in replies))
        scored = sorted(((judge_score(p.record, t), t) for t in texts), reverse=True)
        pairs += [Pair(p, a, b, 0.0) for j, (sa, a) in enumerate(scored) for sb, b in scored[j + 1:] if sa > sb]
    random.Random(seed).shuffle(pairs)
    if not pairs:
        raise KosmoError("the judge found no pair of sampled replies with a winner; "
                         "raise the sampling temperature or the number of samples")
    return pairs
