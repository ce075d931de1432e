"""kosmo `LM` -> a GGUF file that llama.cpp runs as architecture "llama".

The language model of an `lm` run, or of an `mllm` run without its eyes and ears. Three things differ
from the Hugging Face export:
- llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... where kosmo and HF rotate the two halves of
  each head (x_i, x_{i+d/2}); the rows of the q and k projections are reordered to match (`interleave`);
- the tokenizer travels as metadata: kosmo's byte-level BPE vocabulary and merges, its special tokens as
  control tokens, and the chat format as a Jinja template;
- weights may be stored as f16 or q8_0 (blocks of 32 int8 with one f16 scale). Norms and the llama3
  RoPE factors stay f32, as llama.cpp expects of 1-D tensors.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from kosmo import checkpoint
from kosmo.data.chat import JINJA_TEMPLATE
from kosmo.errors import KosmoError
from kosmo.model.lm import LM, LMConfig, llama3_scaled
from kosmo.model.mllm import MLLM
from kosmo.tokenizer import BOS, END_OF_TURN, EOS, PAD, Tokenizer

Q = gguf.GGMLQuantizationType
DTYPES = {  # --dtype -> (the type of 2-D weights, the file type recorded in general.file_type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# kosmo splits text as GPT-2 does (tokenizers' ByteLevel with its regex, no prefix space, no normaliser);
# llama.cpp's pre-tokenizer of that name applies the same regex.
PRE_TOKENIZER = "gpt-2"

# kosmo name (per layer, after "blocks.{i}.") -> llama.cpp names (after "blk.{i}."), split in order
LAYER_MAP = {
    "attn_norm.weight": ["attn_norm.weight"],
    "attn.qkv.weight": ["attn_q.weight", "attn_k.weight", "attn_v.weight"],
    "attn.proj.weight": ["attn_output.weight"],
    "mlp_norm.weight": ["ffn_norm.weight"],
    "mlp.gate_up.weight": ["ffn_gate.weight", "ffn_up.weight"],
    "mlp.down.weight": ["ffn_down.weight"],
}
GLOBAL_MAP = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def export_gguf(model: torch.nn.Module, tokenizer: Tokenizer, out: str | Path, dtype: str = "f32",
                name: str = "kosmo") -> Path:
    """Writes the language model of `model` (an `LM`, or an `MLLM`'s) and `tokenizer` to the file `out`."""
    if dtype not in DTYPES:
        raise KosmoError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    lm = language_model(model)
    cfg = lm.cfg
    out = Path(out)
    if out.is_dir():
        raise KosmoError(f"{out}: is a directory; GGUF is one file, give its path (e.g. {out / 'model.gguf'})")
    weight_type, file_type = DTYPES[dtype]
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(name)
    writer.add_file_type(file_type)
    write_hparams(writer, cfg)
    # a drawing model's image codes are the last rows of its vocabulary
    write_tokenizer(writer, tokenizer, cfg.vocab_size, model.text_vocab if isinstance(model, MLLM) else cfg.vocab_size)
    for tensor_name, w in tensors(lm):
        add_tensor(writer, tensor_name, w, weight_type)
    return checkpoint.atomic_write(out, lambda tmp: write(writer, tmp))


def write(writer: gguf.GGUFWriter, path: Path):
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def language_model(model: torch.nn.Module) -> LM:
    """The LM that llama.cpp can run, or a KosmoError that says why there is none."""
    if isinstance(model, MLLM):
        model = model.lm
    elif not isinstance(model, LM):
        kind = type(model).__name__
        why = {"Flamingo": "its LM reads pictures through gated cross-attention blocks between its layers, which "
                           "llama.cpp's llama architecture has no place for"}.get(kind, "it is not a language model")
        raise KosmoError(f"a {kind} model cannot be written as GGUF: {why}; export an lm or mllm run")
    if model.lm_head is None:
        raise KosmoError("a decoder without a vocabulary head cannot be written as GGUF")
    if model.cfg.smear_keys:
        raise KosmoError("model.smear_keys=true has no counterpart in llama.cpp's llama architecture")
    return model


def write_hparams(writer: gguf.GGUFWriter, cfg: LMConfig):
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    scaling, kind = cfg.rope_scaling or {}, rope_kind(cfg)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        # llama.cpp computes YaRN's ramp and attention factor by HF's defaults; options that change them
        # would give a file whose positions mean something else than in kosmo
        for key, default in (("attention_factor", None), ("mscale", None), ("mscale_all_dim", None),
                             ("truncate", True)):
            if scaling.get(key, default) != default:
                raise KosmoError(f"model.rope_scaling.{key}={scaling[key]} has no counterpart in llama.cpp's YaRN")
        old_len = scaling.get("original_max_position_embeddings") or cfg.max_seq_len
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling.get("factor") or cfg.max_seq_len / old_len)
        writer.add_rope_scaling_orig_ctx_len(old_len)
        writer.add_rope_scaling_yarn_beta_fast(scaling.get("beta_fast") or 32.0)
        writer.add_rope_scaling_yarn_beta_slow(scaling.get("beta_slow") or 1.0)
    elif kind not in ("default", "llama3"):  # llama3's factors travel as the rope_freqs tensor
        raise KosmoError(f"model.rope_scaling type {kind!r} cannot be written as GGUF (linear, llama3, yarn)")


def rope_kind(cfg: LMConfig) -> str:
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int, first_code: int):
    """The vocabulary, one (text, type) per row of the embedding. Rows past the tokenizer's are image codes
    (from `first_code` on) or unused room; llama.cpp still needs a distinct name for each."""
    doc = tokenizer.to_json()
    pre, model_type = doc.get("pre_tokenizer") or {}, doc["model"]["type"]
    if model_type != "BPE" or doc.get("normalizer") or pre.get("type") != "ByteLevel" \
            or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise KosmoError(f"tokenizer: {model_type} with pre-tokenizer {pre.get('type')} is not kosmo's byte-level "
                         f"BPE; llama.cpp's '{PRE_TOKENIZER}' pre-tokenizer would split text differently")
    added = {t["id"]: t["special"] for t in doc["added_tokens"]}
    tokens = [(tokenizer.token(i), gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
              if i in added else (tokenizer.token(i), gguf.TokenType.NORMAL) for i in range(tokenizer.vocab_size)]
    tokens += [(f"<|image_code_{i - first_code}|>" if i >= first_code else f"<|unused_{i}|>", gguf.TokenType.UNUSED)
               for i in range(len(tokens), vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list([text for text, _ in tokens])
    writer.add_token_types([kind for _, kind in tokens])
    # tokenizers writes a merge as a pair or, before 0.20, as "a b"; byte-level symbols never hold a space
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_eot_token_id(END_OF_TURN)  # a chat reply ends here; llama.cpp stops on it as on </s>
    writer.add_pad_token_id(PAD)
    writer.add_add_bos_token(True)  # kosmo starts every document and prompt with <s>
    writer.add_add_eos_token(False)
    writer.add_chat_template(JINJA_TEMPLATE)


def tensors(lm: LM):
    """(llama.cpp name, fp32 array) for every weight, q and k rows interleaved for llama.cpp's RoPE."""
    cfg = lm.cfg
    sd = {k: v.detach().float().cpu() for k, v in lm.state_dict().items()}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    split = {"attn.qkv.weight": [q, kv, kv], "mlp.gate_up.weight": [cfg.hidden_dim, cfg.hidden_dim]}
    heads = {"attn_q.weight": cfg.n_heads, "attn_k.weight": cfg.n_kv_heads}
    for kosmo_name, name in GLOBAL_MAP.items():
        if kosmo_name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        yield name, sd[kosmo_name].numpy()
    for i in range(cfg.n_layers):
        for kosmo_name, names in LAYER_MAP.items():
            w = sd[f"blocks.{i}.{kosmo_name}"]
            for name, part in zip(names, w.split(split[kosmo_name]) if kosmo_name in split else [w]):
                yield f"blk.{i}.{name}", (interleave(part, heads[name]) if name in heads else part).numpy()
    if rope_kind(cfg) == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(cfg)


def interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection, from the rotate-half layout (per head: first halves, then second halves)
    to adjacent pairs: row j of half h goes to row 2j + h."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def llama3_rope_factors(cfg: LMConfig) -> np.ndarray:
    """The number llama.cpp divides each RoPE frequency by: the ratio of kosmo's unscaled to scaled ones."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    return (inv_freq / llama3_scaled(inv_freq, cfg.rope_scaling)).numpy()


def add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, weight_type: Q):
    """Vectors stay f32; a matrix whose rows do not split into q8_0's blocks of 32 falls back to f16."""
    kind = Q.F32 if w.ndim == 1 else weight_type
    if kind == Q.Q8_0 and w.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        kind = Q.F16
    if kind == Q.F32:
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    elif kind == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
