"""Parity with transformers' LlamaForCausalLM: import, export, logits and greedy tokens."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kosmo.errors import KosmoError  # noqa: E402
from kosmo.generate import Sampling, generate_ids  # noqa: E402
from kosmo.interop.hf_llama import export_hf, import_hf  # noqa: E402
from kosmo.model.lm import LM, LMConfig, rope_tables  # noqa: E402

CASES = {
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa-theta": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0),
    "llama3-scaling": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "yarn": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "yarn-options": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                       "beta_fast": 4.0, "beta_slow": 0.5, "mscale": 1.0, "mscale_all_dim": 0.5,
                                       "truncate": False}),
    "linear": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
                   rope_scaling={"rope_type": "linear", "factor": 4.0}),
}
SCALED = ["llama3-scaling", "yarn", "yarn-options", "linear"]


def hf_llama(case: str, seed: int = 0):
    kw = dict(CASES[case])
    theta, scaling = kw.pop("rope_theta"), kw.pop("rope_scaling", None)
    rope = {"rope_theta": theta, "rope_type": "default"} if scaling is None else {"rope_theta": theta, **scaling}
    cfg = transformers.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                   num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
                                   rope_parameters=rope, attn_implementation="eager", **kw)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1; random norms make the parity check meaningful
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_logits(case, tmp_path):
    hf = hf_llama(case)
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path)
    ids = torch.randint(0, 211, (2, 57))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(tie, tmp_path):
    torch.manual_seed(1)
    model = LM(LMConfig(vocab_size=150, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
                        rope_theta=20000.0, tie_embeddings=tie)).eval()
    export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(16, 150, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        hf_tokens = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 20:].tolist()
    ours, _ = generate_ids(model, [ids[0].tolist()], Sampling(max_new_tokens=24), stop_ids=())
    assert ours[0] == hf_tokens


@pytest.mark.parametrize("case", SCALED)
def test_scaled_rope_survives_export_and_matches_transformers(case, tmp_path):
    model = import_hf(save(hf_llama(case), tmp_path / "hf"))
    export_hf(model, tmp_path / "out")
    assert model.cfg.rope_scaling["rope_type"] == CASES[case]["rope_scaling"]["rope_type"]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    for key, value in CASES[case]["rope_scaling"].items():
        assert hf.config.rope_parameters[key] == value, key
    ids = torch.randint(0, 211, (1, 100))  # well past the original 32 positions
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert import_hf(tmp_path / "out").cfg.rope_scaling == model.cfg.rope_scaling


def test_yarn_attention_factor_scales_cos_and_sin():
    plain = rope_tables(16, 64, 10000.0)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    cos, sin = rope_tables(16, 64, 10000.0, yarn)
    assert torch.allclose(cos[0], torch.full((16,), 0.1 * math.log(4.0) + 1))  # position 0: cos 1 times the factor
    assert torch.equal(sin[:, 0], plain[1][:, 0] * (0.1 * math.log(4.0) + 1))  # fastest pair is kept as is
    with pytest.raises(ValueError, match="not supported .*linear, llama3, yarn"):
        rope_tables(16, 64, 10000.0, {"rope_type": "dynamic", "factor": 2.0})


def save(hf, path):
    hf.save_pretrained(path)
    return path


def test_round_trip_is_exact(tmp_path):
    model = LM(LMConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False))
    back = import_hf(export_hf(model, tmp_path))
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_import_refuses_unsupported_and_broken_checkpoints(tmp_path):
    hf = hf_llama("gqa-tied")
    hf.config.attention_bias = True
    hf.save_pretrained(tmp_path / "bias")
    with pytest.raises(KosmoError, match="attention_bias"):
        import_hf(tmp_path / "bias")
    with pytest.raises(KosmoError, match="config.json: file not found"):
        import_hf(tmp_path / "missing")


def test_export_refuses_smeared_keys(tmp_path):
    model = LM(LMConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, smear_keys=True))
    with pytest.raises(KosmoError, match="smear_keys=true has no counterpart"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
