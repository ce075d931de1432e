"""Hugging Face `LlamaForCausalLM` checkpoints <-> kosmo `LM`, through an explicit name map.

kosmo stores q/k/v and gate/up fused; import concatenates them along the output dimension and
export splits them again. Both sides use the rotate-half RoPE layout, so no weights are permuted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kosmo import checkpoint
from kosmo.data.chat import JINJA_TEMPLATE
from kosmo.errors import KosmoError
from kosmo.interop.adopt import Adoption, adopt_rows
from kosmo.model import lora
from kosmo.model.lm import LM, LMConfig
from kosmo.tokenizer import BOS, END_OF_TURN, EOS, PAD

# kosmo name (per layer, after "blocks.{i}.") -> HF names (after "{body}layers.{i}.") concatenated in order
LAYER_MAP = {
    "attn_norm.weight": ["input_layernorm.weight"],
    "attn.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.proj.weight": ["self_attn.o_proj.weight"],
    "mlp_norm.weight": ["post_attention_layernorm.weight"],
    "mlp.gate_up.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.down.weight": ["mlp.down_proj.weight"],
}
BODY_MAP = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}  # after the body, "model." in Llama


def config_from_hf(hf: dict, where: str = "config.json") -> LMConfig:
    if hf.get("model_type") not in ("llama", None):
        raise KosmoError(f"{where}: model_type {hf.get('model_type')!r} is not llama")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise KosmoError(f"{where}: {flag}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise KosmoError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        raise KosmoError(f"{where}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests theta and scaling here
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return LMConfig(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=dict(scaling) if scaling else None, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(cfg: LMConfig) -> dict:
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    }


def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise KosmoError(f"{path}: no *.safetensors files (pytorch_model.bin is pickle and is not read)")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def import_hf(path: str | Path, adoption: Adoption | None = None) -> LM:
    """The LM of a Llama directory; with an `adoption`, in the ids of the tokenizer adopted from it."""
    path = Path(path)
    hf_cfg = checkpoint.read_json(path / "config.json")
    try:
        cfg = config_from_hf(hf_cfg, str(path / "config.json"))
    except KeyError as e:
        raise KosmoError(f"{path / 'config.json'}: missing field {e}") from None
    if adoption is not None:
        cfg.vocab_size += adoption.shift
    model = LM(cfg)
    checkpoint.load_weights(model, _lm_state(_read_hf_tensors(path), cfg, path, adoption=adoption), path)
    return model.eval()


def _lm_state(hf: dict, cfg: LMConfig, path: Path, body: str = "model.", head: str = "lm_head.weight",
              adoption: Adoption | None = None) -> dict:
    """kosmo's LM state (fp32) from HF tensors whose decoder is under `body` and whose head is `head`;
    with an `adoption`, the embedding and head rows in the adopted tokenizer's ids."""
    if cfg.tie_embeddings:
        hf.setdefault(head, hf.get(body + BODY_MAP["embed.weight"]))
    state = {k: _take(hf, body + name, path) for k, name in BODY_MAP.items()}
    state["lm_head.weight"] = _take(hf, head, path)
    for i in range(cfg.n_layers):
        for kosmo_name, hf_names in LAYER_MAP.items():
            parts = [_take(hf, f"{body}layers.{i}.{n}", path) for n in hf_names]
            state[f"blocks.{i}.{kosmo_name}"] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    if adoption is not None:
        for k, name in (("embed.weight", body + BODY_MAP["embed.weight"]), ("lm_head.weight", head)):
            state[k] = adopt_rows(state[k], adoption, f"{path}: {name}")
    return {k: v.float() for k, v in state.items()}


def _take(tensors: dict, name: str, path: Path) -> torch.Tensor:
    if tensors.get(name) is None:
        raise KosmoError(f"{path}: checkpoint has no tensor '{name}'")
    return tensors[name]


def fused_sizes(cfg: LMConfig) -> dict[str, list[int]]:
    """The output sizes of the Llama projections each fused kosmo weight stacks."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"attn.qkv.weight": [q, kv, kv], "mlp.gate_up.weight": [cfg.hidden_dim, cfg.hidden_dim]}


def export_peft_adapter(model: LM, lora_cfg: lora.LoRAConfig, out: str | Path) -> Path:
    """Writes the adapters of `model` (unmerged) as a PEFT LoRA adapter (adapter_config.json +
    adapter_model.safetensors) over the Llama export of its base. A fused layer's update B A splits by
    B's rows into one pair per projection that shares A, which PEFT computes exactly as kosmo does."""
    out = Path(out)
    if not isinstance(model, LM) or not lora.adapters(model):
        raise KosmoError("only a text LM with LoRA adapters exports them for a Llama base")
    split, tensors = fused_sizes(model.cfg), {}
    for i, block in enumerate(model.blocks):
        for target in lora_cfg.targets:
            layer = block.get_submodule(lora.TARGETS[target])
            weight = f"{lora.TARGETS[target]}.weight"
            parts = layer.lora_b.split(split[weight], 0) if weight in split else [layer.lora_b]
            for hf_name, b in zip(LAYER_MAP[weight], parts):
                prefix = f"base_model.model.model.layers.{i}.{hf_name.removesuffix('.weight')}"
                tensors[f"{prefix}.lora_A.weight"] = layer.lora_a.detach().clone()  # one A per projection
                tensors[f"{prefix}.lora_B.weight"] = b
    checkpoint.save_tensors(out / "adapter_model.safetensors", tensors)
    modules = sorted({n.removesuffix(".weight").split(".")[-1] for t in lora_cfg.targets
                      for n in LAYER_MAP[f"{lora.TARGETS[t]}.weight"]})
    checkpoint.write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": None})
    return out


def _lm_tensors(model: LM, dtype, body: str = "model.", head: str = "lm_head.weight") -> dict:
    """HF tensors of kosmo's LM: the decoder under `body`, the head (unless tied) as `head`."""
    cfg, sd = model.cfg, model.state_dict()
    if cfg.smear_keys:
        raise KosmoError("model.smear_keys=true has no counterpart in transformers' Llama; it cannot be exported")
    if lora.adapters(model):  # their tensors have no Llama name: the export would silently be the base
        raise KosmoError("the model has LoRA adapters: merge them into its weights first (kosmo.model.lora.merge)")
    split = fused_sizes(cfg)
    tensors = {body + hf: sd[k].to(dtype) for k, hf in BODY_MAP.items()}
    if not cfg.tie_embeddings:
        tensors[head] = sd["lm_head.weight"].to(dtype)
    for i in range(cfg.n_layers):
        for kosmo_name, hf_names in LAYER_MAP.items():
            w = sd[f"blocks.{i}.{kosmo_name}"].to(dtype)
            parts = w.split(split[kosmo_name], 0) if kosmo_name in split else [w]
            for name, part in zip(hf_names, parts):
                tensors[f"{body}layers.{i}.{name}"] = part
    return tensors


def write_generation_files(out: Path, tokenizer, max_len: int):
    """generation_config.json and, given a tokenizer, tokenizer.json with a tokenizer_config.json that names
    the special tokens and carries kosmo's chat template. Generation stops at a turn's end as at a document's."""
    checkpoint.write_json(out / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": [EOS, END_OF_TURN],
                                                           "pad_token_id": PAD})
    if tokenizer is None:
        return
    tokenizer.save(out / "tokenizer.json")
    checkpoint.write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": max_len, "chat_template": JINJA_TEMPLATE})


def export_hf(model: LM, out: str | Path, tokenizer=None, dtype=torch.float32) -> Path:
    """Writes config.json, model.safetensors and (given a tokenizer) tokenizer files for transformers."""
    out = Path(out)
    cfg = model.cfg
    checkpoint.save_tensors(out / "model.safetensors", _lm_tensors(model, dtype))
    hf_cfg = config_to_hf(cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    checkpoint.write_json(out / "config.json", hf_cfg)
    write_generation_files(out, tokenizer, cfg.max_seq_len)
    return out
