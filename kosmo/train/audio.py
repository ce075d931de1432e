"""CTC pretraining of the audio encoder on transcribed speech: the encoder learns to hear characters.

    kosmo train audio --data data/speech.jsonl --out runs/audio val_data=data/val_speech.jsonl \
        train.batch_size=32 train.lr=2e-3 train.max_steps=600     # ~6 minutes on 2 CPU cores

Lines are {"audio": path relative to the JSONL file, "text": transcript}. Transcripts are normalised as the
scores are (`kosmo.eval.asr.normalise_transcript`: lowercase, punctuation dropped, since nobody hears a comma);
a transcript that still holds a character outside `alphabet` is refused rather than silently cut, because a
letter missing from the target teaches the model to skip a sound it did hear. Unreadable clips are skipped with
a note. After training, `report` transcribes the eval set greedily and gives its CER and WER.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kosmo.data.audio import HOP_LENGTH, SAMPLE_RATE, AudioCache, batch_clips
from kosmo.data.jsonl import read_jsonl
from kosmo.errors import KosmoError
from kosmo.eval.asr import cer, normalise_transcript, wer
from kosmo.model.audio import AudioConfig, out_frames
from kosmo.model.ctc import ALPHABET, BLANK, AudioCTC, CTCConfig
from kosmo.train.trainer import TrainConfig


@dataclass
class Augment:
    """Training-time changes to the features, so that held-out voices and speeds sound like familiar ones.
    The defaults are what measured best on the world's held-out voices (research/ctc_sweep.py); 0 turns each off."""
    speed: float = 0.15      # tempo scaled by a random factor in [1 - speed, 1 + speed] (pitch kept)
    warp: float = 0.1        # mel axis stretched likewise: a longer or shorter vocal tract, i.e. another speaker
    freq_masks: int = 2      # SpecAugment: bands of up to freq_width mel bins blanked to the clip's mean
    freq_width: int = 15
    time_masks: int = 2      # and spans of up to time_width of the clip's frames
    time_width: float = 0.05

    def __post_init__(self):
        if not all(0 <= x < 1 for x in (self.speed, self.warp, self.time_width)):
            raise ValueError("augment.speed, augment.warp and augment.time_width must be in [0, 1)")
        if min(self.freq_masks, self.freq_width, self.time_masks) < 0:
            raise ValueError("augment.freq_masks, freq_width and time_masks must be 0 or more")

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """A changed copy of one clip's (n_mels, frames) features; the global RNG draws, so resume is exact."""
        if self.speed:
            factor = 1 + self.speed * (2 * torch.rand(()).item() - 1)
            frames = max(1, round(feats.shape[-1] / factor))
            feats = F.interpolate(feats[None], size=frames, mode="linear", align_corners=False)[0]
        else:
            feats = feats.clone()  # the cache's tensor is shared
        n_mels, frames = feats.shape
        if self.warp:
            # VTLP: formants move by one factor, approximately a stretch of the mel bins; the top bin repeats
            # where a squeeze leaves the band short
            factor = 1 + self.warp * (2 * torch.rand(()).item() - 1)
            bins = max(1, round(n_mels * factor))
            feats = F.interpolate(feats.T[None], size=bins, mode="linear", align_corners=False)[0].T
            feats = torch.cat([feats, feats[-1:].expand(max(0, n_mels - bins), frames)])[:n_mels].contiguous()
        fill = feats.mean()
        for _ in range(self.freq_masks):
            w = int(torch.randint(0, min(self.freq_width, n_mels) + 1, ()))
            f0 = int(torch.randint(0, n_mels - w + 1, ()))
            feats[f0:f0 + w] = fill
        for _ in range(self.time_masks):
            w = int(torch.randint(0, int(self.time_width * frames) + 1, ()))
            t0 = int(torch.randint(0, frames - w + 1, ()))
            feats[:, t0:t0 + w] = fill
        return feats


@dataclass
class StageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    audio: dict = field(default_factory=lambda: {"dim": 192, "n_layers": 4, "n_heads": 4, "mlp_dim": 768,
                                                 "n_mels": 80})
    alphabet: str = ALPHABET
    augment: Augment = field(default_factory=Augment)
    val_data: str = ""          # a JSONL file of held-out clips to evaluate on; else the last val_fraction
    val_fraction: float = 0.02
    vocab_size: int = 512       # only for the run's tokenizer.json, which a CTC model does not use


@dataclass
class Clip:
    where: str    # file:line, for messages
    audio: str    # resolved path
    text: str     # normalised transcript
    ids: list[int]


class Speech:
    """Clips and their character targets for the trainer; features come from a shared AudioCache."""

    def __init__(self, clips: list[Clip], cache: AudioCache, augment: Augment | None = None):
        self.clips, self.cache, self.augment = clips, cache, augment
        self.frames = [cache.get(c.audio).shape[-1] for c in clips]

    def __len__(self) -> int:
        return len(self.clips)

    def arrange(self, order: list[int], batch_size: int, head: int, generator: torch.Generator) -> list[int]:
        """Clips of similar lengths batched together, as the trainer asks of a dataset: speech lengths vary
        five-fold, and random batches would spend about two thirds of their compute on padding. Windows of 64
        batches of the random order are sorted by length and cut into batches, which are then shuffled, so the
        epoch is still a random order of batches. The first `head` rows and the last, partial batch are the ones
        the neighbouring epochs complete."""
        n, B = len(order), batch_size
        if n <= head + B:
            return order
        tail = (n - head) % B
        window = 64 * B
        by_length = [i for s in range(0, n, window) for i in sorted(order[s:s + window], key=self.frames.__getitem__)]
        edges, body = by_length[:head + tail], by_length[head + tail:]
        batches = [body[s:s + B] for s in range(0, len(body), B)]
        shuffled = [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
        return edges[:head] + shuffled + edges[head:]

    def collate(self, indices: list[int]) -> dict:
        rows = [self.clips[i] for i in indices]
        feats = [self.cache.get(c.audio) for c in rows]
        if self.augment:
            feats = [self.augment(f) for f in feats]
        batch = batch_clips(feats, self.cache.n_mels)
        return {"mels": batch.mels, "lengths": batch.lengths,
                "targets": torch.tensor([i for c in rows for i in c.ids], dtype=torch.long),
                "target_lengths": torch.tensor([len(c.ids) for c in rows], dtype=torch.long),
                "n_targets": sum(len(c.ids) for c in rows)}


def ctc_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Summed CTC loss in nats; the trainer divides by the characters, so the loss reads per character.
    Log-probabilities are fp32 whatever the autocast: CTC's forward-backward sums thousands of them.
    `zero_infinity` drops a clip that speed augmentation made too short for its transcript, instead of
    ending the run on an infinite loss."""
    logits = model(batch["mels"], batch["lengths"])
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C), as F.ctc_loss wants
    loss = F.ctc_loss(log_probs, batch["targets"], out_frames(batch["lengths"]), batch["target_lengths"],
                      blank=BLANK, reduction="sum", zero_infinity=True)
    return loss, {}


def read_clips(path: str | Path, model: AudioCTC) -> list[Clip]:
    path = Path(path)
    clips = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj.get("audio"), str) or not isinstance(obj.get("text"), str):
            raise KosmoError(f"{where}: a speech line needs 'audio' (a path) and 'text' (its transcript)")
        text = normalise_transcript(obj["text"])
        if not text:
            raise KosmoError(f"{where}: the transcript is empty once punctuation is dropped")
        unknown = sorted(set(text) - set(model.cfg.alphabet))
        if unknown:
            raise KosmoError(f"{where}: the transcript has characters outside the alphabet ({''.join(unknown)!r}); "
                             "add them to `alphabet`")
        clips.append(Clip(where, str(path.parent / obj["audio"]), text, model.encode_text(text)))
    return clips


def fits(n_frames: int, ids: list[int]) -> bool:
    """Whether CTC can align the transcript to the clip's encoder frames: one per character, and a blank
    between each pair of repeated characters ("ll" needs three frames)."""
    repeats = sum(a == b for a, b in zip(ids, ids[1:]))
    return out_frames(n_frames) >= len(ids) + repeats


def load_clips(clips: list[Clip], cache: AudioCache, name: str) -> list[Clip]:
    """The clips whose audio loads and is long enough for its transcript; the others are skipped, with a note."""
    kept, notes = [], []
    for c in clips:
        try:
            frames = cache.get(c.audio).shape[-1]
        except KosmoError as e:
            notes.append(f"skipped clip: {c.where}: {e}")
            continue
        if fits(frames, c.ids):
            kept.append(c)
        else:
            seconds = frames * HOP_LENGTH / SAMPLE_RATE
            notes.append(f"skipped clip: {c.where}: {seconds:.2f} s is too short for {len(c.ids)} characters")
    for note in notes[:5]:
        print(note, flush=True)
    if notes:
        print(f"data: {len(notes)} of {len(clips)} {name} clips skipped", flush=True)
    if not kept:
        raise KosmoError(f"no usable {name} clips (all {len(clips)} were unreadable or too short)")
    return kept


def build(cfg: StageConfig, data: list, tokenizer, init_model=None):
    if init_model is not None and not isinstance(init_model, AudioCTC):
        raise KosmoError("--init for audio must be an audio (ctc) run")
    try:
        model = init_model or AudioCTC(CTCConfig(audio=AudioConfig(**cfg.audio), alphabet=cfg.alphabet))
    except (TypeError, ValueError) as e:
        raise KosmoError(f"invalid config: {e}") from None
    audio = model.cfg.audio
    # a clip the encoder's position table cannot hold is skipped when read, not failed on at its first batch
    cache = AudioCache(audio.n_mels, max_seconds=audio.max_frames * HOP_LENGTH / SAMPLE_RATE)
    clips = [c for path in data for c in read_clips(path, model)]
    if cfg.val_data:
        train_clips, val_clips = clips, read_clips(cfg.val_data, model)
    else:
        n_val = int(len(clips) * cfg.val_fraction)
        train_clips, val_clips = clips[: len(clips) - n_val], clips[len(clips) - n_val:]
    train = Speech(load_clips(train_clips, cache, "training"), cache, cfg.augment)
    val = Speech(load_clips(val_clips, cache, "eval"), cache) if val_clips else None
    return model, ctc_loss, train, val


@torch.no_grad()
def transcribe_set(model: AudioCTC, data: Speech, batch_size: int = 32) -> list[str]:
    """Greedy transcripts of every clip, in order; batches of similar lengths waste little on padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: data.cache.get(data.clips[i].audio).shape[-1])
    out = [""] * len(data)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        texts = model.transcribe(batch_clips([data.cache.get(data.clips[i].audio) for i in rows],
                                             data.cache.n_mels))
        for i, t in zip(rows, texts):
            out[i] = t
    model.train(was_training)
    return out


def report(model, train_set: Speech, eval_set: Speech | None) -> dict:
    """CER and WER of greedy transcripts: on the eval set, and on the first 256 training clips, which tells a
    model that has not learned from one that has learned but does not generalise to new voices."""
    seen = Speech(train_set.clips[:256], train_set.cache)
    out = {"train_cer": round(cer([c.text for c in seen.clips], transcribe_set(model, seen)), 4)}
    if eval_set:
        refs = [c.text for c in eval_set.clips]
        hyps = transcribe_set(model, eval_set)
        out.update(val_clips=len(refs), val_cer=round(cer(refs, hyps), 4), val_wer=round(wer(refs, hyps), 4))
        for c, h in list(zip(eval_set.clips, hyps))[:3]:
            print(f"{c.where}\n  heard: {h}\n  said:  {c.text}", file=sys.stderr)
    return out
