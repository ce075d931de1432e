"""The chat template: system, user and assistant turns, where user turns may hold images.

    <s><|system|>{system}<|end|><|user|><image>{K x <|image_pad|>}</image>{question}<|end|><|assistant|>{answer}<|end|>

Role markers and `<|end|>` are special tokens inserted by id, so no text can forge a turn. In
training only the assistant's words and its `<|end|>` are targets: the model learns to answer and
to stop, never to write the user's side.
"""

from __future__ import annotations

from kosmo.errors import KosmoError
from kosmo.tokenizer import ASSISTANT, BOS, END_OF_TURN, IMAGE, IMAGE_END, IMAGE_PAD, ROLE_IDS

ROLES = tuple(ROLE_IDS)


def vqa_messages(question: str, image, answer: str | None = None, system: str | None = None) -> list[dict]:
    """A visual question as a one-turn chat. The question comes before the image, so that in a causal
    LM the image's positions can already attend to what is asked about."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "text", "text": question}, {"type": "image", "image": image}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def image_block(tokens_per_image: int) -> list[int]:
    return [IMAGE] + [IMAGE_PAD] * tokens_per_image + [IMAGE_END]


def content_parts(content, where: str) -> list[tuple[str, str]]:
    """A message's content as [("text", str) | ("image", ref)], from a string or a list of parts."""
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
            parts.append(("image", ref["url"] if isinstance(ref, dict) else ref))
        else:
            raise KosmoError(f"{where}: a content part needs type 'text' with 'text', or 'image' with 'image'")
    return parts


def render(messages: list[dict], tokenizer, tokens_per_image: int, add_generation_prompt: bool = False,
           where: str = "messages") -> tuple[list[int], list[bool], list]:
    """(token ids, is-target flag per token, image refs in order of appearance)."""
    if not isinstance(messages, list) or not messages:
        raise KosmoError(f"{where}: 'messages' must be a non-empty list")
    ids, target, images = [BOS], [False], []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLE_IDS:
            raise KosmoError(f"{where}: message {i} has role {role!r} (expected one of {', '.join(ROLES)})")
        learn = role == "assistant"
        ids.append(ROLE_IDS[role])
        target.append(False)
        for kind, value in content_parts(m.get("content"), f"{where}: message {i}"):
            if kind == "image":
                if learn:
                    raise KosmoError(f"{where}: message {i}: assistant turns cannot hold images")
                block = image_block(tokens_per_image)
                images.append(value)
            else:
                block = tokenizer.encode(value)
            ids += block
            target += [learn] * len(block)
        ids.append(END_OF_TURN)
        target.append(learn)
    if add_generation_prompt:
        ids.append(ASSISTANT)
        target.append(False)
    return ids, target, images
