"""The KV cache: rows at their own lengths, a row's numbers independent of the other rows, views
that write through, and the room a Flamingo cache keeps for images."""

import pytest
import torch

from kosmo.model.cache import key_span
from kosmo.model.lm import LM, LMConfig


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "smeared_keys"])
def model(request):
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                       init_std=0.1, smear_keys=request.param)).eval()


PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51], list(range(1, 40)), [1, 7]]


def prefill(model, cache, rows):
    for i, p in enumerate(rows):
        model(torch.tensor([p]), cache=cache.rows(i, i + 1))


@torch.no_grad()
def test_a_decoding_row_gets_the_same_bits_alone_as_beside_rows_of_other_lengths(model):
    """As in the serving engine, every step has all rows (a matmul's sums depend on its shape); the
    attention must then make a row's numbers its own, whatever the other rows hold."""
    B = len(PROMPTS)
    together = model.new_cache(B, 64)
    prefill(model, together, PROMPTS)
    alone = []
    for i, p in enumerate(PROMPTS):
        alone.append(model.new_cache(B, 64))
        model(torch.tensor([p]), cache=alone[i].rows(i, i + 1))
    for step in range(3):
        tokens = torch.tensor([[3 + step], [4], [5], [6 + step]])
        batch = model(tokens, cache=together)
        for i, cache in enumerate(alone):
            only_i = torch.arange(B) == i
            assert torch.equal(model(tokens, cache=cache, n_new=only_i.long())[i], batch[i])


@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_for_rows_of_different_lengths(model):
    cache = model.new_cache(len(PROMPTS), 64)
    prefill(model, cache, PROMPTS)
    assert cache.lengths.tolist() == [len(p) for p in PROMPTS]
    step = model(torch.tensor([[9]] * len(PROMPTS)), cache=cache)
    for i, p in enumerate(PROMPTS):
        full = model(torch.tensor([p + [9]]))[:, -1:]
        torch.testing.assert_close(step[i:i + 1], full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_rows_without_a_new_token_neither_attend_nor_grow(model):
    cache = model.new_cache(3, 64)
    prefill(model, cache, PROMPTS[:3])
    before = cache.lengths.clone()
    model(torch.tensor([[9], [9], [9]]), cache=cache, n_new=torch.tensor([1, 0, 1]))
    assert (cache.lengths - before).tolist() == [1, 0, 1]


@torch.no_grad()
def test_a_row_view_writes_into_the_whole_cache_and_reset_empties_it(model):
    cache = model.new_cache(2, 32)
    view = cache.rows(1, 2)
    model(torch.tensor([[1, 2, 3]]), cache=view)
    assert cache.lengths.tolist() == [0, 3] and cache.k[:, 1, :, :3].abs().sum() > 0
    view.reset()
    assert cache.lengths.tolist() == [0, 0]


def test_a_full_cache_is_refused(model):
    cache = model.new_cache(1, 8)
    model(torch.tensor([[1] * 8]), cache=cache)
    with pytest.raises(ValueError, match="KV cache is full: 9 positions needed, 8 allocated"):
        model(torch.tensor([[1]]), cache=cache)


def test_key_spans_cover_the_keys_in_multiples_of_64():
    assert [key_span(n) for n in (1, 64, 65, 600)] == [64, 64, 128, 640]


def test_a_flamingo_cache_refuses_more_images_than_it_has_room_for():
    from kosmo.model.flamingo import Flamingo, FlamingoConfig
    from kosmo.model.vision import VisionConfig
    from kosmo.tokenizer import IMAGE, IMAGE_END
    lm = LM(LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    cfg = FlamingoConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
                         lm=lm.cfg, latents=4, resampler_heads=2, xattn_heads=4)
    model = Flamingo(cfg, lm=lm).eval()
    ids = torch.tensor([[1, IMAGE, IMAGE_END, IMAGE, IMAGE_END, 5]])
    with pytest.raises(ValueError, match="8 visual tokens in a row but the cache has room for 4"):
        model(ids, torch.randn(2, 3, 16, 16), cache=model.new_cache(1, 16, max_images=1))
    cache = model.new_cache(1, 16, max_images=2)
    model(ids, torch.randn(2, 3, 16, 16), cache=cache)
    with pytest.raises(ValueError, match="images must all come with the first chunk"):
        model(torch.tensor([[IMAGE]]), torch.randn(1, 3, 16, 16), cache=cache)
