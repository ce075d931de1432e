"""Supervised fine-tuning on chat: loss on the assistant's tokens (and its end-of-turn) only.

Works on a multimodal run (user turns may hold images; VQA lines become one-turn chats) and on a
text-only LM run, whose dialogues must then be text. Pretraining lines (text, captions, interleaved)
may be mixed in, with their own targets, so that fine-tuning keeps what pretraining taught.
"""

from __future__ import annotations

from dataclasses import dataclass

from kosmo.data.multimodal import KINDS, ImageBank, MultimodalDataset, read_examples
from kosmo.errors import KosmoError
from kosmo.model import lora
from kosmo.model.lm import LM
from kosmo.train import mllm
from kosmo.train.lm import lm_loss


@dataclass
class StageConfig(mllm.StageConfig):
    freeze: str = "connector+lm"


def build(cfg: StageConfig, data: list, tokenizer, init_model=None):
    if init_model is None:
        raise KosmoError("sft needs --init RUN (a pretrained LM or multimodal run)")
    if not (isinstance(init_model, LM) and not cfg.vision and not cfg.new_vision):
        return mllm.build(cfg, data, tokenizer, init_model, kinds=KINDS)
    if cfg.freeze == "lora":
        lora.adapt(init_model, cfg.lora)
    examples, _ = read_examples(data, tokenizer, 0, cfg.seq_len + 1, KINDS)
    if any(e.images for e in examples):
        raise KosmoError("the chat data holds images but --init is a text-only LM: set vision=RUN_OR_HF_DIR or "
                         "new_vision.* for a new encoder")
    n_val = int(len(examples) * cfg.val_fraction)
    bank = ImageBank([], 1)
    pack_len = cfg.seq_len if cfg.pack else 0
    val = MultimodalDataset(examples[len(examples) - n_val:], bank, pack_len=pack_len) if n_val else None
    return init_model, lm_loss, MultimodalDataset(examples[: len(examples) - n_val], bank, cfg.mix, cfg.train.seed,
                                                  pack_len), val
