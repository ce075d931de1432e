"""Reading the JSONL data formats of kosmo, with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from kosmo.errors import KosmoError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise KosmoError(f"{path}: file not found")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise KosmoError(f"{path}:{lineno}: not UTF-8 text (is it a JSONL file?)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise KosmoError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise KosmoError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise KosmoError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def record_texts(obj: dict, where: str) -> list[str]:
    """All the text in a record of any kosmo format (text, caption, interleaved, VQA, chat, preference)."""
    if "text" in obj and "image" not in obj:
        return [_str(obj["text"], f"{where}: field 'text'")]
    if "content" in obj:
        parts = obj["content"]
        if not isinstance(parts, list):
            raise KosmoError(f"{where}: field 'content' must be a list of {{'text'}} / {{'image'}} parts")
        return [_str(p["text"], f"{where}: content part 'text'") for p in parts if isinstance(p, dict) and "text" in p]
    if "messages" in obj or "prompt" in obj:
        out = []
        turns = _list(obj.get("messages"), f"{where}: field 'messages'")
        turns += _list(obj.get("prompt"), f"{where}: field 'prompt'")
        for m in turns:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                out.append(c)
            elif isinstance(c, list):
                out += [p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
            else:
                raise KosmoError(f"{where}: a message needs 'content' as a string or a list of parts")
        return out + [obj[k] for k in ("chosen", "rejected") if isinstance(obj.get(k), str)]
    if "question" in obj:
        answers = _list(obj.get("answers"), f"{where}: field 'answers'")
        return [_str(obj["question"], f"{where}: field 'question'")] + [a for a in answers if isinstance(a, str)]
    if "text" in obj:
        captions = _list(obj.get("captions"), f"{where}: field 'captions'")
        return [_str(obj["text"], f"{where}: field 'text'")] + [c for c in captions if isinstance(c, str)]
    raise KosmoError(f"{where}: no text field (expected 'text', 'content', 'messages', 'prompt' or 'question')")


def _str(v, where: str) -> str:
    if not isinstance(v, str):
        raise KosmoError(f"{where} must be a string, got {type(v).__name__}")
    return v


def _list(v, where: str) -> list:
    """An optional list field: absent (or null) is empty."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise KosmoError(f"{where} must be a list, got {type(v).__name__}")
    return v


def iter_texts(paths: list[str | Path]) -> Iterator[str]:
    """The texts of every record of some data sources (any format of `kosmo.data.formats`)."""
    from kosmo.data.formats import read_records
    for path in paths:
        for where, obj in read_records(path):
            yield from record_texts(obj, where)
