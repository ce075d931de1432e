"""The language-modelling stage: packed next-token prediction on text from any kosmo JSONL file."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kosmo.data.jsonl import iter_texts
from kosmo.errors import KosmoError
from kosmo.model.lm import SIZES, LM, LMConfig
from kosmo.tokenizer import BOS, EOS, Tokenizer
from kosmo.train.trainer import TrainConfig


@dataclass
class StageConfig:
    model: dict = field(default_factory=lambda: {"size": "tiny"})  # a named size plus LMConfig fields
    train: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int = 256
    val_fraction: float = 0.02   # share of packed rows held out for eval loss
    vocab_size: int = 4096       # when the stage trains its own tokenizer


def lm_config(model: dict, vocab_size: int) -> LMConfig:
    """LMConfig from {"size": name, **field overrides}, with the tokenizer's vocabulary."""
    model = dict(model)
    size = model.pop("size", "tiny")
    if size not in SIZES:
        raise KosmoError(f"unknown config value model.size={size!r} (known: {', '.join(SIZES)})")
    known = set(LMConfig.__dataclass_fields__)
    for key in model:
        if key not in known:
            raise KosmoError(f"unknown config key 'model.{key}' (known: size, {', '.join(sorted(known))})")
    try:
        return LMConfig(**{**SIZES[size], "vocab_size": vocab_size, **model})
    except (TypeError, ValueError) as e:
        raise KosmoError(f"invalid model config: {e}") from None


class PackedText:
    """Documents joined as <s> doc </s> <s> doc </s> … and cut into rows of seq_len + 1 tokens."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    @classmethod
    def from_texts(cls, texts, tokenizer: Tokenizer, seq_len: int, batch_docs: int = 1024) -> "PackedText":
        stream: list[int] = []
        buf: list[str] = []
        for text in texts:
            buf.append(text)
            if len(buf) == batch_docs:
                stream += _join(tokenizer.encode_batch(buf))
                buf = []
        stream += _join(tokenizer.encode_batch(buf)) if buf else []
        n = (len(stream) - 1) // seq_len
        if n < 1:
            raise KosmoError(f"the data holds {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
        t = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
        # rows overlap by one token so that every token but the very first is a target exactly once
        return cls(t.unfold(0, seq_len + 1, seq_len).contiguous())

    def split(self, val_fraction: float) -> tuple["PackedText", "PackedText | None"]:
        n_val = int(len(self.rows) * val_fraction)
        if n_val == 0:
            return self, None
        return PackedText(self.rows[:-n_val]), PackedText(self.rows[-n_val:])

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int]) -> dict:
        rows = self.rows[indices]
        return {"input": rows[:, :-1], "labels": rows[:, 1:], "n_targets": rows[:, 1:].numel()}


def _join(docs: list[list[int]]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += [BOS, *d, EOS]
    return out


def token_loss(model, batch: dict, **inputs) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 over the targets (labels of -100 are skipped).

    Logits are computed at the target positions only: in chat data most tokens are prompt, and the
    output layer over the whole vocabulary is the costliest matmul of a small model.
    """
    at = batch["labels"] != -100
    logits = model(batch["input"], segments=batch.get("segments"), logits_at=at, **inputs)
    return F.cross_entropy(logits.float(), batch["labels"][at], reduction="sum")


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    return token_loss(model, batch), {}


def build(cfg: StageConfig, data: list[str], tokenizer: Tokenizer, init_model: LM | None = None):
    """(model, loss, train set, eval set) for the trainer."""
    packed = PackedText.from_texts(iter_texts(data), tokenizer, cfg.seq_len)
    train_set, eval_set = packed.split(cfg.val_fraction)
    if init_model is not None:
        model = init_model
    else:
        model = LM(lm_config(cfg.model, tokenizer.vocab_size))
    if cfg.seq_len > model.cfg.max_seq_len:
        raise KosmoError(f"seq_len={cfg.seq_len} exceeds the model's context of {model.cfg.max_seq_len}")
    return model, lm_loss, train_set, eval_set
