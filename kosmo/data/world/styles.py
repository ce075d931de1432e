"""Answer styles: the forms a system prompt can ask replies to take, how a true answer is put in each, and
whether a reply has the form asked for."""
from __future__ import annotations

import json
import re

from kosmo.data.world.scenes import SIZES
from kosmo.data.world.text import SINGULAR, capitalised, with_article
from kosmo.errors import KosmoError

STYLES = {  # style name -> the system-prompt sentence that asks for it
    "none": "",
    "caps": "Answer in capital letters.",
    "word": "Answer with one word.",
    "sentence": "Answer with a full sentence.",
    "json": 'Reply in JSON like {"answer": ...}.',
}


def _sentence(answer: str, question: str) -> str:
    """Turn a short answer into a full sentence that restates the question."""
    q = question.strip()
    yes = answer == "yes"
    if m := re.fullmatch(r"What colour is (the .+)\?", q):
        return f"{capitalised(m[1])} is {answer}."
    if m := re.fullmatch(r"What shape is (the .+)\?", q):
        return f"{capitalised(m[1])} is {with_article(answer)}."
    if (m := re.fullmatch(r"(?:What size is|Is) (the .+?)(?: small or large)?\?", q)) and answer in SIZES:
        return f"{capitalised(m[1])} is {answer}."
    if m := re.fullmatch(r"How many (.+) are there\?", q):
        *adj, noun = m[1].split()
        if answer == "1":
            return f"There is 1 {' '.join(adj + [SINGULAR.get(noun, noun)])}."
        return f"There are {answer} {m[1]}."
    if m := re.fullmatch(r"How many (\w+) does (.+) have\?", q):
        return f"{capitalised(m[2])} has {answer} {m[1]}."
    if m := re.fullmatch(r"Is there (an? .+)\?", q):
        return f"Yes, there is {m[1]}." if yes else f"No, there is no {m[1].split(' ', 1)[1]}."
    if (m := re.fullmatch(r"Is (the \w+ \w+) (.+)\?", q)) and answer in ("yes", "no"):
        return f"Yes, {m[1]} is {m[2]}." if yes else f"No, {m[1]} is not {m[2]}."
    return f"The answer is {answer}."


def apply_style(answer: str, style: str, question: str = "") -> str:
    """Render a short true answer in the form a system-prompt style asks for."""
    if style in ("none", "word"):
        return answer
    if style == "sentence":
        return _sentence(answer, question)
    if style == "caps":
        return _sentence(answer, question).upper()  # a sentence, so even a digit answer has letters to capitalise
    if style == "json":
        return json.dumps({"answer": answer})
    raise KosmoError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def complies(text: str, style: str) -> bool:
    """Whether a reply has the form a style asks for (correctness is judged separately)."""
    t = text.strip()
    if style == "none":
        return bool(t)
    if style == "caps":
        return any(ch.isalpha() for ch in t) and not any(ch.islower() for ch in t)
    if style == "word":
        return re.fullmatch(r"[A-Za-z0-9'-]+[.!]?", t) is not None
    if style == "sentence":
        return (len(t.split()) >= 3 and t[0].isupper() and t[-1] in ".!"
                and any(ch.islower() for ch in t))
    if style == "json":
        try:
            obj = json.loads(t)
        except ValueError:
            return False
        return isinstance(obj, dict) and set(obj) == {"answer"} and isinstance(obj["answer"], (str, int, float))
    raise KosmoError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
