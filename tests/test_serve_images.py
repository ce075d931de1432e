"""Drawing through the serving engine and `kosmo serve`'s /v1/images/generations, called with the official openai
client: pictures drawn beside chat requests have `kosmo.draw.draw_codes`' own codes (greedy, and sampled from the
same seed), chat requests keep their solo tokens, sizes are exact nearest-neighbour multiples, and every bad
request gets its 4xx naming the field."""

import base64
import io
import queue
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import DRAWS, Server, build_runs

from kosmo.draw import DrawSampling, draw_codes, pictures, prompt_ids
from kosmo.generate import Sampling, generate_ids
from kosmo.model.load import load_run
from kosmo.serve.api import create_app
from kosmo.serve.engine import Engine, Params, Picture, Request
from kosmo.tokenizer import BOS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("serve-runs"))


@pytest.fixture(scope="module")
def reference(runs):
    return load_run(runs["drawing"])


@pytest.fixture(scope="module")
def server(runs):
    s = Server(runs["drawing"], "--precision", "fp32", "--max-batch", "4")  # fp32 as `kosmo.draw` draws
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def decoded(item) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert image.format == "PNG"
    return image


def test_pictures_drawn_beside_chat_requests_are_draw_codes_own_and_the_chats_keep_their_tokens(reference):
    model, tok, _ = reference
    # three slots: a guided picture waits for two free ones, chats fill the gaps, and requests join mid-picture
    engine = Engine(model, tok, max_batch=3, precision="fp32").start()
    chats = [[BOS, *tok.encode("there is a")], [BOS, *tok.encode("a small red")]]
    drawings = [("a red square", DrawSampling(cfg=3, temperature=0)),
                ("a blue circle", DrawSampling(cfg=1, temperature=0)),
                ("a red square", DrawSampling(cfg=2, temperature=1, seed=5)),
                ("a green one", DrawSampling(cfg=3, temperature=0.8, top_k=8, seed=9))]
    order = [("chat", 0), ("draw", 0), ("draw", 1), ("chat", 1), ("draw", 2), ("draw", 3)]
    events = queue.Queue()
    try:
        for kind, i in order:
            emit = (lambda key: lambda e: events.put((key, e)))((kind, i))
            if kind == "chat":
                engine.submit(Request(chats[i], Params(max_tokens=24, temperature=0), emit))
            else:
                engine.submit(Request(prompt_ids(tok, drawings[i][0]), None, emit, draw=drawings[i][1]))
        got, done = {key: [] for key in order}, 0
        while done < len(order):
            key, e = events.get(timeout=60)
            assert not isinstance(e, Exception), e
            got[key].append(e)
            done += isinstance(e, Picture) or e.finish is not None
    finally:
        engine.stop()
    for i, (prompt, s) in enumerate(drawings):
        [picture] = got[("draw", i)]
        codes = draw_codes(model, [prompt_ids(tok, prompt)], s)
        assert torch.equal(picture.codes, codes[0]), i
        assert picture.image.size == (DRAWS, DRAWS)
        assert np.array_equal(pixels(picture.image), pixels(pictures(model, codes)[0]))
    for i, ids in enumerate(chats):
        solo, _ = generate_ids(model, [ids], Sampling(max_new_tokens=24))
        tokens = [e.token for e in got[("chat", i)]]
        assert tokens[:len(solo[0])] == solo[0] and all(t < model.text_vocab for t in tokens)
    assert len({tuple(got[("draw", i)][0].codes.flatten().tolist()) for i in range(4)}) == 4


def test_n_seeded_pictures_are_draw_codes_own_and_reproduce(client, reference):
    model, tok, _ = reference
    extra = {"guidance_scale": 2, "temperature": 1, "seed": 3}
    r = client.images.generate(model="drawing", prompt="a red square", n=2, size=f"{DRAWS}x{DRAWS}",
                               response_format="b64_json", extra_body=extra)
    assert r.created > 0 and len(r.data) == 2 and all(d.revised_prompt is None for d in r.data)
    got = [decoded(d) for d in r.data]
    assert all(p.size == (DRAWS, DRAWS) and p.mode == "RGB" for p in got)
    # picture i of seed 3 is `kosmo.draw`'s picture i of seed 3, drawn in one batch
    expected = pictures(model, draw_codes(model, [prompt_ids(tok, "a red square")] * 2,
                                          DrawSampling(cfg=2, temperature=1, seed=3)))
    assert [pixels(p).tolist() for p in got] == [pixels(p).tolist() for p in expected]
    assert not np.array_equal(pixels(got[0]), pixels(got[1]))
    again = client.images.generate(model="drawing", prompt="a red square", n=2, extra_body=extra)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in r.data]
    other = client.images.generate(model="drawing", prompt="a red square", extra_body={**extra, "seed": 4})
    assert other.data[0].b64_json != r.data[0].b64_json


def test_a_multiple_of_the_native_size_is_each_pixel_as_a_square_block(client):
    extra = {"temperature": 0}  # greedy, guidance 3 by default: the same picture every time
    native = pixels(decoded(client.images.generate(prompt="a blue circle", extra_body=extra).data[0]))
    big = decoded(client.images.generate(prompt="a blue circle", size=f"{4 * DRAWS}x{4 * DRAWS}",
                                         extra_body=extra).data[0])
    assert big.size == (4 * DRAWS, 4 * DRAWS)
    assert np.array_equal(pixels(big), native.repeat(4, axis=0).repeat(4, axis=1))
    assert len(np.unique(native.reshape(-1, 3), axis=0)) > 1  # not a flat picture, so the blocks are checked


BAD = {
    "empty prompt": (dict(prompt="  "), 400, "prompt"),
    "n zero": (dict(n=0), 400, "n"),
    "n over the cap": (dict(n=5), 400, "n"),
    "size off the grid": (dict(size="17x17"), 400, "size"),
    "size not square": (dict(size=f"{DRAWS}x{2 * DRAWS}"), 400, "size"),
    "size beyond 1024": (dict(size=f"{DRAWS * 65}x{DRAWS * 65}"), 400, "size"),
    "size a word": (dict(size="1024x1024 please"), 400, "size"),
    "url format": (dict(response_format="url"), 400, "response_format"),
    "guidance below 1": (dict(extra_body={"guidance_scale": 0.5}), 400, "guidance_scale"),
    "temperature too high": (dict(extra_body={"temperature": 3}), 400, "temperature"),
    "prompt beyond the context": (dict(prompt="a red square " * 200), 400, "prompt"),
    "unknown model": (dict(model="dall-e-3"), 404, "model"),
    "n a string": (dict(extra_body={"n": "two"}), 422, "n"),
    "seed a float": (dict(extra_body={"seed": 1.5}), 422, "seed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_gets_its_4xx_naming_the_field(client, server, name):
    kwargs, status, param = BAD[name]
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(**{"model": "drawing", "prompt": "a red square", **kwargs})
    error = info.value
    assert error.status_code == status and isinstance(error, openai.BadRequestError) == (status == 400)
    body = error.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param, body
    assert body["message"].startswith(f"{param}: ") or (param == "model" and "dall-e-3" in body["message"]), body
    if param == "size":
        assert f"{DRAWS}x{DRAWS}" in body["message"] and f"{DRAWS * 64}x{DRAWS * 64}" in body["message"]
    if param == "response_format":
        assert "b64_json" in body["message"]
    assert server.health()["status"] == "ok"


def test_unknown_fields_are_ignored_and_the_body_is_checked_like_the_others(client, server):
    r = client.images.generate(prompt="a red square", extra_body={"style": "vivid", "quality": "hd", "user": "me"})
    assert len(r.data) == 1
    r = httpx.post(server.url + "/v1/images/generations", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/images/generations", json={"n": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_model_that_cannot_draw_says_so(runs):
    model, tok, _ = load_run(runs["mllm"])
    app = create_app(Engine(model, tok, max_batch=1), tok, "mllm")  # refused before the engine
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=TestClient(app),
                           max_retries=0)
    with pytest.raises(openai.BadRequestError, match="cannot draw") as info:
        client.images.generate(model="mllm", prompt="a red square")
    assert info.value.body["code"] == "drawing_not_supported"


def test_a_chat_and_an_image_generation_run_together(client, server):
    messages = [{"role": "user", "content": "what is there?"}]
    solo = client.chat.completions.create(model="drawing", messages=messages, max_tokens=40, temperature=0)
    with ThreadPoolExecutor(2) as pool:
        chat = pool.submit(client.chat.completions.create, model="drawing", messages=messages, max_tokens=40,
                           temperature=0)
        images = pool.submit(client.images.generate, model="drawing", prompt="a red square", n=2)
        assert len(images.result(timeout=120).data) == 2
        assert chat.result(timeout=120).choices[0].message.content == solo.choices[0].message.content
    assert server.health()["running"] == 0


def test_a_model_loaded_in_bf16_draws_in_process_and_in_the_engine(runs):
    model, tok, _ = load_run(runs["drawing"], "cpu", "bf16")  # a bf16 decoder beside the fp32 codebook
    ids = prompt_ids(tok, "a red square")
    [alone] = pictures(model, draw_codes(model, [ids], DrawSampling(temperature=0)))
    engine = Engine(model, tok, max_batch=2, precision="bf16").start()
    got = queue.Queue()
    try:
        engine.submit(Request(ids, None, got.put, draw=DrawSampling(temperature=0)))
        picture = got.get(timeout=60)
    finally:
        engine.stop()
    assert isinstance(picture, Picture), picture
    assert alone.size == picture.image.size == (DRAWS, DRAWS)


def test_a_guided_picture_needs_two_slots_and_an_unguided_one_fits_in_one(reference):
    model, tok, _ = reference
    engine = Engine(model, tok, max_batch=1, precision="fp32")
    ids = prompt_ids(tok, "a red square")
    with pytest.raises(ValueError, match="needs 2 slots"):
        engine.submit(Request(ids, None, print, draw=DrawSampling(cfg=3)))
    client = TestClient(create_app(engine, tok, "drawing"))  # refused before the engine
    r = client.post("/v1/images/generations", json={"prompt": "a red square"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance_scale"
    got = queue.Queue()
    engine.start()
    try:
        engine.submit(Request(ids, None, got.put, draw=DrawSampling(cfg=1, temperature=0)))
        picture = got.get(timeout=60)
    finally:
        engine.stop()
    assert torch.equal(picture.codes, draw_codes(model, [ids], DrawSampling(cfg=1, temperature=0))[0])
