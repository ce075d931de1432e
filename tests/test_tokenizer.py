"""The BPE tokenizer: exact round trips, fixed special ids that plain text can never produce."""

import pytest

from kosmo.errors import KosmoError
from kosmo.tokenizer import BOS, END_OF_TURN, EOS, IMAGE, PAD, SPECIAL_TOKENS, Tokenizer

TRICKY = [
    "plain ascii, with  double spaces and a trailing space ",
    "emoji 🙂👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "CJK 中文字符 日本語 한국어",
    "combining e\u0301 a\u0300\u0323 and Zalgo h\u0336\u0321e\u0337",
    "control \x00\x01\x07\x1b[31m\x7f tabs\t\r\nnewlines\n\n",
    "lone surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and RTL שלום مرحبا",
    "special lookalikes <s> </s> <pad> <image> </image> <|user|> <|end|>",
]


@pytest.fixture(scope="module")
def tok():
    corpus = ["The red circle is left of the blue square. " * 3, "There are two objects."] * 200
    return Tokenizer.train(corpus, vocab_size=400)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_specials_have_fixed_ids_and_never_come_from_text(tok):
    assert (PAD, BOS, EOS, IMAGE, END_OF_TURN) == (0, 1, 2, 3, 9)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token(i) == t
    for text in TRICKY:
        assert min(tok.encode(text)) >= len(SPECIAL_TOKENS)


def test_learns_merges_and_saves(tok, tmp_path):
    assert len(tok.encode("The red circle is left of the blue square.")) < 20
    path = tok.save(tmp_path)
    again = Tokenizer.load(path)
    assert again.encode(TRICKY[1]) == tok.encode(TRICKY[1])
    assert again.decode([BOS, *tok.encode("hi")], skip_special=False) == "<s>hi"


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(KosmoError, match="too small"):
        Tokenizer.train(["x"], vocab_size=100)
    with pytest.raises(KosmoError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KosmoError, match="bad.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")
