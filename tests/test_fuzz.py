"""Schemathesis fuzzes the OpenAPI schema the server publishes, every operation, with bodies that follow the
schema and bodies that break it, against a tiny random model that sees, hears and draws: no request may get
a 5xx. A short run is in the default suite, a longer one in the slow suite."""

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from serve_helpers import DRAWS, HEARS_SECONDS, IMAGE_SIZE

from kosmo.data.world import World
from kosmo.model.audio import AudioConfig
from kosmo.model.lm import LMConfig
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.model.vqvae import VQVAE, VQVAEConfig
from kosmo.serve.api import create_app
from kosmo.serve.engine import Engine
from kosmo.tokenizer import Tokenizer
from kosmo.train.mllm import with_image_tokenizer

# short contexts keep every accepted request quick: the fuzzer's max_tokens defaults to the room left
CONTEXT = 48
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def tiny_engine() -> tuple[Engine, Tokenizer]:
    """A started engine over a random model that sees, hears and draws, with its tokenizer."""
    tok = Tokenizer.train((World().text(i, "train") for i in range(100)), vocab_size=300)
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=CONTEXT)
    vision = VisionConfig(image_size=IMAGE_SIZE, patch_size=8, dim=16, n_layers=1, n_heads=2, mlp_dim=32)
    audio = AudioConfig(dim=16, n_layers=1, n_heads=2, mlp_dim=32, max_frames=HEARS_SECONDS * 100)
    coder = VQVAE(VQVAEConfig(image_size=DRAWS, downsample=4, channels=16, n_res_blocks=1, codebook_size=16,
                              code_dim=4))
    model = with_image_tokenizer(MLLM(MLLMConfig(vision=vision, lm=lm, audio=audio)), coder).eval()
    return Engine(model, tok, max_batch=4, max_queue=16, precision="fp32").start(), tok


@pytest.fixture(scope="module")
def app():
    engine, tok = tiny_engine()
    yield create_app(engine, tok, "tiny")
    engine.stop()


@pytest.fixture(scope="module")
def api(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def fuzz(api, examples: int):
    """`examples` cases of every operation, half following the schema and half breaking it (where an operation
    takes anything to break); fails with the smallest case that got a 5xx."""
    for operation in api.get_all_operations():
        operation = operation.ok()
        modes = [operation.as_strategy(GenerationMode.POSITIVE)]
        if operation.body or operation.query:
            modes.append(operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=st.one_of(modes))
        @settings(max_examples=examples, **FUZZ)
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()


def test_the_schema_describes_every_request_body(app):
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/images/generations"):
        assert "application/json" in paths[path]["post"]["requestBody"]["content"], path
    assert "file" in paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"]["required"]


def test_no_request_gets_a_server_error(api):
    fuzz(api, examples=12)


@pytest.mark.slow
def test_no_request_gets_a_server_error_long_run(api):
    fuzz(api, examples=300)
