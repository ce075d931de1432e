"""`kosmo serve` in a subprocess, called with the official openai client: streaming and not, image parts,
stop, n, seed, logprobs, bad requests with OpenAI's error envelope, and 16 concurrent greedy requests that
each get the tokens they get alone."""

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import Server, build_runs, data_url, png_bytes

KEY = "test-key"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("serve-runs"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "allowed" / "red.png").write_bytes(png_bytes())
    (root / "secret.png").write_bytes(png_bytes(colour=(0, 0, 255)))
    (root / "allowed" / "link.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def server(runs, media_dir):
    s = Server(runs["mllm"], "--allowed-local-media-path", str(media_dir / "allowed"), "--max-body-bytes", "2000000",
               "--max-image-bytes", "200000", api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def ask(text, image=None):
    content = [{"type": "text", "text": text}] + ([{"type": "image_url", "image_url": {"url": image}}] if image else [])
    return [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": content}]


RED = data_url(png_bytes())


def test_streaming_and_whole_answers_agree(client):
    kw = dict(model="mllm", messages=ask("what colour is the square?", RED), max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason] and finish[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens == (20 if finish[0] == "length" else whole.usage.completion_tokens)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_the_image_reaches_the_model(client, media_dir):
    def first_logprobs(url):
        r = client.chat.completions.create(model="mllm", messages=ask("colour?", url), max_tokens=1, temperature=0,
                                           logprobs=True, top_logprobs=5)
        return [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]
    red, blue = first_logprobs(RED), first_logprobs(data_url(png_bytes(colour=(0, 0, 255))))
    assert red != blue
    # an allowed local file is the same picture as its bytes sent inline
    assert first_logprobs((media_dir / "allowed" / "red.png").as_uri()) == red


def test_stop_string_cuts_the_answer(client):
    kw = dict(model="mllm", messages=ask("describe the picture", RED), max_tokens=30, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop and full.index(stop) > 0
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_and_seed_reproduce(client):
    kw = dict(model="mllm", messages=ask("tell me about shapes"), max_tokens=12, temperature=1.0, n=3)
    a = client.chat.completions.create(**kw, seed=7)
    b = client.chat.completions.create(**kw, seed=7)
    c = client.chat.completions.create(**kw, seed=8)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # the n samples of one request differ from each other


def test_logprobs_are_a_distribution(client):
    r = client.chat.completions.create(model="mllm", messages=ask("hello"), max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == tops[0]  # greedy takes the likeliest token
        assert sum(2.718281828 ** lp for lp in tops) <= 1 + 1e-6


def test_completions_and_models_on_a_text_model(runs):
    s = Server(runs["lm"])
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["lm"]
        whole = c.completions.create(model="lm", prompt="a red circle", max_tokens=10, temperature=0, logprobs=2)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="lm", prompt="a red circle", max_tokens=10, temperature=0, stream=True))
        assert streamed == whole.choices[0].text
        assert len(whole.choices[0].logprobs.token_logprobs) == whole.usage.completion_tokens
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": ask("colour?", RED)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "images_not_supported"
    finally:
        s.close()


def test_concurrent_greedy_requests_get_the_tokens_they_get_alone(client):
    prompts = [ask(" ".join(["a red circle left of a blue square"] * (1 + i % 5)) + f" {i}",
                   RED if i % 2 else None) for i in range(16)]

    def run(messages):
        r = client.chat.completions.create(model="mllm", messages=messages, max_tokens=24, temperature=0,
                                           logprobs=True)
        return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]

    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone  # same tokens and bit-identical log-probabilities


def huge_png(w=100_000, h=100_000) -> bytes:
    """A PNG header declaring w x h pixels and almost no data: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def body(**kw):
    return {"model": "mllm", "messages": ask("hi"), "max_tokens": 4, **kw}


def with_image(url, n=1):
    return body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * n}])


BAD = {
    "malformed JSON": (b'{"messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_json"),
    "messages not a list": (body(messages="hi"), 422, "invalid_type"),
    "content of wrong type": (body(messages=[{"role": "user", "content": 5}]), 422, "invalid_type"),
    "unknown role": (body(messages=[{"role": "robot", "content": "x"}]), 422, "invalid_type"),
    "temperature a string": (body(temperature="hot"), 422, "invalid_type"),
    "max_tokens a string": (body(max_tokens="10"), 422, "invalid_type"),
    "missing messages": ({"model": "mllm"}, 400, "missing_parameter"),
    "empty messages": (body(messages=[]), 400, None),
    "n too large": (body(n=50), 400, None),
    "five stop strings": (body(stop=list("abcde")), 400, None),
    "non-image base64": (with_image(data_url(b"just some text, not a picture")), 400, "invalid_image"),
    "truncated image": (with_image(data_url(png_bytes(64, 64)[:60])), 400, "invalid_image"),
    "broken base64": (with_image("data:image/png;base64,@@@not-base64@@@"), 400, "invalid_image"),
    "non-image data URL": (with_image("data:text/plain;base64,aGVsbG8="), 400, "invalid_image"),
    "1x1 image": (with_image(data_url(png_bytes(1, 1))), 400, "invalid_image"),
    "huge declared image": (with_image(data_url(huge_png())), 400, "image_too_large"),
    "image over the byte cap": (with_image(data_url(b"\0" * 300_000)), 413, "image_too_large"),
    "body over the cap": (body(messages=ask("x" * 2_100_000)), 413, "request_too_large"),
    "too many images": (with_image(RED, n=5), 400, "too_many_images"),
    "image in an assistant turn": (body(messages=[{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": RED}}]}]), 400, None),
    "file:// outside the allowed folder": (with_image("file:///etc/passwd"), 400, "image_url_not_allowed"),
    "file:// symlink out of the folder": ("LINK", 400, "image_url_not_allowed"),
    "private-address URL": (with_image("http://127.0.0.1:8000/a.png"), 400, "image_url_not_allowed"),
    "cloud metadata URL": (with_image("http://169.254.169.254/latest"), 400, "image_url_not_allowed"),
    "ftp URL": (with_image("ftp://example.com/a.png"), 400, "invalid_image_url"),
    "max_tokens beyond the context": (body(max_tokens=100_000), 400, "context_length_exceeded"),
    "prompt beyond the context": (body(messages=ask("red circle " * 400)), 400, "context_length_exceeded"),
    "unknown model": (body(model="gpt-9"), 404, "model_not_found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_the_right_4xx(server, media_dir, case):
    payload, status, code = BAD[case]
    if payload == "LINK":
        payload = with_image((media_dir / "allowed" / "link.png").as_uri())
    kw = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                                 "Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code or code is None
    assert server.health()["status"] == "ok"


def test_api_key_is_required_everywhere_but_health(server):
    for key in (None, "wrong-key", KEY[:-1]):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/")):
            r = httpx.request(method, server.url + path, headers=headers, json=body())
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    # the playground takes the key as a browser's Basic password too
    assert httpx.get(server.url + "/", auth=("user", KEY)).status_code == 200
