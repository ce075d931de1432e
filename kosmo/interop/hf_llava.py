"""Hugging Face LLaVA checkpoints <-> kosmo `MLLM`, through hf_llama's and hf_clip's name maps.

A kosmo MLLM that sees through a `linear` or `mlp` connector is LLaVA-1.5's architecture. transformers'
`LlavaForConditionalGeneration` feeds its projector the vision tower's `hidden_states[vision_feature_layer]`,
which, like kosmo's `VisionTransformer.features`, is taken after the pre-layernorm and never through the
post-layernorm. It drops the class token unless `vision_feature_select_strategy` is "full" (kosmo's
`use_cls`). The projector is linear_1 -> act -> linear_2: kosmo's `mlp` connector with GELU. kosmo's
`linear` connector is written as linear_1, an identity linear_2 and act "linear"; import folds any
"linear" projector back into one layer.

Image embeddings go where the ids hold `<|image_pad|>` (`image_token_index`). The exported `LlavaProcessor`
expands each `<|image_pad|>` in a prompt into as many as the model has per image. Its image processor
reproduces kosmo's "crop" mode (CLIP's: shortest side to the size, bicubic, then a centre crop), pixel
for pixel with transformers' PIL backend (`backend="pil"`; its torchvision backend resamples on its own
terms). There are two exceptions. When the resized long side exceeds the size by 4k + 3 pixels,
transformers floors the crop offset where kosmo rounds it as torchvision does, so the crop sits one pixel
over. Strips thinner than 1:16 differ by rounding, because kosmo resamples only the crop's box. The "pad"
mode is written as LLaVA's own processor, which pads to a square before it resizes, where kosmo resizes
first. So a padded picture's border lands up to a pixel apart, and only square pictures agree exactly.

Tensor names: export writes those of the llava-hf checkpoints (`vision_tower.vision_model.`,
`multi_modal_projector.`, `language_model.model.`, `language_model.lm_head.`), which transformers 4 reads
as they are and transformers 5 renames on loading. Import also reads transformers 5's own names
(`model.vision_tower.`, `model.multi_modal_projector.`, `model.language_model.`, `lm_head.`), and the CLIP
tower without its `vision_model.` level, as transformers 5's `save_pretrained` writes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kosmo import checkpoint
from kosmo.data.chat import JINJA_TEMPLATE
from kosmo.data.images import CLIP_MEAN, CLIP_STD
from kosmo.errors import KosmoError
from kosmo.interop.adopt import Adoption
from kosmo.interop.hf_clip import VISION_MAP, _tower_state, _tower_tensors, _vision_config_to_hf, vision_config_from_hf
from kosmo.interop.hf_llama import (
    _lm_state,
    _lm_tensors,
    _read_hf_tensors,
    _take,
    config_from_hf,
    config_to_hf,
    write_generation_files,
)
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.tokenizer import IMAGE_PAD, SPECIAL_TOKENS

# the names of the llava-hf checkpoints, which every transformers version since LLaVA's first reads
VISION, PROJECTOR, LM_BODY, LM_HEAD = ("vision_tower.vision_model.", "multi_modal_projector.",
                                       "language_model.model.", "language_model.lm_head.weight")
VISION_BARE = "vision_tower."  # transformers 5 saves the CLIP tower without its `vision_model.` level
# transformers 5's names in memory -> the checkpoints' names
RENAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
           ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))
STRATEGY = {"default": False, "full": True}  # vision_feature_select_strategy -> use_cls
PROJECTOR_ACTS = {"mlp": "gelu", "linear": "linear"}  # kosmo connector -> projector_hidden_act


def export_hf_llava(model: MLLM, out: str | Path, tokenizer=None, image_mode: str = "crop",
                    dtype=torch.float32) -> Path:
    """A directory that `LlavaForConditionalGeneration` and (given the tokenizer) `AutoProcessor` load."""
    out, cfg = Path(out), model.cfg
    for part, what in ((cfg.audio, "an audio encoder"), (cfg.image_tokenizer, "an image tokenizer")):
        if part is not None:
            raise KosmoError(f"this model has {what}, which LLaVA lacks; it cannot be exported as llava")
    if cfg.connector not in PROJECTOR_ACTS:
        raise KosmoError(f"model.connector={cfg.connector!r} has no LLaVA counterpart "
                         f"(exportable: {', '.join(PROJECTOR_ACTS)})")
    tensors = _lm_tensors(model.lm, dtype, body=LM_BODY, head=LM_HEAD)
    tensors |= _tower_tensors(model.vision.state_dict(), "", VISION, VISION_MAP, cfg.vision.n_layers, dtype)
    tensors |= {PROJECTOR + k: v.to(dtype) for k, v in _projector(model.connector, cfg.connector).items()}
    checkpoint.save_tensors(out / "model.safetensors", tensors)
    text = config_to_hf(cfg.lm)
    del text["architectures"]
    checkpoint.write_json(out / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": _vision_config_to_hf(cfg.vision), "text_config": text,
        "image_token_index": IMAGE_PAD, "image_seq_length": cfg.tokens_per_image,
        "vision_feature_layer": cfg.feature_layer, "vision_feature_select_strategy": _strategy(cfg),
        "projector_hidden_act": PROJECTOR_ACTS[cfg.connector], "multimodal_projector_bias": True,
        "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch.")})
    write_generation_files(out, tokenizer, cfg.lm.max_seq_len)
    if tokenizer is not None:
        _write_processor(out, cfg, image_mode)
    return out


def _strategy(cfg: MLLMConfig) -> str:
    return "full" if cfg.use_cls else "default"


def _projector(connector: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    if kind == "mlp":
        first, last = connector[0], connector[2]
        return {"linear_1.weight": first.weight, "linear_1.bias": first.bias,
                "linear_2.weight": last.weight, "linear_2.bias": last.bias}
    dim = connector.out_features
    return {"linear_1.weight": connector.weight, "linear_1.bias": connector.bias,
            "linear_2.weight": torch.eye(dim), "linear_2.bias": torch.zeros(dim)}


def _write_processor(out: Path, cfg: MLLMConfig, image_mode: str):
    """The LlavaProcessor: its image processor, and how many `<|image_pad|>` each one in a prompt becomes
    (a grid of patches, plus the class token that "default" then drops again)."""
    size = cfg.vision.image_size
    image = {"image_processor_type": "LlavaImageProcessor" if image_mode == "pad" else "CLIPImageProcessor",
             "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,  # PIL's bicubic
             "do_center_crop": True, "crop_size": {"height": size, "width": size},
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
             **({"do_pad": True} if image_mode == "pad" else {})}
    processor = {"processor_class": "LlavaProcessor", "image_token": SPECIAL_TOKENS[IMAGE_PAD],
                 "patch_size": cfg.vision.patch_size, "num_additional_image_tokens": 1,
                 "vision_feature_select_strategy": _strategy(cfg)}
    checkpoint.write_json(out / "processor_config.json", processor | {"image_processor": image})
    checkpoint.write_json(out / "preprocessor_config.json", image)  # where transformers 4 looks for it
    checkpoint.atomic_write(out / "chat_template.jinja", lambda p: Path(p).write_text(JINJA_TEMPLATE))


def config_from_hf_llava(hf: dict, where: str = "config.json", adopted: bool = False) -> MLLMConfig:
    """The MLLM's config; `adopted`: the tokenizer is adopted from the checkpoint, whose image token then
    becomes kosmo's `<|image_pad|>` wherever it sits (`kosmo.interop.adopt`)."""
    if hf.get("model_type") != "llava":
        raise KosmoError(f"{where}: model_type {hf.get('model_type')!r} is not llava")
    layer, strategy = hf.get("vision_feature_layer", -2), hf.get("vision_feature_select_strategy", "default")
    act, token = hf.get("projector_hidden_act", "gelu"), hf.get("image_token_index", 32000)
    if not isinstance(layer, int):
        raise KosmoError(f"{where}: vision_feature_layer {layer} concatenates several layers; kosmo reads one")
    if strategy not in STRATEGY:
        raise KosmoError(f"{where}: vision_feature_select_strategy {strategy!r} is not supported "
                         f"({', '.join(STRATEGY)})")
    if act not in PROJECTOR_ACTS.values():
        raise KosmoError(f"{where}: projector_hidden_act {act!r} is not supported "
                         f"({', '.join(PROJECTOR_ACTS.values())})")
    if not hf.get("multimodal_projector_bias", True):
        raise KosmoError(f"{where}: multimodal_projector_bias=false is not supported")
    if token != IMAGE_PAD and not adopted:
        raise KosmoError(f"{where}: image_token_index {token} is not kosmo's <|image_pad|> id {IMAGE_PAD} "
                         "(without --tokenizer, kosmo import adopts the checkpoint's own tokenizer and image token)")
    for key in ("vision_config", "text_config"):
        if not isinstance(hf.get(key), dict):
            raise KosmoError(f"{where}: missing field '{key}'")
    text = {"model_type": "llama", **hf["text_config"]}
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    try:
        lm = config_from_hf(text, f"{where}: text_config")
    except KeyError as e:
        raise KosmoError(f"{where}: text_config: missing field {e}") from None
    vision = vision_config_from_hf({"model_type": "clip_vision_model", **hf["vision_config"]},
                                   f"{where}: vision_config")
    if not -(vision.n_layers + 1) <= layer <= vision.n_layers:
        raise KosmoError(f"{where}: vision_feature_layer {layer} is out of range for {vision.n_layers} vision layers")
    return MLLMConfig(vision=vision, lm=lm, connector={v: k for k, v in PROJECTOR_ACTS.items()}[act],
                      feature_layer=layer, use_cls=STRATEGY[strategy])


def import_hf_llava(path: str | Path, adoption: Adoption | None = None) -> tuple[MLLM, str]:
    """The MLLM of a LLaVA directory, and the image mode ("crop" or "pad") its processor asks for; with an
    `adoption`, in the ids of the tokenizer adopted from it."""
    path = Path(path)
    cfg = config_from_hf_llava(checkpoint.read_json(path / "config.json"), str(path / "config.json"),
                               adopted=adoption is not None)
    if adoption is not None:
        cfg.lm.vocab_size += adoption.shift
    hf = {_renamed(k): v for k, v in _read_hf_tensors(path).items()}
    model = MLLM(cfg)
    state = {f"lm.{k}": v
             for k, v in _lm_state(hf, cfg.lm, path, body=LM_BODY, head=LM_HEAD, adoption=adoption).items()}
    vision = VISION if any(k.startswith(VISION) for k in hf) else VISION_BARE
    state |= {f"vision.{k}": v.float()
              for k, v in _tower_state(hf, vision, VISION_MAP, cfg.vision.n_layers, path).items()}
    w1, b1, w2, b2 = (_take(hf, f"{PROJECTOR}linear_{i}.{p}", path).float() for i in (1, 2) for p in ("weight", "bias"))
    if cfg.connector == "mlp":
        state |= {"connector.0.weight": w1, "connector.0.bias": b1, "connector.2.weight": w2, "connector.2.bias": b2}
    else:  # two linear layers are one: W2 (W1 x + b1) + b2
        state |= {"connector.weight": w2 @ w1, "connector.bias": w2 @ b1 + b2}
    checkpoint.load_weights(model, state, path)
    return model.eval(), _image_mode(path)


def _renamed(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _image_mode(path: Path) -> str:
    """"pad" where the processor pads to a square, else "crop"; kosmo normalises with CLIP's statistics only.
    transformers 4 keeps the image processor in preprocessor_config.json, 5 inside processor_config.json."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        image = checkpoint.read_json(path / name) if (path / name).is_file() else {}
        image = image.get(key) if key else image
        if not image:
            continue
        for stat, want in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            if stat in image and (len(image[stat]) != 3 or any(abs(a - b) > 1e-6 for a, b in zip(image[stat], want))):
                raise KosmoError(f"{path / name}: {stat} {image[stat]} is not CLIP's {list(want)}, "
                                 "the only normalisation kosmo applies")
        return "pad" if image.get("do_pad") else "crop"
    return "crop"
