"""Audio input: log-mel parity with transformers' WhisperFeatureExtractor, downmixing, resampling, bad files."""

import io
import struct

import numpy as np
import pytest
import soundfile
import torch

from kosmo.data.audio import (
    N_FRAMES,
    SAMPLE_RATE,
    AudioCache,
    clip_features,
    decode_audio_bytes,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
)
from kosmo.errors import KosmoError


def noise_and_tones(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(samples, channels) float32: quiet noise under a few tones, different in each channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    cols = [0.05 * rng.standard_normal(len(t)) + sum(0.3 * np.sin(2 * np.pi * f * t) for f in rng.uniform(80, 7000, 3))
            for _ in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = "FLOAT") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def whisper_features(audio: torch.Tensor, n_mels: int, pad: bool) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    out = extractor(audio.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="np",
                    padding="max_length" if pad else "longest")
    return out.input_features[0]


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("seconds,rate,channels", [(1.0, 16_000, 1), (2.3, 16_000, 1), (1.7, 44_100, 2)])
def test_log_mel_matches_whisper_feature_extractor(tmp_path, n_mels, pad, seconds, rate, channels):
    path = tmp_path / "clip.wav"
    soundfile.write(path, noise_and_tones(seconds, rate, channels), rate, subtype="FLOAT")
    audio = load_audio(path)
    ours = log_mel_spectrogram(audio, n_mels, pad=pad)
    expected = whisper_features(audio, n_mels, pad)
    assert ours.shape == expected.shape == (n_mels, N_FRAMES if pad else len(audio) // 160)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-4)


def test_batched_clips_are_featurised_one_by_one():
    a, b = torch.from_numpy(noise_and_tones(1.0, SAMPLE_RATE, 2)).T
    b = b * 0.01  # a quieter clip: its floor must follow its own peak, not the batch's
    batch = log_mel_spectrogram(torch.stack([a, b]))
    torch.testing.assert_close(batch, torch.stack([log_mel_spectrogram(a), log_mel_spectrogram(b)]))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    audio_utils = pytest.importorskip("transformers.audio_utils")
    expected = audio_utils.mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                           max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney",
                                           mel_scale="slaney")
    np.testing.assert_allclose(mel_filters(n_mels).numpy(), expected.T, rtol=1e-6, atol=1e-9)


def test_downmix_averages_channels():
    stereo = noise_and_tones(0.5, SAMPLE_RATE, 2)
    mono = decode_audio_bytes(encode(stereo, SAMPLE_RATE))
    np.testing.assert_allclose(mono.numpy(), stereo.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", None), ("OGG", None)])
def test_resampling_keeps_a_tone_at_its_frequency(fmt, subtype):
    rate, seconds = 44_100, 2.0
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    audio = decode_audio_bytes(encode(tone, rate, fmt, subtype)).numpy()
    assert audio.dtype == np.float32 and abs(len(audio) - seconds * SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    peak = np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()]
    assert abs(peak - 1000) <= 1
    assert abs(np.abs(audio).max() - 0.5) < 0.02  # the resampler neither loses nor adds level


def with_wav_field(wav: bytes, offset: int, value: int) -> bytes:
    out = bytearray(wav)
    struct.pack_into("<I", out, offset, value)
    return bytes(out)


def wav_lying_about_its_data() -> bytes:
    wav = encode(noise_and_tones(0.5, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    data = wav.index(b"data")
    return with_wav_field(wav, data + 4, 4 * struct.unpack_from("<I", wav, data + 4)[0])


def wav_with_rate(rate: int) -> bytes:
    wav = encode(noise_and_tones(0.5, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    return with_wav_field(with_wav_field(wav, 24, rate), 28, 2 * rate)  # fmt's rate and bytes per second


BAD_FILES = {
    "not audio": (lambda: b"just some text, no sound in it\n" * 20, "libsndfile"),
    "empty": (lambda: b"", "empty"),
    "header only": (lambda: encode(noise_and_tones(0.5, SAMPLE_RATE), SAMPLE_RATE)[:30], "libsndfile"),
    "cut WAV": (lambda: (w := encode(noise_and_tones(0.5, SAMPLE_RATE), SAMPLE_RATE))[:len(w) // 2], "truncated"),
    "cut FLAC": (lambda: (f := encode(noise_and_tones(1.0, SAMPLE_RATE), SAMPLE_RATE, "FLAC", None))[:len(f) // 2],
                 "truncated"),
    "lying header": (wav_lying_about_its_data, "truncated"),
    "no samples": (lambda: encode(np.zeros((0, 1), np.float32), SAMPLE_RATE), "no audio samples"),
    "rate 0": (lambda: wav_with_rate(0), "sample rate 0 Hz"),
    "rate 10 Hz": (lambda: wav_with_rate(10), "sample rate 10 Hz"),
    "rate 500 kHz": (lambda: wav_with_rate(500_000), "sample rate 500,000 Hz"),
    "NaN": (lambda: encode(np.full((100, 1), np.nan, np.float32), SAMPLE_RATE), "NaN"),
    "over the cap": (lambda: encode(noise_and_tones(31.0, SAMPLE_RATE), SAMPLE_RATE), "31.0 s of audio, over the 30 s"),
    "9 channels": (lambda: encode(np.zeros((100, 9), np.float32), SAMPLE_RATE), "9 audio channels, over the limit of 8"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_audio_is_a_one_line_error_naming_the_file(tmp_path, case):
    make, words = BAD_FILES[case]
    data = make()
    path = tmp_path / "clip.wav"
    path.write_bytes(data)
    for load, name in ((lambda: load_audio(path), str(path)), (lambda: decode_audio_bytes(data), "audio")):
        with pytest.raises(KosmoError) as e:
            load()
        message = str(e.value)
        assert message.startswith(f"{name}: ") and words in message and "\n" not in message, message


def test_a_streamed_wav_whose_header_leaves_the_size_open_is_read(tmp_path):
    """What espeak-ng --stdout writes: 0x7FFFF000 for a data size it cannot know in advance."""
    wav = encode(noise_and_tones(0.5, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    streamed = with_wav_field(wav, wav.index(b"data") + 4, 0x7FFFF000)
    assert torch.equal(decode_audio_bytes(streamed), decode_audio_bytes(wav))


def test_missing_file_and_a_custom_cap(tmp_path):
    with pytest.raises(KosmoError, match="nowhere.wav: cannot read audio file"):
        load_audio(tmp_path / "nowhere.wav")
    path = tmp_path / "two.wav"
    soundfile.write(path, noise_and_tones(2.0, SAMPLE_RATE), SAMPLE_RATE)
    with pytest.raises(KosmoError, match=r"two.wav: 2.0 s of audio, over the 1.5 s limit"):
        load_audio(path, max_seconds=1.5)
    assert len(load_audio(path, max_seconds=2.0)) == 2 * SAMPLE_RATE


def test_unpadded_clip_too_short_for_a_window():
    with pytest.raises(ValueError, match="more than 200 samples"):
        log_mel_spectrogram(torch.zeros(200), pad=False)
    assert log_mel_spectrogram(torch.zeros(200)).shape == (80, N_FRAMES)


def test_clips_batch_keeps_each_clips_frames(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, seconds in enumerate((0.5, 1.25)):
        paths.append(tmp_path / f"c{i}.wav")
        soundfile.write(paths[-1], rng.uniform(-0.5, 0.5, int(seconds * SAMPLE_RATE)).astype(np.float32), SAMPLE_RATE)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    cache = AudioCache()
    clips, ok, skipped = cache.load([paths[0], tmp_path / "bad.wav", paths[1], paths[0]])
    assert ok == [0, 2, 3] and len(skipped) == 1 and "bad.wav" in skipped[0][1]
    assert clips.lengths.tolist() == [50, 125, 50] and clips.mels.shape == (3, 80, 125)
    assert torch.equal(clips.mels[0, :, :50], cache.get(paths[0])) and not clips.mels[0, :, 50:].any()


def test_a_clip_too_short_for_one_window_is_refused():
    with pytest.raises(KosmoError, match=r"^voice.wav: 6.2 ms of audio is too short \(at least 12 ms\)$"):
        clip_features(torch.zeros(100), source="voice.wav")
