"""The audio encoder with a CTC head over characters: how the encoder is pretrained to hear.

Each encoder frame (20 ms) gets a distribution over blank + the alphabet; CTC sums over every alignment of
the transcript to the frames, so no frame-level labels are needed. Characters rather than BPE tokens keep the
head tiny and make every output frame's job local (one sound, one letter), which is what the encoder should
learn before it is frozen and handed to the LM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kosmo.config import ModelConfig
from kosmo.data.audio import Clips
from kosmo.model.audio import AudioConfig, AudioEncoder, out_frames

BLANK = 0
ALPHABET = " 'abcdefghijklmnopqrstuvwxyz0123456789"  # what `normalise_transcript` leaves of English


@dataclass
class CTCConfig(ModelConfig):
    audio: AudioConfig = field(default_factory=AudioConfig)
    alphabet: str = ALPHABET  # output i + 1 is alphabet[i]; output 0 is the blank

    def __post_init__(self):
        if not self.alphabet or len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet={self.alphabet!r} must be non-empty, each character once")


class AudioCTC(nn.Module):
    def __init__(self, cfg: CTCConfig):
        super().__init__()
        self.cfg = cfg
        self.audio = AudioEncoder(cfg.audio)  # the name every kosmo model gives its audio encoder
        self.head = nn.Linear(cfg.audio.dim, len(cfg.alphabet) + 1)
        self._ids = {ch: i + 1 for i, ch in enumerate(cfg.alphabet)}

    def forward(self, mels, lengths=None):
        """(B, n_mels, T) features -> (B, (T + 1) // 2, 1 + len(alphabet)) logits; frames past
        `out_frames(lengths)` are padding."""
        return self.head(self.audio(mels, lengths))

    def encode_text(self, text: str) -> list[int]:
        return [self._ids[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        """Greedy CTC decoding of one clip's best path: repeats collapse, then blanks drop ("aa_a" -> "aa")."""
        out, prev = [], BLANK
        for i in ids:
            if i != prev and i != BLANK:
                out.append(self.cfg.alphabet[i - 1])
            prev = i
        return "".join(out)

    @torch.no_grad()
    def transcribe(self, clips: Clips) -> list[str]:
        param = next(self.parameters())
        best = self(clips.mels.to(param.device), clips.lengths.to(param.device)).argmax(-1).cpu()
        return [self.decode(row[:n].tolist()) for row, n in zip(best, out_frames(clips.lengths).tolist())]
