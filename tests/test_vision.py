"""The CLIP image encoder and CLIP model: parity with transformers, the contrastive loss, checkpoint errors."""

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from kosmo import checkpoint  # noqa: E402
from kosmo.errors import KosmoError  # noqa: E402
from kosmo.interop.hf_clip import (export_hf_clip, export_hf_clip_vision, import_hf_clip,  # noqa: E402
                                   import_hf_clip_vision)
from kosmo.model.clip import CLIP, CLIPConfig, TextConfig, clip_loss  # noqa: E402
from kosmo.model.vision import VisionConfig, VisionTransformer  # noqa: E402

VISION_CASES = {
    "p8-quick_gelu": dict(patch_size=8, num_hidden_layers=3, hidden_act="quick_gelu"),
    "p4-gelu": dict(patch_size=4, num_hidden_layers=2, hidden_act="gelu"),
    "p4-gelu_tanh": dict(patch_size=4, num_hidden_layers=2, hidden_act="gelu_pytorch_tanh"),
}
VOCAB = 99


def vision_cfg(**kw):
    return dict(dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, layer_norm_eps=1e-5), **kw)


def randomise(model, seed=0):
    """HF inits norms to 1 and biases to 0; random ones make the parity check meaningful (a swapped q/k
    bias or a skipped LayerNorm would otherwise go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("logit_scale"):
                p.fill_(3.0)
    return model.eval()


def hf_vision(case):
    torch.manual_seed(0)
    return randomise(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision_cfg(**VISION_CASES[case]))))


def hf_clip(eos: int, act="quick_gelu", seed=0):
    text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, hidden_act=act, eos_token_id=eos, bos_token_id=1, pad_token_id=0)
    cfg = transformers.CLIPConfig(vision_config=vision_cfg(patch_size=8, num_hidden_layers=2, hidden_act=act),
                                  text_config=text, projection_dim=24)
    torch.manual_seed(seed)
    return randomise(transformers.CLIPModel(cfg), seed)


def pixels(n=2, size=(32, 32), seed=1):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def token_ids(eot: int, seed=2):
    """Rows of ordinary tokens, the end-of-text token `eot` at a different place in each, then padding.
    One row is padded with `eot` itself (pooled at the first), and unless `eot` is the largest id, one
    row holds a larger id before it, so the argmax rule and the first-EOS rule really disagree."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (4, 12), generator=g)
    for row, end in enumerate([11, 5, 8, 2]):
        ids[row, end] = eot
        ids[row, end + 1:] = 0
    ids[2, 9:] = eot
    if eot != VOCAB - 1:
        ids[3, 1] = VOCAB - 1
    return ids


@pytest.mark.parametrize("case", list(VISION_CASES))
def test_vision_import_matches_transformers_pooled_output_and_hidden_states(case, tmp_path):
    hf = hf_vision(case)
    hf.save_pretrained(tmp_path)
    model = import_hf_clip_vision(tmp_path)
    x = pixels()
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        torch.testing.assert_close(model(x), out.pooler_output, atol=1e-4, rtol=1e-4)
        n = model.cfg.n_layers
        for k in (0, 1, -2, -1, n, -(n + 1)):
            torch.testing.assert_close(model.features(x, layer=k), out.hidden_states[k], atol=1e-4, rtol=1e-4)
    assert model.num_patches == (32 // VISION_CASES[case]["patch_size"]) ** 2
    assert model.features(x).shape == (2, 1 + model.num_patches, 64)


def test_vision_import_reads_prefixed_and_full_clip_checkpoints(tmp_path):
    """transformers 4 saved CLIPVisionModel tensors under `vision_model.`; CLIPModel does too."""
    hf = hf_vision("p8-quick_gelu")
    hf.save_pretrained(tmp_path / "v5")
    tensors = load_file(str(tmp_path / "v5" / "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in tensors)  # what this transformers writes
    (tmp_path / "v4").mkdir()
    save_file({f"vision_model.{k}": v for k, v in tensors.items()}, str(tmp_path / "v4" / "model.safetensors"))
    (tmp_path / "v4" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(import_hf_clip_vision(tmp_path / "v4")(x), hf(x).pooler_output,
                                   atol=1e-4, rtol=1e-4)
        full = hf_clip(eos=VOCAB - 2)
        full.save_pretrained(tmp_path / "clip")
        # openai/clip-vit-* configs also carry `vision_config_dict`, whose values transformers lets win
        cfg = checkpoint.read_json(tmp_path / "clip" / "config.json")
        cfg["vision_config"]["hidden_size"], cfg["vision_config_dict"] = 1024, {"hidden_size": 64}
        checkpoint.write_json(tmp_path / "clip" / "config.json", cfg)
        torch.testing.assert_close(import_hf_clip_vision(tmp_path / "clip").features(x, -2),
                                   full.vision_model(x, output_hidden_states=True).hidden_states[-2],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(48, 48), (32, 48)])
def test_interpolated_position_embeddings_match_transformers(size, tmp_path):
    hf = hf_vision("p8-quick_gelu")
    hf.save_pretrained(tmp_path)
    model = import_hf_clip_vision(tmp_path)
    x = pixels(size=size)
    with torch.no_grad():
        expected = hf(x, interpolate_pos_encoding=True, output_hidden_states=True)
        torch.testing.assert_close(model(x), expected.pooler_output, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.features(x, 0), expected.hidden_states[0], atol=1e-4, rtol=1e-4)


# Legacy: the config says eos_token_id=2 while the real end-of-text token is the largest id (as in
# openai/clip-vit-*), and transformers pools at argmax(input_ids). Modern: it pools at the first eos_token_id.
@pytest.mark.parametrize("eos,eot,legacy", [(2, VOCAB - 1, True), (VOCAB - 2, VOCAB - 2, False)])
def test_clip_import_matches_transformers_embeddings_and_logits(eos, eot, legacy, tmp_path):
    hf = hf_clip(eos, act="quick_gelu" if legacy else "gelu")
    hf.save_pretrained(tmp_path)
    model = import_hf_clip(tmp_path)
    assert model.cfg.text.legacy_argmax_pool is legacy and model.cfg.text.eos_token_id == eos
    x, ids = pixels(n=3), token_ids(eot)
    with torch.no_grad():
        # transformers 5 returns BaseModelOutputWithPooling here, the projected embedding in .pooler_output
        torch.testing.assert_close(model.encode_image(x), hf.get_image_features(x).pooler_output,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids), hf.get_text_features(ids).pooler_output,
                                   atol=1e-4, rtol=1e-4)
        expected = hf(input_ids=ids, pixel_values=x)
        per_image, per_text = model(x, ids)
        torch.testing.assert_close(per_image, expected.logits_per_image, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(per_text, expected.logits_per_text, atol=1e-4, rtol=1e-4)
        # the other pooling rule would have given different text embeddings on these ids
        model.text.cfg.legacy_argmax_pool = not legacy
        assert not torch.allclose(model.encode_text(ids), hf.get_text_features(ids).pooler_output, atol=1e-3)


def test_text_pools_at_first_eos_and_truncated_rows_at_their_last_token():
    model = CLIP(CLIPConfig(vision=VisionConfig(dim=32, n_layers=1, mlp_dim=64),
                            text=TextConfig(vocab_size=50, dim=32, n_layers=1, mlp_dim=64, eos_token_id=7)))
    ids = torch.tensor([[5, 9, 7, 7, 7], [5, 7, 9, 7, 0], [5, 9, 9, 9, 9]])
    assert model.text.eos_positions(ids).tolist() == [2, 1, 4]
    hidden = model.text.hidden(ids)
    torch.testing.assert_close(model.text(ids), hidden[[0, 1, 2], [2, 1, 4]])


def test_clip_export_loads_in_transformers_with_the_same_logits(tmp_path):
    torch.manual_seed(3)
    cfg = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, dim=64, n_layers=2, mlp_dim=128, act="gelu"),
                     text=TextConfig(vocab_size=VOCAB, max_len=16, dim=48, n_layers=2, mlp_dim=96,
                                     eos_token_id=VOCAB - 2, act="gelu_tanh"), embed_dim=24, logit_scale_init=3.3)
    model = randomise(CLIP(cfg))
    export_hf_clip(model, tmp_path / "clip")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "clip").eval()
    x, ids = pixels(n=3), token_ids(VOCAB - 2)
    with torch.no_grad():
        per_image, _ = model(x, ids)
        torch.testing.assert_close(per_image, hf(input_ids=ids, pixel_values=x).logits_per_image,
                                   atol=1e-4, rtol=1e-4)
    back = import_hf_clip(tmp_path / "clip")
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    export_hf_clip_vision(model.vision, tmp_path / "vision")
    hf_v = transformers.CLIPVisionModel.from_pretrained(tmp_path / "vision").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.vision(x), hf_v(x).pooler_output, atol=1e-4, rtol=1e-4)
    # kosmo's own "</s>" is id 2, which transformers would pool by argmax: refuse rather than export wrongly
    cfg.text.eos_token_id = 2
    with pytest.raises(KosmoError, match="eos_token_id=2"):
        export_hf_clip(model, tmp_path / "bad")


def test_clip_loss_matches_a_hand_computed_2x2_value():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.exp(3) / (math.exp(1) + math.exp(3)))]
    cols = [-math.log(math.exp(2) / (math.exp(2) + math.exp(1))), -math.log(math.exp(3) / (1 + math.exp(3)))]
    expected = (sum(rows) / 2 + sum(cols) / 2) / 2
    assert clip_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def tiny_clip(**kw):
    return CLIP(CLIPConfig(vision=VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=2, mlp_dim=64),
                           text=TextConfig(vocab_size=40, max_len=8, dim=32, n_layers=2, mlp_dim=64, eos_token_id=3),
                           embed_dim=16, **kw))


def test_gradient_reaches_logit_scale_and_both_towers_and_the_scale_is_clamped():
    torch.manual_seed(0)
    model = tiny_clip()
    x, ids = torch.randn(4, 3, 16, 16), torch.randint(4, 40, (4, 8))
    ids[:, -1] = 3
    per_image, per_text = model(x, ids)
    assert torch.equal(per_text, per_image.T)
    clip_loss(per_image).backward()
    for name in ("logit_scale", "vision.patch_embed.weight", "text.token_embed.weight", "text_projection.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all(), name
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026, clamped to 100
        per_image, _ = model(x, ids)
        cos = torch.nn.functional.normalize(model.encode_image(x), dim=-1) @ \
            torch.nn.functional.normalize(model.encode_text(ids), dim=-1).T
    torch.testing.assert_close(per_image, 100 * cos)


def test_features_runs_only_the_blocks_it_needs():
    model = VisionTransformer(VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=5, mlp_dim=64))
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    x = torch.randn(1, 3, 16, 16)
    for layer, ran in [(-2, [0, 1, 2, 3]), (0, []), (2, [0, 1]), (-1, [0, 1, 2, 3, 4]), (-6, [])]:
        calls.clear()
        model.features(x, layer)
        assert calls == ran, layer
    calls.clear()
    model(x)
    assert calls == [0, 1, 2, 3, 4]
    with pytest.raises(IndexError, match="out of range"):
        model.features(x, 6)


def test_configs_round_trip_and_defaults():
    cfg = CLIPConfig(vision=VisionConfig(patch_size=8, act="gelu"), text=TextConfig(eos_token_id=9), embed_dim=64)
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    vit = VisionTransformer(VisionConfig())
    assert vit.num_patches == 64 and vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    with pytest.raises(ValueError, match="act"):
        VisionConfig(act="relu")
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match=r"text\.dim=10 is not divisible by text\.n_heads=3"):
        TextConfig(dim=10, n_heads=3)


@pytest.mark.parametrize("cls, data, key", [(VisionConfig, {"patch": 8}, "patch"),
                                            (TextConfig, {"max_length": 77}, "max_length"),
                                            (CLIPConfig, {"vision": {"dimm": 64}}, "vision.dimm"),
                                            (CLIPConfig, {"text": {"heads": 2}}, "text.heads")])
def test_an_unknown_config_key_is_refused_by_name(cls, data, key):
    with pytest.raises(KosmoError, match=f"unknown config key '{re.escape(key)}'"):
        cls.from_dict(data)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    hf = hf_vision("p4-gelu")
    good = tmp_path / "good"
    hf.save_pretrained(good)
    config = checkpoint.read_json(good / "config.json")
    tensors = load_file(str(good / "model.safetensors"))

    def variant(name, cfg=None, tensors_=None, bin_only=False):
        d = tmp_path / name
        d.mkdir()
        checkpoint.write_json(d / "config.json", config if cfg is None else cfg)
        if bin_only:
            torch.save(tensors, d / "pytorch_model.bin")
        else:
            save_file(tensors if tensors_ is None else tensors_, str(d / "model.safetensors"))
        return d

    cases = [
        (variant("bin", bin_only=True), r"no \*\.safetensors files \(pytorch_model\.bin"),
        (variant("llama", cfg={**config, "model_type": "llama"}), "model_type 'llama' is not clip"),
        (variant("nofield", cfg={k: v for k, v in config.items() if k != "hidden_size"}),
         "missing field 'hidden_size'"),
        (variant("act", cfg={**config, "hidden_act": "relu"}), "hidden_act 'relu' is not supported"),
        (variant("missing", tensors_={k: v for k, v in tensors.items() if "layers.1.mlp.fc2.weight" not in k}),
         "no tensor 'encoder.layers.1.mlp.fc2.weight'"),
        (variant("shape", cfg={**config, "intermediate_size": 100}), r"tensor 'blocks.0.mlp.fc1.weight' has shape"),
        (tmp_path / "nowhere", "config.json: file not found"),
    ]
    for path, message in cases:
        with pytest.raises(KosmoError, match=message) as e:
            import_hf_clip_vision(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(KosmoError, match="is not clip"):  # a vision-only checkpoint is not a full CLIPModel
        import_hf_clip(good)
    clip_cfg = hf_clip(eos=VOCAB - 2).config.to_dict()
    del clip_cfg["text_config"]
    d = tmp_path / "notext"
    d.mkdir()
    checkpoint.write_json(d / "config.json", clip_cfg)
    with pytest.raises(KosmoError, match="missing field 'text_config'"):
        import_hf_clip(d)
