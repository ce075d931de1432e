"""The LM's smeared keys: what they are for, and that they change nothing they should not."""

import torch
import torch.nn.functional as F

from kosmo.model.lm import LM, KVCache, LMConfig


def copy_accuracy(smear_keys: bool, steps: int = 150) -> float:
    """Trains a one-layer model on random tokens whose second half repeats the first, at a length drawn
    per batch (so looking back a fixed distance does not work); its held-out second-half accuracy."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = LM(LMConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=64,
                        smear_keys=smear_keys))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def rows(batch):
        half = int(torch.randint(6, 25, (1,), generator=gen))
        first = torch.randint(0, 64, (batch, half), generator=gen)
        return torch.cat([first, first], 1), half

    for _ in range(steps):
        ids, half = rows(32)
        logits = model(ids[:, :-1])
        F.cross_entropy(logits[:, half:].flatten(0, 1), ids[:, half + 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        ids, half = rows(64)
        return (model(ids[:, :-1])[:, half:].argmax(-1) == ids[:, half + 1:]).float().mean().item()


def test_smeared_keys_let_one_layer_copy_an_earlier_sequence():
    """An induction head needs the previous token in its keys: plain attention must first learn a
    previous-token head in a layer below, which one layer does not have."""
    assert copy_accuracy(smear_keys=True) > 0.6
    assert copy_accuracy(smear_keys=False) < 0.2


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
    from kosmo.tokenizer import SPECIAL_TOKENS
    from kosmo.train.lm import CopyRows, PackedText
    text = PackedText(torch.arange(20 * 65).view(20, 65) % 7 + len(SPECIAL_TOKENS))
    rows = CopyRows(text, share=0.75, vocab_size=500)
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


def test_copy_accuracy_tells_a_copying_lm_from_one_that_cannot():
    from kosmo.eval.copying import copy_accuracy

    class Copier(torch.nn.Module):
        """Predicts the token that followed the current one's previous occurrence."""

        cfg = LMConfig(max_seq_len=64)

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # copy_accuracy reads the device off a parameter

        def forward(self, ids):
            out = torch.zeros(*ids.shape, 600)
            for b, row in enumerate(ids.tolist()):
                for t, token in enumerate(row):
                    before = [i for i in range(t) if row[i] == token]
                    out[b, t, row[before[-1] + 1] if before else 0] = 1
            return out

    assert copy_accuracy(Copier(), 600, spans=(20,), rows=4)["20"] > 90  # a span may hold a token twice
    lm = LM(LMConfig(vocab_size=600, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=64))
    assert copy_accuracy(lm, 600, spans=(20,), rows=4)["20"] < 5
