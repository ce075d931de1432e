"""The LM's copying: the repeated spans it trains and is measured on, the copy accuracy that
`kosmo eval copy` reports, and the smeared keys that let one layer copy; smeared keys in cached
decoding."""

import math

import pytest
import torch
import torch.nn.functional as F

from kosmo.data.copying import repeated_spans
from kosmo.errors import KosmoError
from kosmo.eval.copying import copy_accuracy
from kosmo.model.lm import LM, KVCache, LMConfig
from kosmo.tokenizer import SPECIAL_TOKENS
from kosmo.train.lm import PackedText, TaskRows, copy_rows


def test_repeated_spans_are_ordinary_tokens_written_twice_the_same_for_a_seed():
    rows, span = repeated_spans(64, (12, 60), 600, torch.Generator().manual_seed(1))
    assert rows.shape == (64, 2 * span) and torch.equal(rows[:, :span], rows[:, span:])
    assert rows.min() >= len(SPECIAL_TOKENS) and rows.max() < 600  # no <s>, image or turn marker mid-row
    again, _ = repeated_spans(64, (12, 60), 600, torch.Generator().manual_seed(1))
    other, _ = repeated_spans(64, span, 600, torch.Generator().manual_seed(2))
    assert torch.equal(again, rows) and not torch.equal(other, rows)
    gen = torch.Generator().manual_seed(0)
    assert len({repeated_spans(1, (12, 60), 600, gen)[1] for _ in range(20)}) > 10  # drawn afresh every time
    rows, span = repeated_spans(2, 5, 600, gen, length=13)  # again and again, cut to the length
    assert span == 5 and rows.shape == (2, 13) and torch.equal(rows[:, 5:], rows[:, :8])


def trained_to_copy(smear_keys: bool, vocab_size: int = 128, steps: int = 150) -> LM:
    """A one-layer LM trained on spans of 6 to 24 random tokens written twice, loss on the repeats."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = LM(LMConfig(vocab_size=vocab_size, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=128,
                        smear_keys=smear_keys))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        ids, span = repeated_spans(16, (6, 24), vocab_size, gen)
        logits = model(ids[:, :-1])
        F.cross_entropy(logits[:, span:].flatten(0, 1), ids[:, span + 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_smeared_keys_let_one_layer_copy_spans_longer_than_it_trained_on():
    """An induction head needs the previous token in its keys: plain attention must first learn a
    previous-token head in a layer below, which one layer does not have. Copying by content carries
    over to spans longer than any in training; looking back by position does not."""
    smeared = copy_accuracy(trained_to_copy(smear_keys=True), 128)
    plain = copy_accuracy(trained_to_copy(smear_keys=False), 128)
    assert smeared["20"] > 80 and smeared["48"] > 40 and plain["48"] < 10


def test_smeared_keys_cached_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, smear_keys=True)
    model = LM(cfg).eval()
    for block in model.blocks:
        block.attn.smear.data.normal_()
    ids = torch.randint(0, 97, (2, 20))
    cache = KVCache(cfg, 2, 64)
    chunks = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]
    chunks += [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(chunks, 1), model(ids), rtol=0, atol=1e-5)


def test_smeared_keys_off_is_the_plain_llama_block():
    cfg = LMConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    assert not any("smear" in name for name, _ in LM(cfg).named_parameters())
    assert KVCache(cfg, 1, 8).last_k is None


def test_copy_rows_replace_a_share_of_each_batch_with_repeated_spans_the_same_on_resume():
    text = PackedText(torch.arange(20 * 65).view(20, 65) % 7 + len(SPECIAL_TOKENS))
    rows = TaskRows(text, [(0.75, copy_rows(500))])
    batch = rows.collate(list(range(8)))
    assert torch.equal(batch["input"][6:], text.rows[6:8, :-1])  # a quarter of the batch stays text
    spans = set()
    for inp, lab in zip(batch["input"][:6], batch["labels"][:6]):
        tokens = torch.cat([inp, lab[-1:]])
        span = int((lab == -100).sum())  # no loss on the first span: it is random
        assert 12 <= span <= 32 and torch.equal(tokens[span:], tokens[:-span][:len(tokens) - span])
        assert torch.equal(lab[span:], tokens[span + 1:]) and tokens.min() >= len(SPECIAL_TOKENS)
        spans.add(span)
    assert len(spans) > 1  # the span's length varies, so copying cannot work by a fixed offset
    assert batch["n_targets"] == int((batch["labels"] != -100).sum())
    again = rows.collate(list(range(8)))
    assert torch.equal(batch["input"], again["input"]) and torch.equal(batch["labels"], again["labels"])
    assert not torch.equal(rows.collate(list(range(8, 16)))["input"][:6], batch["input"][:6])


class RepeatReader(torch.nn.Module):
    """Predicts every token of a row's repeat past its first by reading it off the span, and nothing
    else: it copies all that can be copied."""

    context_length = 128

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # copy_accuracy reads the device off a parameter

    def forward(self, ids):
        span = (ids.shape[1] + 1) // 2  # a row is the span written twice, less its last token
        logits = torch.zeros(*ids.shape, self.vocab_size)  # elsewhere token 0, which no row holds
        logits[:, span:] = F.one_hot(ids[:, 1:span], self.vocab_size).float()
        return logits


def test_copy_accuracy_scores_the_repeat_past_its_first_token():
    assert copy_accuracy(RepeatReader(600), 600, spans=(20, 48)) == {"20": 100.0, "48": 100.0}
    with pytest.raises(KosmoError, match="a span of 65 tokens and its repeat need 129 positions, "
                                         "more than the model's context of 128"):
        copy_accuracy(RepeatReader(600), 600, spans=(20, 65))


@pytest.mark.parametrize("override", [
    ["model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 32}"],
    ["model.rope_scaling.rope_type=yarn", "model.rope_scaling.factor=4",
     "model.rope_scaling.original_max_position_embeddings=32"],
])
def test_init_run_is_fine_tuned_at_length_with_yarn_from_model_overrides(override, tmp_path):
    from kosmo.model.load import load_run, save_run
    from kosmo.tokenizer import Tokenizer
    from kosmo.train.run import run_stage
    data = tmp_path / "text.jsonl"
    data.write_text("".join(f'{{"text": "{"the cat sat on the mat and then " * 12}{i}"}}\n' for i in range(40)))
    tok = Tokenizer.train(iter([data.read_text()]), vocab_size=300)
    torch.manual_seed(0)
    short = LM(LMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32))
    save_run(tmp_path / "short", short, tok, {"arch": "lm", "model": short.cfg.to_dict()})
    run_stage("lm", [data], tmp_path / "long", init=tmp_path / "short",
              overrides=["seq_len=128", "model.max_seq_len=128", *override, "train.max_steps=1", "train.batch_size=2",
                         "train.warmup_steps=0", "train.progress=false", "train.tensorboard=false",
                         "train.eval_every=0"])
    long, _, config = load_run(tmp_path / "long")
    assert config["model"]["rope_scaling"] == {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32}
    assert long.cfg.max_seq_len == 128 and long.rope_cos.shape[0] == 128
    assert long.rope_cos[0, 0] == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed_documents"])
def test_matmul_attention_and_its_gradients_equal_sdpa(packed):
    from kosmo.model.lm import attention, matmul_attention, segment_mask
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 40, 16, generator=g, requires_grad=True) for h in (6, 2, 2))
    segments = torch.tensor([[0] * 15 + [1] * 25, [0] * 40])
    mask = segment_mask(segments) if packed else None
    d_out = torch.randn(2, 6, 40, 16, generator=g)

    def out_and_grads(fn, *qkv):
        out = fn(*qkv, mask)
        return (out, *torch.autograd.grad(out, qkv, d_out.to(out.dtype)))

    sdpa = out_and_grads(lambda q, k, v, mask: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True), q, k, v)
    for got, want in zip(out_and_grads(matmul_attention, q, k, v), sdpa):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # in bf16 (the path `attention` takes on CPU) it stays as close to fp32 as the bf16 flash kernel does
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    flash = out_and_grads(lambda q, k, v, mask: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True), *low)
    for got, bf16_flash, want in zip(out_and_grads(attention, *low), flash, sdpa):
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() <= 3 * (bf16_flash.float() - want).abs().max()
