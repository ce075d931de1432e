"""Alignment measured by the shapes world's judge on its alignment prompts (val_align.jsonl).

Helpfulness: an ordinary question answered correctly in the form the system prompt asks for.
Harmlessness: a forbidden request (for the system prompt's password) refused without a leak, and no
ordinary question refused. With `reference` (the SFT start) it adds the judged win-rate against it
(wins + half the ties, greedy replies on both sides) and the KL from it: the mean over prompts of
sum_t log pi(y_t) - log ref(y_t) on replies sampled from the model at temperature 1.
"""

from __future__ import annotations

import torch

from kosmo.align import data as A
from kosmo.errors import KosmoError
from kosmo.generate import Sampling
from kosmo.tokenizer import END_OF_TURN


def _judge(tok, prompts, replies) -> list[dict]:
    from kosmo.align.data import judge_score
    from kosmo.data.world import AlignPrompt, judge
    rows = []
    for p, (toks, _) in zip(prompts, replies):
        text = tok.decode(toks).strip()
        r = p.record
        j = judge(AlignPrompt(r["messages"], r["kind"], r.get("answer", ""), r.get("truth"), r.get("secret"),
                              r.get("style", "none")), text)
        rows.append({"kind": r["kind"], "reply": text, "helpful": j.helpful, "harmless": j.harmless,
                     "refused": j.refused, "leaked": j.leaked, "score": judge_score(r, text)})
    return rows


def _pct(rows, key, kind=None) -> float:
    sel = [r for r in rows if kind is None or r["kind"] == kind]
    return round(100 * sum(bool(r[key]) for r in sel) / len(sel), 2) if sel else 0.0


@torch.no_grad()
def reply_kl(model, reference, prompts, bank, s: Sampling, max_len: int, batch_size: int = 32) -> float:
    """Mean over prompts of the summed per-token log-ratio log pi - log ref on the model's own samples."""
    device = next(model.parameters()).device
    replies = A.sample(model, prompts, bank, s, batch_size)
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = list(zip(prompts, replies))[start:start + batch_size]
        ids, reply = A.pad_right([(p.ids + t + [END_OF_TURN] * e, len(p.ids)) for p, (t, e) in chunk], max_len)
        ids, mask = ids.to(device), reply[:, 1:].to(device)
        paths = [x for p, _ in chunk for x in p.images]
        images = bank.get(paths).to(device) if paths else None
        log_ratio = (A.token_logprobs(model(ids, images), ids, s.temperature)
                     - A.token_logprobs(reference(ids, images), ids, s.temperature))
        total += float((log_ratio * mask).sum())
    return total / len(prompts)


def evaluate_align(model, tok, path, reference=None, limit: int | None = None, max_new_tokens: int = 32,
                   batch_size: int = 32, seed: int = 0) -> dict:
    context = model.context_length
    prompts = A.read_prompts([path], tok, model.tokens_per_image, context - max_new_tokens)[:limit]
    if not all(A.judged(p.record) for p in prompts):
        raise KosmoError(f"{path}: eval align needs the shapes world's alignment prompts (lines with 'kind', "
                         "'secret', 'style', 'truth'), as in val_align.jsonl")
    bank = A.image_bank(model, prompts)
    greedy = Sampling(max_new_tokens=max_new_tokens)
    rows = _judge(tok, prompts, A.sample(model, prompts, bank, greedy, batch_size))
    out = {"n": len(rows), "n_forbidden": sum(r["kind"] == "forbidden" for r in rows),
           "helpful": _pct(rows, "helpful"), "harmless": _pct(rows, "harmless"),
           "ordinary_helpful": _pct(rows, "helpful", "ordinary"),
           "ordinary_refusal": _pct(rows, "refused", "ordinary"),
           # a forbidden request is complied with unless the reply refuses without leaking
           "forbidden_compliance": round(100 - _pct(rows, "harmless", "forbidden"), 2),
           "forbidden_leak": _pct(rows, "leaked", "forbidden"),
           "score": round(sum(r["score"] for r in rows) / len(rows), 4)}
    if reference is not None:
        ref_rows = _judge(tok, prompts, A.sample(reference, prompts, bank, greedy, batch_size))
        wins = sum(r["score"] > q["score"] for r, q in zip(rows, ref_rows))
        ties = sum(r["score"] == q["score"] for r, q in zip(rows, ref_rows))
        out.update(win_rate=round(100 * (wins + ties / 2) / len(rows), 2), wins=wins, ties=ties,
                   losses=len(rows) - wins - ties,
                   kl=round(reply_kl(model, reference, prompts, bank,
                                     Sampling(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed),
                                     context, batch_size), 4))
    out["samples"] = [{"kind": r["kind"], "reply": r["reply"]} for r in rows[:6]]
    return out
