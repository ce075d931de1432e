"""Evaluation scores against hand-computed values."""

import pytest

from kosmo.eval.metrics import caption_scores, vqa_accuracy, vqa_normalize


@pytest.mark.parametrize("raw,norm", [("Two", "2"), ("the Red one.", "red 1"), ("yes!", "yes"),
                                      ("dont know", "don't know"), ("1,000", "1000"), ("3.5", "3.5"),
                                      ("A circle", "circle"), ("  Blue\n", "blue")])
def test_vqa_normalisation(raw, norm):
    assert vqa_normalize(raw) == norm


def test_vqa_accuracy_is_min_one_matches_over_three_averaged_over_leave_one_out():
    assert vqa_accuracy("red", ["red"] * 10) == 1.0
    # 2 of 10 humans said "red": leaving out a "red" leaves 1 match (1/3), leaving out another leaves 2 (2/3)
    answers = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy("Red.", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("green", answers) == 0.0
    assert vqa_accuracy("two", ["2"]) == 1.0


def test_caption_scores_reward_matching_captions():
    refs = {"a": ["a red circle in the top left corner", "a small red circle at the top left"],
            "b": ["two blue squares at the bottom", "blue squares in the bottom row"],
            "c": ["a green triangle in the centre", "one green triangle in the middle"]}
    good = caption_scores({"a": "a red circle in the top left corner", "b": "two blue squares at the bottom",
                           "c": "a green triangle in the centre"}, refs)
    bad = caption_scores({"a": "two blue squares at the bottom", "b": "a green triangle in the centre",
                          "c": "a red circle in the top left corner"}, refs)
    assert good["cider"] > 2 and good["bleu4"] > 0.8
    assert bad["cider"] < 0.5 and bad["bleu4"] < good["bleu4"]
