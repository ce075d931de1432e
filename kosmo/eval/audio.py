"""Hearing, measured beside a deaf baseline (the same model and prompts with the audio removed):

- `eval_asr`: transcription of {"audio", "text"} lines, as word and character error rates (`kosmo.eval.asr`).
- `eval_sounds`: naming sound events, {"audio", "text": class} lines, as accuracy overall and per class.

The prompt is the pretraining format, `<s><audio>…</audio>`, and the model writes the rest.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from kosmo.data import chat
from kosmo.errors import KosmoError
from kosmo.eval.asr import cer, normalise_transcript, wer
from kosmo.eval.vision import ClipReader, complete, records, resolve
from kosmo.tokenizer import BOS


def _clip_prompts(model, tok, path, limit):
    path = Path(path)
    clips = ClipReader(model)
    prompts, heard, truth = [], [], []
    for where, obj in records(path)[:limit]:
        if "audio" not in obj or not isinstance(obj.get("text"), str):
            raise KosmoError(f"{where}: an audio line needs 'audio' and 'text'")
        clip = resolve(path, obj["audio"], where, "audio")
        prompts.append([BOS, *chat.audio_block(clips.tokens(clip, where))])
        heard.append([clip])
        truth.append(obj["text"])
    if not prompts:
        raise KosmoError(f"{path}: no lines to evaluate")
    return clips, prompts, heard, truth


def eval_asr(model, tok, path, deaf=False, batch_size=32, limit=None, max_new_tokens=64) -> dict:
    clips, prompts, heard, truth = _clip_prompts(model, tok, path, limit)
    preds = complete(model, tok, prompts, [[] for _ in prompts], False, max_new_tokens, batch_size, clips=clips,
                     audio_paths=heard, deaf=deaf)
    try:
        rates = {"wer": round(100 * wer(truth, preds), 2), "cer": round(100 * cer(truth, preds), 2)}
    except ValueError as e:
        raise KosmoError(f"{path}: {e}") from None
    return {**rates, "n": len(preds),
            "samples": [{"prediction": p, "truth": t} for p, t in zip(preds[:4], truth)]}


def eval_sounds(model, tok, path, deaf=False, batch_size=32, limit=None) -> dict:
    clips, prompts, heard, truth = _clip_prompts(model, tok, path, limit)
    preds = complete(model, tok, prompts, [[] for _ in prompts], False, 8, batch_size, clips=clips,
                     audio_paths=heard, deaf=deaf)
    by_class = defaultdict(list)
    for p, t in zip(preds, truth):
        by_class[t].append(normalise_transcript(p) == normalise_transcript(t))
    hits = [h for v in by_class.values() for h in v]
    return {"accuracy": round(100 * sum(hits) / len(hits), 2), "n": len(hits),
            "by_class": {c: round(100 * sum(v) / len(v), 2) for c, v in sorted(by_class.items())},
            "samples": [{"prediction": p, "truth": t} for p, t in zip(preds[:4], truth)]}


EVALS = {"asr": eval_asr, "sounds": eval_sounds}


@torch.no_grad()
def evaluate(kind: str, model, tok, path, with_deaf: bool = True, **kw) -> dict:
    """The metrics of `kind`, and under "deaf" the same metrics with the audio removed."""
    if not model.n_mels:
        raise KosmoError(f"eval {kind} needs a model that hears (one trained with audio=…)")
    result = EVALS[kind](model, tok, path, **kw)
    if with_deaf:
        deaf = EVALS[kind](model, tok, path, deaf=True, **kw)
        result["deaf"] = {k: v for k, v in deaf.items() if k not in ("samples", "n")}
    return result
