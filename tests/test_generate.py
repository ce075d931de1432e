"""Decoding: the KV cache changes nothing, padding changes nothing, sampling options behave."""

import copy

import pytest
import torch

from kosmo.generate import Sampling, filter_logits, generate, generate_ids
from kosmo.model.lm import LM, LMConfig


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "smeared_keys"])
def model(request):
    """Every decoding test runs on a plain model and on one with smeared keys, which carry a key across steps."""
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                       init_std=0.1, smear_keys=request.param)).eval()


PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51], [1, 60, 61, 62, 63, 64]]


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=20),
                                      Sampling(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=3)])
def test_cached_and_uncached_decoding_agree(model, sampling):
    a, _, la = generate_ids(model, PROMPTS, sampling, stop_ids=(), use_cache=True, return_logits=True)
    b, _, lb = generate_ids(model, PROMPTS, sampling, stop_ids=(), use_cache=False, return_logits=True)
    assert a == b
    assert len(la) == 20
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_batched_prompts_of_different_lengths_match_one_by_one(model):
    batched, _, lb = generate_ids(model, PROMPTS, Sampling(max_new_tokens=12), stop_ids=(), return_logits=True)
    for i, p in enumerate(PROMPTS):
        alone, _, la = generate_ids(model, [p], Sampling(max_new_tokens=12), stop_ids=(), return_logits=True)
        assert alone[0] == batched[i]
        torch.testing.assert_close(la[0][0], lb[0][i], atol=1e-5, rtol=0)


def test_seed_reproduces_and_changes_samples(model):
    s = dict(max_new_tokens=16, temperature=1.5)
    a = generate_ids(model, PROMPTS, Sampling(**s, seed=1), stop_ids=())[0]
    b = generate_ids(model, PROMPTS, Sampling(**s, seed=1), stop_ids=())[0]
    c = generate_ids(model, PROMPTS, Sampling(**s, seed=2), stop_ids=())[0]
    assert a == b and a != c


def test_stop_token_and_max_tokens(model):
    greedy, _ = generate_ids(model, PROMPTS[:1], Sampling(max_new_tokens=10), stop_ids=())
    stop_at = greedy[0][3]
    out, reasons = generate_ids(model, PROMPTS[:1], Sampling(max_new_tokens=10), stop_ids=(stop_at,))
    assert out[0] == greedy[0][:greedy[0].index(stop_at)] and reasons == ["stop"]
    assert generate_ids(model, PROMPTS[:1], Sampling(max_new_tokens=10), stop_ids=())[1] == ["length"]


def test_stop_strings_cut_the_text(model):
    class CharTok:  # each id decodes to one letter, so stop strings are easy to place
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)
    tok = CharTok()
    full = generate(model, tok, PROMPTS[:1], Sampling(max_new_tokens=12), stop_ids=())[0]
    stop = full.text[4:6]
    cut = generate(model, tok, PROMPTS[:1], Sampling(max_new_tokens=12, stop=[stop]), stop_ids=())[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert len(cut.tokens) < len(full.tokens)


def test_top_k_and_top_p_filter_the_right_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = filter_logits(logits, Sampling(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = filter_logits(logits, Sampling(temperature=1.0, top_p=0.8)).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]] and probs[0] < 0.8 < probs[:2].sum()


@pytest.mark.parametrize("temperature", [1e-300, 2e-38])
def test_a_temperature_near_zero_samples_the_likeliest_token(temperature):
    """fp32 holds 1e-300 as 0, and 31 / 2e-38 overflows to inf; either way the sampler must pick the top token."""
    from kosmo.generate import next_tokens
    logits = torch.full((2, 300), -40.0)
    logits[0, [40, 41, 42, 43]] = torch.tensor([30.0, 2.0, 31.0, float("-inf")])
    logits[1, [40, 41, 42]] = torch.tensor([-5.0, -1.0, -3.0])
    tokens = next_tokens(logits, Sampling(temperature=temperature, top_p=0.9), torch.Generator().manual_seed(0))
    assert tokens.tolist() == [42, 41]


def test_prompt_beyond_context_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the context"):
        generate_ids(model, [[1] * 120], Sampling(max_new_tokens=20))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_placeholders_and_padding_are_never_written(temperature):
    """Logits that put <|audio_pad|>, <|image_pad|> and <pad> far on top still give a word: those ids stand for
    embeddings and padding, and a written one would claim a clip or picture nobody gave."""
    from kosmo.generate import next_tokens
    from kosmo.tokenizer import AUDIO_PAD, IMAGE_PAD, PAD
    logits = torch.zeros(64, 300)
    logits[:, [PAD, IMAGE_PAD, AUDIO_PAD]] = 50.0
    logits[:, 40] = 1.0
    tokens = next_tokens(logits, Sampling(temperature=temperature), torch.Generator().manual_seed(0))
    assert not {PAD, IMAGE_PAD, AUDIO_PAD} & set(tokens.tolist())
    assert temperature or set(tokens.tolist()) == {40}


def test_a_static_cache_gives_the_dynamic_caches_logits_bit_for_bit(model):
    """The compiled decode's cache attends over its whole room, each row masked to its own keys; a masked key
    adds an exact zero, so without the compiler its numbers are the dynamic cache's exactly."""
    s = Sampling(max_new_tokens=12)
    a, _, la = generate_ids(model, PROMPTS, s, stop_ids=(), return_logits=True)
    cache = model.new_cache(len(PROMPTS), 128, static=True)
    assert cache.static and cache.k.shape[3] == 128
    import kosmo.generate as g
    original = model.new_cache
    try:  # the eager loop over a static cache
        model.new_cache = lambda *args, **kw: original(*args, **{**kw, "static": True})
        b, _, lb = generate_ids(model, PROMPTS, s, stop_ids=(), return_logits=True)
    finally:
        del model.new_cache
    assert a == b and g.COMPILED_ROOM % 64 == 0
    for x, y in zip(la, lb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("step_name", ["decode_logits", "decode_greedy"])
def test_a_decode_step_over_a_static_cache_is_one_graph_that_never_recompiles(model, step_name):
    """What `generate_ids(compile=True)` relies on: no graph break and no host sync inside a decode step (the
    greedy one choosing its tokens too), and the same graph at every length (checked with the eager backend,
    which traces as inductor does)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    import kosmo.generate as g
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(getattr(g, step_name), backend=counter, fullgraph=True, dynamic=False)
    cache = model.new_cache(len(PROMPTS), 64, static=True)
    idx, lengths = g.right_pad(PROMPTS, "cpu")
    with torch.no_grad():
        tok = g.prefill(model, idx, lengths, cache).argmax(-1)
        for _ in range(6):
            out = step(model, cache, tok)
            tok = out if step_name == "decode_greedy" else out.argmax(-1)
    assert counter.frame_count == 1 and counter.op_count > 0
    assert cache.lengths.tolist() == [len(p) + 6 for p in PROMPTS]


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens(model):
    s = Sampling(max_new_tokens=16)
    eager, _, la = generate_ids(model, PROMPTS, s, stop_ids=(), return_logits=True)
    compiled, _, lb = generate_ids(model, PROMPTS, s, stop_ids=(), return_logits=True, compile=True)
    assert compiled == eager
    # without logits asked for, the compiled step chooses the greedy tokens itself
    assert generate_ids(model, PROMPTS, s, stop_ids=(), compile=True)[0] == eager
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    # a second model of the same shape is compiled for its own frozen weights: the guards checked at each
    # loop's first step tell the two apart, though the loop's later steps skip them
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mine = generate_ids(other, PROMPTS, s, stop_ids=())[0]
    assert mine != eager and generate_ids(other, PROMPTS, s, stop_ids=(), compile=True)[0] == mine
    assert generate_ids(model, PROMPTS, s, stop_ids=(), compile=True)[0] == eager

