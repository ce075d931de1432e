"""The spoken world: espeak-ng clips in varied voices, synthetic sound events, and their files on disk."""
import json
import shutil

import numpy as np
import pytest
import soundfile
from conftest import kosmo

from kosmo.data.audio import SAMPLE_RATE, load_audio
from kosmo.data.world import SOUND_CLASSES, Voice, World, sound_event, synthesise, write_audio
from kosmo.data.world.speech import ACCENTS, HELDOUT_ACCENTS, HELDOUT_VARIANTS, HELDOUT_WPM, VARIANTS, WPM, voice_for
from kosmo.errors import KosmoError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("audio")
    return out, write_audio(World(seed=3), out, n=10, val=5)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_espeak
def test_same_seed_writes_identical_files(written, tmp_path):
    out, paths = written
    again = write_audio(World(seed=3), tmp_path, n=10, val=5)
    for key, path in paths.items():
        assert again[key].read_bytes() == path.read_bytes()
        for line in _lines(path):
            clip = line.get("audio", line.get("question_audio"))
            assert (tmp_path / clip).read_bytes() == (out / clip).read_bytes()
    other = write_audio(World(seed=4), tmp_path / "other", n=2, val=1)
    first = _lines(other["speech"])[0]["audio"]
    assert (tmp_path / "other" / first).read_bytes() != (out / first).read_bytes()


@needs_espeak
def test_lines_pair_a_16k_clip_with_its_transcript_or_class(written):
    out, paths = written
    assert set(paths) == {"speech", "val_speech", "spoken_vqa", "val_spoken_vqa", "sounds", "val_sounds"}
    for key, path in paths.items():
        for line in _lines(path):
            clip = out / line.get("audio", line.get("question_audio"))
            info = soundfile.info(clip)
            assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
            audio = load_audio(clip)
            assert audio.shape == (info.frames,)
            if key.endswith("sounds"):
                assert line["text"] in SOUND_CLASSES and line["labels"] == list(SOUND_CLASSES)
            else:
                # The clip lasts about as long as its words take at the voice's words per minute.
                said = line.get("text", line.get("question"))
                nominal = 60 * len(said.split()) / line["voice"]["wpm"]
                assert said.endswith((".", "?")) and 0.5 < info.duration / nominal < 2


@needs_espeak
def test_spoken_questions_are_the_vqa_lines_of_the_same_split_read_aloud(written, tmp_path):
    from kosmo.data.world import write_world
    out, paths = written
    typed = write_world(tmp_path, 20, seed=3)
    spoken = _lines(paths["val_spoken_vqa"])
    for line, twin in zip(spoken, _lines(typed["val_vqa"])):
        assert {k: v for k, v in line.items() if k not in ("question_audio", "voice")} == twin
        assert (out / twin["image"]).is_file()
    train = _lines(paths["spoken_vqa"])
    assert len(train) == 10 and len(spoken) == 5
    assert [x["qtype"] for x in train[:6]] == ["colour", "shape", "count", "exist", "spatial", "size"]
    assert len({x["image"] for x in train[:6]}) == 1 and train[6]["image"] != train[0]["image"]
    assert [Voice(**x["voice"]) for x in train] != [Voice(**x["voice"]) for x in _lines(paths["speech"])]


@needs_espeak
def test_written_voices_follow_the_split(written):
    _, paths = written
    train = [Voice(**line["voice"]) for line in _lines(paths["speech"])]
    val = [Voice(**line["voice"]) for line in _lines(paths["val_speech"])]
    assert all(v.variant in VARIANTS and v.wpm in WPM and v.language in ACCENTS for v in train)
    assert all(v.variant in HELDOUT_VARIANTS and v.wpm in HELDOUT_WPM for v in val)


def test_heldout_voices_and_speeds_never_meet_training():
    draws = {split: [voice_for(np.random.default_rng(i), split) for i in range(400)] for split in ("train", "val")}
    train, val = draws["train"], draws["val"]
    assert not {v.variant for v in train} & {v.variant for v in val}
    assert not {v.wpm for v in train} & {v.wpm for v in val}
    assert not {v.language for v in train} & set(HELDOUT_ACCENTS)
    # Val hears every held-out variant, speed and accent, so the split measures them all.
    assert {v.variant for v in val} == set(HELDOUT_VARIANTS) and {v.wpm for v in val} == set(HELDOUT_WPM)
    assert {v.language for v in val} == set(ACCENTS + HELDOUT_ACCENTS)


@needs_espeak
def test_slower_speech_makes_a_longer_clip():
    text = "The red circle is above the blue square."
    slow, fast = (len(synthesise(text, Voice("en-gb", "m3", wpm, 50))) for wpm in (120, 205))
    assert slow > 1.4 * fast


def _peak_hz(frames: np.ndarray) -> np.ndarray:
    """The strongest frequency of each 32 ms frame."""
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(frames.shape[1]), axis=1))
    return np.fft.rfftfreq(frames.shape[1], 1 / SAMPLE_RATE)[spectrum.argmax(axis=1)]


def _frames(audio: np.ndarray, size: int = 512) -> np.ndarray:
    return audio[: len(audio) // size * size].reshape(-1, size)


def _events(name: str, count: int = 4):
    index = SOUND_CLASSES.index(name)
    return [sound_event(0, "train", index + k * len(SOUND_CLASSES))[1] for k in range(count)]


def test_a_chirp_rises_and_a_tone_holds_its_pitch():
    for chirp in _events("chirp"):
        peaks = _peak_hz(_frames(chirp))
        assert peaks[-3:].mean() > 2 * peaks[:3].mean()
        assert np.all(np.diff(peaks[1:-1]) >= -2 * SAMPLE_RATE / 512)  # never falls by more than bin jitter
    for tone in _events("tone"):
        peaks = _peak_hz(_frames(tone)[1:-1])
        assert np.ptp(peaks) <= SAMPLE_RATE / 512


def test_beeps_and_clicks_are_mostly_silence_and_tones_and_noise_never_are():
    def quiet_share(audio):  # frames 20 dB below the loudest one
        energy = (_frames(audio, 160) ** 2).mean(axis=1)
        return (energy < energy.max() / 100).mean()

    for name, low, high in (("beeps", 0.3, 0.7), ("clicks", 0.5, 1.0), ("tone", 0.0, 0.05),
                            ("noise burst", 0.0, 0.05)):
        for audio in _events(name):
            assert low <= quiet_share(audio) <= high, name


def test_a_noise_burst_spreads_its_energy_and_a_tone_does_not():
    def bandwidth_hz(audio):  # the width of the fewest frequency bins that hold 90% of the energy
        power = np.sort(np.abs(np.fft.rfft(audio)) ** 2)[::-1]
        bins = np.searchsorted(np.cumsum(power) / power.sum(), 0.9) + 1
        return bins * (SAMPLE_RATE / 2) / len(power)

    assert all(bandwidth_hz(a) > 150 for a in _events("noise burst", 10))  # bands are at least 200 Hz wide
    assert all(bandwidth_hz(a) < 20 for a in _events("tone", 10))


def test_sound_events_follow_the_seed_and_take_turns_by_class():
    assert not np.array_equal(sound_event(1, "val", 0)[1], sound_event(2, "val", 0)[1])
    assert [sound_event(0, "train", i)[0] for i in range(10)] == list(SOUND_CLASSES) * 2


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KosmoError, match="espeak-ng not found: install it"):
        synthesise("hello", Voice("en-gb", "m1", 150, 50))


@needs_espeak
def test_kosmo_world_writes_the_audio_beside_the_pictures(tmp_path):
    paths = json.loads(kosmo("world", "--out", tmp_path, "--n", 8, "--audio", 10).stdout.splitlines()[-1])
    assert {"captions", "speech", "val_speech", "sounds", "val_sounds"} <= set(paths)
    assert len(_lines(tmp_path / "speech.jsonl")) == 10 and len(_lines(tmp_path / "val_sounds.jsonl")) == 1
    assert all((tmp_path / line["audio"]).is_file() for line in _lines(tmp_path / "sounds.jsonl"))
    proc = kosmo("world", "--out", tmp_path / "x", "--n", 8, "--audio", -1, check=False)
    assert proc.returncode == 2 and "--audio must be 0 or more, got -1" in proc.stderr
