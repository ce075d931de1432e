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
