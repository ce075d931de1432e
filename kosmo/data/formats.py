"""The data formats people's data already comes in, read as kosmo records (the JSONL formats of MISSION.md).

A data source is a path with optional `?key=value&…` options (quote it in a shell):

    text.jsonl                          kosmo JSONL, one record a line
    llava.json?images=coco/train2017    LLaVA conversation JSON: a list of items (or .jsonl, an item a line)
    train.parquet?text=caption&image=jpg  Hugging Face `datasets` files: parquet or arrow (`save_to_disk`)
    shards/                             a folder of parquet shards (`kosmo shard`), read in name order

`images=DIR` is the folder that relative image paths are read from (default: the file's own folder).
Any other option maps a kosmo field to a column: `text=caption` reads the field `text` from the column
`caption`. Images stored inline (`datasets`' Image struct `{"bytes", "path"}`, or a bytes column) become
`EncodedImage`s; a LLaVA item (`{"image", "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`),
in any of these files, becomes a chat record with its images where its `<image>` marks stand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from kosmo.data.images import EncodedImage
from kosmo.data.jsonl import read_jsonl
from kosmo.errors import KosmoError

FIELDS = ("text", "image", "captions", "question", "answers", "content", "messages", "prompt", "chosen",
          "rejected", "audio", "conversations")
TABLE_SUFFIXES = (".parquet", ".arrow")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_MARK = "<image>"


@dataclass
class Source:
    path: Path
    images: Path                                          # the folder relative image paths are read from
    columns: dict[str, str] = field(default_factory=dict)  # kosmo field -> column

    @property
    def files(self) -> list[Path]:
        """The files this source reads, in order: itself, or a folder's parquet shards."""
        if self.path.is_dir():
            shards = sorted(self.path.glob("*.parquet"))
            if not shards:
                raise KosmoError(f"{self.path}: a data folder must hold parquet shards (*.parquet); it holds none")
            return shards
        if not self.path.is_file():
            raise KosmoError(f"{self.path}: file not found")
        return [self.path]


def parse_source(spec: str | Path) -> Source:
    """`path?images=DIR&field=column…` as a Source, its options checked."""
    path, _, query = str(spec).partition("?")
    path = Path(path)
    options = dict(parse_qsl(query, keep_blank_values=True, separator="&"))
    images = Path(options.pop("images")) if "images" in options else (path if path.is_dir() else path.parent)
    for key, column in options.items():
        if key not in FIELDS:
            raise KosmoError(f"{spec}: unknown data option {key!r} (known: images, and a column for any of "
                             f"{', '.join(FIELDS)})")
        if not column:
            raise KosmoError(f"{spec}: data option {key!r} needs a column name")
    return Source(path, images, options)


def read_records(spec: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a data source; `where` names the file and line, item or row.
    Relative image and audio paths in a record are relative to `parse_source(spec).images`."""
    source = parse_source(spec)
    for path in source.files:
        for where, obj in _raw_records(path, source):
            yield where, convert(obj, where, source)


def _raw_records(path: Path, source: Source) -> Iterator[tuple[str, dict]]:
    if path.suffix in TABLE_SUFFIXES:
        yield from _table_rows(path, source.columns)
    elif path.suffix == ".json":
        yield from _json_items(path)
    else:
        for lineno, obj in read_jsonl(path):
            yield f"{path}:{lineno}", obj


def _json_items(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        items = json.loads(path.read_bytes())
    except UnicodeDecodeError:
        raise KosmoError(f"{path}: not UTF-8 text (is it a JSON file?)") from None
    except json.JSONDecodeError as e:
        raise KosmoError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(items, list):
        raise KosmoError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise KosmoError(f"{path}: item {i}: expected a JSON object, got {type(obj).__name__}")
        yield f"{path}: item {i}", obj


def _table_rows(path: Path, columns: dict[str, str]) -> Iterator[tuple[str, dict]]:
    """The rows of a parquet or arrow file, streamed a record batch at a time, images left undecoded."""
    from datasets import IterableDataset
    try:
        ds = IterableDataset.from_parquet(str(path)) if path.suffix == ".parquet" else IterableDataset.from_file(
            str(path))
        names = ds.column_names
    except Exception as e:  # pyarrow's errors for a file that is not what its name says
        raise KosmoError(f"{path}: cannot read as {path.suffix[1:]} ({' '.join(str(e).split())[:200]})") from None
    if names is not None:
        for key, column in columns.items():
            if column not in names:
                raise KosmoError(f"{path}: no column {column!r} for {key}= (columns: {', '.join(names)})")
    for i, row in enumerate(ds.decode(False)):
        yield f"{path}: row {i}", table_record(row, columns, f"{path}: row {i}")


def table_record(row: dict, columns: dict[str, str], where: str) -> dict:
    """A table's row as a record: columns renamed to fields, nulls left out, inline images as EncodedImages."""
    renamed = {column: key for key, column in columns.items()}
    obj = {renamed.get(k, k): v for k, v in row.items() if v is not None and (k in renamed or k not in columns)}
    if "image" in obj:
        obj["image"] = _inline_images(obj["image"], where)
    return obj


def _inline_images(value, where: str):
    """`datasets`' Image structs and bytes as EncodedImages; paths stay paths; lists stay lists."""
    if isinstance(value, list):
        return [_inline_images(v, f"{where}: image {k}") for k, v in enumerate(value)]
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    elif isinstance(value, dict) and isinstance(value.get("path"), str):
        return value["path"]
    if isinstance(value, bytes):
        return EncodedImage(value, f"{where}: image")
    if isinstance(value, str):
        return value
    raise KosmoError(f"{where}: the image column holds {type(value).__name__}, not bytes, an Image struct or a path")


def convert(obj: dict, where: str, source: Source) -> dict:
    """A record as kosmo reads it: a LLaVA item as a chat, anything else as it is."""
    return llava_record(obj, where, source.images) if "conversations" in obj else obj


def llava_record(item: dict, where: str, images: Path) -> dict:
    """A LLaVA conversation item as a kosmo chat record: roles mapped (human -> user, gpt -> assistant, system),
    each `<image>` mark replaced by its image (in order), the newline that LLaVA writes beside a mark dropped."""
    turns = item["conversations"]
    if not isinstance(turns, list) or not turns:
        raise KosmoError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    refs = item.get("image")
    refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
    refs = [_image_file(r, images, where) for r in refs]
    messages, used = [], 0
    for t, turn in enumerate(turns):
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise KosmoError(f"{where}: conversation turn {t} is from {got!r} (expected human, gpt or system)")
        value = turn.get("value")
        if not isinstance(value, str):
            raise KosmoError(f"{where}: conversation turn {t} needs 'value' as a string")
        pieces = value.split(IMAGE_MARK)
        if len(pieces) == 1:
            messages.append({"role": role, "content": value})
            continue
        if role != "user":
            raise KosmoError(f"{where}: conversation turn {t}: an {IMAGE_MARK} mark in a {turn['from']} turn "
                             "(images go in human turns)")
        parts = []
        for k, piece in enumerate(pieces):
            if k:
                if used == len(refs):
                    raise KosmoError(f"{where}: conversation turn {t} has more {IMAGE_MARK} marks than the item "
                                     f"has images ({len(refs)})")
                parts.append({"type": "image", "image": refs[used]})
                used += 1
            piece = piece.removeprefix("\n") if k else piece
            piece = piece.removesuffix("\n") if k < len(pieces) - 1 else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    if used < len(refs):
        raise KosmoError(f"{where}: the item has {len(refs)} image(s) but {used} {IMAGE_MARK} mark(s) in its "
                         "turns (each image needs a mark where it stands)")
    return {"messages": messages}


def _image_file(ref, images: Path, where: str) -> str | EncodedImage:
    if isinstance(ref, EncodedImage):
        return ref
    if not isinstance(ref, str):
        raise KosmoError(f"{where}: 'image' must be a path string or a list of them")
    path = images / ref
    if not path.is_file():
        raise KosmoError(f"{where}: image file {path} not found (images are read from {images}; set ?images=DIR)")
    return str(path)
