"""Adopting a Hugging Face checkpoint's own tokenizer, so that a real Llama (TinyLlama's and Llama 2's
SentencePiece-style BPE, Llama 3's byte-level BPE) imports with the vocabulary it was trained on.

kosmo's special tokens have fixed ids 0-15 (`kosmo.tokenizer`). Adoption puts them there and shifts the
checkpoint's whole vocabulary up by 16, added tokens included: its token i is kosmo's token 16 + i, and
embedding and head row 16 + i is its row i. BPE merges name tokens by their strings, so they stay valid, and
the normaliser, pre-tokeniser and decoder (Metaspace with byte fallback, or byte-level) are kept as they
are. Text therefore encodes to the checkpoint's ids plus 16, and the logits over them are its logits.

The checkpoint's BOS, EOS and PAD become kosmo's: those rows start as its rows, so a document opens as it
did. Their shifted slots keep their rows too, under a `<|reserved_N|>` name where the checkpoint's string is
one of kosmo's (TinyLlama's `<s>`), since a tokenizer holds each string once. Its other specials (Llama 3's
`<|eot_id|>`) stay special tokens at their shifted ids. kosmo's remaining specials (the image and audio
markers, the chat roles, END_OF_TURN) have no counterpart: their rows start at the mean row, and the LLaVA
stages train them. A LLaVA checkpoint's image token is kosmo's `<|image_pad|>`, whose row is never read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from kosmo import checkpoint
from kosmo.errors import KosmoError
from kosmo.tokenizer import BOS, EOS, IMAGE_PAD, PAD, SPECIAL_TOKENS, Tokenizer

SHIFT = len(SPECIAL_TOKENS)
ROLES = {"bos": BOS, "eos": EOS, "pad": PAD}  # the checkpoint's specials that kosmo's take over


@dataclass
class Adoption:
    """What an adopted run's config records: the checkpoint's token i is kosmo's token `shift` + i, and
    kosmo special `k` starts from the checkpoint's row `rows[k]` (the rest from the mean row)."""
    source: str
    shift: int
    rows: dict[int, int]

    def to_dict(self) -> dict:
        return asdict(self) | {"rows": {str(k): v for k, v in self.rows.items()},
                               "mean_rows": [i for i in range(self.shift) if i not in self.rows]}


def has_kosmo_specials(path: Path) -> bool:
    tok = _read(path)
    return all(tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))


def _read(path: Path) -> HFTokenizer:
    if not path.is_file():
        raise KosmoError(f"{path}: tokenizer file not found (a SentencePiece tokenizer.model alone is not read: "
                         "save the checkpoint with transformers' tokenizer.save_pretrained to write it)")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions with multi-line text
        raise KosmoError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def adopt_tokenizer(hf_dir: str | Path) -> tuple[Tokenizer, Adoption]:
    """kosmo's tokenizer over the checkpoint's `tokenizer.json`, and how its ids and rows map."""
    hf_dir = Path(hf_dir)
    path = hf_dir / "tokenizer.json"
    source = _read(path)
    doc = json.loads(source.to_str())
    model = doc["model"]
    if model.get("type") != "BPE":
        raise KosmoError(f"{path}: kosmo adopts BPE tokenizers (Llama 2, TinyLlama, Llama 3, Mistral), "
                         f"not {model.get('type')}; pass --tokenizer with a kosmo tokenizer.json instead")
    rows = {kosmo: i for kosmo, i in _specials(hf_dir, source).items() if i is not None}

    def name(token: str, i: int) -> str:
        return f"<|reserved_{SHIFT + i}|>" if token in SPECIAL_TOKENS else token

    renamed = {t: name(t, i) for t, i in model["vocab"].items()}
    model["vocab"] = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {
        renamed[t]: SHIFT + i for t, i in model["vocab"].items()}
    if model.get("unk_token") in renamed:
        model["unk_token"] = renamed[model["unk_token"]]
    kosmo_specials = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                       "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)]
    doc["added_tokens"] = kosmo_specials + [a | {"id": SHIFT + a["id"], "content": name(a["content"], a["id"])}
                                            for a in doc["added_tokens"]]
    # kosmo inserts its specials by id; the checkpoint's template would insert its own, at stale ids
    doc["post_processor"] = doc["padding"] = doc["truncation"] = None
    try:
        adopted = HFTokenizer.from_str(json.dumps(doc))
    except Exception as e:  # a merge that builds one of the renamed tokens: no Llama's does
        raise KosmoError(f"{path}: cannot be adopted ({str(e).splitlines()[0]})") from None
    return Tokenizer(adopted), Adoption(source=str(path), shift=SHIFT, rows=rows)


def _specials(hf_dir: Path, source: HFTokenizer) -> dict[int, int | None]:
    """kosmo special id -> the checkpoint's id of the same role: as its tokenizer_config.json names the token,
    else as config.json numbers it. A LLaVA checkpoint's image token is kosmo's `<|image_pad|>`."""
    tok_cfg = _json(hf_dir / "tokenizer_config.json")
    cfg = _json(hf_dir / "config.json")
    found = {}
    for role, kosmo in ROLES.items():
        token = tok_cfg.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        i = source.token_to_id(token) if isinstance(token, str) else None
        if i is None:
            i = cfg.get(f"{role}_token_id", (cfg.get("text_config") or {}).get(f"{role}_token_id"))
            i = i[0] if isinstance(i, list) and i else i
        found[kosmo] = i if isinstance(i, int) else None
    if cfg.get("model_type") == "llava":
        found[IMAGE_PAD] = cfg.get("image_token_index", 32000)
    return found


def _json(path: Path) -> dict:
    return checkpoint.read_json(path) if path.is_file() else {}


def adopt_rows(weight: torch.Tensor, adoption: Adoption, where: str) -> torch.Tensor:
    """An embedding or head matrix in kosmo's ids: 16 special rows, then the checkpoint's rows."""
    for i in adoption.rows.values():
        if not 0 <= i < len(weight):
            raise KosmoError(f"{where}: special token id {i} is outside the checkpoint's {len(weight)} rows")
    special = weight.mean(0).expand(adoption.shift, -1).clone()
    for kosmo, i in adoption.rows.items():
        special[kosmo] = weight[i]
    return torch.cat([special, weight])
