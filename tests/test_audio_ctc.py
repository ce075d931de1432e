"""CTC pretraining of the audio encoder: greedy decoding, batching, the stage end to end, bad input, scores."""

import json

import numpy as np
import pytest
import soundfile
import torch

from kosmo.data.audio import SAMPLE_RATE, AudioCache, batch_clips
from kosmo.errors import KosmoError
from kosmo.eval.asr import cer, normalise_transcript, wer
from kosmo.model.audio import AudioConfig
from kosmo.model.ctc import AudioCTC, CTCConfig
from kosmo.model.load import load_run
from kosmo.train import audio as stage
from kosmo.train.run import run_stage

TINY = ["audio.dim=16", "audio.n_layers=1", "audio.n_heads=2", "audio.mlp_dim=32", "audio.n_mels=16"]
TEXTS = ["A cab.", "Bab, a cab?", "abc", "Cab-ba", "a b c", "bacca"]


def tiny_model(alphabet: str = "ab ") -> AudioCTC:
    torch.manual_seed(0)
    return AudioCTC(CTCConfig(AudioConfig(dim=16, n_layers=1, n_heads=2, mlp_dim=32, n_mels=16), alphabet))


def write_clips(folder, texts=TEXTS, name="speech.jsonl", broken=()) -> str:
    """Clips of noise and tones, 0.3 to 0.8 s, one per text; lines in `broken` point at a file that is not audio."""
    (folder / "audio").mkdir(exist_ok=True)
    rng = np.random.default_rng(len(texts))
    lines = []
    for i, text in enumerate(texts):
        rel = f"audio/{name.split('.')[0]}_{i}.wav"
        if i in broken:
            (folder / rel).write_bytes(b"not audio at all")
        else:
            t = np.arange(int(rng.uniform(0.3, 0.8) * SAMPLE_RATE)) / SAMPLE_RATE
            soundfile.write(folder / rel, 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
                            + 0.05 * rng.standard_normal(len(t)), SAMPLE_RATE)
        lines.append(json.dumps({"audio": rel, "text": text}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return str(folder / name)


def test_greedy_decoding_collapses_repeats_then_drops_blanks():
    model = tiny_model()  # 0 blank, 1 'a', 2 'b', 3 ' '
    assert model.decode([0, 1, 1, 0, 1, 2, 2, 0, 3, 3, 0]) == "aab "
    assert model.decode([0, 0, 0]) == ""
    assert model.encode_text("ab a") == [1, 2, 3, 1]
    # transcribe reads each clip's best path only up to its own frames, never into the padding
    paths = torch.tensor([[1, 1, 2, 2], [2, 0, 2, 1]])
    model.forward = lambda mels, lengths=None: torch.nn.functional.one_hot(paths, 4).float()
    clips = batch_clips([torch.zeros(16, 8), torch.zeros(16, 5)], 16)  # 4 and 3 encoder frames
    assert model.transcribe(clips) == ["ab", "bb"]


def test_alphabet_must_not_repeat_a_character():
    with pytest.raises(ValueError, match="each character once"):
        CTCConfig(alphabet="abca")


def test_a_batch_of_clips_of_different_lengths_gives_the_loss_of_each_clip_alone(tmp_path):
    model = tiny_model("abc ").eval()
    clips = stage.read_clips(write_clips(tmp_path), model)
    data = stage.Speech(clips, AudioCache(16))
    assert len(set(data.frames)) > 1
    with torch.no_grad():
        together, _ = stage.ctc_loss(model, data.collate(list(range(len(clips)))))
        alone = sum(stage.ctc_loss(model, data.collate([i]))[0] for i in range(len(clips)))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_stage_trains_end_to_end_and_writes_a_loadable_run(tmp_path):
    train = write_clips(tmp_path)
    val = write_clips(tmp_path, TEXTS[:3], name="val.jsonl")
    last = run_stage("audio", [train], tmp_path / "run", overrides=[
        *TINY, "train.max_steps=3", "train.batch_size=4", "train.warmup_steps=1", "train.progress=false",
        "train.tensorboard=false", f"val_data={val}", "augment.speed=0.1", "augment.freq_masks=1",
        "augment.freq_width=4", "augment.time_masks=1", "augment.time_width=0.1"])
    assert last["step"] == 3 and np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])
    assert last["val_clips"] == 3 and 0 <= last["val_cer"] and 0 <= last["val_wer"] and 0 <= last["train_cer"]
    model, _, config = load_run(tmp_path / "run")
    assert config["arch"] == "ctc" and isinstance(model, AudioCTC) and model.cfg.audio.dim == 16
    clips, ok, _ = AudioCache(16).load([tmp_path / "audio/speech_0.wav"])
    assert all(set(t) <= set(model.cfg.alphabet) for t in model.transcribe(clips))


def test_bad_lines_name_their_file_and_line(tmp_path):
    cfg = stage.StageConfig(audio={"dim": 16, "n_layers": 1, "n_heads": 2, "mlp_dim": 32, "n_mels": 16})
    path = tmp_path / "bad.jsonl"
    path.write_text('{"audio": "a.wav", "text": "ab"}\n{"audio": "b.wav"}\n')
    with pytest.raises(KosmoError, match=r"bad\.jsonl:2: a speech line needs 'audio' \(a path\) and 'text'"):
        stage.build(cfg, [path], None)
    path.write_text('{"audio": "a.wav", "text": "a naïve cab"}\n')
    with pytest.raises(KosmoError, match=r"bad\.jsonl:1: .*outside the alphabet \('ï'\)"):
        stage.build(cfg, [path], None)
    path.write_text('{"audio": "a.wav", "text": "?!"}\n')
    with pytest.raises(KosmoError, match=r"bad\.jsonl:1: the transcript is empty"):
        stage.build(cfg, [path], None)


def test_an_unreadable_clip_is_skipped_with_a_note_naming_its_line(tmp_path, capsys):
    cfg = stage.StageConfig(audio={"dim": 16, "n_layers": 1, "n_heads": 2, "mlp_dim": 32, "n_mels": 16},
                            val_fraction=0)
    _, _, train, val = stage.build(cfg, [write_clips(tmp_path, broken={1})], None)
    assert len(train) == len(TEXTS) - 1 and val is None
    note = capsys.readouterr().out.splitlines()[0]
    assert note.startswith("skipped clip: ") and "speech.jsonl:2: " in note and "audio/speech_1.wav" in note
    with pytest.raises(KosmoError, match="no usable training clips"):
        stage.build(cfg, [write_clips(tmp_path, TEXTS[:2], name="all_bad.jsonl", broken={0, 1})], None)


def test_arrange_batches_similar_lengths_and_keeps_every_row():
    data = stage.Speech([], AudioCache(16))
    data.frames = torch.randint(50, 1000, (203,)).tolist()
    order = torch.randperm(203).tolist()
    arranged = data.arrange(order, 8, 3, torch.Generator().manual_seed(0))
    assert sorted(arranged) == list(range(203))

    def padded(rows):  # frames computed, padding included, over the full batches after the head
        return sum(max(data.frames[i] for i in rows[s:s + 8]) * 8 for s in range(3, 203, 8))
    assert padded(arranged) < 0.7 * padded(order)


def test_augment_changes_a_copy_and_speed_changes_the_length():
    feats = torch.randn(16, 200)
    before = feats.clone()
    out = stage.Augment(speed=0.3, warp=0.2, freq_masks=2, freq_width=4, time_masks=2, time_width=0.1)(feats)
    assert torch.equal(feats, before) and out.shape[0] == 16 and 150 <= out.shape[1] <= 290
    off = stage.Augment(speed=0, warp=0, freq_masks=0, time_masks=0)(feats)
    assert torch.equal(off, feats) and off is not feats


def test_error_rates_normalise_both_sides():
    assert normalise_transcript("What's  the Top-left corner?") == "what's the top left corner"
    assert wer(["The cat-sat."], ["the cat sat"]) == 0.0
    assert wer(["a b c d"], ["a x c"]) == 0.5  # one substitution, one deletion
    assert cer(["abcd"], ["abed"]) == 0.25
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
