"""Memory that does not grow with T x V: the loss over chunks of targets, prefill in chunks of the prompt."""

import pytest
import torch

from kosmo.generate import Sampling, generate_ids, prefill_spans
from kosmo.model.lm import LM, LMConfig
from kosmo.tokenizer import IMAGE_PAD
from kosmo.train.lm import token_loss


def tiny_lm(smear_keys=False) -> LM:
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                       init_std=0.1, smear_keys=smear_keys))


def tiny_mllm():
    from kosmo.model.mllm import MLLM, MLLMConfig
    from kosmo.model.vision import VisionConfig
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                 init_std=0.1))
    return MLLM(cfg)


def loss_and_grads(model, batch, **kw):
    model.zero_grad()
    loss = token_loss(model, batch, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_chunked_loss_equals_whole(model, batch, **inputs):
    n = int((batch["labels"] != -100).sum())
    whole, whole_grads = loss_and_grads(model, batch, **inputs)
    chunked, chunked_grads = loss_and_grads(model, batch, loss_chunk=7, **inputs)
    assert n > 2 * 7  # several chunks, the last a partial one
    torch.testing.assert_close(chunked, whole)
    assert chunked_grads.keys() == whole_grads.keys() and len(whole_grads) > 0
    for name, g in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, msg=name)


def test_chunked_loss_and_gradients_equal_the_whole_on_a_text_lm():
    model = tiny_lm()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (2, 24), generator=g)
    labels = torch.randint(3, 120, (2, 24), generator=g)
    labels[0, :5] = labels[1, 10:13] = -100  # prompt positions are skipped in both
    assert_chunked_loss_equals_whole(model, {"input": ids, "labels": labels})


def test_chunked_loss_and_gradients_equal_the_whole_on_an_mllm_batch():
    from kosmo.data.chat import image_block
    model = tiny_mllm()
    block = image_block(model.tokens_per_image)
    rows = [[1, *block, *range(40, 52)], [1, *range(60, 66), *block, *range(70, 76)]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.roll(ids, -1, 1)
    labels[(ids == 0) | (labels == 0) | (labels == IMAGE_PAD) | (ids == IMAGE_PAD)] = -100
    batch = {"input": ids, "labels": labels}
    assert_chunked_loss_equals_whole(model, batch, images=torch.randn(2, 3, 16, 16))


def test_prefill_spans_keep_images_in_the_first_chunk():
    ids = torch.tensor([[1, 50, 50, IMAGE_PAD, IMAGE_PAD, 50, 50, 50, 50, 50, 50]])
    assert prefill_spans(ids, None) == [(0, 11)]
    assert prefill_spans(ids, 20) == [(0, 11)]
    assert prefill_spans(ids, 3) == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert prefill_spans(ids, 3, media=True) == [(0, 5), (5, 8), (8, 11)]


def assert_chunked_prefill_decodes_like_whole(model, prompts, chunk, **media):
    s = Sampling(max_new_tokens=10)
    whole, reasons, whole_logits = generate_ids(model, prompts, s, return_logits=True, **media)
    chunked, chunked_reasons, chunked_logits = generate_ids(model, prompts, s, return_logits=True,
                                                            prefill_chunk=chunk, **media)
    assert chunked == whole and chunked_reasons == reasons
    assert len(chunked_logits) == len(whole_logits)
    for a, b in zip(chunked_logits, whole_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("smear_keys", [False, True], ids=["plain", "smeared_keys"])
def test_chunked_prefill_decodes_like_one_forward_alone_and_ragged(smear_keys):
    model = tiny_lm(smear_keys).eval()
    g = torch.Generator().manual_seed(2)
    long = [1, *torch.randint(3, 120, (45,), generator=g).tolist()]
    assert_chunked_prefill_decodes_like_whole(model, [long], chunk=8)
    # rows that end in different chunks, one inside the first
    ragged = [long, long[:13], [1, 7, 8], long[5:30]]
    assert_chunked_prefill_decodes_like_whole(model, ragged, chunk=8)


def test_chunked_prefill_of_an_mllm_sends_the_images_with_the_first_chunk():
    from kosmo.data.chat import image_block
    model = tiny_mllm().eval()
    block = image_block(model.tokens_per_image)
    prompts = [[1, 40, *block, *range(41, 70)], [1, *range(50, 60), *block, 61]]
    assert_chunked_prefill_decodes_like_whole(model, prompts, chunk=4, images=torch.randn(2, 3, 16, 16))


def test_the_engine_prefills_long_prompts_in_chunks_like_generate_ids():
    import queue

    from serve_helpers import Letters

    from kosmo.serve.engine import Engine, Params, Request

    model = tiny_lm(smear_keys=True).eval()
    prompts = [[1, *range(30, 70)], [1, 25, 26], [1, *range(80, 100)]]
    engine = Engine(model, Letters(), max_batch=2, precision="fp32", prefill_chunk=8).start()
    events = queue.Queue()
    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(p, Params(max_tokens=10, temperature=0), lambda e, i=i: events.put((i, e))))
        out, done = [[] for _ in prompts], 0
        while done < len(prompts):
            i, e = events.get(timeout=30)
            out[i].append(e)
            done += e.finish is not None
    finally:
        engine.stop()
    for p, evs in zip(prompts, out):
        ref, _ = generate_ids(model, [p], Sampling(max_new_tokens=10))
        assert [e.token for e in evs][:len(ref[0])] == ref[0]


@pytest.mark.parametrize("chunk", [7, 4096])
def test_fused_head_and_loss_equal_the_plain_cross_entropy_of_the_logits(chunk):
    from kosmo.model.linear_ce import linear_cross_entropy
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, 50, (40,), generator=g)
    labels[3] = labels[20] = -100
    plain = torch.nn.functional.cross_entropy(h @ weight.T, labels, reduction="sum")
    expected = torch.autograd.grad(plain * 0.3, (h, weight))
    fused = linear_cross_entropy(h, weight, labels, chunk)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    for got, want in zip(torch.autograd.grad(fused * 0.3, (h, weight)), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # a frozen head gets no gradient, and a loss without grad computes none
    assert torch.autograd.grad(linear_cross_entropy(h, weight.detach(), labels, chunk), h)[0].shape == h.shape
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, weight, labels, chunk), plain, rtol=1e-6, atol=1e-5)


def test_fused_loss_under_bf16_autocast_matches_the_autocast_logits():
    from kosmo.model.linear_ce import linear_cross_entropy
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = (torch.randn(100, 32, generator=g) * 0.2).requires_grad_()
    labels = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.cross_entropy((h @ weight.T).float(), labels, reduction="sum")
        fused = linear_cross_entropy(h, weight, labels, 16)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for got, want in zip(torch.autograd.grad(fused, (h, weight)), torch.autograd.grad(plain, (h, weight))):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
