"""The README's bring-your-own-audio walkthrough, command for command: a user's clips in the formats, rates and
channel counts they come in, the encoder's CTC pretraining, ears for a model that sees, evaluation,
transcription from the command line and through the server with the official `openai` client."""

import json
import shutil

import numpy as np
import pytest
import soundfile
import soxr
from conftest import kosmo
from serve_helpers import Server, build_runs

TINY = ["train.max_steps=3", "train.progress=false", "train.tensorboard=false", "train.batch_size=4"]
SENTENCES = ["turn left at the red door", "the blue cup is empty", "open the window please",
             "two green chairs", "a small yellow box", "close the red door"]

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (make test installs it)")


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """mine/clips/ as a user has them: FLAC in stereo at 44.1 kHz, WAV in mono at 8 kHz, OGG at 22.05 kHz."""
    from kosmo.data.audio import SAMPLE_RATE
    from kosmo.data.world import Voice, synthesise
    d = tmp_path_factory.mktemp("mine")
    (d / "clips").mkdir()
    lines = []
    for i, text in enumerate(SENTENCES):
        audio = synthesise(text, Voice("en-gb", "m3" if i % 2 else "f2", 150, 50))
        rate, ext = [(44_100, "flac"), (8_000, "wav"), (22_050, "ogg")][i % 3]
        audio = soxr.resample(audio, SAMPLE_RATE, rate)
        audio = np.stack([audio, 0.5 * audio], axis=1) if ext == "flac" else audio
        soundfile.write(d / f"clips/{i:04d}.{ext}", audio, rate)
        lines.append({"audio": f"clips/{i:04d}.{ext}", "text": text})
    (d / "speech.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:4]))
    (d / "val_speech.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[4:]))
    return d


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_own_audio_trains_evaluates_and_is_served(mine, tmp_path):
    seeing = build_runs(tmp_path / "served")["mllm"]  # stands for the vision demo's runs/sft
    speech, val = mine / "speech.jsonl", mine / "val_speech.jsonl"
    kosmo("train", "audio", "--data", speech, "--out", tmp_path / "my-ctc", f"val_data={val}", *TINY,
          "audio.dim=32", "audio.n_layers=1", "audio.n_heads=2", "audio.mlp_dim=64")
    kosmo("train", "mllm", "--init", seeing, f"audio={tmp_path / 'my-ctc'}", "--data", speech, "--out",
          tmp_path / "my-hear-1", "freeze=connector", "val_fraction=0", "seq_len=160", *TINY)
    kosmo("train", "sft", "--init", tmp_path / "my-hear-1", "--data", speech, "--out", tmp_path / "my-hear",
          "val_fraction=0", "seq_len=160", *TINY)
    hear = tmp_path / "my-hear"
    result = last_json(kosmo("eval", "asr", "--model", hear, "--data", val))
    assert result["n"] == 2 and result["wer"] >= 0 and "wer" in result["deaf"]
    clip = mine / "clips/0000.flac"
    said = last_json(kosmo("generate", "--model", hear, "--audio", clip, "--prompt", "", "--max-new-tokens", 8,
                           "--precision", "fp32"))
    server = Server(hear, "--precision", "fp32")
    try:
        import openai
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        with open(clip, "rb") as f:
            heard = client.audio.transcriptions.create(model="my-hear", file=f)
    finally:
        server.close()
    assert said["completion"] and heard.text.startswith(said["completion"])  # greedy: the same words, then more


def test_audio_for_a_model_without_ears_is_a_one_line_error(mine, tmp_path):
    seeing = build_runs(tmp_path / "served")["mllm"]
    proc = kosmo("generate", "--model", seeing, "--audio", mine / "clips/0000.flac", "--prompt", "", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("does not hear; it takes no --audio")
    proc = kosmo("train", "sft", "--init", seeing, "--data", mine / "speech.jsonl", "--out", tmp_path / "x", *TINY,
                 "seq_len=160", check=False)
    assert proc.returncode == 2 and "speech.jsonl:1: the data has audio but the model takes none" in proc.stderr


def test_the_demos_hearing_section_alone_is_refused_in_one_line(tmp_path):
    proc = kosmo("demo", "--quick", "--sections", "audio", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "kosmo: error: the audio section gives ears to the vision section's model: run it with --sections "
        "vision,audio")
    assert not (tmp_path / "data" / "audio").exists()  # refused before any clip is written
