"""`kosmo chat` in a subprocess: answers stream to stdout, the commands work (/image and /audio attach to the
next message), bad input is one line on stderr."""

import subprocess
import sys

from serve_helpers import HEARS_SECONDS, IMAGE_SIZE, build_runs, png_bytes, wav_bytes

from kosmo.data.audio import batch_clips, clip_features, load_audio
from kosmo.data.chat import render
from kosmo.data.images import load_image
from kosmo.generate import Sampling, generate
from kosmo.model.load import load_run


def reference(run, messages, images=None, clips=(), max_tokens=10) -> str:
    """The same conversation through `generate`, the batch decode loop; `clips` are the audio files in order."""
    model, tok, _ = load_run(run)
    heard = {path: clip_features(load_audio(path), model.n_mels) for path in clips}
    ids = render(messages, tok, model.cfg.tokens_per_image, add_generation_prompt=True,
                 audio_tokens=lambda path, _: model.audio_tokens(heard[path].shape[-1])).ids
    audio = batch_clips([heard[p] for p in clips]) if clips else None
    return generate(model, tok, [ids], Sampling(max_new_tokens=max_tokens), images=images, audio=audio)[0].text


def test_chat_session_with_image_system_prompt_and_reset(tmp_path):
    run = build_runs(tmp_path / "runs")["mllm"]
    picture = tmp_path / "red.png"
    picture.write_bytes(png_bytes())
    script = f"/system You answer briefly.\n/image {picture}\nwhat colour?\n/reset\n/image {tmp_path}/nope.png\nhello\n"
    proc = subprocess.run([sys.executable, "-m", "kosmo", "chat", "--model", str(run), "--max-tokens", "10",
                           "--device", "cpu"], input=script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    system = [{"role": "system", "content": "You answer briefly."}]
    first = reference(run, system + [{"role": "user", "content": [
        {"type": "text", "text": "what colour?"}, {"type": "image", "image": str(picture)}]}],
        images=load_image(picture, IMAGE_SIZE)[None])
    # /reset keeps the system prompt and forgets the turns and the attached image
    second = reference(run, system + [{"role": "user", "content": "hello"}])
    assert proc.stdout == f"{first}\n{second}\n"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path}/nope.png: image file not found"]
    assert "Traceback" not in proc.stderr


def test_chat_session_with_a_spoken_question_about_a_picture(tmp_path):
    run = build_runs(tmp_path / "runs")["hearing"]
    picture, question, long = tmp_path / "red.png", tmp_path / "q.wav", tmp_path / "long.wav"
    picture.write_bytes(png_bytes())
    question.write_bytes(wav_bytes(1.2, seed=3))
    long.write_bytes(wav_bytes(HEARS_SECONDS + 1))
    script = f"/audio {long}\n/audio {tmp_path}/nope.wav\n/audio {question}\n/image {picture}\nthis one?\n"
    proc = subprocess.run([sys.executable, "-m", "kosmo", "chat", "--model", str(run), "--max-tokens", "10",
                           "--device", "cpu", "--precision", "fp32"], input=script, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = reference(run, [{"role": "user", "content": [
        {"type": "text", "text": "this one?"}, {"type": "audio", "audio": str(question)},
        {"type": "image", "image": str(picture)}]}], load_image(picture, IMAGE_SIZE)[None], [str(question)])
    assert proc.stdout == f"{expected}\n"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {long}: a clip of {HEARS_SECONDS + 1} s is longer than the model hears at once "
                      f"({HEARS_SECONDS} s)", f"error: {tmp_path}/nope.wav: cannot read audio file (No such file or "
                      "directory)"]
    assert "Traceback" not in proc.stderr
