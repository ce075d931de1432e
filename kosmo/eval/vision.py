"""Captioning, VQA and chat evaluation, each beside its blind baseline: the same model and prompts
with the images removed, which measures how much of a score the model earns by looking. A VQA line
with `question_audio` asks its question aloud, to a model that hears."""

from __future__ import annotations

from pathlib import Path

import torch

from kosmo.data import chat
from kosmo.data.audio import AudioCache
from kosmo.data.images import load_images
from kosmo.data.jsonl import read_jsonl
from kosmo.errors import KosmoError
from kosmo.eval.metrics import caption_scores, vqa_accuracy
from kosmo.generate import Sampling, generate
from kosmo.tokenizer import AUDIO, AUDIO_END, AUDIO_PAD, BOS, END_OF_TURN, EOS, IMAGE, IMAGE_END, IMAGE_PAD


def sees_images(model) -> bool:
    """Whether a model takes images: a KOSMOS or a Flamingo model, not a text-only LM."""
    return model.image_size > 0


def _strip(ids: list[int], tokens: tuple[int, ...]) -> list[int]:
    return [t for t in ids if t not in tokens]


class ClipReader:
    """The clips an evaluation reads, each once: `tokens(path, where)` sizes a prompt's audio block (an unreadable
    clip is a hard error here) and `batch(paths)` gives their features."""

    def __init__(self, model):
        self.model, self.cache = model, AudioCache(model.n_mels) if model.n_mels else None

    def tokens(self, path: str, where: str) -> int:
        if self.cache is None:
            raise KosmoError(f"{where}: the data has audio but the model takes none")
        try:
            return self.model.audio_tokens(self.cache.get(path).shape[-1])
        except ValueError as e:
            raise KosmoError(f"{where}: {path}: {e}") from None

    def batch(self, paths: list[str]):
        clips, _, skipped = self.cache.load(paths)
        if skipped:
            raise KosmoError(skipped[0][1])
        return clips


def complete(model, tok, prompts: list[list[int]], image_paths: list[list[str]], blind: bool, max_new_tokens: int,
             batch_size: int, image_mode: str = "crop", stop_ids=(EOS, END_OF_TURN), clips: ClipReader | None = None,
             audio_paths: list[list[str]] | None = None, deaf: bool = False) -> list[str]:
    """Greedy completions; images are loaded per batch (an unreadable one is a hard error here). `blind`
    removes the images from the prompts, `deaf` the audio."""
    size = model.image_size
    audio_paths = audio_paths or [[] for _ in prompts]
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = prompts[start:start + batch_size]
        paths = [p for row in image_paths[start:start + batch_size] for p in row]
        heard = [p for row in audio_paths[start:start + batch_size] for p in row]
        images = audio = None
        if blind:
            ids = [_strip(p, (IMAGE, IMAGE_PAD, IMAGE_END)) for p in ids]
        elif paths:
            if not size:
                raise KosmoError("the data has images but the model is text-only")
            images, ok, skipped = load_images(paths, size, image_mode)
            if skipped:
                raise KosmoError(skipped[0][1])
        if deaf:
            ids = [_strip(p, (AUDIO, AUDIO_PAD, AUDIO_END)) for p in ids]
        elif heard:
            audio = clips.batch(heard)
        try:
            results = generate(model, tok, ids, Sampling(max_new_tokens=max_new_tokens), stop_ids, images=images,
                               audio=audio)
        except ValueError as e:  # a prompt longer than the context
            raise KosmoError(str(e)) from None
        out += [r.text.strip() for r in results]
    return out


def records(path) -> list[tuple[str, dict]]:
    return [(f"{path}:{n}", obj) for n, obj in read_jsonl(path)]


def resolve(path: Path, ref, where: str, field: str = "image") -> str:
    if not isinstance(ref, str):
        raise KosmoError(f"{where}: field '{field}' must be a path string")
    return str((path.parent / ref).resolve())


def eval_vqa(model, tok, path, blind=False, system: str | None = None, batch_size=32, limit=None) -> dict:
    path = Path(path)
    k = model.tokens_per_image
    clips = ClipReader(model)
    prompts, images, heard, answers, qtypes, asked = [], [], [], [], [], []
    for where, obj in records(path)[:limit]:
        spoken = "question_audio" in obj
        if not (spoken or isinstance(obj.get("question"), str)) or not isinstance(obj.get("answers"), list):
            raise KosmoError(f"{where}: a VQA line needs 'question' (or 'question_audio') and 'answers'")
        question = resolve(path, obj["question_audio"], where, "question_audio") if spoken else obj["question"]
        messages = chat.vqa_messages(question, obj["image"], system=system, spoken=spoken)
        r = chat.render(messages, tok, k, add_generation_prompt=True, where=where, audio_tokens=clips.tokens)
        prompts.append(r.ids)
        images.append([resolve(path, i, where) for i in r.images])
        heard.append(r.audio)
        answers.append(obj["answers"])
        qtypes.append(obj.get("qtype", "all"))
        # what was asked, for the samples: a spoken question's transcript where the line has one
        asked.append(obj.get("question", "") if spoken else tok.decode(r.ids))
    preds = complete(model, tok, prompts, images, blind, 8, batch_size, clips=clips, audio_paths=heard)
    scores = [vqa_accuracy(p, a) for p, a in zip(preds, answers)]
    by_type: dict[str, list[float]] = {}
    for q, s in zip(qtypes, scores):
        by_type.setdefault(q, []).append(s)
    return {"vqa_accuracy": round(100 * sum(scores) / len(scores), 2), "n": len(scores),
            "by_type": {q: round(100 * sum(v) / len(v), 2) for q, v in sorted(by_type.items())},
            "samples": [{"question": q, "prediction": p, "answers": a[:3]}
                        for q, p, a in zip(asked[:4], preds, answers)]}


def eval_caption(model, tok, path, blind=False, batch_size=32, limit=None) -> dict:
    path = Path(path)
    k = model.tokens_per_image
    prompts, images, refs = [], [], {}
    for i, (where, obj) in enumerate(records(path)[:limit]):
        caps = obj.get("captions") or ([obj["text"]] if isinstance(obj.get("text"), str) else None)
        if not caps or "image" not in obj:
            raise KosmoError(f"{where}: a caption line needs 'image' and 'captions' (or 'text')")
        prompts.append([BOS] + chat.image_block(k))
        images.append([resolve(path, obj["image"], where)])
        refs[str(i)] = caps
    preds = complete(model, tok, prompts, images, blind, 32, batch_size)
    scores = caption_scores({str(i): p for i, p in enumerate(preds)}, refs)
    return {**scores, "n": len(preds), "samples": [{"prediction": p, "reference": refs[str(i)][0]}
                                                   for i, p in enumerate(preds[:4])]}


def eval_chat(model, tok, path, blind=False, batch_size=32, limit=None) -> dict:
    """Replays each dialogue up to its last user turn. Lines with a `style` (the shapes world's
    form-changing system prompts) are scored for compliance, lines with an `answer` for correctness."""
    from kosmo.data.world import answer_matches, complies
    path = Path(path)
    k = model.tokens_per_image
    prompts, images, rows = [], [], []
    for where, obj in records(path)[:limit]:
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise KosmoError(f"{where}: a chat line needs 'messages'")
        last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                        default=None)
        if last_user is None:
            raise KosmoError(f"{where}: the dialogue has no user turn")
        r = chat.render(messages[:last_user + 1], tok, k, add_generation_prompt=True, where=where)
        prompts.append(r.ids)
        images.append([resolve(path, i, where) for i in r.images])
        rows.append(obj)
    preds = complete(model, tok, prompts, images, blind, 24, batch_size)
    styled = [(p, r) for p, r in zip(preds, rows) if "style" in r]
    answered = [(p, r) for p, r in zip(preds, rows) if "answer" in r]
    out = {"n": len(preds)}
    if styled:
        out["compliance"] = round(100 * sum(complies(p, r["style"]) for p, r in styled) / len(styled), 2)
    if answered:
        out["answer_accuracy"] = round(100 * sum(answer_matches(p, r["answer"]) for p, r in answered) / len(answered), 2)
    out["samples"] = [{"style": r.get("style"), "prediction": p} for p, r in list(zip(preds, rows))[:4]]
    return out


EVALS = {"vqa": eval_vqa, "caption": eval_caption, "chat": eval_chat}


@torch.no_grad()
def evaluate(kind: str, model, tok, path, with_blind: bool = True, **kw) -> dict:
    """The metrics of `kind`, and under "blind" the same metrics without the images."""
    result = EVALS[kind](model, tok, path, **kw)
    if with_blind and sees_images(model):
        blind = EVALS[kind](model, tok, path, blind=True, **kw)
        result["blind"] = {k: v for k, v in blind.items() if k not in ("samples", "n")}
    return result
