"""The serving engine and media policy in-process: parity with `generate_ids`, cancellation (also by a
client that hangs up), a full queue, stop strings in streamed text, and remote image fetching that never
reaches a private address."""

import asyncio
import queue
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from serve_helpers import Letters, free_port, open_ears, png_bytes

from kosmo.generate import Sampling, generate_ids
from kosmo.model.lm import LM, LMConfig
from kosmo.serve.api import create_app
from kosmo.serve.engine import Engine, Params, QueueFull, Request, TextStream
from kosmo.serve.media import MediaError, MediaPolicy, fetch


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "smeared_keys"])
def model(request):
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                       init_std=0.1, smear_keys=request.param)).eval()


PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51], [1, 60, 61, 62, 63, 64], [1, 7, 8], [1, 30, 31]]


def collect(engine, prompts, params, images=None, audio=None):
    """Submits every prompt (with its images and clips) at once; each one's events, in order."""
    events = queue.Queue()
    for i, (p, im, au) in enumerate(zip(prompts, images or [None] * len(prompts), audio or [None] * len(prompts))):
        engine.submit(Request(p, params, lambda e, i=i: events.put((i, e)), im, au))
    out, done = [[] for _ in prompts], 0
    while done < len(prompts):
        i, e = events.get(timeout=30)
        out[i].append(e)
        done += e.finish is not None
    return out


@pytest.mark.parametrize("max_batch", [1, 2])
def test_engine_decodes_like_generate_ids_with_more_prompts_than_slots(model, max_batch):
    engine = Engine(model, Letters(), max_batch=max_batch, precision="fp32").start()  # generate_ids' own
    try:
        events = collect(engine, PROMPTS, Params(max_tokens=16, temperature=0))
    finally:
        engine.stop()
    for p, evs in zip(PROMPTS, events):
        ref, reasons = generate_ids(model, [p], Sampling(max_new_tokens=16))
        tokens = [e.token for e in evs]
        assert tokens[:len(ref[0])] == ref[0]
        assert evs[-1].finish == reasons[0]
        assert "".join(e.text for e in evs) == Letters().decode(ref[0])


def assert_engine_decodes_like_generate_ids(model, prompts, images, audio=None):
    """Three requests with pictures (or clips) or none through two slots: each alone, then beside another."""
    engine = Engine(model, Letters(), max_batch=2, precision="fp32").start()
    audio = audio or [None] * len(prompts)
    try:
        out = collect(engine, prompts, Params(max_tokens=12, temperature=0), images, audio)
    finally:
        engine.stop()
    for p, im, au, evs in zip(prompts, images, audio, out):
        ref, _ = generate_ids(model, [p], Sampling(max_new_tokens=12), images=im, audio=au)
        assert [e.token for e in evs][:len(ref[0])] == ref[0]


@pytest.mark.parametrize("attend,smear_keys", [("latest", False), ("previous", False), ("latest", True)])
def test_a_flamingo_model_decodes_like_generate_ids_alone_and_beside_others(attend, smear_keys):
    from kosmo.model.flamingo import Flamingo, FlamingoConfig
    from kosmo.model.vision import VisionConfig
    from kosmo.tokenizer import IMAGE, IMAGE_END
    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.1,
                     smear_keys=smear_keys))
    cfg = FlamingoConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
                         lm=lm.cfg, latents=4, resampler_heads=2, xattn_heads=4, attend=attend)
    model = Flamingo(cfg, lm=lm).eval()
    for block in model.xattn.values():  # open gates, so the pictures change the answers
        torch.nn.init.constant_(block.attn_gate, 1.0)
        torch.nn.init.constant_(block.ffw_gate, 1.0)
    prompts = [[1, IMAGE, IMAGE_END, 40, 41, IMAGE, IMAGE_END, 42], [1, 50, 51], [1, 60, IMAGE, IMAGE_END, 61]]
    images = [torch.randn(2, 3, 16, 16), None, torch.randn(1, 3, 16, 16)]
    assert_engine_decodes_like_generate_ids(model, prompts, images)
    alone, _ = generate_ids(model, [prompts[0]], Sampling(max_new_tokens=12), images=images[0])
    other, _ = generate_ids(model, [prompts[0]], Sampling(max_new_tokens=12), images=torch.randn(2, 3, 16, 16))
    assert alone != other  # the pictures matter, so the parity above covers the cross-attention


def test_a_kosmos_model_decodes_like_generate_ids_alone_and_beside_others():
    from kosmo.data.chat import image_block
    from kosmo.model.mllm import MLLM, MLLMConfig
    from kosmo.model.vision import VisionConfig
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                 init_std=0.1))
    model = MLLM(cfg).eval()
    block = image_block(cfg.tokens_per_image)
    prompts = [[1, *block, 40, 41, *block, 42], [1, 50, 51], [1, 60, *block, 61]]
    images = [torch.randn(2, 3, 16, 16), None, torch.randn(1, 3, 16, 16)]
    assert_engine_decodes_like_generate_ids(model, prompts, images)


def test_a_hearing_model_decodes_like_generate_ids_alone_and_beside_others():
    from kosmo.data.audio import batch_clips
    from kosmo.data.chat import audio_block, image_block
    from kosmo.model.audio import AudioConfig
    from kosmo.model.mllm import MLLM, MLLMConfig
    from kosmo.model.vision import VisionConfig
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                 init_std=0.1),
                     audio=AudioConfig(dim=32, n_layers=1, n_heads=2, mlp_dim=64, max_frames=200))
    model = open_ears(MLLM(cfg)).eval()
    mels = [torch.randn(80, 120), torch.randn(80, 37), torch.randn(80, 200)]
    spoken = [audio_block(model.audio_tokens(m.shape[-1])) for m in mels]
    # two clips of different lengths and a picture; text alone; the longest clip the model hears
    prompts = [[1, *spoken[0], 40, *image_block(cfg.tokens_per_image), *spoken[1], 41], [1, 50, 51],
               [1, *spoken[2], 61]]
    audio = [batch_clips(mels[:2]), None, batch_clips(mels[2:])]
    assert_engine_decodes_like_generate_ids(model, prompts, [torch.randn(1, 3, 16, 16), None, None], audio)
    with torch.no_grad():
        heard = model(torch.tensor([prompts[2]]), audio=audio[2])[0, -1]
        other = model(torch.tensor([prompts[2]]), audio=batch_clips([torch.randn(80, 200)]))[0, -1]
    assert (heard - other).abs().max() > 1  # the clip matters, so the parity above covers the audio path


def test_a_cancelled_request_frees_its_slot_and_hears_no_more(model):
    engine = Engine(model, Letters(), max_batch=1).start()
    events = queue.Queue()
    first = Request(PROMPTS[0], Params(max_tokens=100, temperature=1.0, seed=0), events.put)
    try:
        engine.submit(first)
        events.get(timeout=30)
        first.cancel()
        # the only slot goes to the next request long before the first could have used its 100 tokens
        second = collect(engine, [PROMPTS[1]], Params(max_tokens=3, temperature=0))[0]
        assert len(second) <= 3 and second[-1].finish
        assert events.qsize() < 100
        assert engine.running == 0
    finally:
        engine.stop()


def test_a_full_queue_answers_429_and_a_stopped_engine_503_at_once(model):
    engine = Engine(model, Letters(), max_queue=1)  # not started: nothing leaves the queue
    engine.submit(Request([1, 2], Params(max_tokens=1), print))
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], Params(max_tokens=1), print))
    client = TestClient(create_app(engine, Letters(), "m"))
    request = {"prompt": "", "max_tokens": 2}
    assert client.post("/v1/completions", json=request).status_code == 503
    assert client.get("/health").status_code == 503
    engine = Engine(model, Letters(), max_queue=0).start()  # a queue that is always full
    try:
        r = TestClient(create_app(engine, Letters(), "m")).post("/v1/completions", json=request)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    finally:
        engine.stop()


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it():
    s = TextStream(Letters(), stop=["cde"])
    assert s.push(0) == ("a", False)
    assert s.push(1) == ("b", False)
    assert s.push(2) == ("", False)  # "c" may start "cde"
    assert s.push(3) == ("", False)
    assert s.push(4) == ("", True)  # "cde" complete: nothing of it is released
    s = TextStream(Letters(), stop=["cx"])
    assert [s.push(t) for t in (2, 3)] == [("", False), ("cd", False)]  # "c" then "d": not the stop after all
    assert s.flush() == ""


PUBLIC = {"img.example.org": ["93.184.216.34"], "evil.example.org": ["93.184.216.35"],
          "internal.example.org": ["10.0.0.7"], "mixed.example.org": ["93.184.216.36", "127.0.0.1"]}
POLICY = MediaPolicy(allowed_domains=("example.org",), max_image_bytes=10_000)


def serve_fake(request: httpx.Request) -> httpx.Response:
    """The fake internet: each pinned address answers for its own host."""
    host = request.headers["host"]
    assert PUBLIC[host][0] == request.url.host  # the connection went to the address that was checked
    if host == "evil.example.org":
        return httpx.Response(302, headers={"location": "http://internal.example.org/secret.png"})
    if request.url.path == "/big.png":
        return httpx.Response(200, content=b"\0" * 20_000)
    return httpx.Response(200, content=png_bytes())


def fetch_fake(url, policy=POLICY):
    return asyncio.run(fetch(url, policy, "image", httpx.MockTransport(serve_fake), lambda host, port: PUBLIC[host]))


def test_remote_images_come_only_from_allowed_public_hosts():
    assert fetch_fake("https://img.example.org/a.png") == png_bytes()
    refused = {
        "https://img.example.org/a.png": MediaPolicy(),  # remote fetching not enabled
        "http://internal.example.org/a.png": POLICY,  # a private address
        "http://mixed.example.org/a.png": POLICY,  # one private address among public ones
        "http://evil.example.org/a.png": POLICY,  # a public host that redirects to a private one
        "http://img.example.org.attacker.net/a.png": POLICY,  # not a subdomain of an allowed one
        "http://img.example.org/big.png": POLICY,  # over the byte cap
    }
    for url, policy in refused.items():
        with pytest.raises(MediaError) as e:
            fetch_fake(url, policy)
        assert e.value.status in (400, 413), url


def test_a_client_that_goes_away_cancels_its_requests(model):
    """Over real HTTP, with an engine that takes requests but never runs them: closing the connection, streamed
    or not, must cancel the request (which frees its slot in a running engine)."""
    engine = Engine(model, Letters())
    idle = threading.Event()
    engine.thread = threading.Thread(target=idle.wait)  # alive, so requests are accepted, but nothing runs
    engine.thread.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, Letters(), "m"), port=port, log_level="warning"))
    serving = threading.Thread(target=server.run)
    serving.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/completions"
        with httpx.stream("POST", url, json={"prompt": "ab", "max_tokens": 5, "stream": True}) as r:
            assert r.status_code == 200
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url, json={"prompt": "ab", "max_tokens": 5}, timeout=0.5)
        deadline = time.time() + 5
        while not all(r.cancelled for r in engine.waiting) and time.time() < deadline:
            time.sleep(0.05)
        assert len(engine.waiting) == 2 and all(r.cancelled for r in engine.waiting)
    finally:
        server.should_exit = True
        serving.join()
        idle.set()
