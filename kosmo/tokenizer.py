"""Byte-level BPE tokenizer trained with the `tokenizers` library, or a checkpoint's own BPE tokenizer
adopted around kosmo's special tokens (`kosmo.interop.adopt`).

Special tokens have fixed ids (below) in every kosmo tokenizer, so templates, data pipelines and
checkpoints agree without looking anything up. Ordinary text can never produce them: encoding treats
the literal string "<s>" as five characters of text, and only templates insert specials, by id
(`encode_with_specials` reads such strings as the tokens, for clients that name them so: the server's /tokenize).
A model that draws has ids beyond the tokenizer's: the image tokenizer's codes, appended to the LM's
vocabulary (`kosmo.model.mllm`); text decoding skips them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kosmo.errors import KosmoError

SPECIAL_TOKENS = [
    "<pad>",          # 0  padding, never a target
    "<s>",            # 1  beginning of a document
    "</s>",           # 2  end of a document
    "<image>",        # 3  opens an image's embeddings
    "</image>",       # 4  closes them
    "<|image_pad|>",  # 5  placeholder at the positions image embeddings are spliced into
    "<|system|>",     # 6  chat roles
    "<|user|>",       # 7
    "<|assistant|>",  # 8
    "<|end|>",        # 9  end of a chat turn
    "<audio>",        # 10 opens an audio clip's embeddings
    "</audio>",       # 11
    "<|audio_pad|>",  # 12 placeholder at the positions audio embeddings are spliced into
    "<|begin_of_image|>",  # 13 opens a drawn picture: the image tokenizer's codes follow, one per position
    "<|end_of_image|>",    # 14 closes it
    "<|reserved_15|>",
]

(PAD, BOS, EOS, IMAGE, IMAGE_END, IMAGE_PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN, AUDIO, AUDIO_END, AUDIO_PAD,
 BEGIN_OF_IMAGE, END_OF_IMAGE) = range(15)
ROLE_IDS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")  # keeps the specials it splits at


class Tokenizer:
    def __init__(self, tok: HFTokenizer):
        for i, t in enumerate(SPECIAL_TOKENS):
            if tok.token_to_id(t) != i:
                raise KosmoError(f"tokenizer: special token {t!r} must have id {i}, found {tok.token_to_id(t)}")
        tok.encode_special_tokens = True  # literal "<s>" in text stays text
        self._tok = tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        if vocab_size < len(SPECIAL_TOKENS) + 256:
            raise KosmoError(f"--vocab-size {vocab_size} is too small: the 256 bytes and "
                             f"{len(SPECIAL_TOKENS)} special tokens need at least {len(SPECIAL_TOKENS) + 256}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise KosmoError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises plain Exceptions with multi-line text
            raise KosmoError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        self._tok.save(str(tmp))
        tmp.replace(path)
        return path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Like `encode`, but a special token's string in the text is that token (as in Hugging Face tokenizers):
        for clients that name special tokens by their strings, never for text a model is fed as text."""
        ids = []
        for i, piece in enumerate(_SPECIAL_SPLIT.split(text)):
            if i % 2:  # split() puts the separators, the specials, at the odd places
                ids.append(SPECIAL_TOKENS.index(piece))
            elif piece:
                ids += self.encode(piece)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def to_json(self) -> dict:
        """The whole tokenizer as its `tokenizer.json` document: model, merges, added tokens, pre-tokenizer."""
        return json.loads(self._tok.to_str())
