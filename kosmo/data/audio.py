"""Reading audio safely and turning it into Whisper's log-mel features.

- `load_audio(path, max_seconds)`: float32 mono samples at 16 kHz, from any file libsndfile reads (WAV, FLAC,
  OGG, ...). Channels are averaged and the rate converted with soxr. A missing, empty, unreadable or truncated
  file, a WAV header that declares more data than the file holds, an absurd sample rate or a clip over
  `max_seconds` becomes a one-line `KosmoError` that names the file; the duration is refused from the header,
  before any sample is decoded.
- `decode_audio_bytes(data, source, max_seconds)`: the same for encoded bytes in memory (errors name `source`).
- `log_mel_spectrogram(audio, n_mels, pad)`: Whisper's features, (n_mels, frames) or (batch, n_mels, frames):
  25 ms Hann windows every 10 ms, power spectrum, Slaney mel filters, log10, a floor 8 below the clip's peak and
  a shift and scale to roughly [-1, 1]. `pad=True` pads or trims the clip to 30 s (3000 frames) as Whisper
  does; `pad=False` keeps one frame per 10 ms of the clip.
- `pad_or_trim(audio, length)`: zeros appended, or samples cut, to `length` samples on the last axis.
- `mel_filters(n_mels)`: the (n_mels, 201) filterbank, the same as librosa's `norm="slaney"` one.
- `clip_features(audio, n_mels, source)`: the unpadded features of one clip, one frame per 10 ms; too short a clip
  is a one-line `KosmoError`.
- `Clips(mels, lengths)`: features of clips of different lengths zero-padded to the longest, with each clip's own
  frame count; `batch_clips(features)` builds one. The audio encoder takes both.
- `AudioCache(n_mels, max_seconds)`: for data streams, as `ImageCache` is for pictures. `.get(path)` decodes each
  file once (a bad file's error is remembered in `.skipped`); `.load(paths)` returns `(Clips, ok, skipped)`,
  leaving bad files out instead of failing.
"""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import soundfile
import soxr
import torch

from kosmo.errors import KosmoError

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms windows
HOP_LENGTH = 160  # 10 ms hop
CHUNK_SECONDS = 30  # Whisper's encoder sees 30 s at a time
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH
MAX_SECONDS = 30.0
# Below 1 kHz nothing of speech survives, and a tiny file would resample into a huge one; libsndfile and
# common hardware stop at 384 kHz, so a higher rate is a corrupt or forged header.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000
MAX_CHANNELS = 8  # 7.1 surround
# what streaming writers (espeak-ng --stdout among them) put in a header they cannot go back to
_UNKNOWN_WAV_SIZES = (0, 0x7FFFF000, 0xFFFFFFFF)


def load_audio(path: str | Path, max_seconds: float = MAX_SECONDS) -> torch.Tensor:
    """The audio file at `path` as float32 mono samples at 16 kHz, or a KosmoError naming it."""
    try:
        with open(path, "rb") as fp:
            return _decode(fp, str(path), max_seconds)
    except OSError as e:
        raise KosmoError(f"{path}: cannot read audio file ({e.strerror or e})") from None


def decode_audio_bytes(data: bytes, source: str = "audio", max_seconds: float = MAX_SECONDS) -> torch.Tensor:
    """Encoded audio bytes (WAV, FLAC, OGG, ...) as float32 mono samples at 16 kHz, or a KosmoError naming `source`."""
    return _decode(io.BytesIO(data), source, max_seconds)


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    if audio.shape[-1] >= length:
        return audio[..., :length]
    return torch.nn.functional.pad(audio, (0, length - audio.shape[-1]))


@functools.cache
def mel_filters(n_mels: int) -> torch.Tensor:
    """(n_mels, N_FFT // 2 + 1) triangles from 0 to 8 kHz, evenly spaced on Slaney's mel scale, each scaled to
    unit area so that wide high-frequency bands do not outweigh narrow low ones."""
    fft_freqs = torch.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(0, _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2, dtype=torch.float64)
    edges = _mel_to_hz(mels)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_freqs - lower) / (center - lower)
    falling = (upper - fft_freqs) / (upper - center)
    triangles = torch.minimum(rising, falling).clamp(min=0)
    return (triangles * 2 / (upper - lower)).float()


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = 80, pad: bool = True) -> torch.Tensor:
    """Whisper's log-mel features of 16 kHz samples, (samples,) or (batch, samples): (n_mels, frames) or
    (batch, n_mels, frames), with 3000 frames if `pad`, else one per 10 ms (samples // 160)."""
    if pad:
        audio = pad_or_trim(audio)
    elif audio.shape[-1] <= N_FFT // 2:
        # torch.stft centres each window by mirroring the clip's ends, which needs more samples than half a window
        raise ValueError(f"an unpadded clip needs more than {N_FFT // 2} samples, got {audio.shape[-1]}")
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio.float(), N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # the last window, centred on the clip's very end, is dropped as in Whisper
    mel = mel_filters(n_mels).to(audio.device) @ power
    log_mel = mel.clamp(min=1e-10).log10()
    # A floor 80 dB below each clip's peak, so silence and padding do not stretch the range
    log_mel = torch.maximum(log_mel, log_mel.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_mel + 4.0) / 4.0


def clip_features(audio: torch.Tensor, n_mels: int = 80, source: str = "audio") -> torch.Tensor:
    """(n_mels, frames) log-mel features of one clip, unpadded: one frame per 10 ms."""
    if audio.shape[-1] <= N_FFT // 2:
        raise KosmoError(f"{source}: {audio.shape[-1] / SAMPLE_RATE * 1000:.1f} ms of audio is too short "
                         f"(at least {(N_FFT // 2 + 1) * 1000 // SAMPLE_RATE} ms)")
    return log_mel_spectrogram(audio, n_mels, pad=False)


class Clips(NamedTuple):
    """Log-mel features of M clips zero-padded to the longest, (M, n_mels, T), and each clip's frames (M,)."""
    mels: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.lengths)

    def to(self, device) -> "Clips":
        return Clips(self.mels.to(device), self.lengths.to(device))


def batch_clips(features: list[torch.Tensor], n_mels: int = 80) -> Clips:
    """Clips of (n_mels, frames_i) features as one zero-padded batch."""
    lengths = torch.tensor([f.shape[-1] for f in features], dtype=torch.long)
    mels = torch.zeros(len(features), n_mels, int(lengths.max()) if features else 0)
    for i, f in enumerate(features):
        mels[i, :, :f.shape[-1]] = f
    return Clips(mels, lengths)


class AudioCache:
    """Log-mel features by file, each file decoded once. A bad file is remembered too (in `skipped`: path ->
    message), so a stream that meets it again pays for it once. Returned tensors are shared: do not modify them."""

    def __init__(self, n_mels: int = 80, max_seconds: float = MAX_SECONDS):
        self.n_mels, self.max_seconds = n_mels, max_seconds
        self._items: dict[str, torch.Tensor | str] = {}  # a str is the error message
        self.skipped: dict[str, str] = {}

    def get(self, path: str | Path) -> torch.Tensor:
        """(n_mels, frames) features of the clip at `path`, or the KosmoError it gives."""
        key = os.path.realpath(path)
        item = self._items.get(key)
        if item is None:
            try:
                item = clip_features(load_audio(path, self.max_seconds), self.n_mels, str(path))
            except KosmoError as e:
                item = self.skipped[str(path)] = str(e)
            self._items[key] = item
        if isinstance(item, str):
            raise KosmoError(item)
        return item

    def load(self, paths) -> tuple[Clips, list[int], list[tuple[str, str]]]:
        """Every clip of `paths` that loads, batched; the others are listed in `skipped`, not raised."""
        feats, ok, skipped = [], [], []
        for i, path in enumerate(paths):
            try:
                feats.append(self.get(path))
                ok.append(i)
            except KosmoError as e:
                skipped.append((str(path), str(e)))
        return batch_clips(feats, self.n_mels), ok, skipped


def _hz_to_mel(hz):
    """Slaney's mel scale: linear up to 1 kHz, logarithmic above."""
    hz = torch.as_tensor(hz, dtype=torch.float64)
    return torch.where(hz < 1000, hz * 3 / 200, 15 + torch.log(hz / 1000) * 27 / math.log(6.4))


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return torch.where(mel < 15, mel * 200 / 3, 1000 * torch.exp((mel - 15) * math.log(6.4) / 27))


def _decode(fp: BinaryIO, source: str, max_seconds: float) -> torch.Tensor:
    size = fp.seek(0, io.SEEK_END)
    if size == 0:
        raise KosmoError(f"{source}: empty audio file")
    _check_wav_header(fp, size, source)
    fp.seek(0)
    try:
        with soundfile.SoundFile(fp) as f:
            rate, frames = f.samplerate, f.frames
            _check_rate(rate, source)
            if f.channels > MAX_CHANNELS:  # each is decoded in full before the downmix
                raise KosmoError(f"{source}: {f.channels} audio channels, over the limit of {MAX_CHANNELS}")
            if frames > max_seconds * rate:
                raise KosmoError(f"{source}: {frames / rate:.1f} s of audio, over the {max_seconds:g} s limit")
            samples = f.read(dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise KosmoError(f"{source}: not audio that libsndfile can read, or truncated ({e.error_string})") from None
    if len(samples) == 0:
        raise KosmoError(f"{source}: no audio samples")
    if len(samples) < frames:
        raise KosmoError(f"{source}: truncated audio ({len(samples):,} of the {frames:,} frames its header declares)")
    if not np.isfinite(samples).all():
        raise KosmoError(f"{source}: audio samples include NaN or infinity")
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


def _check_wav_header(fp: BinaryIO, size: int, source: str) -> None:
    """libsndfile quietly reads a WAV whose data chunk is shorter than its header declares, as if nothing were
    missing, and names a zero sample rate only as an "incomplete SF_INFO struct"; both are caught here, by
    walking the RIFF chunks to `fmt ` and `data`."""
    fp.seek(0)
    head = fp.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= size:
        fp.seek(pos)
        chunk = fp.read(16)
        declared = int.from_bytes(chunk[4:8], "little")
        if chunk[:4] == b"fmt " and len(chunk) == 16:
            _check_rate(int.from_bytes(chunk[12:16], "little"), source)
        elif chunk[:4] == b"data":
            held = size - pos - 8
            if declared > held and declared not in _UNKNOWN_WAV_SIZES:
                raise KosmoError(f"{source}: truncated WAV (its header declares {declared:,} bytes of samples, "
                                 f"the file holds {held:,})")
            return
        pos += 8 + declared + declared % 2  # chunks are padded to an even length


def _check_rate(rate: int, source: str) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise KosmoError(f"{source}: sample rate {rate:,} Hz is outside {MIN_SAMPLE_RATE:,} to {MAX_SAMPLE_RATE:,} Hz "
                         "(corrupt header?)")
