"""Repeated spans: random tokens written again and again, which an LM can predict only by copying.

Predicting a repeat needs an induction circuit (Olsson et al. 2022): find where the current token
occurred before and copy what followed. The LM stage trains on such rows (`copy_rows`), and
`kosmo eval copy` measures how much of a repeat an LM predicts.
"""

from __future__ import annotations

import torch

from kosmo.tokenizer import SPECIAL_TOKENS


def repeated_spans(rows: int, span: int | tuple[int, int], vocab_size: int, gen: torch.Generator,
                   length: int | None = None, lowest_id: int = len(SPECIAL_TOKENS)) -> tuple[torch.Tensor, int]:
    """(ids, span): `rows` rows, each a span of random ids from lowest_id to vocab_size - 1 written
    again and again up to `length` tokens (default: twice), and the span's length.

    `span` is a length, or a (shortest, longest) range to draw one from. Drawing it afresh keeps a
    model from copying by looking back a fixed number of positions, which no real text rewards,
    instead of finding the earlier copy by its content. By default no special token is drawn: one
    in the middle of a row would mean something (an image, a turn) that the row does not have.
    """
    if not isinstance(span, int):
        span = int(torch.randint(span[0], span[1] + 1, (1,), generator=gen))
    length = length or 2 * span
    first = torch.randint(lowest_id, vocab_size, (rows, span), generator=gen)
    return first.repeat(1, -(-length // span))[:, :length], span
