"""Audio through `kosmo serve`, called with the official openai client: transcriptions equal what
`kosmo.eval.audio`'s prompt gives through `generate`, a spoken question about a picture equals the same chat
through `generate`, and every bad clip or form gets its 4xx in OpenAI's envelope, the server staying healthy."""

import base64
import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from serve_helpers import HEARS_SECONDS, IMAGE_SIZE, Server, build_runs, data_url, png_bytes, wav_bytes
from test_audio import BAD_FILES

from kosmo.data.audio import batch_clips, clip_features, load_audio
from kosmo.data.chat import render
from kosmo.data.images import load_image
from kosmo.eval.audio import eval_asr
from kosmo.generate import Sampling, generate
from kosmo.model.load import load_run
from kosmo.serve.api import create_app
from kosmo.serve.engine import Engine

KEY = "test-key"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("serve-runs"))


@pytest.fixture(scope="module")
def server(runs):
    # fp32 as `generate` decodes, so greedy tokens can be compared one for one
    s = Server(runs["hearing"], "--precision", "fp32", "--max-body-bytes", "3000000", "--max-audio-seconds", "5",
               "--max-audio-clips", "2", api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(runs):
    return load_run(runs["hearing"])


def transcribe_directly(reference, path, tmp_path) -> str:
    """The transcript `kosmo eval asr` gives: its prompt through `generate`, greedy, up to the context's end."""
    model, tok, _ = reference
    (tmp_path / "one.jsonl").write_text(json.dumps({"audio": str(path), "text": "x"}) + "\n")
    prompt = 3 + model.audio_tokens(clip_features(load_audio(path), model.n_mels).shape[-1])  # <s><audio>…</audio>
    result = eval_asr(model, tok, tmp_path / "one.jsonl", max_new_tokens=model.context_length - prompt)
    return result["samples"][0]["prediction"]


@pytest.mark.parametrize("fmt,subtype,suffix", [("WAV", "PCM_16", "wav"), ("FLAC", None, "flac"),
                                                ("MP3", None, "mp3")])
def test_a_transcription_is_what_the_eval_prompt_gives(client, reference, tmp_path, fmt, subtype, suffix):
    path = tmp_path / f"speech.{suffix}"
    path.write_bytes(wav_bytes(1.5, rate=22_050, fmt=fmt, subtype=subtype))
    with open(path, "rb") as f:
        got = client.audio.transcriptions.create(model="hearing", file=f)
    assert got.text == transcribe_directly(reference, path, tmp_path) != ""
    assert got.usage.type == "tokens" and got.usage.output_tokens > 0


def test_response_formats_carry_the_same_text_and_another_clip_another_text(client, tmp_path):
    path, other = tmp_path / "a.wav", tmp_path / "b.wav"
    path.write_bytes(wav_bytes(1.0, seed=1))
    other.write_bytes(wav_bytes(2.0, seed=2))
    text = client.audio.transcriptions.create(model="hearing", file=path.open("rb")).text
    plain = client.audio.transcriptions.create(model="hearing", file=path.open("rb"), response_format="text")
    verbose = client.audio.transcriptions.create(model="hearing", file=path.open("rb"), response_format="verbose_json",
                                                 language="en", prompt="ignored")
    assert plain == text == verbose.text
    assert verbose.duration == 1.0 and verbose.language == "en"
    assert client.audio.transcriptions.create(model="hearing", file=other.open("rb")).text != text


def spoken_question(clip: bytes, fmt="wav") -> list[dict]:
    return [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": fmt}},
                {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]


def test_a_spoken_question_about_a_picture_is_answered_as_generate_does(client, reference, tmp_path):
    model, tok, _ = reference
    question, picture = tmp_path / "q.wav", tmp_path / "red.png"
    question.write_bytes(wav_bytes(1.2, seed=3))
    picture.write_bytes(png_bytes())
    r = client.chat.completions.create(model="hearing", messages=spoken_question(question.read_bytes()),
                                       max_tokens=12, temperature=0)
    heard = clip_features(load_audio(question), model.n_mels)
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": [{"type": "audio", "audio": str(question)},
                                             {"type": "image", "image": str(picture)}]}]
    ids = render(messages, tok, model.tokens_per_image, add_generation_prompt=True,
                 audio_tokens=lambda ref, where: model.audio_tokens(heard.shape[-1])).ids
    expected = generate(model, tok, [ids], Sampling(max_new_tokens=12), images=load_image(picture, IMAGE_SIZE)[None],
                        audio=batch_clips([heard]))[0]
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(ids)
    # another question about the same picture gets another first-token distribution
    def first_logprobs(clip):
        r = client.chat.completions.create(model="hearing", messages=spoken_question(clip), max_tokens=1,
                                           temperature=0, logprobs=True, top_logprobs=5)
        return [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]
    assert first_logprobs(question.read_bytes()) != first_logprobs(wav_bytes(1.2, seed=4))


def chat_body(*parts, role="user") -> dict:
    return {"model": "hearing", "max_tokens": 2, "messages": [{"role": role, "content": list(parts)}]}


def audio_part(data: bytes | str, fmt="wav") -> dict:
    encoded = data if isinstance(data, str) else base64.b64encode(data).decode()
    return {"type": "input_audio", "input_audio": {"data": encoded, "format": fmt}}


FIELD = "messages[0].content[0].input_audio"
BAD_CHATS = {
    "broken base64": (chat_body(audio_part("@@not base64@@")), 400, "invalid_audio", FIELD),
    "not audio": (chat_body(audio_part(b"just text " * 50)), 400, "invalid_audio", FIELD),
    "lying header": (chat_body(audio_part(BAD_FILES["lying header"][0]())), 400, "invalid_audio", FIELD),
    "bad second clip": (chat_body(audio_part(wav_bytes(0.5)), audio_part(b"")), 400, "invalid_audio",
                        "messages[0].content[1].input_audio"),
    "longer than the model hears": (chat_body(audio_part(wav_bytes(HEARS_SECONDS + 1))), 400, "audio_too_long",
                                    FIELD),
    "over the server's cap": (chat_body(audio_part(wav_bytes(6))), 400, "audio_too_long", FIELD),
    "too many clips": (chat_body(*[audio_part(wav_bytes(0.3))] * 3), 400, "too_many_audio_clips", "messages"),
    "audio in an assistant turn": (chat_body(audio_part(wav_bytes(0.3)), role="assistant"), 400, None, "messages"),
    "no data": (chat_body({"type": "input_audio", "input_audio": {"format": "wav"}}), 400, "missing_parameter",
                "messages.0.content.0.input_audio.data"),
    "body over the cap": (chat_body(audio_part(b"\0" * 2_400_000)), 413, "request_too_large", None),
}


def upload(data: bytes, **fields) -> dict:
    return {"files": {"file": ("clip.wav", data, "audio/wav"), **{k: (None, v) for k, v in fields.items()}}}


BAD_UPLOADS = {
    **{f"{name} file": (upload(make()), 400, "audio_too_long" if "cap" in name else "invalid_audio", "file")
       for name, (make, _) in BAD_FILES.items()},
    "too short a clip": (upload(wav_bytes(0.005)), 400, "invalid_audio", "file"),
    "longer than the model hears": (upload(wav_bytes(HEARS_SECONDS + 1)), 400, "audio_too_long", "file"),
    "over the server's cap": (upload(wav_bytes(6)), 400, "audio_too_long", "file"),
    "missing file": ({"files": {"model": (None, "hearing")}}, 400, "missing_parameter", "file"),
    "file sent as text": ({"files": {"file": (None, "RIFF....WAVE")}}, 400, "missing_parameter", "file"),
    "not a form": ({"json": {"file": "clip.wav"}}, 400, "invalid_form", None),
    "two files": ({"files": [("file", ("a.wav", wav_bytes(0.3))), ("file", ("b.wav", wav_bytes(0.3)))]}, 400,
                  "invalid_form", None),
    "oversized upload": (upload(b"\0" * 3_100_000), 413, "request_too_large", None),
    "unknown model": (upload(wav_bytes(0.5), model="whisper-1"), 404, "model_not_found", "model"),
    "srt format": (upload(wav_bytes(0.5), response_format="srt"), 400, None, "response_format"),
    "temperature a word": (upload(wav_bytes(0.5), temperature="hot"), 422, "invalid_type", "temperature"),
    "temperature too high": (upload(wav_bytes(0.5), temperature="3"), 400, None, "temperature"),
}


def test_every_bad_request_gets_its_4xx_and_the_server_stays_healthy(server, client, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [("/v1/chat/completions", name, {"json": body}, *rest) for name, (body, *rest) in BAD_CHATS.items()]
    cases += [("/v1/audio/transcriptions", name, *case) for name, case in BAD_UPLOADS.items()]
    for path, name, request, status, code, param in cases:
        r = httpx.post(server.url + path, headers=auth, timeout=60, **request)
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert "\n" not in error["message"] and (code is None or error["code"] == code), (name, error)
        assert param is None or error["param"] == param, (name, error)
        if param is not None and param.endswith(("input_audio", "file")):  # the message names the field too
            assert error["message"].startswith(f"{param}: "), (name, error)
        assert server.health()["status"] == "ok", name
    assert httpx.post(server.url + "/v1/audio/transcriptions", **upload(wav_bytes(0.5))).status_code == 401
    good = tmp_path / "good.wav"
    good.write_bytes(wav_bytes(1.0, seed=5))
    assert client.audio.transcriptions.create(model="hearing", file=good.open("rb")).text


def test_a_model_without_ears_refuses_audio_with_a_clear_code(runs):
    model, tok, _ = load_run(runs["mllm"])
    client = TestClient(create_app(Engine(model, tok, max_batch=1), tok, "mllm"))  # refused before the engine
    r = client.post("/v1/chat/completions", json={**chat_body(audio_part(wav_bytes(0.5))), "model": "mllm"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "audio_not_supported"
    r = client.post("/v1/audio/transcriptions", **upload(wav_bytes(0.5)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "audio_not_supported"
