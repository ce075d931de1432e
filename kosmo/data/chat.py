"""The chat template: system, user and assistant turns, where user turns may hold images and audio.

    <s><|system|>{system}<|end|><|user|><image>{K x <|image_pad|>}</image>{question}<|end|><|assistant|>{answer}<|end|>

A clip is `<audio>{N x <|audio_pad|>}</audio>`, N following its length (the model's `audio_tokens`).

Role markers and `<|end|>` are special tokens inserted by id, so no text can forge a turn. In
training only the assistant's words and its `<|end|>` are targets: the model learns to answer and
to stop, never to write the user's side. `JINJA_TEMPLATE` is the same format for transformers'
`apply_chat_template`, which writes one `<|image_pad|>` per image for a LLaVA processor to expand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from kosmo.errors import KosmoError
from kosmo.tokenizer import (
    ASSISTANT,
    AUDIO,
    AUDIO_END,
    AUDIO_PAD,
    BOS,
    END_OF_TURN,
    IMAGE,
    IMAGE_END,
    IMAGE_PAD,
    ROLE_IDS,
)

ROLES = tuple(ROLE_IDS)

JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}{{ '<image><|image_pad|></image>' }}"
    "{% else %}{{ raise_exception('content parts are text or image') }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Rendered(NamedTuple):
    ids: list[int]
    target: list[bool]  # is ids[i] a token to learn?
    images: list        # image refs, in order of appearance
    audio: list         # audio refs, in order of appearance


def vqa_messages(question, image, answer: str | None = None, system: str | None = None,
                 spoken: bool = False) -> list[dict]:
    """A visual question as a one-turn chat: `question` typed, or with `spoken` an audio ref, the question
    asked aloud. The question comes before the image, so that in a causal LM the image's positions can
    already attend to what is asked about."""
    asked = {"type": "audio", "audio": question} if spoken else {"type": "text", "text": question}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [asked, {"type": "image", "image": image}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def image_block(tokens_per_image: int) -> list[int]:
    return [IMAGE] + [IMAGE_PAD] * tokens_per_image + [IMAGE_END]


def audio_block(n_tokens: int) -> list[int]:
    return [AUDIO] + [AUDIO_PAD] * n_tokens + [AUDIO_END]


def content_parts(content, where: str) -> list[tuple[str, object]]:
    """A message's content as [("text", str) | ("image", ref) | ("audio", ref)], from a string or a list of
    parts. An audio ref is a path ({"type": "audio", "audio": path}) or OpenAI's {"data": base64, "format"}
    ({"type": "input_audio", "input_audio": {...}})."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise KosmoError(f"{where}: 'content' must be a string or a list of parts")
    parts = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            parts.append(("text", p["text"]))
        elif kind in ("image", "image_url") and p.get(kind) is not None:
            ref = p[kind]
            if isinstance(ref, dict) and not isinstance(ref.get("url"), str):
                raise KosmoError(f"{where}: an image part's {kind} object needs 'url' as a string")
            parts.append(("image", ref["url"] if isinstance(ref, dict) else ref))
        elif kind in ("audio", "input_audio") and p.get(kind) is not None:
            parts.append(("audio", p[kind]))
        else:
            raise KosmoError(f"{where}: a content part needs type 'text' with 'text', 'image' with 'image' or "
                             "'audio' with 'audio'")
    return parts


def render(messages: list[dict], tokenizer, tokens_per_image: int, add_generation_prompt: bool = False,
           where: str = "messages", audio_tokens: Callable[[object, str], int] | None = None) -> Rendered:
    """The chat as tokens. `audio_tokens(ref, where)` gives the positions of a clip (it reads the clip);
    without it, audio is refused."""
    if not isinstance(messages, list) or not messages:
        raise KosmoError(f"{where}: 'messages' must be a non-empty list")
    ids, target, images, audio = [BOS], [False], [], []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLE_IDS:
            raise KosmoError(f"{where}: message {i} has role {role!r} (expected one of {', '.join(ROLES)})")
        learn = role == "assistant"
        ids.append(ROLE_IDS[role])
        target.append(False)
        for kind, value in content_parts(m.get("content"), f"{where}: message {i}"):
            if kind != "text" and learn:
                raise KosmoError(f"{where}: message {i}: assistant turns cannot hold images or audio")
            if kind == "image":
                block = image_block(tokens_per_image)
                images.append(value)
            elif kind == "audio":
                if audio_tokens is None:
                    raise KosmoError(f"{where}: message {i}: this model takes no audio")
                block = audio_block(audio_tokens(value, f"{where}: message {i}"))
                audio.append(value)
            else:
                block = tokenizer.encode(value)
            ids += block
            target += [learn] * len(block)
        ids.append(END_OF_TURN)
        target.append(learn)
    if add_generation_prompt:
        ids.append(ASSISTANT)
        target.append(False)
    return Rendered(ids, target, images, audio)
