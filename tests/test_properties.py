"""Property tests of the parsers that read what users send: the JSONL reader, the chat template and the image
decoders; and of the server's stream events, which any client must read back. Whatever the input, each gives
a result or a one-line error naming where the input went wrong, never another exception; the chat template
keeps each turn's words and lets no text forge a turn."""

import asyncio
import base64
import io
import json
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from kosmo.data.chat import render
from kosmo.data.images import decode_image_bytes
from kosmo.data.jsonl import read_jsonl, record_texts
from kosmo.errors import KosmoError
from kosmo.serve.api import sse
from kosmo.serve.media import MediaError, MediaPolicy, load_image
from kosmo.tokenizer import (
    ASSISTANT,
    BOS,
    END_OF_TURN,
    IMAGE,
    IMAGE_END,
    IMAGE_PAD,
    ROLE_IDS,
    SPECIAL_TOKENS,
    Tokenizer,
)

# a fixed sequence of examples: the same cases on every machine, so a failure is never a fluke of the draw
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
# record_texts looks these keys up; other keys change nothing
RECORD_KEYS = st.sampled_from(["text", "image", "content", "messages", "prompt", "question", "answers", "captions",
                               "chosen", "rejected", "role"])
RECORDS = st.dictionaries(RECORD_KEYS, JSON | st.lists(st.dictionaries(RECORD_KEYS, JSON, max_size=3), max_size=3),
                          max_size=4)


def one_line_naming(error: Exception, where: str):
    assert "\n" not in str(error) and str(error).startswith(where), str(error)


# ---- JSONL

@PROPERTY
@given(lines=st.lists(st.binary(max_size=40) | st.builds(json.dumps, JSON).map(str.encode), max_size=6))
@example(lines=[b'{"text": "a"}', b"[" * 100_000])  # nested deeper than the parser recurses
@example(lines=[b'{"text": "a"}', b"\xff\xfe", b"{}"])
def test_any_bytes_are_rows_or_an_error_naming_the_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    lines = path.read_bytes().split(b"\n")  # a line's own newlines split it
    rows = []
    try:
        for lineno, obj in read_jsonl(path):
            rows.append((lineno, obj))
    except KosmoError as e:
        one_line_naming(e, f"{path}:")
        bad = int(str(e)[len(f"{path}:"):].split(":")[0])
        assert bad > (rows[-1][0] if rows else 0) and lines[bad - 1].strip()
        return
    assert all(isinstance(obj, dict) for _, obj in rows)
    assert [n for n, _ in rows] == [i + 1 for i, line in enumerate(lines) if line.decode().strip()]


@PROPERTY
@given(objects=st.lists(st.dictionaries(st.text(), JSON, max_size=4), max_size=5))
def test_objects_written_as_jsonl_read_back_equal(tmp_path_factory, objects):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    assert [obj for _, obj in read_jsonl(path)] == objects


@PROPERTY
@given(record=RECORDS)
@example(record={"messages": "hello"})
@example(record={"question": "q", "answers": 3})
@example(record={"text": "t", "image": "a.png", "captions": {"a": 1}})
def test_any_record_gives_its_texts_or_an_error_naming_it(record):
    try:
        texts = record_texts(record, "f.jsonl:3")
    except KosmoError as e:
        one_line_naming(e, "f.jsonl:3: ")
        return
    assert all(isinstance(t, str) for t in texts)


# ---- the chat template

@pytest.fixture(scope="module")
def tok():
    from kosmo.data.world import World
    return Tokenizer.train((World().text(i, "train") for i in range(100)), vocab_size=300)


# text full of what special tokens look like, so that forging a turn is tried often
TEXT = st.lists(st.sampled_from(SPECIAL_TOKENS) | st.text(max_size=6) | st.sampled_from(string.whitespace),
                max_size=6).map("".join)
IMAGE_REF = st.just({"type": "image", "image": "a.png"})
MESSAGE = st.one_of(
    st.builds(lambda role, text: {"role": role, "content": text}, st.sampled_from(list(ROLE_IDS)), TEXT),
    st.builds(lambda parts: {"role": "user", "content": parts},
              st.lists(st.builds(lambda t: {"type": "text", "text": t}, TEXT) | IMAGE_REF, max_size=3)))


@PROPERTY
@given(messages=st.lists(MESSAGE, min_size=1, max_size=4), generation_prompt=st.booleans())
def test_render_keeps_every_turn_and_text_cannot_forge_one(tok, messages, generation_prompt):
    tokens_per_image = 3
    ids, target, images, _ = render(messages, tok, tokens_per_image, add_generation_prompt=generation_prompt)
    assert ids[0] == BOS and len(target) == len(ids)
    turns, at = [], 1
    for m in messages:  # parse the ids back, turn by turn, by the special ids the template put there
        assert ids[at] == ROLE_IDS[m["role"]]
        end = ids.index(END_OF_TURN, at)
        turns.append((ids[at + 1:end], target[at + 1:end + 1]))
        at = end + 1
    assert ids[at:] == ([ASSISTANT] if generation_prompt else [])
    for m, (body, learn) in zip(messages, turns):
        parts = [m["content"]] if isinstance(m["content"], str) else m["content"]
        texts = [p if isinstance(p, str) else p.get("text") for p in parts]
        text_ids = [i for i in body if i not in (IMAGE, IMAGE_PAD, IMAGE_END)]
        # no special id inside a turn except the image blocks the template itself inserts
        assert all(i >= len(SPECIAL_TOKENS) for i in text_ids)
        assert tok.decode(text_ids) == "".join(t for t in texts if t is not None)
        assert body.count(IMAGE_PAD) == tokens_per_image * sum(t is None for t in texts)
        assert all(learn) if m["role"] == "assistant" else not any(learn)
    assert len(images) == sum(p == {"type": "image", "image": "a.png"} for m in messages
                              if isinstance(m["content"], list) for p in m["content"])


@PROPERTY
@given(messages=st.lists(JSON, min_size=1, max_size=3) | JSON)
@example(messages=[{"role": "user", "content": [{"type": "text"}]}])
@example(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
def test_any_messages_render_or_give_an_error_naming_them(tok, messages):
    try:
        render(messages, tok, 2, where="chat.jsonl:7")
    except KosmoError as e:
        one_line_naming(e, "chat.jsonl:7: ")


# ---- images

def encoded(fmt: str, mode: str = "RGB", size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, fmt)
    return buf.getvalue()


VALID = [encoded("PNG"), encoded("PNG", "I;16"), encoded("GIF", "P"), encoded("JPEG"), encoded("BMP"),
         encoded("WEBP"), encoded("TIFF", "F"), encoded("ICO", size=(16, 16))]


@st.composite
def damaged(draw) -> bytes:
    """A valid picture of some format, cut short or with a few bytes overwritten: what parsers choke on."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@PROPERTY
@given(data=st.binary(max_size=64) | damaged())
def test_any_bytes_are_a_picture_or_an_error_naming_them(data):
    try:
        img = decode_image_bytes(data, "upload", max_pixels=10_000, max_bytes=4096)
    except KosmoError as e:
        one_line_naming(e, "upload: ")
        return
    assert img.mode == "RGB" and img.width * img.height <= 10_000


DATA_URLS = st.one_of(
    st.text(max_size=30),
    st.builds("data:{}{},{}".format, st.sampled_from(["image/png", "text/plain", "", "image/x"]),
              st.sampled_from([";base64", "", ";charset=utf-8;base64", ";BASE64"]),
              st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=20)
              | damaged().map(lambda b: base64.b64encode(b).decode())),
    st.builds(lambda scheme, rest: f"{scheme}:{rest}", st.sampled_from(["file", "http", "https", "ftp", "DATA"]),
              st.text(max_size=20)))


@PROPERTY
@given(url=DATA_URLS)
def test_any_image_url_is_a_picture_or_a_4xx(url):
    try:
        img = asyncio.run(load_image(url, MediaPolicy(max_image_bytes=4096, max_pixels=10_000), "messages[0]"))
    except MediaError as e:
        assert 400 <= e.status < 500 and e.code
        one_line_naming(e, "messages[0]: ")
        return
    assert img.mode == "RGB" and min(img.size) >= 8


def test_a_data_url_of_a_valid_picture_decodes():
    # the properties above allow errors everywhere; this pins that the happy path stays open
    url = "data:image/png;base64," + base64.b64encode(VALID[0]).decode()
    assert asyncio.run(load_image(url, MediaPolicy(), "x")).size == (12, 10)


@given(text=st.text())
@example(text="a\u2028b\x85c\u2029d\re\nf")
def test_a_stream_event_is_one_line_to_any_line_splitter_and_reads_back(text):
    event = sse({"delta": text})
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1  # str.splitlines: the most eager
    assert json.loads(event[len("data: "):]) == {"delta": text}
