"""GGUF export: the file reads back with kosmo's metadata, tokenizer and weights; transformers' GGUF loader
runs it with kosmo's logits and token ids; llama.cpp itself does too (slow suite)."""

import copy
import json

import jinja2
import numpy as np
import pytest
import torch

from kosmo.cli import main
from kosmo.data.chat import JINJA_TEMPLATE, render
from kosmo.errors import KosmoError
from kosmo.generate import Sampling, generate_ids
from kosmo.interop.gguf import export_gguf, interleave
from kosmo.model.flamingo import Flamingo, FlamingoConfig
from kosmo.model.lm import LM, LMConfig, apply_rope, llama3_scaled, rope_tables
from kosmo.model.load import save_run
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.model.vqvae import VQVAEConfig
from kosmo.tokenizer import SPECIAL_TOKENS, Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

TEXTS = ["the red circle is left of the blue square.", "A picture of 3 green triangles: 12 in all!",
         "café über 日本語 🙂 tabs\tand  two spaces\n\nnew lines", "don't we'll it's <s> </s> <|end|>"]
SAMPLES = TEXTS + ["  leading spaces", "trailing spaces   ", "x=1+2*3; y='q'", "\n\n\t"]
EXTRA_ROWS = 3  # embedding rows past the tokenizer's: llama.cpp still needs a token for each


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS * 20, vocab_size=420, min_frequency=1)


def tiny_lm(vocab: int, tie: bool, **kw) -> LM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, max_seq_len=64,
               rope_theta=20000.0, norm_eps=1e-5, tie_embeddings=tie, init_std=0.1)
    model = LM(LMConfig(**(cfg | kw))).eval()
    with torch.no_grad():  # random norms, so a misplaced one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request, tok, tmp_path_factory):
    """A run directory and its GGUF files, one per --dtype."""
    model = tiny_lm(tok.vocab_size + EXTRA_ROWS, tie=request.param)
    out = tmp_path_factory.mktemp("gguf")
    save_run(out / "run", model, tok, {"arch": "lm", "model": model.cfg.to_dict()})
    files = {dtype: export_gguf(model, tok, out / f"{dtype}.gguf", dtype, name="run")
             for dtype in ("f32", "f16", "q8_0")}
    return model, out / "run", files


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_cli_writes_the_same_file(exported, tmp_path, capsys):
    _, run, files = exported
    assert main(["export", "--model", str(run), "--format", "gguf", "--dtype", "q8_0", "--out",
                 str(tmp_path / "m.gguf")]) == 0
    assert json.loads(capsys.readouterr().out) == {"exported": str(tmp_path / "m.gguf"), "format": "gguf"}
    assert (tmp_path / "m.gguf").read_bytes() == files["q8_0"].read_bytes()


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_metadata_tokenizer_and_tensors_read_back(exported, tok, dtype):
    model, _, files = exported
    cfg = model.cfg
    meta, tensors = fields(files[dtype])
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "run"
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    assert {k.removeprefix("llama."): v for k, v in meta.items() if k.startswith("llama.")} == pytest.approx({
        "vocab_size": cfg.vocab_size, "context_length": 64, "embedding_length": 64, "block_count": 2,
        "feed_forward_length": 176, "attention.head_count": 4, "attention.head_count_kv": 2,
        "rope.dimension_count": 16, "rope.freq_base": 20000.0, "attention.layer_norm_rms_epsilon": 1e-5})
    n = tok.vocab_size
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [tok.token(i) for i in range(n)] + [f"<|unused_{i}|>" for i in
                                                                                 range(n, n + EXTRA_ROWS)]
    control, normal, unused = 3, 1, 5
    assert meta["tokenizer.ggml.token_type"] == [control] * len(SPECIAL_TOKENS) + [normal] * (
        n - len(SPECIAL_TOKENS)) + [unused] * EXTRA_ROWS
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in tok.to_json()["model"]["merges"]]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (1, 2, 9, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == JINJA_TEMPLATE

    names = {"token_embd.weight", "output_norm.weight"} | set(["output.weight"] * (not cfg.tie_embeddings)) | {
        f"blk.{i}.{t}.weight" for i in range(2) for t in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names
    shapes = {"token_embd": [64, cfg.vocab_size], "output": [64, cfg.vocab_size], "attn_q": [64, 64],
              "attn_k": [64, 32], "attn_v": [64, 32], "attn_output": [64, 64], "ffn_gate": [64, 176],
              "ffn_up": [64, 176], "ffn_down": [176, 64]}  # ggml order: the row length first
    matrix = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[dtype]
    for name, t in tensors.items():
        kind = name.split(".")[-2]
        if "norm" in kind:
            assert t.tensor_type == Q.F32 and t.shape.tolist() == [64], name
        else:
            assert t.shape.tolist() == shapes[kind], name
            # q8_0 blocks hold 32 values of a row: ffn_down's rows of 176 fall back to f16
            expected = Q.F16 if dtype == "q8_0" and kind == "ffn_down" else matrix
            assert t.tensor_type == expected, name


def test_f32_loads_in_transformers_with_kosmo_logits_and_greedy_tokens(exported):
    model, _, files = exported
    hf = load_hf(files["f32"])
    ids = torch.randint(16, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the Q/K rows went to llama.cpp's pairwise RoPE layout and transformers took them back
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
        hf_tokens = hf.generate(ids[:1, :10], max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 10:].tolist()
    ours, _ = generate_ids(model, [ids[0, :10].tolist()], Sampling(max_new_tokens=20), stop_ids=())
    assert ours[0] == hf_tokens


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_load_with_the_logits_of_their_rounded_weights(exported, dtype):
    model, _, files = exported
    ids = torch.randint(16, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact, got = model(ids), load_hf(files[dtype])(ids).logits
        torch.testing.assert_close(got, rounded(model, dtype)(ids), atol=1e-4, rtol=1e-4)
    error, scale = (got - exact).abs(), exact.abs().max().item()
    print(f"{dtype}: |logit - f32 logit| max {error.max():.4f}, mean {error.mean():.5f}; |logits| up to {scale:.2f}")
    assert error.max() < {"f16": 0.002, "q8_0": 0.05}[dtype] * scale


def rounded(model: LM, dtype: str) -> LM:
    """The model with every matrix rounded as the file stores it: q8_0 rounds within rows, so it commutes with
    splitting qkv and interleaving rows; a row that is no whole number of blocks is stored f16."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                w = p.numpy()
                if dtype == "q8_0" and w.shape[1] % 32 == 0:
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0)))
                else:
                    p.copy_(torch.from_numpy(w.astype(np.float16).astype(np.float32)))
    return model


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def test_tokenizer_in_transformers_gives_kosmo_ids(exported, tok):
    _, _, files = exported
    hf = transformers.AutoTokenizer.from_pretrained(files["f32"].parent, gguf_file=files["f32"].name)
    for text in SAMPLES:  # a literal "<s>" in text is text in kosmo: split_special_tokens says the same here
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text), text
    assert hf("a red circle").input_ids == [1] + tok.encode("a red circle")  # add_bos_token
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the red circle?"},
            {"role": "assistant", "content": "left of the blue square."},
            {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": " the green one?"}]}]
    for prompt in (True, False):
        expected = render(chat, tok, 0, add_generation_prompt=prompt).ids
        assert hf.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True)["input_ids"] == expected
    assert hf.decode(tok.encode(TEXTS[2])) == TEXTS[2]


def test_interleave_turns_rotate_half_rope_into_pairwise_rope():
    """What llama.cpp computes with the interleaved rows is what kosmo computes, in interleaved order."""
    torch.manual_seed(0)
    heads, d, T = 3, 8, 5
    w, x = torch.randn(heads * d, 16), torch.randn(T, 16)
    cos, sin = rope_tables(d, T, 10000.0)
    kosmo_q = apply_rope((x @ w.T).view(T, heads, d).transpose(0, 1), cos, sin)  # (heads, T, d)
    q = (x @ interleave(w, heads).T).view(T, heads, d // 2, 2).transpose(0, 1)
    c, s = cos[:, : d // 2], sin[:, : d // 2]  # pair j turns by the angle of dimensions j and j + d/2
    pairwise = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], -1)
    expected = kosmo_q.view(heads, T, 2, d // 2).transpose(2, 3)  # pair j = (x_j, x_{j + d/2})
    torch.testing.assert_close(pairwise, expected)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
], ids=lambda s: s["rope_type"])
def test_rope_scaling_is_written_as_llama_cpp_reads_it(tok, tmp_path, scaling):
    model = tiny_lm(tok.vocab_size, tie=True, rope_scaling=scaling)
    meta, tensors = fields(export_gguf(model, tok, tmp_path / "m.gguf"))
    kind = scaling["rope_type"]
    if kind == "llama3":  # llama.cpp divides each frequency by its factor
        inv_freq = 1.0 / 20000.0 ** (torch.arange(0, 16, 2) / 16)
        factors = np.asarray(tensors["rope_freqs.weight"].data)
        np.testing.assert_allclose(factors, (inv_freq / llama3_scaled(inv_freq, scaling)).numpy(), rtol=1e-6)
        assert factors[0] < 2 and factors[-1] == 8  # fast pairs keep most of their speed, the slowest slow 8-fold
        assert "llama.rope.scaling.type" not in meta
    else:
        assert meta["llama.rope.scaling.type"] == kind and meta["llama.rope.scaling.factor"] == 4.0
    if kind == "yarn":
        assert meta["llama.rope.scaling.original_context_length"] == 16
        assert (meta["llama.rope.scaling.yarn_beta_fast"], meta["llama.rope.scaling.yarn_beta_slow"]) == (16, 1)


def test_an_mllm_exports_its_language_model_with_image_codes_named(tok, tmp_path):
    torch.manual_seed(0)
    codes = 16
    lm = LMConfig(vocab_size=tok.vocab_size + codes, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)
    model = MLLM(MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2,
                                                mlp_dim=64), lm=lm,
                            image_tokenizer=VQVAEConfig(image_size=8, downsample=4, channels=16, codebook_size=codes,
                                                        code_dim=8))).eval()
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    meta, tensors = fields(path)
    assert meta["tokenizer.ggml.tokens"][-codes:] == [f"<|image_code_{i}|>" for i in range(codes)]
    assert not any(name.startswith(("v.", "mm.")) for name in tensors)
    ids = torch.randint(16, tok.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(path)(ids).logits, model.lm(ids), atol=1e-4, rtol=1e-4)


def test_what_gguf_cannot_hold_is_refused_in_one_line(tok, tmp_path, capsys):
    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64))
    cfg = FlamingoConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, mlp_dim=64),
                         lm=lm.cfg, latents=4, resampler_heads=2, xattn_heads=2)
    save_run(tmp_path / "flamingo", Flamingo(cfg, lm=lm), tok, {"arch": "flamingo", "model": cfg.to_dict()})
    save_run(tmp_path / "lm", lm, tok, {"arch": "lm", "model": lm.cfg.to_dict()})
    export = lambda *args: main(["export", "--model", *map(str, args)])  # noqa: E731
    assert export(tmp_path / "flamingo", "--format", "gguf", "--out", tmp_path / "f.gguf") == 2
    assert_one_line(capsys, "flamingo: --format gguf exports runs of arch lm or mllm, and this one is flamingo")
    assert not (tmp_path / "f.gguf").exists()
    with pytest.raises(SystemExit):
        export(tmp_path / "lm", "--format", "gguf", "--dtype", "q4_0", "--out", tmp_path / "m.gguf")
    assert "argument --dtype: invalid choice: 'q4_0'" in capsys.readouterr().err
    assert export(tmp_path / "lm", "--dtype", "f16", "--out", tmp_path / "hf") == 2
    assert_one_line(capsys, "--dtype is for --format gguf")
    with pytest.raises(KosmoError, match="Flamingo model cannot be written as GGUF: its LM reads pictures through "
                                         "gated cross-attention"):
        export_gguf(Flamingo(cfg, lm=lm), tok, tmp_path / "m.gguf")
    assert export(tmp_path / "lm", "--format", "gguf", "--adapter", "--out", tmp_path / "m.gguf") == 2
    assert_one_line(capsys, "--adapter writes a PEFT adapter; --format gguf writes the merged model")
    assert export(tmp_path / "lm", "--format", "gguf", "--out", tmp_path) == 2
    assert_one_line(capsys, "is a directory; GGUF is one file")
    with pytest.raises(KosmoError, match="--dtype 'bf16' is not one of f32, f16, q8_0"):
        export_gguf(lm, tok, tmp_path / "m.gguf", "bf16")
    with pytest.raises(KosmoError, match="smear_keys"):
        export_gguf(tiny_lm(tok.vocab_size, tie=True, smear_keys=True), tok, tmp_path / "m.gguf")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "truncate": False}
    with pytest.raises(KosmoError, match="rope_scaling.truncate=False has no counterpart in llama.cpp"):
        export_gguf(tiny_lm(tok.vocab_size, tie=True, rope_scaling=yarn), tok, tmp_path / "m.gguf")


def assert_one_line(capsys, *needles):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}],
                         ids=["plain", "linear", "llama3", "yarn"])
def test_llama_cpp_runs_the_file_with_kosmo_logits_tokens_and_greedy_text(tok, tmp_path, scaling):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_lm(tok.vocab_size, tie=False, rope_scaling=scaling)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    # an f32 KV cache (llama.cpp keeps f16 by default), so the logits compare at fp32 tolerance
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    for text in SAMPLES:  # llama.cpp's "gpt-2" pre-tokenizer splits as kosmo's does
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    chat = [{"role": "user", "content": "where is the red circle?"}]
    rendered = jinja2.Template(JINJA_TEMPLATE).render(messages=chat, add_generation_prompt=True, bos_token="<s>")
    ids = render(chat, tok, 0, add_generation_prompt=True).ids
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), expected, atol=1e-3, rtol=1e-3)
    llm.reset()
    theirs = [t for _, t in zip(range(12), llm.generate(ids, temp=0.0))]
    # kosmo's plain argmax (its generate_ids never writes placeholders such as <|begin_of_image|>; llama.cpp may)
    ours = list(ids)
    with torch.no_grad():
        for _ in range(12):
            ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
    assert theirs == ours[len(ids):]
