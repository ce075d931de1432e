"""Passkey prompts, passkey training rows, `kosmo eval needle`, and a 32k-token conversation served."""

import json

import openai
import pytest
import torch
from serve_helpers import Server

from kosmo.data.chat import render
from kosmo.data.passkey import PasskeyPrompts, passkey_row
from kosmo.data.world import World
from kosmo.errors import KosmoError
from kosmo.eval import needle as N
from kosmo.model.lm import LM, LMConfig
from kosmo.model.load import save_run
from kosmo.tokenizer import BOS, Tokenizer
from kosmo.train.lm import PackedText, TaskRows, passkey_rows


@pytest.fixture(scope="module")
def tok():
    world = World()
    return Tokenizer.train((world.text(i, "train") for i in range(300)), vocab_size=300)


def tiny_lm(tok, context: int) -> LM:
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=context,
                       init_std=0.1)).eval()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_a_passkey_prompt_has_the_exact_length_and_the_key_where_it_says(tok, depth):
    prompts = PasskeyPrompts(tok)
    p = prompts.prompt(1000, depth, "40213")
    assert len(p.ids) == 1000 and p.ids[0] == BOS
    assert p.ids[p.key_at:p.key_at + len(p.answer)] == p.answer == tok.encode(" 40213")
    text = tok.decode(p.ids)
    assert text.count("40213") == 2 and text.endswith("What is the pass key? The pass key is")
    filler = len(p.ids) - prompts.minimum()
    before = p.key_at - 1 - len(prompts.intro) - len(prompts.needle_parts[0])
    assert before == round(depth * filler)


def test_a_passkey_prompt_too_short_or_too_deep_is_refused(tok):
    prompts = PasskeyPrompts(tok)
    with pytest.raises(KosmoError, match="needs at least"):
        prompts.prompt(prompts.minimum() - 1, 0.5, "12345")
    with pytest.raises(KosmoError, match="depth is a fraction"):
        prompts.prompt(500, 1.5, "12345")


def test_passkey_rows_mask_the_unpredictable_key_and_teach_the_answer(tok):
    prompts = PasskeyPrompts(tok)
    gen = torch.Generator().manual_seed(0)
    ids, labels = passkey_row(prompts, 256, gen)
    assert ids.shape == labels.shape == (256,)
    torch.testing.assert_close(labels[labels != -100], torch.cat([ids[1:], labels[-1:]])[labels != -100])
    masked = (labels == -100).nonzero().flatten()
    key = ids[masked[0] + 1:masked[-1] + 2].tolist()  # the key's first appearance, which nothing predicts
    tail = tok.decode(ids[-20:].tolist() + labels[-1:].tolist())
    assert tail.endswith(tok.decode(key)) and "The pass key is" + tok.decode(key) in tail


def test_task_rows_give_passkey_rows_their_share_the_same_on_resume(tok):
    text = PackedText(torch.arange(8 * 257).view(8, 257) % 50 + 20)
    rows = TaskRows(text, [(0.5, passkey_rows(tok))])
    batch = rows.collate(list(range(8)))
    assert torch.equal(batch["input"][4:], text.rows[4:8, :-1])
    assert all("pass key" in tok.decode(r.tolist()) for r in batch["input"][:4])
    assert torch.equal(batch["input"], rows.collate(list(range(8)))["input"])


@pytest.mark.parametrize("reply,right", [(" 40213.", True), ("40213", True), (" 4021", False),
                                         (" 402134", False), (" key 40213", False)])
def test_an_answer_counts_only_as_the_key_as_a_whole_number(reply, right):
    assert N.answered(reply, "40213") is right


def test_the_grid_scores_every_cell_with_prompts_of_the_exact_length(tok, monkeypatch):
    """A model that always finds the key scores 100 everywhere; one that never does scores 0."""
    model, seen = tiny_lm(tok, 2048), []

    def oracle(model, prompts, s, prefill_chunk):
        seen.append((len(prompts), [len(p) for p in prompts], prefill_chunk))
        pre, mid, _ = PasskeyPrompts(tok).needle_parts

        def find(p, part, start=0):
            return next(i for i in range(start, len(p)) if p[i:i + len(part)] == part)
        keys = [p[find(p, pre) + len(pre):find(p, mid, find(p, pre))] for p in prompts]
        return [k + tok.encode(".") for k in keys], ["length"] * len(prompts)

    monkeypatch.setattr(N, "generate_ids", oracle)
    result = N.needle(model, tok, [512, 2048], [0.0, 1.0], trials=3, prefill_chunk=256)
    assert result["overall"] == 100.0 and set(result["accuracy"]) == {"512", "2048"}
    assert seen[0] == (3, [512 - N.ANSWER_TOKENS] * 3, 256) and seen[-1][1] == [2048 - N.ANSWER_TOKENS] * 3
    monkeypatch.setattr(N, "generate_ids", lambda m, prompts, s, prefill_chunk: ([[]] * len(prompts), None))
    assert N.needle(model, tok, [512], [0.5], trials=2)["overall"] == 0.0


def test_eval_needle_runs_a_real_model_and_draws_the_heatmap(tok, tmp_path, capsys):
    from kosmo.cli import main
    model = tiny_lm(tok, 4096)
    save_run(tmp_path / "run", model, tok, {"stage": "test", "arch": "lm", "model": model.cfg.to_dict()})
    main(["eval", "needle", "--model", str(tmp_path / "run"), "--lengths", "1k,4k", "--depths", "0,1", "--trials",
          "2", "--plot", str(tmp_path / "needle.png"), "--device", "cpu", "--precision", "fp32"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["accuracy"]) == {"1024", "4096"} and set(result["accuracy"]["1024"]) == {"0.0", "1.0"}
    assert (tmp_path / "needle.png").stat().st_size > 1000
    assert main(["eval", "needle", "--model", str(tmp_path / "run"), "--lengths", "8k", "--device", "cpu"]) != 0
    assert "--lengths 8192 exceeds the model's context of 4096 tokens" in capsys.readouterr().err
    assert main(["eval", "needle", "--model", str(tmp_path / "run"), "--lengths", "4q", "--device", "cpu"]) != 0
    assert "--lengths: expected comma-separated token counts like 1k,4k,32k, got '4q'" in capsys.readouterr().err


def test_the_server_answers_a_32k_token_conversation(tok, tmp_path):
    """The engine prefills it in chunks (the chunks' parity with one prefill: tests/test_chunked.py). One layer
    with 64-wide heads: a 32k prefill is mostly attention, and narrower heads run it slower on CPU."""
    context = 32 * 1024
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=tok.vocab_size, dim=128, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=context,
                        init_std=0.1)).eval()
    save_run(tmp_path / "long", model, tok, {"stage": "test", "arch": "lm", "model": model.cfg.to_dict()})
    world = World()
    turns, i, size = [{"role": "system", "content": "You answer briefly."}], 0, 0
    while size < context - 700:  # a turn's text and its role and end-of-turn tokens
        turns.append({"role": ("user", "assistant")[i % 2], "content": world.text(i, "train")})
        size, i = size + len(tok.encode(turns[-1]["content"])) + 2, i + 1
    turns.append({"role": "user", "content": "what comes next?"})
    ids = render(turns, tok, 0, add_generation_prompt=True)[0]
    assert 31 * 1024 < len(ids) <= context - 8
    server = Server(tmp_path / "long", "--max-batch", "2", "--prefill-chunk", "4096")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="long", messages=turns, max_tokens=8, temperature=0)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="context"):
            client.chat.completions.create(model="long", messages=turns * 2, max_tokens=8)
    finally:
        server.close()
