"""Checks that need a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them): the LM on the GPU
computes what it computes on the CPU, its KV-cached decoding is the uncached one, training in bf16 learns,
and the serving engine gives each greedy request the tokens it gets alone."""

import queue

import pytest
import torch
from serve_helpers import Letters

from kosmo.generate import Sampling, generate_ids
from kosmo.model.lm import LM, LMConfig
from kosmo.serve.engine import Engine, Params, Request

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66], [1, 7]]


def tiny_lm() -> LM:
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
                       init_std=0.1)).eval()


def test_the_gpu_computes_the_cpus_logits():
    model = tiny_lm()
    idx = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(idx)
        gpu = model.to(CUDA)(idx.to(CUDA)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_cached_decoding_on_the_gpu_is_the_uncached_one():
    model = tiny_lm().to(CUDA)
    s = Sampling(max_new_tokens=12)
    cached, _, la = generate_ids(model, PROMPTS, s, stop_ids=(), return_logits=True)
    uncached, _, lb = generate_ids(model, PROMPTS, s, stop_ids=(), use_cache=False, return_logits=True)
    assert cached == uncached
    for a, b in zip(la, lb):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bf16_training_on_the_gpu_learns_a_batch():
    model = tiny_lm().to(CUDA).train()
    rows = torch.randint(0, 128, (8, 33), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", torch.bfloat16):
            logits = model(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_engine_on_the_gpu_gives_each_request_its_tokens_alone(precision):
    engine = Engine(tiny_lm().to(CUDA), Letters(), max_batch=4, precision=precision).start()
    params = Params(max_tokens=16, temperature=0)
    try:
        def run(prompts):
            events = queue.Queue()
            for i, p in enumerate(prompts):
                engine.submit(Request(p, params, lambda e, i=i: events.put((i, e))))
            out, done = [[] for _ in prompts], 0
            while done < len(prompts):
                i, e = events.get(timeout=60)
                assert not isinstance(e, Exception), e
                out[i].append(e.token)
                done += e.finish is not None
            return out
        alone = [run([p])[0] for p in PROMPTS]
        together = run(PROMPTS)
    finally:
        engine.stop()
    assert together == alone
