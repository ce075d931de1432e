"""Scores: VQA accuracy (VQAv2 normalisation, min(1, matches/3) averaged over the 10 leave-one-out
subsets) and caption CIDEr-D / BLEU-4 with pycocoevalcap's scorers."""

from __future__ import annotations

import re

# VQAv2's answer normalisation (the official evaluation script's tables, abridged to what changes
# answers: contractions, number words, articles, punctuation).
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't", "havent": "haven't",
                 "didnt": "didn't", "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't",
                 "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
                 "whats": "what's", "its": "it's", "lets": "let's"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_COMMA_NUM = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(answer: str) -> str:
    a = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    a = _COMMA_NUM.sub(r"\1\3", a)
    a = _PUNCT.sub(" ", a)
    a = _PERIOD.sub("", a)
    words = []
    for w in a.split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2: for each of the human answers left out in turn, min(1, matches among the rest / 3);
    the mean of those. With fewer than 10 answers the same rule applies to what there is."""
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        matches = sum(g == pred for j, g in enumerate(gts) if j != i)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def _caption_tokens(text: str) -> str:
    # The PTB tokenizer of the COCO toolkit needs Java; lower-casing and splitting off punctuation
    # is what it does to captions like these.
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    res = {k: [_caption_tokens(v) or "empty"] for k, v in predictions.items()}
    gts = {k: [_caption_tokens(r) for r in references[k]] for k in predictions}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": round(float(cider), 4), "bleu4": round(float(bleu[3]), 4)}
