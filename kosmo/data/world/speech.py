"""What the world sounds like: its sentences read aloud by espeak-ng, and synthetic sound events to name.

Every clip is float32 mono at 16 kHz and a pure function of (seed, split, index), like everything in the world.
Speech varies the voice (accent, variant, words per minute, pitch) and adds light white noise at a random SNR.
Some accents, variants and speeds are heard only in the "val" split, and val never hears train's variants or
speeds, so evaluation measures voices and speeds the model has not heard.
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kosmo.data.audio import SAMPLE_RATE, decode_audio_bytes
from kosmo.data.world.scenes import item_rng, pick
from kosmo.errors import KosmoError

# espeak-ng's own English voices (the mbrola ones need another package). A variant changes the formants,
# breathiness and pitch contour: it is what makes espeak sound like another speaker.
ACCENTS = ("en-gb", "en-us", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "f5")
WPM = (130, 145, 175, 190)
HELDOUT_ACCENTS = ("en-gb-scotland", "en-029")
HELDOUT_VARIANTS = ("m7", "f4")
HELDOUT_WPM = (120, 160, 205)  # one speed between train's, one either side of them

@dataclass(frozen=True)
class Voice:
    """How espeak-ng reads a sentence: an English accent, a speaker variant, a speed and a pitch (0-99)."""
    language: str
    variant: str
    wpm: int
    pitch: int

    @property
    def espeak_args(self) -> list[str]:
        return ["-v", f"{self.language}+{self.variant}", "-s", str(self.wpm), "-p", str(self.pitch)]


def voice_for(rng: np.random.Generator, split: str) -> Voice:
    """A voice for one clip: the val split hears held-out variants and speeds, and every accent; the rest none."""
    if split == "val":
        return Voice(pick(rng, ACCENTS + HELDOUT_ACCENTS), pick(rng, HELDOUT_VARIANTS), pick(rng, HELDOUT_WPM),
                     int(rng.integers(25, 76)))
    return Voice(pick(rng, ACCENTS), pick(rng, VARIANTS), pick(rng, WPM), int(rng.integers(25, 76)))


def synthesise(text: str, voice: Voice) -> np.ndarray:
    """`text` read by espeak-ng in `voice`, clean, as float32 samples at 16 kHz."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise KosmoError("espeak-ng not found: install it (make test does) or run `apt-get install espeak-ng`")
    # "--" keeps a sentence that starts with "-" from being read as an option.
    try:
        done = subprocess.run([espeak, *voice.espeak_args, "--stdout", "--", text], capture_output=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KosmoError(f"espeak-ng failed for voice {voice}: {e}") from None
    if done.returncode != 0 or not done.stdout:
        why = " ".join(done.stderr.decode(errors="replace").split())  # one line, whatever espeak printed
        raise KosmoError(f"espeak-ng failed for voice {voice}: {why}")
    return decode_audio_bytes(done.stdout, f"espeak-ng {voice}").numpy()


def _light_noise(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`audio` scaled to a random peak, with white noise 20-35 dB below its mean power, clipped to [-1, 1]."""
    peak, snr_db = rng.uniform(0.3, 0.9), rng.uniform(20.0, 35.0)
    audio = audio * (peak / max(float(np.abs(audio).max()), 1e-9))
    noise_power = float(np.mean(audio ** 2)) / 10 ** (snr_db / 10)
    noisy = audio + rng.normal(0.0, np.sqrt(noise_power), audio.shape)
    return np.clip(noisy, -1.0, 1.0).astype(np.float32)


def speak(text: str, seed: int, split: str, index: int, stream: str = "voice") -> tuple[Voice, np.ndarray]:
    """Item `index` of a split read aloud: the voice chosen for it and the noisy 16 kHz clip. Each kind of
    spoken item has its own `stream` of voices, so that item i of one kind is not read as item i of another."""
    rng = item_rng(seed, stream, split, index)
    voice = voice_for(rng, split)
    return voice, _light_noise(synthesise(text, voice), rng)


def _tone(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    return np.sin(2 * np.pi * rng.uniform(250, 2500) * t)


def _chirp(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    # An exponential sweep rising at least three-fold over the clip; the phase is the integral of the frequency.
    f0 = rng.uniform(200, 800)
    rate = np.log(rng.uniform(3, 8)) / t[-1]
    return np.sin(2 * np.pi * f0 * np.expm1(rate * t) / rate)


def _clicks(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    out = np.zeros_like(t)
    decay = np.exp(-np.arange(int(0.003 * SAMPLE_RATE)) / (0.0005 * SAMPLE_RATE))  # 3 ms, a sharp snap
    for i in (np.arange(rng.uniform(0, 0.05), t[-1], 1 / rng.uniform(4, 12)) * SAMPLE_RATE).astype(int):
        snap = decay[: len(out) - i]  # the last click may be cut short by the clip's end
        out[i:i + len(snap)] = snap * rng.choice((-1.0, 1.0))
    return out


def _noise_burst(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    # White noise kept between two random edges, an octave or more apart, by zeroing the rest of its spectrum.
    spectrum = np.fft.rfft(rng.normal(size=len(t)))
    freqs = np.fft.rfftfreq(len(t), 1 / SAMPLE_RATE)
    low = rng.uniform(200, 2000)
    spectrum[(freqs < low) | (freqs > low * rng.uniform(2, 4))] = 0
    return np.fft.irfft(spectrum, len(t))


def _beeps(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    on = (t * rng.uniform(2, 6)) % 1 < 0.5  # half of each period sounds
    return _tone(rng, t) * on


_SOUNDS: dict[str, Callable[[np.random.Generator, np.ndarray], np.ndarray]] = {
    "tone": _tone, "chirp": _chirp, "clicks": _clicks, "noise burst": _noise_burst, "beeps": _beeps}
SOUND_CLASSES = tuple(_SOUNDS)


def sound_event(seed: int, split: str, index: int) -> tuple[str, np.ndarray]:
    """Item `index` of a split's sound events: its class name and a 0.5-2 s noisy 16 kHz clip.

    Classes take turns by index, so any run of len(SOUND_CLASSES) items is balanced.
    """
    rng = item_rng(seed, "sound", split, index)
    name = SOUND_CLASSES[index % len(SOUND_CLASSES)]
    t = np.arange(int(rng.uniform(0.5, 2.0) * SAMPLE_RATE)) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)  # 5 ms ramps: no click where a clip starts or ends
    return name, _light_noise(_SOUNDS[name](rng, t) * fade, rng)
