"""Multimodal training examples: KOSMOS-1's three data kinds, audio, VQA and chat, as token sequences
with image and audio slots, target flags and the images and clips they need.

    text         <s> text </s>
    captions     <s> <image> [K x <|image_pad|>] </image> caption </s>
    audio        <s> <audio> [N x <|audio_pad|>] </audio> transcript (or a sound's name) </s>
    interleaved  <s> text <image> … </image> text <audio> … </audio> … </s>
    VQA, chat    the chat template of `kosmo.data.chat`; a VQA line with `question_audio` asks it aloud
    draw         <s> prompt <|begin_of_image|> [the picture's codes] <|end_of_image|> </s>

Loss is on text, and on the codes of a picture to draw: no position is asked to predict an image or audio
token it reads, and chat examples learn only the assistant's words. A draw line ({"prompt", "image"})
needs a model with an image tokenizer: `encode_drawings` writes each picture's codes into its examples,
and the dataset drops the prompt of a share of them (`uncond`), which classifier-free guidance needs.
Each image and clip is decoded once, however many examples use it. A clip fills as many positions as
the model gives its length (`audio_tokens`), so reading data with audio reads the clips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kosmo.data import chat
from kosmo.data.audio import AudioCache
from kosmo.data.formats import parse_source, read_records
from kosmo.data.images import EncodedImage
from kosmo.errors import KosmoError
from kosmo.tokenizer import AUDIO, AUDIO_END, BEGIN_OF_IMAGE, BOS, END_OF_IMAGE, EOS, IMAGE, IMAGE_END, IMAGE_PAD, PAD

KINDS = ("text", "captions", "audio", "interleaved", "vqa", "chat", "draw")
IMAGE_TOKENS = (IMAGE, IMAGE_PAD, IMAGE_END)


@dataclass
class Example:
    ids: list[int]
    target: list[bool]          # is ids[i] a token the model should learn to predict?
    images: list[str] = field(default_factory=list)
    kind: str = "text"
    audio: list[str] = field(default_factory=list)
    drawn: str | None = None    # the picture a draw example's codes come from (PAD until `encode_drawings`)

    def unconditional(self) -> Example:
        """A draw example without its prompt: what guidance contrasts the prompt with."""
        start = self.ids.index(BEGIN_OF_IMAGE)
        return Example([BOS, *self.ids[start:]], [False, *self.target[start:]], kind=self.kind, drawn=self.drawn)


def kind_of(obj: dict) -> str:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj and "image" in obj:
        return "draw"
    if ("question" in obj or "question_audio" in obj) and "image" in obj:
        return "vqa"
    if "content" in obj:
        return "interleaved"
    if "image" in obj:
        return "captions"
    if "audio" in obj:
        return "audio"
    if "text" in obj:
        return "text"
    return "unknown"


class ClipLengths:
    """Positions each clip fills, for a model whose `audio_tokens(frames)` is given: reads each clip once into
    `cache`. An unreadable clip fills none here; the dataset then leaves its examples out, as it does an
    example whose image cannot be read."""

    def __init__(self, cache: AudioCache, audio_tokens: Callable[[int], int]):
        self.cache, self.audio_tokens = cache, audio_tokens

    def __call__(self, path: str, where: str) -> int:
        try:
            frames = self.cache.get(path).shape[-1]
        except KosmoError:
            return 0
        try:
            return self.audio_tokens(frames)
        except ValueError as e:
            raise KosmoError(f"{where}: {path}: {e}") from None


def example_from_record(obj: dict, tokenizer, tokens_per_image: int, base: Path, where: str,
                        audio_tokens: Callable[[str, str], int] | None = None, codes_per_image: int = 0) -> Example:
    """One line as an example; `audio_tokens(path, where)` gives a clip's positions (without it, audio is refused),
    and `codes_per_image` a drawn picture's (0: the model cannot draw)."""
    kind = kind_of(obj)

    def image_path(ref) -> str | EncodedImage:
        if isinstance(ref, EncodedImage):
            return ref
        if not isinstance(ref, str):
            raise KosmoError(f"{where}: an image must be a path string")
        return str((base / ref).resolve())

    def clip_path(ref, where: str = where) -> str:
        if not isinstance(ref, str):
            raise KosmoError(f"{where}: an audio clip must be a path string")
        if audio_tokens is None:
            raise KosmoError(f"{where}: the data has audio but the model takes none")
        return str((base / ref).resolve())

    def clip_tokens(ref, where: str = where) -> int:
        return audio_tokens(clip_path(ref, where), where)

    if kind == "text":
        ids = tokenizer.encode(_text(obj, "text", where))
        return Example([BOS, *ids, EOS], [False] + [True] * (len(ids) + 1), kind=kind)
    if kind == "captions":
        caption = tokenizer.encode(_text(obj, "text", where))
        block = chat.image_block(tokens_per_image)
        return Example([BOS, *block, *caption, EOS], [False] * (1 + len(block)) + [True] * (len(caption) + 1),
                       [image_path(obj["image"])], kind)
    if kind == "draw":
        if not codes_per_image:
            raise KosmoError(f"{where}: a draw line, but the model has no image tokenizer to draw with "
                             "(set image_tokenizer=RUN, a `kosmo train vqvae` run)")
        prompt = tokenizer.encode(_text(obj, "prompt", where))
        n = 1 + len(prompt)
        return Example([BOS, *prompt, BEGIN_OF_IMAGE, *[PAD] * codes_per_image, END_OF_IMAGE, EOS],
                       [False] * (n + 1) + [True] * (codes_per_image + 2), kind=kind, drawn=image_path(obj["image"]))
    if kind == "audio":
        text = tokenizer.encode(_text(obj, "text", where))
        block = chat.audio_block(clip_tokens(obj["audio"]))
        return Example([BOS, *block, *text, EOS], [False] * (1 + len(block)) + [True] * (len(text) + 1),
                       kind=kind, audio=[clip_path(obj["audio"])])
    if kind == "interleaved":
        ids, target, images, clips = [BOS], [False], [], []
        if not isinstance(obj["content"], list):
            raise KosmoError(f"{where}: 'content' must be a list of {{'text'}} / {{'image'}} / {{'audio'}} parts")
        for part in obj["content"]:
            if isinstance(part, dict) and "image" in part:
                block = chat.image_block(tokens_per_image)
                images.append(image_path(part["image"]))
            elif isinstance(part, dict) and "audio" in part:
                block = chat.audio_block(clip_tokens(part["audio"]))
                clips.append(clip_path(part["audio"]))
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                toks = tokenizer.encode(part["text"])
                ids += toks
                target += [True] * len(toks)
                continue
            else:
                raise KosmoError(f"{where}: a content part must be {{'text': str}}, {{'image': path}} or "
                                 "{'audio': path}")
            ids += block
            target += [False] * len(block)
        return Example(ids + [EOS], target + [True], images, kind, clips)
    if kind == "vqa":
        answers = obj.get("answers") or [obj.get("answer")]
        if not answers or not isinstance(answers[0], str):
            raise KosmoError(f"{where}: a VQA line needs 'answers': [str, …]")
        spoken = "question_audio" in obj
        question = obj["question_audio"] if spoken else _text(obj, "question", where)
        obj = {"messages": chat.vqa_messages(question, obj["image"], answers[0], spoken=spoken)}
    if kind in ("vqa", "chat"):
        r = chat.render(obj["messages"], tokenizer, tokens_per_image, where=where, audio_tokens=clip_tokens)
        return Example(r.ids, r.target, [image_path(i) for i in r.images], kind, [clip_path(a) for a in r.audio])
    raise KosmoError(f"{where}: unknown record (expected a text, caption, audio, interleaved, VQA, chat or draw line)")


def _text(obj: dict, key: str, where: str) -> str:
    if not isinstance(obj.get(key), str):
        raise KosmoError(f"{where}: field '{key}' must be a string")
    return obj[key]


def truncate(ex: Example, max_len: int) -> Example | None:
    """Cuts to max_len tokens without splitting an image or a clip; None if nothing learnable is left."""
    if len(ex.ids) <= max_len:
        return ex
    ids, target = ex.ids[:max_len], ex.target[:max_len]
    for start, end in ((IMAGE, IMAGE_END), (AUDIO, AUDIO_END), (BEGIN_OF_IMAGE, END_OF_IMAGE)):
        opened = [i for i, t in enumerate(ids) if t == start]
        closed = sum(t == end for t in ids)
        if len(opened) > closed:  # the cut fell inside a block: drop that block's tokens
            ids, target = ids[:opened[closed]], target[:opened[closed]]
    if not any(target[1:]):
        return None
    return Example(ids, target, ex.images[:ids.count(IMAGE_END)], ex.kind, ex.audio[:ids.count(AUDIO_END)],
                   ex.drawn if END_OF_IMAGE in ids else None)


def read_examples(paths: list, tokenizer, tokens_per_image: int, max_len: int,
                  kinds: tuple[str, ...] = KINDS, audio_tokens: Callable[[str, str], int] | None = None,
                  codes_per_image: int = 0) -> tuple[list[Example], int]:
    """All examples of the given kinds in `paths`, truncated to max_len; also how many were dropped.
    `audio_tokens(path, where)`: a clip's positions (a `ClipLengths`), for a model that hears;
    `codes_per_image`: a drawn picture's positions, for a model that draws."""
    out, dropped = [], 0
    for spec in paths:
        base = parse_source(spec).images
        for where, obj in read_records(spec):
            kind = kind_of(obj)
            if kind not in kinds:
                raise KosmoError(f"{where}: a {kind} line, but this stage reads {', '.join(kinds)} data")
            ex = truncate(example_from_record(obj, tokenizer, tokens_per_image, base, where, audio_tokens,
                                              codes_per_image), max_len)
            if ex is None:
                dropped += 1
            else:
                out.append(ex)
    return out, dropped


@torch.no_grad()
def encode_drawings(examples: list[Example], model, mode: str = "crop", batch: int = 256
                    ) -> tuple[list[Example], list[str]]:
    """The examples with each draw example's picture codes (as the model's ids) in place of its padding,
    every picture read and encoded once; also the messages of the pictures that could not be read, whose
    examples are left out."""
    from kosmo.data.images import load_images
    paths = list(dict.fromkeys(e.drawn for e in examples if e.drawn))
    if not paths:
        return examples, []
    coder = model.image_tokenizer.eval()
    pixels, ok, skipped = load_images(paths, coder.cfg.image_size, mode)
    device = next(coder.parameters()).device
    ids: dict[str, list[int]] = {}
    for start in range(0, len(ok), batch):
        codes = coder.encode(pixels[start:start + batch].to(device)).flatten(1)
        ids.update(zip([paths[i] for i in ok[start:start + batch]], model.codes_to_ids(codes).tolist()))
    kept = []
    for e in examples:
        if e.drawn is not None:
            if e.drawn not in ids:
                continue
            start = e.ids.index(BEGIN_OF_IMAGE) + 1
            e = Example(e.ids[:start] + ids[e.drawn] + e.ids[start + len(ids[e.drawn]):], e.target, kind=e.kind,
                        drawn=e.drawn)
        kept.append(e)
    return kept, [message for _, message in skipped]


class ImageBank:
    """Every image of a dataset, decoded and preprocessed once, addressed by path."""

    def __init__(self, paths: list[str], size: int, mode: str = "crop"):
        from kosmo.data.images import load_images
        unique = list(dict.fromkeys(paths))
        self.pixels, ok, self.skipped = load_images(unique, size, mode)
        self.index = {unique[i]: j for j, i in enumerate(ok)}

    def __contains__(self, path: str) -> bool:
        return path in self.index

    def get(self, paths: list[str]) -> torch.Tensor:
        return self.pixels[[self.index[p] for p in paths]] if paths else self.pixels[:0]


class MultimodalDataset:
    """Examples plus their images and clips, mixed by kind with weights; implements the trainer's Dataset."""

    def __init__(self, examples: list[Example], bank: ImageBank, mix: dict[str, float] | None = None,
                 seed: int = 0, pack_len: int = 0, audio: AudioCache | None = None, uncond: float = 0.0):
        self.pack_len = pack_len  # >0: pack a batch's examples into rows of this many tokens
        self.audio = audio  # the clips' features, read by `ClipLengths` when the examples were made
        bad_clips = audio.skipped if audio else {}
        self.examples = [e for e in examples if all(p in bank for p in e.images)
                         and not any(p in bad_clips for p in e.audio)]
        self.skipped = len(examples) - len(self.examples)  # examples whose image or clip could not be read
        self.bank = bank
        if not self.examples:
            raise KosmoError("no usable examples (every one was empty or had an unreadable image or clip)")
        self.order = self._mix(mix or {}, seed)
        # A fixed, seeded share of the epoch's draw examples goes without its prompt, so resume stays exact.
        draws = [i for i, j in enumerate(self.order) if self.examples[j].kind == "draw"]
        chosen = torch.randperm(len(draws), generator=torch.Generator().manual_seed(seed + 1))
        self.unconditional = {draws[k] for k in chosen[:round(uncond * len(draws))].tolist()}

    def _mix(self, mix: dict[str, float], seed: int) -> list[int]:
        """Example indices for one epoch: each kind gets a share of the epoch proportional to its
        weight (a kind without one weighs 1), drawn without replacement first. No weights at all:
        every example once."""
        by_kind: dict[str, list[int]] = {}
        for i, e in enumerate(self.examples):
            by_kind.setdefault(e.kind, []).append(i)
        for k in mix:
            if k not in KINDS:
                raise KosmoError(f"unknown config key 'mix.{k}' (known: {', '.join(KINDS)})")
        if not mix:
            return list(range(len(self.examples)))
        weights = {k: mix.get(k, 1.0) for k in by_kind}
        total_w = sum(weights.values())
        if total_w <= 0:
            raise KosmoError("the mix weights of the data present sum to zero")
        n = len(self.examples)
        gen = torch.Generator().manual_seed(seed)
        order = []
        for k, idx in by_kind.items():
            want = round(n * weights[k] / total_w)
            reps = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
            order += (reps * (want // len(reps) + 1))[:want]
        return order

    def __len__(self) -> int:
        return len(self.order)

    def collate(self, indices: list[int]) -> dict:
        exs = [self.examples[self.order[i]].unconditional() if i in self.unconditional
               else self.examples[self.order[i]] for i in indices]
        return collate_examples(exs, self.pack_len, self.bank.get, self.audio)


def collate_examples(exs: list[Example], pack_len: int, pixels: Callable[[list], torch.Tensor],
                     audio: AudioCache | None = None) -> dict:
    """The batch of these examples, their pictures from `pixels(refs)`. Packed (pack_len > 0), the same
    examples (hence the same loss) fill fewer rows: each example is its own document (`segments`), so none
    sees another, and far less of the batch is padding, which in short-answer chat data is otherwise most of it."""
    rows = pack(exs, pack_len) if pack_len else [[e] for e in exs]
    T = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    inp = torch.full((len(rows), T), PAD, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    segments = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for doc, e in enumerate(row, start=1):
            ids, n = torch.tensor(e.ids), len(e.ids) - 1
            inp[r, t:t + n] = ids[:-1]
            labels[r, t:t + n] = torch.where(torch.tensor(e.target[1:]), ids[1:], -100)
            segments[r, t:t + n] = doc
            t += n
    images = pixels([p for row in rows for e in row for p in e.images])
    clips = [p for row in rows for e in row for p in e.audio]
    sound = audio.load(clips)[0] if clips else None
    batch = {"input": inp, "labels": labels, "images": images, "audio": sound, "n_targets": int((labels != -100).sum())}
    return {**batch, "segments": segments} if pack_len else batch


def pack(examples: list[Example], capacity: int) -> list[list[Example]]:
    """First-fit decreasing: each example goes into the first row with room for its input tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.ids)):
        n = len(e.ids) - 1
        r = next((i for i, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(e)
        room[r] -= n
    return rows
