"""Hugging Face CLIP checkpoints <-> kosmo `VisionTransformer` / `CLIP`, through an explicit name map.

Reads a `CLIPVisionModel` directory or a full `CLIPModel` one (config.json + *.safetensors). kosmo
stores q/k/v fused; import concatenates weights and biases along the output dimension, export splits
them again. Tensor names are found under whichever prefix the checkpoint uses: `vision_model.` in
`CLIPModel` and in transformers 4 `CLIPVisionModel` saves, none in transformers 5 ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kosmo import checkpoint
from kosmo.errors import KosmoError
from kosmo.interop.hf_llama import _read_hf_tensors, _take
from kosmo.model.clip import CLIP, CLIPConfig, TextConfig
from kosmo.model.vision import VisionConfig, VisionTransformer

# kosmo name (per layer, after "blocks.{i}.") -> HF names (after "encoder.layers.{i}.") concatenated in order;
# the image and the text tower share the layer.
LAYER_MAP = {
    "norm1.weight": ["layer_norm1.weight"],
    "norm1.bias": ["layer_norm1.bias"],
    "attn.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "attn.proj.weight": ["self_attn.out_proj.weight"],
    "attn.proj.bias": ["self_attn.out_proj.bias"],
    "norm2.weight": ["layer_norm2.weight"],
    "norm2.bias": ["layer_norm2.bias"],
    "mlp.fc1.weight": ["mlp.fc1.weight"],
    "mlp.fc1.bias": ["mlp.fc1.bias"],
    "mlp.fc2.weight": ["mlp.fc2.weight"],
    "mlp.fc2.bias": ["mlp.fc2.bias"],
}
VISION_MAP = {  # kosmo VisionTransformer -> HF, after the vision prefix
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "class_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding.weight",
    "pre_norm.weight": "pre_layrnorm.weight",  # sic: transformers' spelling
    "pre_norm.bias": "pre_layrnorm.bias",
    "post_norm.weight": "post_layernorm.weight",
    "post_norm.bias": "post_layernorm.bias",
}
TEXT_MAP = {  # kosmo TextTransformer -> HF, after "text_model."
    "token_embed.weight": "embeddings.token_embedding.weight",
    "pos_embed": "embeddings.position_embedding.weight",
    "final_norm.weight": "final_layer_norm.weight",
    "final_norm.bias": "final_layer_norm.bias",
}
CLIP_MAP = {"visual_projection.weight": "visual_projection.weight",
            "text_projection.weight": "text_projection.weight", "logit_scale": "logit_scale"}
TOWERS = {"vision": ("vision_model.", VISION_MAP), "text": ("text_model.", TEXT_MAP)}

ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _sub_config(hf: dict, key: str, where: str) -> dict:
    """A CLIPModel config's nested tower config. Old checkpoints (openai/clip-vit-*) also carry a
    `<key>_dict` whose values transformers lets win, so they win here too."""
    sub = hf.get(key)
    if not isinstance(sub, dict):
        raise KosmoError(f"{where}: missing field '{key}'")
    return {**sub, **(hf.get(f"{key}_dict") or {})}


def _tower_fields(hf: dict, where: str) -> dict:
    act = hf.get("hidden_act", "quick_gelu")
    if act not in ACT_FROM_HF:
        raise KosmoError(f"{where}: hidden_act {act!r} is not supported ({', '.join(ACT_FROM_HF)})")
    try:
        return dict(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                    mlp_dim=hf["intermediate_size"], act=ACT_FROM_HF[act], norm_eps=hf.get("layer_norm_eps", 1e-5))
    except KeyError as e:
        raise KosmoError(f"{where}: missing field {e}") from None


def _square(hf: dict, key: str, default: int, where: str) -> int:
    v = hf.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise KosmoError(f"{where}: {key} {v} is not square (only square images and patches are supported)")
        v = v[0]
    return int(v)


def vision_config_from_hf(hf: dict, where: str = "config.json") -> VisionConfig:
    """From a "clip_vision_model" config, or the vision part of a "clip" one. Absent optional fields take
    transformers' defaults."""
    if hf.get("model_type") == "clip" or "vision_config" in hf:
        hf, where = _sub_config(hf, "vision_config", where), f"{where}: vision_config"
    elif hf.get("model_type") not in ("clip_vision_model", None):
        raise KosmoError(f"{where}: model_type {hf.get('model_type')!r} is not clip or clip_vision_model")
    fields = _tower_fields(hf, where)
    try:
        return VisionConfig(image_size=_square(hf, "image_size", 224, where),
                            patch_size=_square(hf, "patch_size", 32, where),
                            channels=hf.get("num_channels", 3), **fields)
    except ValueError as e:
        raise KosmoError(f"{where}: {e}") from None


def text_config_from_hf(hf: dict, where: str = "config.json") -> TextConfig:
    fields = _tower_fields(hf, where)
    eos = hf.get("eos_token_id", 49407)
    if isinstance(eos, list):
        if len(eos) != 1:
            raise KosmoError(f"{where}: eos_token_id {eos} names several tokens; CLIP pools at one")
        eos = eos[0]
    if not isinstance(eos, int):
        raise KosmoError(f"{where}: eos_token_id {eos!r} is not a token id")
    if "vocab_size" not in hf:
        raise KosmoError(f"{where}: missing field 'vocab_size'")
    try:
        # transformers pools at argmax(input_ids) exactly when eos_token_id == 2 (configs from before its #24773)
        return TextConfig(vocab_size=hf["vocab_size"], max_len=hf.get("max_position_embeddings", 77),
                          eos_token_id=eos, legacy_argmax_pool=eos == 2, **fields)
    except ValueError as e:
        raise KosmoError(f"{where}: {e}") from None


def clip_config_from_hf(hf: dict, where: str = "config.json") -> CLIPConfig:
    if hf.get("model_type") not in ("clip", None):
        raise KosmoError(f"{where}: model_type {hf.get('model_type')!r} is not clip (a full CLIPModel)")
    return CLIPConfig(vision=vision_config_from_hf(hf, where),
                      text=text_config_from_hf(_sub_config(hf, "text_config", where), f"{where}: text_config"),
                      embed_dim=hf.get("projection_dim", 512),
                      logit_scale_init=hf.get("logit_scale_init_value", math.log(1 / 0.07)))


def _tower_state(hf: dict, prefix: str, global_map: dict, n_layers: int, path, layer_map: dict = LAYER_MAP,
                 layers: str = "encoder.layers") -> dict:
    """kosmo's tower state from HF tensors: `global_map`'s names once, `layer_map`'s per layer (several HF
    names are concatenated, q/k/v into one fused tensor)."""
    state = {k: _take(hf, prefix + name, path) for k, name in global_map.items()}
    for i in range(n_layers):
        for kosmo_name, hf_names in layer_map.items():
            parts = [_take(hf, f"{prefix}{layers}.{i}.{n}", path) for n in hf_names]
            state[f"blocks.{i}.{kosmo_name}"] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return state


def _read(path: Path, parse):
    hf_cfg = checkpoint.read_json(path / "config.json")
    cfg = parse(hf_cfg, str(path / "config.json"))
    return cfg, _read_hf_tensors(path)


def import_hf_clip_vision(path: str | Path) -> VisionTransformer:
    """The vision tower of a `CLIPVisionModel` or `CLIPModel` directory (e.g. openai/clip-vit-large-patch14)."""
    path = Path(path)
    cfg, hf = _read(path, vision_config_from_hf)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf) else ""
    model = VisionTransformer(cfg)
    state = _tower_state(hf, prefix, VISION_MAP, cfg.n_layers, path)
    checkpoint.load_weights(model, {k: v.float() for k, v in state.items()}, path)
    return model.eval()


import_hf_vision = import_hf_clip_vision  # the name the multimodal stages import


def import_hf_clip(path: str | Path) -> CLIP:
    """Both towers, projections and temperature of a `CLIPModel` directory."""
    path = Path(path)
    cfg, hf = _read(path, clip_config_from_hf)
    model = CLIP(cfg)
    state = {k: _take(hf, name, path) for k, name in CLIP_MAP.items()}
    for tower, (prefix, global_map) in TOWERS.items():
        n_layers = getattr(cfg, tower).n_layers
        for k, v in _tower_state(hf, prefix, global_map, n_layers, path).items():
            state[f"{tower}.{k}"] = v
    checkpoint.load_weights(model, {k: v.float() for k, v in state.items()}, path)
    return model.eval()


def _tower_tensors(sd: dict, tower: str, prefix: str, global_map: dict, n_layers: int, dtype) -> dict:
    out = {prefix + hf: sd[tower + k].to(dtype) for k, hf in global_map.items()}
    for i in range(n_layers):
        for kosmo_name, hf_names in LAYER_MAP.items():
            w = sd[f"{tower}blocks.{i}.{kosmo_name}"].to(dtype)
            for name, part in zip(hf_names, w.chunk(len(hf_names), 0)):
                out[f"{prefix}encoder.layers.{i}.{name}"] = part
    return out


def _vision_config_to_hf(c: VisionConfig) -> dict:
    return {"model_type": "clip_vision_model", "hidden_size": c.dim, "intermediate_size": c.mlp_dim,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_channels": c.channels,
            "image_size": c.image_size, "patch_size": c.patch_size, "hidden_act": ACT_TO_HF[c.act],
            "layer_norm_eps": c.norm_eps}


def export_hf_clip_vision(model: VisionTransformer, out: str | Path, dtype=torch.float32) -> Path:
    """A `CLIPVisionModel` directory, tensors under `vision_model.` as every transformers version reads them."""
    out = Path(out)
    tensors = _tower_tensors(model.state_dict(), "", "vision_model.", VISION_MAP, model.cfg.n_layers, dtype)
    checkpoint.save_tensors(out / "model.safetensors", tensors)
    checkpoint.write_json(out / "config.json", {"architectures": ["CLIPVisionModel"], **_vision_config_to_hf(model.cfg),
                                                "torch_dtype": str(dtype).removeprefix("torch.")})
    return out


def export_hf_clip(model: CLIP, out: str | Path, dtype=torch.float32) -> Path:
    """A `CLIPModel` directory (config.json + model.safetensors) for transformers."""
    out, cfg, t = Path(out), model.cfg, model.cfg.text
    if (t.eos_token_id == 2) != t.legacy_argmax_pool:
        raise KosmoError(f"text.eos_token_id={t.eos_token_id} with legacy_argmax_pool={t.legacy_argmax_pool} "
                         "cannot be exported: transformers pools at argmax(input_ids) exactly when eos_token_id == 2")
    sd = model.state_dict()
    tensors = {hf: sd[k].to(dtype) for k, hf in CLIP_MAP.items()}
    for tower, (prefix, global_map) in TOWERS.items():
        n_layers = getattr(cfg, tower).n_layers
        tensors |= _tower_tensors(sd, f"{tower}.", prefix, global_map, n_layers, dtype)
    checkpoint.save_tensors(out / "model.safetensors", tensors)
    text = {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.dim,
            "intermediate_size": t.mlp_dim, "num_hidden_layers": t.n_layers, "num_attention_heads": t.n_heads,
            "max_position_embeddings": t.max_len, "hidden_act": ACT_TO_HF[t.act], "layer_norm_eps": t.norm_eps,
            "eos_token_id": t.eos_token_id, "bos_token_id": None, "pad_token_id": None,
            "projection_dim": cfg.embed_dim}
    checkpoint.write_json(out / "config.json", {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init, "text_config": text,
        "vision_config": _vision_config_to_hf(cfg.vision) | {"projection_dim": cfg.embed_dim},
        "torch_dtype": str(dtype).removeprefix("torch.")})
    return out
