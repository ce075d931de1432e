"""The engine's prefix cache and batch shapes: a shared system prompt computed once, the same bits with the
prefix cached or not, eviction within the budget, no reuse across different prefixes (a colliding hash
included), prompts with images left out, and bucketed decode steps."""

import queue

import pytest
import torch
from serve_helpers import Letters

from kosmo.generate import Sampling, generate_ids
from kosmo.model.lm import LM, LMConfig
from kosmo.serve import prefix_cache
from kosmo.serve.engine import Engine, Params, Request, bucket


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "smeared_keys"])
def model(request):
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                       init_std=0.1, smear_keys=request.param)).eval()


g = torch.Generator().manual_seed(0)
SYSTEM = [1, *torch.randint(20, 120, (140,), generator=g).tolist()]  # two whole blocks of 64 and a part
QUESTIONS = [torch.randint(20, 120, (n,), generator=g).tolist() for n in (5, 9, 30)]


def shifted(ids):
    """Other text tokens, each one's neighbour."""
    return [20 + (t - 19) % 100 for t in ids]


PARAMS = Params(max_tokens=8, temperature=0, logprobs=0)


def run_one(engine, prompt, images=None):
    """(token, logprob) of every event of one request, run to its end."""
    events = queue.Queue()
    engine.submit(Request(prompt, PARAMS, events.put, images))
    out = []
    while not out or out[-1][2] is None:
        e = events.get(timeout=30)
        if isinstance(e, Exception):
            raise e
        out.append((e.token, e.logprob, e.finish))
    return [(t, lp) for t, lp, _ in out]


def run_each(prompts, **engine_options):
    engine = Engine(prompts[0][0], Letters(), max_batch=2, precision="fp32", **engine_options).start()
    try:
        return [run_one(engine, p, *rest) for _, p, *rest in prompts], engine
    finally:
        engine.stop()


def test_a_shared_system_prompt_is_computed_once_with_the_same_bits_as_uncached(model):
    prompts = [SYSTEM + q for q in QUESTIONS]
    warm, engine = run_each([(model, p) for p in prompts])
    assert engine.prefix.hit_tokens == 2 * 128  # the second and third prompts copy the system prompt's blocks
    for p, got in zip(prompts, warm):
        (cold,), fresh = run_each([(model, p)])
        assert fresh.prefix.hit_tokens == 0
        assert got == cold  # tokens and log-probabilities, to the bit
        (off,), _ = run_each([(model, p)], prefix_cache_tokens=0)
        assert [t for t, _ in off] == [t for t, _ in got]
        torch.testing.assert_close([lp for _, lp in off], [lp for _, lp in got], atol=1e-5, rtol=0)
        ref, _ = generate_ids(model, [p], Sampling(max_new_tokens=8))
        assert [t for t, _ in got][:len(ref[0])] == ref[0]


def test_a_whole_cached_prompt_still_computes_its_last_token(model):
    prompt = SYSTEM[:128]
    (first, second), engine = run_each([(model, prompt), (model, prompt)])
    assert engine.prefix.hit_tokens == 64  # the second block holds the last token, which must give logits
    assert first == second


def test_prompts_that_part_after_the_first_block_share_only_that_block(model):
    other = SYSTEM[:64] + shifted(SYSTEM[64:])
    (_, got), engine = run_each([(model, SYSTEM + QUESTIONS[0]), (model, other + QUESTIONS[0])])
    assert engine.prefix.hit_tokens == 64
    assert got == run_each([(model, other + QUESTIONS[0])])[0][0]


def test_a_colliding_hash_is_never_taken_for_another_prefix(model, monkeypatch):
    # a block's key now knows only its first token, not its other tokens nor the blocks before it
    monkeypatch.setattr(prefix_cache, "chain_key", lambda parent, tokens: hash(tokens[:1]))
    a = SYSTEM
    b = SYSTEM[:1] + shifted(SYSTEM[1:64]) + SYSTEM[64:]  # its first block's key is a's
    prompts = [a + QUESTIONS[0], b + QUESTIONS[0], b + QUESTIONS[1], a + QUESTIONS[1]]
    got, engine = run_each([(model, p) for p in prompts])
    # b's second block equals a's, with the same key, but follows another block: b reuses nothing of a, then
    # its own two blocks; a then finds b's first block under its key and reuses nothing
    assert engine.prefix.hit_tokens == 128
    for p, out in zip(prompts, got):
        assert out == run_each([(model, p)])[0][0]


def test_the_pool_keeps_within_its_budget_evicting_the_least_recently_used(model):
    a, b = SYSTEM, shifted(SYSTEM)
    engine = Engine(model, Letters(), max_batch=1, precision="fp32", prefix_cache_tokens=128).start()
    try:
        run_one(engine, a + QUESTIONS[0])
        assert len(engine.prefix.blocks) == 2 and not engine.prefix.free
        run_one(engine, b + QUESTIONS[0])  # b's two blocks take the places of a's
        assert len(engine.prefix.blocks) == 2
        run_one(engine, b + QUESTIONS[1])
        assert engine.prefix.hit_tokens == 128
        run_one(engine, a + QUESTIONS[1])
        assert engine.prefix.hit_tokens == 128  # a was evicted
        # a prompt longer than the pool keeps its start, and after it gets the same bits as before
        c = shifted(b)
        long = c + c[:60]  # three whole blocks
        cold = run_one(engine, long)
        assert engine.prefix.hit_tokens == 128
        assert len(engine.prefix.match(long)) == 2
        assert run_one(engine, long) == cold and engine.prefix.hit_tokens == 256
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="blocks of 64 tokens: give it 0 .off. or at least 64 tokens, not 10"):
        Engine(model, Letters(), prefix_cache_tokens=10)


def test_prompts_with_images_neither_use_nor_fill_the_prefix_cache():
    from kosmo.data.chat import image_block
    from kosmo.model.mllm import MLLM, MLLMConfig
    from kosmo.model.vision import VisionConfig
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                                 init_std=0.1))
    model = MLLM(cfg).eval()
    pictured = SYSTEM + image_block(cfg.tokens_per_image) + QUESTIONS[0]
    image = torch.randn(1, 3, 16, 16)
    out, engine = run_each([(model, SYSTEM + QUESTIONS[1]), (model, pictured, image), (model, pictured, image),
                            (model, SYSTEM + QUESTIONS[2])])
    assert engine.prefix.hit_tokens == 128  # the last text prompt only
    ref, _ = generate_ids(model, [pictured], Sampling(max_new_tokens=8), images=image)
    assert out[1] == out[2] and [t for t, _ in out[1]][:len(ref[0])] == ref[0]


def test_bucketed_steps_decode_like_generate_ids_alone_and_beside_others(model):
    prompts = [SYSTEM[:9], SYSTEM[:3] + QUESTIONS[0], QUESTIONS[1], QUESTIONS[2][:7], [1, 7]]
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    engine = Engine(model, Letters(), max_batch=3, precision="fp32", batch_shapes="bucketed")
    rows, decode = [], engine._decode
    engine._decode = lambda tokens, active: rows.append(len(tokens)) or decode(tokens, active)
    engine.start()
    events = queue.Queue()
    try:
        run_one(engine, prompts[0])
        assert set(rows) == {1}  # a lone request decodes in a batch of one
        for i, p in enumerate(prompts):
            engine.submit(Request(p, Params(max_tokens=8, temperature=0), lambda e, i=i: events.put((i, e))))
        out, done = [[] for _ in prompts], 0
        while done < len(prompts):
            i, e = events.get(timeout=30)
            out[i].append(e.token)
            done += e.finish is not None
    finally:
        engine.stop()
    assert max(rows) == 3
    for p, tokens in zip(prompts, out):
        ref, _ = generate_ids(model, [p], Sampling(max_new_tokens=8))
        assert tokens[:len(ref[0])] == ref[0]
    with pytest.raises(ValueError, match="batch_shapes must be one of full, bucketed, not 'fixed'"):
        Engine(model, Letters(), batch_shapes="fixed")


def test_serve_refuses_a_prefix_cache_smaller_than_one_block(tmp_path, capsys):
    from kosmo.cli import main
    assert main(["serve", "--model", str(tmp_path), "--prefix-cache-tokens", "10"]) == 2
    assert capsys.readouterr().err == "kosmo: error: --prefix-cache-tokens must be 0 (off) or at least one block " \
                                      "of 64, got 10\n"
