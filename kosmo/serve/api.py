"""The OpenAI-compatible HTTP API: chat and text completions (streamed or not), audio transcriptions, image
generations, models, health, and the playground page, over one continuous-batching `Engine`.

Chat messages may hold `image_url` parts and `input_audio` parts ({"data": base64, "format": "wav"}); a
transcription request is a multipart form with the clip as `file`. A clip is decoded by libsndfile (WAV,
FLAC, OGG, MP3), turned into log-mels and spliced into the prompt like a picture, as many positions as it
is long. Transcription runs the pretraining prompt `<s><audio>…</audio>`, and the model writes the rest.
An image generation draws `n` pictures of its prompt with a model that has an image tokenizer (`kosmo.draw`),
each a drawing request in the same batch as the text ones, and returns them as base64 PNGs at the model's
size or an integer multiple of it (nearest-neighbour, so every pixel stays a crisp square); `guidance_scale`,
`temperature` and `seed` are kosmo's extra fields.

Text completions take what lm-evaluation-harness's `local-completions` model sends: a prompt of text or token ids,
or a batch of either, and `echo` with `logprobs`, which scores every prompt token in one forward pass of the model
(`kosmo.serve.score`); `max_tokens` 0 then generates nothing, and the one token of `max_tokens` 1 (lm-eval's
loglikelihood request) is sampled from that same pass, as the engine would sample it. /tokenizer_info, /tokenize
and /detokenize are vLLM's tokenizer endpoints, which lm-eval's `tokenizer_backend=remote` calls.

Errors come in OpenAI's envelope, {"error": {"message", "type", "param", "code"}}: malformed JSON and
bad values (bad audio among them) are 400, values of the wrong type 422, a wrong key 401, an unknown
model 404, an oversized body or image 413, a full queue 429, an engine that is not running 503. Nothing
a client sends leads to a 500 (tests/test_fuzz.py fuzzes every operation to hold that).

The OpenAPI schema, request bodies included, is at /openapi.json, open like /health; /health also tells how
many of the engine's slots are free, which a client that hung up must not keep.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import itertools
import json
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from kosmo.data.audio import HOP_LENGTH, MAX_SECONDS, SAMPLE_RATE, Clips, batch_clips, clip_features, decode_audio_bytes
from kosmo.data.chat import JINJA_TEMPLATE, audio_block, render
from kosmo.data.images import preprocess
from kosmo.draw import DrawSampling, prompt_ids
from kosmo.errors import KosmoError
from kosmo.serve.engine import Engine, Event, Params, Picture, QueueFull, TextStream, sample_event, seeded
from kosmo.serve.engine import Request as EngineRequest
from kosmo.serve.media import MediaError, MediaPolicy, load_image
from kosmo.serve.score import Scored, Scorer
from kosmo.tokenizer import AUDIO_PAD, BOS, EOS, IMAGE_PAD, PAD, SPECIAL_TOKENS

PLAYGROUND = Path(__file__).parent / "static" / "index.html"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 2**20
    max_images: int = 4
    max_n: int = 8
    max_audio_clips: int = 4  # per chat request
    max_audio_seconds: float = MAX_SECONDS  # decoding stops here; the model may hear less at once
    max_pictures: int = 4  # pictures one image generation may ask for (its n)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request schemas (strict: a string where a number belongs is an error, not a guess)

class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ImageURL(Schema):
    url: str
    detail: str | None = None


class ImagePart(Schema):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Schema):
    data: str  # base64
    format: str  # "wav", "mp3", ...: informative only, libsndfile reads the format from the bytes


class AudioPart(Schema):
    type: Literal["input_audio"]
    input_audio: InputAudio


class Message(Schema):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]]


class StreamOptions(Schema):
    include_usage: bool = False


class Sampled(Schema):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "'stop' takes at most 4 strings", param="stop")
        return stops


class ChatRequest(Sampled):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]  # text or token ids; a list of either is a batch
    max_tokens: int | None = Field(None, ge=0)  # 0, with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)


class TokenizeRequest(Schema):
    prompt: str
    add_special_tokens: bool = True  # vLLM's meaning: <s> first
    model: str | None = None


class DetokenizeRequest(Schema):
    tokens: list[int]
    model: str | None = None


class ImageRequest(Schema):
    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    guidance_scale: float | None = None  # kosmo's: classifier-free guidance, 1 for none (default 3)
    temperature: float | None = None  # kosmo's: 0 for the likeliest code everywhere (default 1)
    seed: int | None = None  # kosmo's: picture i draws from seed + i


# The handlers read their bodies themselves (to cap the size before parsing, and to word errors OpenAI's way),
# so FastAPI cannot see them: the published schema names them here, for clients and for fuzzers.

def json_body(schema: type[Schema]) -> dict:
    ref = {"$ref": f"#/components/schemas/{schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


TRANSCRIPTION_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the clip: WAV, FLAC, OGG or MP3"},
        "model": {"type": "string"},
        "response_format": {"type": "string", "enum": ["json", "text", "verbose_json"]},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "language": {"type": "string", "description": "taken but unused"},
        "prompt": {"type": "string", "description": "taken but unused"}}}}}}}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, with the request bodies' schemas among its components."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in (ChatRequest, CompletionRequest, ImageRequest)],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


# ---- the app

def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               media: MediaPolicy = MediaPolicy(), limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="kosmo", docs_url=None, redoc_url=None)  # the schema at /openapi.json
    app.openapi = lambda: openapi_schema(app)
    created = int(time.time())
    scorer = Scorer(engine)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        # a browser asked for a password opens the playground with the key as Basic-auth password
        headers = {"WWW-Authenticate": 'Basic realm="kosmo"'} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__})", type="server_error").body(),
                            status_code=500)

    async def authorized(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":  # a browser opening the playground sends the key as a password
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except (binascii.Error, ValueError):
                given = ""
        # compare_digest takes as long whatever the first wrong byte: no timing oracle for the key
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "down", "running": engine.running, "waiting": len(engine.waiting),
                "free_slots": engine.free_slots, "max_batch": engine.max_batch, "device": str(engine.device),
                "precision": engine.precision}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/", dependencies=auth, response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text())

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kosmo", "context_length": engine.context}]}

    @app.post("/v1/chat/completions", dependencies=auth, openapi_extra=json_body(ChatRequest))
    async def chat_completions(request: Request):
        body = parse(ChatRequest, await read_body(request, limits.max_body_bytes))
        check_common(body, model_name, limits)
        if not body.messages:
            raise APIError(400, "'messages' must not be empty", param="messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        clips = await load_clips(messages, engine, limits)
        sizes = iter([engine.model.audio_tokens(c.shape[-1]) for c in clips])  # render meets the clips in order
        try:
            ids, _, refs, _ = render(messages, tokenizer, engine.model.tokens_per_image, add_generation_prompt=True,
                                     audio_tokens=lambda ref, where: next(sizes))
        except KosmoError as e:
            raise APIError(400, str(e).removeprefix("messages: "), param="messages") from None
        images = await load_images(messages, refs, engine, media, limits)
        audio = batch_clips(clips, engine.model.n_mels) if clips else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = make_params(body, ids, max_tokens, engine, (body.top_logprobs or 0) if body.logprobs else None)
        requests, events = submit(engine, [ids], [params], body.n, images, audio)
        reply = Reply(tokenizer, model_name, len(ids), body.n, chat=True)
        if body.stream:
            return streamed(reply, events, requests, body)
        return await collect(request, reply, events, requests)

    @app.post("/v1/completions", dependencies=auth, openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request):
        body = parse(CompletionRequest, await read_body(request, limits.max_body_bytes))
        check_common(body, model_name, limits)
        prompts = completion_prompts(body.prompt, tokenizer, engine)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is for scoring the prompt, with echo", param="max_tokens")
        if body.echo and body.stream:
            raise APIError(400, "echo is not served with stream", param="echo")
        if body.max_tokens == 0:
            for i, ids in enumerate(prompts):
                if len(ids) > engine.context:
                    raise APIError(400, f"prompt[{i}] is {len(ids)} tokens; this model's context is {engine.context}",
                                   code="context_length_exceeded", param="prompt")
        params = [] if body.max_tokens == 0 else [make_params(body, ids, body.max_tokens, engine, body.logprobs,
                                                              "prompt") for ids in prompts]
        if not engine.alive:
            raise APIError(503, "the generation engine is not running", code="engine_down", type="server_error")
        reply = Reply(tokenizer, model_name, sum(map(len, prompts)), len(prompts) * body.n, chat=False)
        if body.echo:
            await echo(reply, scorer, prompts, params, body, tokenizer)
            if body.max_tokens in (0, 1):
                return reply.whole()
        requests, events = submit(engine, prompts, params, body.n, None, None)
        if body.stream:
            return streamed(reply, events, requests, body)
        return await collect(request, reply, events, requests)

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        # vLLM's fields, which lm-eval's remote tokenizer reads; the chat template renders as kosmo.data.chat does
        return {"tokenizer_class": "kosmo.tokenizer.Tokenizer", "bos_token": SPECIAL_TOKENS[BOS],
                "eos_token": SPECIAL_TOKENS[EOS], "pad_token": SPECIAL_TOKENS[PAD], "chat_template": JINJA_TEMPLATE,
                "model_max_length": engine.context}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request):
        body = parse(TokenizeRequest, await read_body(request, limits.max_body_bytes))
        check_model(body.model, model_name)
        # as vLLM's Hugging Face tokenizers do, a special token's string here is that token: lm-eval finds the
        # ids of <s> and </s> by tokenizing them (the completions endpoint keeps such strings as text)
        tokens = [BOS] * body.add_special_tokens + tokenizer.encode_with_specials(body.prompt)
        return {"count": len(tokens), "max_model_len": engine.context, "tokens": tokens}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request):
        body = parse(DetokenizeRequest, await read_body(request, limits.max_body_bytes))
        check_model(body.model, model_name)
        check_ids(body.tokens, engine.model.text_vocab, "tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special=False)}

    @app.post("/v1/audio/transcriptions", dependencies=auth, openapi_extra=TRANSCRIPTION_FORM)
    async def transcriptions(request: Request):
        form = await read_form(request, limits.max_body_bytes)
        check_model(form.get("model"), model_name)
        response_format = form.get("response_format", "json")
        if response_format not in ("json", "text", "verbose_json"):
            raise APIError(400, f"response_format {response_format!r} is not supported (json, text or verbose_json)",
                           param="response_format")
        try:
            temperature = float(form.get("temperature", 0))
        except (TypeError, ValueError):  # a TypeError: sent as a file
            raise APIError(422, "temperature: must be a number", code="invalid_type", param="temperature") from None
        if not 0 <= temperature <= 2:
            raise APIError(400, "temperature must be between 0 and 2", param="temperature")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: an audio file is required", code="missing_parameter", param="file")
        if not engine.model.n_mels:
            raise APIError(400, "this model has no ears; it does not take audio", code="audio_not_supported",
                           param="file")
        clip = await asyncio.to_thread(hear, await upload.read(), "file", engine, limits)
        # `language` and `prompt` are taken but unused: the model was taught one format, the clip then its words
        ids = [BOS, *audio_block(engine.model.audio_tokens(clip.shape[-1]))]
        params = Params(max_tokens=engine.context - len(ids), temperature=temperature)
        requests, events = submit(engine, [ids], [params], 1, None, batch_clips([clip], engine.model.n_mels))
        reply = Reply(tokenizer, model_name, len(ids), 1, chat=False)
        whole = await collect(request, reply, events, requests)
        if isinstance(whole, JSONResponse):
            return whole
        text = whole["choices"][0]["text"].strip()
        if response_format == "text":
            return PlainTextResponse(text)
        usage = {"type": "tokens", "input_tokens": len(ids), "output_tokens": reply.tokens[0],
                 "total_tokens": len(ids) + reply.tokens[0]}
        if response_format == "json":
            return {"text": text, "usage": usage}
        return {"task": "transcribe", "language": form.get("language") or "unknown",
                "duration": clip.shape[-1] * HOP_LENGTH / SAMPLE_RATE, "text": text, "segments": [], "usage": usage}

    @app.post("/v1/images/generations", dependencies=auth, openapi_extra=json_body(ImageRequest))
    async def image_generations(request: Request):
        body = parse(ImageRequest, await read_body(request, limits.max_body_bytes))
        check_model(body.model, model_name)
        if engine.model.image_tokenizer is None:
            raise APIError(400, "this model cannot draw: it has no image tokenizer", code="drawing_not_supported",
                           param="model")
        n = 1 if body.n is None else body.n
        if not 1 <= n <= limits.max_pictures:
            raise APIError(400, f"n: must be between 1 and {limits.max_pictures}, got {n}", param="n")
        if body.response_format not in (None, "b64_json"):
            raise APIError(400, f"response_format: only 'b64_json' is served (this server keeps no pictures to "
                           f"link to), got {body.response_format!r}", param="response_format")
        scale = picture_scale(body.size, engine.model.image_tokenizer.cfg.image_size)
        draw = draw_sampling(body)
        try:
            ids = prompt_ids(tokenizer, body.prompt)
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        n_codes = engine.model.image_tokenizer.grid ** 2
        if len(ids) + n_codes > engine.context:
            raise APIError(400, f"prompt: {len(ids)} tokens and a picture's {n_codes} codes exceed this model's "
                           f"context of {engine.context}", code="context_length_exceeded", param="prompt")
        if draw.cfg != 1 and engine.max_batch < 2:
            raise APIError(400, "guidance_scale: a guided picture needs 2 slots and this server decodes 1 at a "
                           "time (guidance_scale 1 draws without guidance)", param="guidance_scale")
        requests, events = submit(engine, [ids], None, n, None, None, draw)
        return await collect(request, Pictures(n, scale), events, requests)

    return app


MAX_PICTURE_SIDE = 1024


def picture_scale(size: str | None, native: int) -> int:
    """How many times the model's own size `size` ("WxH"; "auto": the model's own) is, or a 400 naming the sizes
    there are."""
    if size in (None, "auto"):
        return 1
    sizes = [f"{native * k}x{native * k}" for k in range(1, max(1, MAX_PICTURE_SIDE // native) + 1)]
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if match and match[1] == match[2] and size in sizes:
        return int(match[1]) // native
    raise APIError(400, f"size: {size!r} is not a size this model draws; it draws {sizes[0]} and its multiples up "
                   f"to {sizes[-1]}: {', '.join(sizes)}", param="size")


def draw_sampling(body: ImageRequest) -> DrawSampling:
    cfg = 3.0 if body.guidance_scale is None else body.guidance_scale
    if not 1 <= cfg <= 100:
        raise APIError(400, f"guidance_scale: must be between 1 (no guidance) and 100, got {cfg}",
                       param="guidance_scale")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature: must be between 0 and 2, got {temperature}", param="temperature")
    return DrawSampling(cfg=cfg, temperature=temperature, seed=body.seed)


async def read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"request body too large ({int(declared):,} bytes, limit {cap:,})",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise APIError(413, f"request body too large (limit {cap:,} bytes)", code="request_too_large")
    return bytes(body)


async def read_form(request: Request, cap: int):
    """A multipart form read under the body cap (Starlette's own parser would spool any size to disk)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "the body must be multipart/form-data with the audio as 'file'", code="invalid_form")
    body = await read_body(request, cap)

    async def chunks():
        yield body

    try:
        return await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise APIError(400, f"malformed multipart form ({e.message})", code="invalid_form") from None


def parse(schema: type[Schema], body: bytes) -> Schema:
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        # the deepest error names the field: in a content part, not the union of str and list it is part of
        err = max(e.errors(include_url=False), key=lambda err: len(err["loc"]))
        if err["type"] == "json_invalid":
            raise APIError(400, f"malformed JSON body ({err['msg']})", code="invalid_json") from None
        if err["type"] == "model_type":
            raise APIError(400, "the body must be a JSON object", code="invalid_json") from None
        loc = [x for x in err["loc"] if not _is_type_tag(x)]
        # a content part's tag ('input_audio') comes before its field of the same name: name the field once
        param = ".".join(str(x) for i, x in enumerate(loc) if i == 0 or x != loc[i - 1])
        status, code = (400, "missing_parameter") if err["type"] == "missing" else (422, "invalid_type")
        raise APIError(status, f"{param}: {err['msg']}", code=code, param=param) from None


def _is_type_tag(loc) -> bool:
    """pydantic puts the union member tried ('str', 'list[str]', 'tagged-union[...]') into error locations."""
    return isinstance(loc, str) and (loc in ("str", "int", "float", "bool") or "[" in loc or "-" in loc)


def completion_prompts(prompt: str | list, tokenizer, engine: Engine) -> list[list[int]]:
    """The token ids of each prompt of a completion request: a text is read after <s>, token ids as they are."""
    if not prompt and isinstance(prompt, list):
        raise APIError(400, "prompt: must not be empty", param="prompt")
    batch = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    prompts = []
    for i, p in enumerate(batch):
        where = "prompt" if batch[0] is prompt else f"prompt[{i}]"
        if isinstance(p, str):
            prompts.append([BOS] + tokenizer.encode(p))
            continue
        if not p:
            raise APIError(400, f"{where}: must not be empty", param="prompt")
        check_ids(p, engine.model.text_vocab, where)
        if placeholders := {IMAGE_PAD, AUDIO_PAD} & set(p):
            raise APIError(400, f"{where}: token {min(placeholders)} holds the place of image or audio embeddings; "
                           "send pictures and sound through /v1/chat/completions", param="prompt")
        prompts.append(p)
    return prompts


def check_ids(ids: list[int], vocab: int, where: str):
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"{where}[{bad}]: token {ids[bad]} is not in this model's vocabulary of {vocab}",
                       param=where.partition("[")[0])


def check_model(model: str | None, model_name: str):
    if model not in (None, model_name):
        raise APIError(404, f"model {model!r} does not exist (this server serves {model_name!r})",
                       code="model_not_found", param="model")


def check_common(body: Sampled, model_name: str, limits: Limits):
    check_model(body.model, model_name)
    if body.n > limits.max_n:
        raise APIError(400, f"'n' must be at most {limits.max_n}", param="n")


def make_params(body: Sampled, ids: list[int], max_tokens: int | None, engine: Engine,
                logprobs: int | None, param: str = "messages") -> Params:
    room = engine.context - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {engine.context}",
                       code="context_length_exceeded", param=param)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens {max_tokens} + the prompt's {len(ids)} tokens exceed this model's "
                       f"context of {engine.context}", code="context_length_exceeded", param="max_tokens")
    return Params(max_tokens=max_tokens or room, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                  stop=body.stops(), logprobs=logprobs)


async def load_images(messages: list[dict], refs: list[str], engine: Engine, media: MediaPolicy,
                      limits: Limits) -> torch.Tensor | None:
    if not refs:
        return None
    if not engine.model.image_size:
        raise APIError(400, "this model is text-only; it does not take images", code="images_not_supported",
                       param="messages")
    if len(refs) > limits.max_images:
        raise APIError(400, f"{len(refs)} images in the request; the limit is {limits.max_images}",
                       code="too_many_images", param="messages")
    where = [f"messages[{i}].content[{j}]" for i, m in enumerate(messages) if isinstance(m["content"], list)
             for j, p in enumerate(m["content"]) if p["type"] == "image_url"]

    async def load(url: str, where: str):
        try:
            return await load_image(url, media, where)
        except MediaError as e:
            raise APIError(e.status, str(e), code=e.code, param=where) from None

    pictures = await asyncio.gather(*(load(url, w) for url, w in zip(refs, where)))
    size = engine.model.image_size
    return torch.stack(await asyncio.to_thread(lambda: [preprocess(p, size, engine.image_mode) for p in pictures]))


async def load_clips(messages: list[dict], engine: Engine, limits: Limits) -> list[torch.Tensor]:
    """The (n_mels, frames) features of every input_audio part, in order."""
    parts = [(f"messages[{i}].content[{j}].input_audio", p["input_audio"]["data"]) for i, m in enumerate(messages)
             if isinstance(m["content"], list) for j, p in enumerate(m["content"]) if p["type"] == "input_audio"]
    if not parts:
        return []
    if not engine.model.n_mels:
        raise APIError(400, "this model has no ears; it does not take audio", code="audio_not_supported",
                       param="messages")
    if len(parts) > limits.max_audio_clips:
        raise APIError(400, f"{len(parts)} audio clips in the request; the limit is {limits.max_audio_clips}",
                       code="too_many_audio_clips", param="messages")

    def decode(where: str, data: str) -> torch.Tensor:
        try:
            encoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the base64 data is invalid or truncated", code="invalid_audio",
                           param=where) from None
        return hear(encoded, where, engine, limits)

    return await asyncio.to_thread(lambda: [decode(where, data) for where, data in parts])


def hear(data: bytes, where: str, engine: Engine, limits: Limits) -> torch.Tensor:
    """(n_mels, frames) features of one encoded clip the model can hear at once, or a 400 naming `where`."""
    try:
        features = clip_features(decode_audio_bytes(data, where, limits.max_audio_seconds), engine.model.n_mels, where)
    except KosmoError as e:
        code = "audio_too_long" if "s limit" in str(e) else "invalid_audio"
        raise APIError(400, str(e), code=code, param=where) from None
    try:
        engine.model.audio_tokens(features.shape[-1])
    except ValueError as e:
        raise APIError(400, f"{where}: {e}", code="audio_too_long", param=where) from None
    return features


# ---- responses

async def echo(reply: "Reply", scorer: Scorer, prompts: list[list[int]], params: list[Params],
               body: CompletionRequest, tokenizer):
    """Starts each prompt's choices with the prompt, scored if `logprobs` asks. With max_tokens 1 (lm-eval's
    loglikelihood request) it also finishes them: their one token is sampled, as the engine samples, from the
    scoring pass's last position, so the prompt is read once."""
    scores = None
    if body.logprobs is not None or body.max_tokens == 1:
        try:
            scores = await asyncio.to_thread(scorer, prompts, body.logprobs or 0)
        except Exception as e:
            raise APIError(500, f"scoring failed ({type(e).__name__})", type="server_error") from None
    for p, ids in enumerate(prompts):
        for i in range(body.n):
            reply.echo(p * body.n + i, ids, None if body.logprobs is None else scores[p])
            if body.max_tokens == 1:
                sample = nth_sample(params[p], i)
                reply.add(p * body.n + i, sample_event(scores[p].next, sample, TextStream(tokenizer, sample.stop),
                                                       seeded(sample.seed, scorer.device), 1))


def nth_sample(params: Params, i: int) -> Params:
    """The params of a prompt's i-th sample: n samples of one seed still differ."""
    return dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)


def streamed(reply: "Reply", events: asyncio.Queue, requests: list[EngineRequest], body: Sampled):
    usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(stream(reply, events, requests, usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def submit(engine: Engine, prompts: list[list[int]], params: list[Params] | None, n: int, images,
           audio: Clips | None, draw: DrawSampling | None = None) -> tuple[list[EngineRequest], asyncio.Queue]:
    """n samples of each prompt into the engine, texts (prompt p with params[p]) or (with `draw`) pictures; their
    events arrive on the queue as (choice, event), the choices of prompt p numbered p * n to p * n + n - 1."""
    if not engine.alive:
        raise APIError(503, "the generation engine is not running", code="engine_down", type="server_error")
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    requests = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            emit = (lambda c: lambda e: loop.call_soon_threadsafe(events.put_nowait, (c, e)))(p * n + i)
            if draw is not None:  # picture i of a seeded request is `kosmo.draw`'s picture i of that seed
                seed = None if draw.seed is None else draw.seed + i
                requests.append(EngineRequest(ids, None, emit, draw=dataclasses.replace(draw, seed=seed)))
                continue
            requests.append(EngineRequest(ids, nth_sample(params[p], i), emit, images, audio))
    try:
        for r in requests:
            engine.submit(r)
    except QueueFull as e:
        for r in requests:
            r.cancel()
        raise APIError(429, str(e), code="queue_full", type="server_busy") from None
    return requests, events


async def collect(http: Request, reply: "Reply", events: asyncio.Queue, requests: list[EngineRequest]):
    """Waits for every choice to finish: the whole response, or a 499 if the client went away first."""
    watcher = asyncio.create_task(watch_disconnect(http, events))
    try:
        finished = 0
        while finished < reply.n:
            i, event = await events.get()
            if i is None:
                return JSONResponse({}, status_code=499)  # nobody is listening; the slots are freed below
            finished += reply.add(i, event)
        return reply.whole()
    finally:
        watcher.cancel()
        for r in requests:
            r.cancel()


async def watch_disconnect(http: Request, events: asyncio.Queue):
    """Wakes a waiting non-streaming handler when its client goes away (a stream notices by itself)."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
    events.put_nowait((None, None))


async def stream(reply: "Reply", events: asyncio.Queue, requests: list[EngineRequest], usage: bool):
    """Server-sent events; a client that goes away cancels this generator, which frees its slots."""
    try:
        for i in range(reply.n):
            yield sse(reply.chunk(i, {"role": "assistant", "content": ""}))
        finished = 0
        while finished < reply.n:
            i, event = await events.get()
            if isinstance(event, Exception):
                yield sse(APIError(500, f"generation failed ({type(event).__name__})", type="server_error").body())
                return
            finished += reply.add(i, event)
            yield sse(reply.delta(i, event))
        if usage:
            yield sse({**reply.chunk(None, None), "usage": reply.usage()})
        yield "data: [DONE]\n\n"
    finally:
        for r in requests:
            r.cancel()


# Characters JSON may leave raw in a string that `str.splitlines` (httpx's `iter_lines`, for one) ends a line at;
# escaped, every event stays on its one line for any client, though SSE itself ends lines only at CR and LF.
LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(LINE_BREAKS)}\n\n"


class Reply:
    """Accumulates each choice's events into OpenAI's response and chunk objects."""

    def __init__(self, tokenizer, model: str, prompt_tokens: int, n: int, chat: bool):
        self.tokenizer, self.model, self.prompt_tokens, self.n, self.chat = tokenizer, model, prompt_tokens, n, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text = [""] * n
        self.logprobs: list[list[dict]] = [[] for _ in range(n)]
        self.tokens = [0] * n
        self.finish: list[str | None] = [None] * n

    def add(self, i: int, event: Event | Exception) -> int:
        """Records an event; 1 when it ends its choice."""
        if isinstance(event, Exception):
            raise APIError(500, f"generation failed ({type(event).__name__})", type="server_error")
        self.text[i] += event.text
        self.tokens[i] += 1
        if event.logprob is not None:
            self.logprobs[i].append(self.logprob_entry(event))
        self.finish[i] = event.finish
        return int(event.finish is not None)

    def echo(self, i: int, ids: list[int], scored: Scored | None):
        """Starts choice i with its prompt, as `echo` asks; with the prompt's scores, its tokens' log-probabilities
        too (the first token's, which nothing comes before, is null)."""
        self.text[i] = self.tokenizer.decode(ids)
        self.finish[i] = "length"  # where nothing is generated after it
        if scored is not None:
            first = {**self.piece(ids[0], None), "top_logprobs": None}
            self.logprobs[i] = [first] + [self.logprob_entry(Event(t, "", lp, top))
                                          for t, lp, top in zip(ids[1:], scored.logprobs, scored.top)]

    def piece(self, token: int, logprob: float | None) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def logprob_entry(self, e: Event) -> dict:
        return {**self.piece(e.token, e.logprob), "top_logprobs": [self.piece(t, lp) for t, lp in e.top]}

    def logprobs_of(self, entries: list[dict], offset: int = 0) -> dict | None:
        """Chat's logprobs, or the completions' columns; `offset`: where the first entry's text starts in the
        choice's text (text_offset counts the tokens' strings, as vLLM does)."""
        if not entries:
            return None
        if self.chat:
            return {"content": entries}
        tokens = [e["token"] for e in entries]
        starts = list(itertools.accumulate(map(len, tokens[:-1]), initial=offset))
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [None if e["top_logprobs"] is None else {t["token"]: t["logprob"]
                                                                         for t in e["top_logprobs"]} for e in entries],
                "text_offset": starts}

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def chunk(self, i: int | None, delta: dict | None, finish: str | None = None, logprobs=None) -> dict:
        head = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model}
        if i is None:
            return {**head, "choices": []}
        choice = {"index": i, "delta": delta} if self.chat else {"index": i, "text": delta.get("content", "")}
        return {**head, "choices": [{**choice, "logprobs": logprobs, "finish_reason": finish}]}

    def delta(self, i: int, e: Event) -> dict:
        offset = len(self.text[i]) - len(e.text)
        logprobs = self.logprobs_of(self.logprobs[i][-1:], offset) if e.logprob is not None else None
        return self.chunk(i, {"content": e.text} if e.text or not e.finish else {}, e.finish, logprobs)

    def whole(self) -> dict:
        choices = []
        for i in range(self.n):
            out = {"message": {"role": "assistant", "content": self.text[i]}} if self.chat else {"text": self.text[i]}
            choices.append({"index": i, **out, "logprobs": self.logprobs_of(self.logprobs[i]),
                            "finish_reason": self.finish[i]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}


class Pictures:
    """Collects each picture of an image generation into OpenAI's images response."""

    def __init__(self, n: int, scale: int):
        self.n, self.scale = n, scale
        self.created = int(time.time())
        self.images: list[Picture | None] = [None] * n

    def add(self, i: int, event: Picture | Exception) -> int:
        if isinstance(event, Exception):
            raise APIError(500, f"drawing failed ({type(event).__name__})", type="server_error")
        self.images[i] = event
        return 1

    def whole(self) -> dict:
        return {"created": self.created, "data": [{"b64_json": png_base64(p.image, self.scale), "revised_prompt": None}
                                                  for p in self.images]}


def png_base64(image, scale: int) -> str:
    """A picture enlarged `scale` times, each pixel a scale x scale block, as base64 PNG."""
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, device: str = "auto",
          max_batch: int = 16, max_queue: int = 64, media: MediaPolicy = MediaPolicy(), limits: Limits = Limits(),
          precision: str = "auto", prefill_chunk: int | None = 2048, prefix_cache_tokens: int = 8192,
          batch_shapes: str = "full"):
    """Loads a run and serves it until interrupted."""
    import uvicorn

    from kosmo.hardware import pick_device
    from kosmo.model.load import load_run
    model, tokenizer, config = load_run(run, pick_device(device), precision)
    try:
        engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                        image_mode=config.get("config", {}).get("image_mode", "crop"), precision=precision,
                        max_images=limits.max_images, prefill_chunk=prefill_chunk,
                        prefix_cache_tokens=prefix_cache_tokens, batch_shapes=batch_shapes)
    except ValueError as e:
        raise KosmoError(f"{run}: {e}") from None
    app = create_app(engine.start(), tokenizer, Path(run).resolve().name, api_key, media, limits)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()
