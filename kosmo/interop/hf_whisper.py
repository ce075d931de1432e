"""Hugging Face Whisper checkpoints -> kosmo `AudioEncoder`, through an explicit name map.

Takes the encoder of a `WhisperModel` or `WhisperForConditionalGeneration`, either a directory
(config.json + *.safetensors, read whole) or a model in memory; the decoder's tensors are left unused.
The encoder's blocks are the image tower's, with q/k/v fused: import concatenates the three weights,
and the three biases with zeros for the key's, which Whisper does not have. Tensor names are found
under whichever prefix the checkpoint uses: `model.encoder.` in `WhisperForConditionalGeneration`,
`encoder.` in `WhisperModel`, none in a bare `WhisperEncoder`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from kosmo import checkpoint
from kosmo.errors import KosmoError
from kosmo.interop.hf_clip import ACT_FROM_HF, _read, _tower_state
from kosmo.model.audio import AudioConfig, AudioEncoder

# kosmo name (per layer, after "blocks.{i}.") -> HF names (after "layers.{i}.") concatenated in order
LAYER_MAP = {
    "norm1.weight": ["self_attn_layer_norm.weight"],
    "norm1.bias": ["self_attn_layer_norm.bias"],
    "attn.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],  # k: zeros
    "attn.proj.weight": ["self_attn.out_proj.weight"],
    "attn.proj.bias": ["self_attn.out_proj.bias"],
    "norm2.weight": ["final_layer_norm.weight"],
    "norm2.bias": ["final_layer_norm.bias"],
    "mlp.fc1.weight": ["fc1.weight"],
    "mlp.fc1.bias": ["fc1.bias"],
    "mlp.fc2.weight": ["fc2.weight"],
    "mlp.fc2.bias": ["fc2.bias"],
}
GLOBAL_MAP = {  # kosmo AudioEncoder -> HF, after the encoder prefix
    "conv1.weight": "conv1.weight",
    "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight",
    "conv2.bias": "conv2.bias",
    "positions": "embed_positions.weight",
    "norm.weight": "layer_norm.weight",
    "norm.bias": "layer_norm.bias",
}
ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")


def audio_config_from_hf(hf: dict, where: str = "config.json") -> AudioConfig:
    """From a "whisper" config. transformers' Whisper LayerNorms have no eps setting: they use 1e-5."""
    if hf.get("model_type") not in ("whisper", None):
        raise KosmoError(f"{where}: model_type {hf.get('model_type')!r} is not whisper")
    act = hf.get("activation_function", "gelu")
    if act not in ACT_FROM_HF:
        raise KosmoError(f"{where}: activation_function {act!r} is not supported ({', '.join(ACT_FROM_HF)})")
    try:
        return AudioConfig(dim=hf["d_model"], n_layers=hf["encoder_layers"], n_heads=hf["encoder_attention_heads"],
                           mlp_dim=hf["encoder_ffn_dim"], act=ACT_FROM_HF[act], norm_eps=1e-5,
                           n_mels=hf["num_mel_bins"], max_frames=2 * hf["max_source_positions"])
    except KeyError as e:
        raise KosmoError(f"{where}: missing field {e}") from None
    except ValueError as e:
        raise KosmoError(f"{where}: {e}") from None


def _encoder_prefix(tensors: dict, source) -> str:
    for prefix in ENCODER_PREFIXES:
        if f"{prefix}conv1.weight" in tensors:
            return prefix
    raise KosmoError(f"{source}: no Whisper encoder tensors (none named "
                     f"{', '.join(repr(p + 'conv1.weight') for p in ENCODER_PREFIXES)})")


def import_hf_whisper_encoder(source: str | Path | nn.Module) -> AudioEncoder:
    """The encoder of a `WhisperModel` / `WhisperForConditionalGeneration` directory (e.g. openai/whisper-tiny),
    or of such a model, or a `WhisperEncoder`, in memory."""
    if isinstance(source, nn.Module):
        where = type(source).__name__
        cfg, tensors = audio_config_from_hf(source.config.to_dict(), f"{where}.config"), dict(source.state_dict())
    else:
        where = Path(source)
        cfg, tensors = _read(where, audio_config_from_hf)
    prefix = _encoder_prefix(tensors, where)
    for i in range(cfg.n_layers):  # Whisper's attention has no key bias
        q_bias = tensors.get(f"{prefix}layers.{i}.self_attn.q_proj.bias")
        if q_bias is not None:
            tensors.setdefault(f"{prefix}layers.{i}.self_attn.k_proj.bias", torch.zeros_like(q_bias))
    state = _tower_state(tensors, prefix, GLOBAL_MAP, cfg.n_layers, where, layer_map=LAYER_MAP, layers="layers")
    model = AudioEncoder(cfg)
    checkpoint.load_weights(model, {k: v.detach().float() for k, v in state.items()}, where)
    return model.eval()
