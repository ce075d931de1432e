"""The KOSMOS-1 multimodal stage: text, image-caption pairs, audio-transcript pairs and interleaved
documents, loss on text.

    kosmo train mllm --init runs/lm vision=runs/clip --data text.jsonl captions.jsonl interleaved.jsonl
    kosmo train mllm --init runs/mllm-stage1 freeze=connector+lm --data …    # LLaVA's stage 2
    kosmo train mllm --init runs/sft audio=runs/ctc --data speech.jsonl …     # ears for a model that sees
    kosmo train sft --init runs/sft image_tokenizer=runs/vqvae --data draw.jsonl vqa.jsonl …  # drawing

With `--init` an LM run, the image encoder comes from `vision` (a kosmo CLIP run or a Hugging Face
CLIPModel / CLIPVisionModel directory); with `--init` a multimodal run, everything comes from it. `audio`
(a kosmo `train audio` run or a Hugging Face Whisper directory) gives a model without ears its audio
encoder, with a new frame stacker to connect it. `image_tokenizer` (a kosmo `train vqvae` run) teaches a
model to draw: its codes join the LM's vocabulary as new rows, and draw lines ({"prompt", "image"}) learn
to write a picture's codes after its prompt, the prompt dropped from a share `uncond` of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from kosmo.data.audio import AudioCache
from kosmo.data.formats import parse_source
from kosmo.data.images import ImageCache
from kosmo.data.multimodal import (ClipLengths, ImageBank, MultimodalDataset, encode_drawings, example_from_record,
                                   kind_of, read_examples, truncate)
from kosmo.data.stream import ExampleStream
from kosmo.errors import KosmoError
from kosmo.model.lm import LM
from kosmo.model.lora import LoRAConfig, add_adapters
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.train import distributed as D
from kosmo.train.lm import lm_config, token_loss
from kosmo.train.trainer import TrainConfig

KINDS = ("text", "captions", "audio", "interleaved", "draw")


@dataclass
class StageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int = 256
    val_fraction: float = 0.02
    vision: str = ""                   # image encoder source, when --init is a text-only LM
    new_vision: dict = field(default_factory=dict)  # or a new, untrained encoder of these VisionConfig fields
    audio: str = ""                    # audio encoder source, to give a model without one ears
    audio_stack: int = 4               # encoder frames (20 ms each) per LM position, for a new audio connector
    image_tokenizer: str = ""          # a `train vqvae` run, to teach a model that cannot draw to draw
    uncond: float = 0.1                # share of draw examples without their prompt (for classifier-free guidance)
    connector: str = "mlp"             # linear, mlp or resampler
    feature_layer: int = -2
    use_cls: bool = False
    resampler_tokens: int = 8
    freeze: str = "connector"          # connector (stage 1), connector+lm (stage 2), all, or lora (stage 2
    #                                    with the LM through adapters; see lora.*)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    vision_last_block: bool = False    # KOSMOS-1: the encoder frozen but for its last block
    image_mode: str = "crop"           # crop or pad to square
    mix: dict = field(default_factory=dict)  # weight per data kind, e.g. {text: 1, captions: 2}
    pack: bool = True                  # pack each batch's examples into rows of seq_len tokens
    model: dict = field(default_factory=lambda: {"size": "tiny"})  # LM from scratch without --init
    vocab_size: int = 4096


def load_vision(source: str):
    """A VisionTransformer from a kosmo CLIP run or a Hugging Face CLIP checkpoint directory."""
    from pathlib import Path

    from kosmo import checkpoint
    if not source:
        raise KosmoError("this stage needs an image encoder: set vision=RUN_OR_HF_DIR, or new_vision.* for a new one "
                         "(or --init a multimodal run)")
    path = Path(source)
    if (path / "config.json").is_file() and checkpoint.read_json(path / "config.json").get("arch") == "clip":
        from kosmo.model.load import load_run
        clip, _, _ = load_run(path)
        return clip.vision
    from kosmo.interop.hf_clip import import_hf_vision
    return import_hf_vision(path)


def new_vision(fields: dict, source: str):
    """A freshly initialised VisionTransformer, for pictures that no pretrained encoder has seen the like of;
    the stage that follows trains it with the rest of the model (freeze=all)."""
    from kosmo.config import build
    from kosmo.model.vision import VisionConfig, VisionTransformer
    if source:
        raise KosmoError(f"vision={source} and new_vision.* both name the image encoder: give one")
    return VisionTransformer(build(VisionConfig, fields, "new_vision."))


def load_audio_encoder(source: str):
    """An AudioEncoder from a kosmo run that has one (`train audio`, or a model that hears) or a Hugging Face
    Whisper checkpoint directory."""
    from pathlib import Path

    from kosmo import checkpoint
    path = Path(source)
    if (path / "config.json").is_file() and "arch" in checkpoint.read_json(path / "config.json"):
        from kosmo.model.load import load_run
        model, _, _ = load_run(path)
        if getattr(model, "audio", None) is None:
            raise KosmoError(f"audio={source}: that run has no audio encoder")
        return model.audio
    from kosmo.interop.hf_whisper import import_hf_whisper_encoder
    return import_hf_whisper_encoder(path)


def load_image_tokenizer(source: str):
    """The VQ-VAE of a kosmo `train vqvae` run, or of a run that draws."""
    from kosmo.model.load import load_run
    from kosmo.model.vqvae import VQVAE
    model, _, _ = load_run(source)
    coder = model if isinstance(model, VQVAE) else model.image_tokenizer
    if coder is None:
        raise KosmoError(f"image_tokenizer={source}: that run is neither a VQ-VAE nor a model that draws")
    return coder


def make_model(cfg: StageConfig, tokenizer, init_model) -> MLLM:
    if isinstance(init_model, MLLM):
        model = init_model
    else:
        lm = init_model if isinstance(init_model, LM) else LM(lm_config(cfg.model, tokenizer.vocab_size))
        vision = new_vision(cfg.new_vision, cfg.vision) if cfg.new_vision else load_vision(cfg.vision)
        mcfg = MLLMConfig(vision=vision.cfg, lm=lm.cfg, connector=cfg.connector, feature_layer=cfg.feature_layer,
                          use_cls=cfg.use_cls, resampler_tokens=cfg.resampler_tokens)
        try:
            model = MLLM(mcfg, vision=vision, lm=lm)
        except ValueError as e:
            raise KosmoError(f"invalid config: {e}") from None
    if cfg.audio:
        model = with_ears(model, load_audio_encoder(cfg.audio), cfg.audio_stack)
    if cfg.image_tokenizer:
        model = with_image_tokenizer(model, load_image_tokenizer(cfg.image_tokenizer))
    return model


def with_ears(model: MLLM, encoder, stack: int) -> MLLM:
    """`model` with `encoder` and a new frame stacker: everything it had is kept, weights and all."""
    if model.audio is not None:
        raise KosmoError("audio=…: the --init model already has an audio encoder")
    try:
        heard = MLLM(dataclasses.replace(model.cfg, audio=encoder.cfg, audio_stack=stack), model.vision, model.lm)
    except ValueError as e:
        raise KosmoError(f"invalid config: {e}") from None
    heard.connector.load_state_dict(model.connector.state_dict())
    heard.audio.load_state_dict(encoder.state_dict())
    return heard


def with_image_tokenizer(model: MLLM, coder) -> MLLM:
    """`model` with `coder` to draw with and a new vocabulary row per code (embedding and head), initialised
    as the LM's own rows were; everything it had is kept."""
    if model.image_tokenizer is not None:
        raise KosmoError("image_tokenizer=…: the --init model already draws")
    lm_cfg = dataclasses.replace(model.cfg.lm, vocab_size=model.cfg.lm.vocab_size + coder.codebook_size)
    try:
        drawing = MLLM(dataclasses.replace(model.cfg, lm=lm_cfg, image_tokenizer=coder.cfg), model.vision)
    except ValueError as e:
        raise KosmoError(f"invalid config: {e}") from None
    state = model.lm.state_dict()
    fresh = drawing.lm.state_dict()
    for name in ("embed.weight", "lm_head.weight"):
        if name in state:  # the head's own rows, where it is not tied to the embedding
            state[name] = torch.cat([state[name], fresh[name][len(state[name]):]])
    drawing.lm.load_state_dict(state)
    drawing.connector, drawing.audio, drawing.audio_connector = model.connector, model.audio, model.audio_connector
    drawing.vqvae.load_state_dict(coder.state_dict())
    return drawing


def mllm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    return token_loss(model, batch, images=batch["images"], audio=batch.get("audio")), {}


STREAMED_KINDS = ("text", "captions", "interleaved", "vqa", "chat")


def stream_data(cfg, source, tokenizer, model: MLLM, kinds: tuple[str, ...]) -> ExampleStream:
    """A shard folder's records as a stream: examples made as rows are read, pictures decoded as batches need them."""
    allowed = [k for k in kinds if k in STREAMED_KINDS]
    if cfg.mix:
        raise KosmoError("mix weighs the kinds of in-memory data; a streamed shard folder is read in its own order")

    def make(obj: dict, where: str):
        kind = kind_of(obj)
        if kind not in allowed:
            raise KosmoError(f"{where}: a {kind} row, but a streamed shard folder gives this stage "
                             f"{', '.join(allowed)} rows")
        return truncate(example_from_record(obj, tokenizer, model.tokens_per_image, source.images, where),
                        cfg.seq_len + 1)

    rank, world = D.rank_world()
    # a stream meets each picture once an epoch: the cache only spans a batch (64 pictures of 336 px: 87 MB)
    images = ImageCache(model.image_size, cfg.image_mode, max_items=64)
    return ExampleStream(source, make, images, cfg.seq_len if cfg.pack else 0, rank, world, cfg.train.seed)


def build_data(cfg, data: list, tokenizer, model: MLLM, kinds: tuple[str, ...], uncond: float = 0.0):
    sources = [parse_source(d) for d in data]
    if any(s.path.is_dir() for s in sources):
        if len(sources) > 1:
            raise KosmoError(f"{', '.join(map(str, data))}: a shard folder is streamed, and must be the only --data")
        return stream_data(cfg, sources[0], tokenizer, model, kinds), None
    audio = AudioCache(model.n_mels) if model.n_mels else None
    lengths = ClipLengths(audio, model.audio_tokens) if audio else None
    codes = model.image_tokenizer.grid ** 2 if model.image_tokenizer is not None else 0
    examples, dropped = read_examples(data, tokenizer, model.tokens_per_image, cfg.seq_len + 1, kinds, lengths, codes)
    examples, bad_drawings = encode_drawings(examples, model, cfg.image_mode)
    if not examples:
        raise KosmoError(f"no example fits seq_len={cfg.seq_len} with {model.tokens_per_image} tokens per image "
                         f"({dropped} had nothing left to learn after truncation); raise seq_len")
    bank = ImageBank([p for e in examples for p in e.images], model.image_size, cfg.image_mode)
    bad_clips = list(audio.skipped.values()) if audio else []
    for message in [m for _, m in bank.skipped[:5]] + bad_clips[:5] + bad_drawings[:5]:
        print(f"skipped: {message}", flush=True)
    n_val = int(len(examples) * cfg.val_fraction)
    pack_len = cfg.seq_len if cfg.pack else 0
    train = MultimodalDataset(examples[: len(examples) - n_val], bank, cfg.mix, cfg.train.seed, pack_len, audio,
                              uncond)
    val = MultimodalDataset(examples[len(examples) - n_val:], bank, pack_len=pack_len, audio=audio) if n_val else None
    if bank.skipped or bad_clips or bad_drawings or dropped:
        print(f"data: {len(bank.skipped) + len(bad_drawings)} unreadable images and {len(bad_clips)} unreadable "
              "clips skipped, "
              f"{train.skipped} examples without them, {dropped} examples with nothing to learn after truncation",
              flush=True)
    return train, val


def build(cfg: StageConfig, data: list, tokenizer, init_model=None, kinds: tuple[str, ...] = KINDS):
    if cfg.freeze == "lora" and (not isinstance(init_model, MLLM) or cfg.audio or cfg.image_tokenizer):
        # a LoRA run stores what trains and reads the rest from --init, which must then hold all of it
        raise KosmoError("freeze=lora adapts the --init multimodal run as it is: give a new encoder (vision=, "
                         "audio=) or image_tokenizer= a run of its own first (e.g. freeze=connector)")
    model = make_model(cfg, tokenizer, init_model)
    try:
        model.freeze(cfg.freeze, cfg.vision_last_block)
    except ValueError as e:
        raise KosmoError(f"invalid config: {e}") from None
    if cfg.freeze == "lora":
        add_adapters(model, cfg.lora)
    if cfg.seq_len > model.context_length:
        raise KosmoError(f"seq_len={cfg.seq_len} exceeds the model's context of {model.context_length}")
    if not 0 <= cfg.uncond < 1:
        raise KosmoError(f"invalid config: uncond={cfg.uncond} must be at least 0 and below 1")
    train, val = build_data(cfg, data, tokenizer, model, kinds, cfg.uncond)
    return model, mllm_loss, train, val
