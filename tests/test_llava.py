"""Parity with transformers' LlavaForConditionalGeneration and LlavaProcessor: export, import, CLI."""

import dataclasses
import json
import re

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from kosmo.cli import main  # noqa: E402
from kosmo.data.chat import render  # noqa: E402
from kosmo.data.images import preprocess  # noqa: E402
from kosmo.errors import KosmoError  # noqa: E402
from kosmo.generate import Sampling, generate_ids  # noqa: E402
from kosmo.interop.hf_llava import export_hf_llava, import_hf_llava  # noqa: E402
from kosmo.model.audio import AudioConfig  # noqa: E402
from kosmo.model.lm import LMConfig  # noqa: E402
from kosmo.model.load import load_run, save_run  # noqa: E402
from kosmo.model.mllm import MLLM, MLLMConfig  # noqa: E402
from kosmo.model.vision import VisionConfig  # noqa: E402
from kosmo.tokenizer import IMAGE_PAD, SPECIAL_TOKENS, Tokenizer  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["what shape is it? a red circle left of a blue square"] * 50, vocab_size=VOCAB)


def tiny_mllm(connector="mlp", use_cls=False, feature_layer=-2, tie=True) -> MLLM:
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=32, patch_size=8, dim=48, n_layers=3, n_heads=4, mlp_dim=96),
                     lm=LMConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                 tie_embeddings=tie),
                     connector=connector, use_cls=use_cls, feature_layer=feature_layer)
    model = MLLM(cfg).eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a swapped or dropped tensor
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model


def picture() -> Image.Image:
    """48 x 40: resized to 38 x 32, then cropped 3 pixels in from each side, by kosmo and transformers alike."""
    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy())


def chat():
    return [{"role": "user", "content": [{"type": "text", "text": "what shape is it?"},
                                         {"type": "image", "image": "p.png"}]}]


@pytest.mark.parametrize("connector,use_cls,feature_layer,tie", [("mlp", False, -2, True), ("linear", True, 1, False)])
def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(tok, tmp_path, connector, use_cls,
                                                                          feature_layer, tie):
    model = tiny_mllm(connector, use_cls, feature_layer, tie)
    export_hf_llava(model, tmp_path, tok)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path, backend="pil")  # PIL's bicubic, as kosmo's
    prompt = processor.apply_chat_template(chat(), add_generation_prompt=True)
    inputs = processor(images=picture(), text=prompt, return_tensors="pt")

    ids = render(chat(), tok, model.tokens_per_image, add_generation_prompt=True).ids
    pixels = preprocess(picture(), 32)[None]
    assert inputs["input_ids"][0].tolist() == ids
    assert (inputs["input_ids"] == IMAGE_PAD).sum() == model.tokens_per_image == 16 + use_cls
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = model(torch.tensor([ids]), pixels)
        got = hf(**inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        hf_tokens = hf.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    ours, _ = generate_ids(model, [ids], Sampling(max_new_tokens=12), stop_ids=(), images=pixels)
    assert ours[0] == hf_tokens


def test_pad_mode_exports_llava_padding_and_imports_back(tok, tmp_path):
    export_hf_llava(tiny_mllm(), tmp_path, tok, image_mode="pad")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil"
    square = picture().crop((0, 0, 32, 32))  # a square at the model's size is neither padded nor resampled
    pixels = processor(images=square, text=SPECIAL_TOKENS[IMAGE_PAD], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, preprocess(square, 32, "pad")[None], atol=1e-6, rtol=0)
    assert import_hf_llava(tmp_path)[1] == "pad"
    (tmp_path / "preprocessor_config.json").unlink()  # transformers 5 keeps it in processor_config.json alone
    assert import_hf_llava(tmp_path)[1] == "pad"
    config = json.loads((tmp_path / "processor_config.json").read_text())
    config["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]  # SigLIP's
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(KosmoError, match=re.escape("image_mean [0.5, 0.5, 0.5] is not CLIP's")):
        import_hf_llava(tmp_path)


def test_chat_template_renders_kosmo_chats(tok, tmp_path):
    export_hf_llava(tiny_mllm(), tmp_path, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "what shape is it?"},
                                             {"type": "image", "image": "p.png"}]},
                {"role": "assistant", "content": "a red circle"}, {"role": "user", "content": "and left of it?"}]
    ours = render(messages, tok, 1, add_generation_prompt=True).ids  # one pad per image, for the processor to expand
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"] == ours


def hf_llava(strategy="default", act="gelu", layer=-2):
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu")
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_PAD,
                                   vision_feature_select_strategy=strategy, vision_feature_layer=layer,
                                   projector_hidden_act=act, image_seq_length=16 + (strategy == "full"))
    torch.manual_seed(1)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("strategy,layer,act", [("default", -2, "gelu"), ("full", -1, "linear")])
def test_import_matches_transformers_and_round_trips_exactly(tok, tmp_path, strategy, layer, act):
    hf = hf_llava(strategy, act, layer)
    hf.save_pretrained(tmp_path / "hf")
    model, mode = import_hf_llava(tmp_path / "hf")
    assert mode == "crop" and model.cfg.use_cls == (strategy == "full") and model.cfg.feature_layer == layer
    assert model.cfg.connector == {"gelu": "mlp", "linear": "linear"}[act]  # a linear projector's two layers, folded
    n = model.tokens_per_image
    ids = torch.tensor([[1, 7, 40, 41, 3] + [IMAGE_PAD] * n + [4, 9, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits,
                                   atol=1e-4, rtol=1e-4)
    export_hf_llava(model, tmp_path / "out", tok)
    back, _ = import_hf_llava(tmp_path / "out")
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["save_pretrained", "llava-hf", "in memory"])
def test_every_tensor_layout_is_read(tmp_path, layout):
    """transformers 5's save_pretrained writes the old prefixes without CLIP's `vision_model.` level; the llava-hf
    checkpoints (transformers 4) have it; transformers 5 holds `model.language_model.` etc. in memory."""
    from safetensors.torch import load_file, save_file
    hf = hf_llava()
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "language_model.model.norm.weight" in tensors and "vision_tower.pre_layrnorm.weight" in tensors
    if layout == "llava-hf":
        tensors = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in tensors.items()}
    elif layout == "in memory":
        tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
        assert "model.language_model.norm.weight" in tensors
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, _ = import_hf_llava(tmp_path)
    ids = torch.tensor([[1, 7, 3] + [IMAGE_PAD] * 16 + [4, 9]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits,
                                   atol=1e-4, rtol=1e-4)


def test_export_refuses_what_llava_lacks(tok, tmp_path):
    with pytest.raises(KosmoError, match="connector='resampler' has no LLaVA counterpart"):
        export_hf_llava(tiny_mllm("resampler"), tmp_path / "out", tok)
    hearing = MLLM(dataclasses.replace(tiny_mllm().cfg, audio=AudioConfig(dim=32, n_layers=1, n_heads=2, mlp_dim=64)))
    with pytest.raises(KosmoError, match="this model has an audio encoder, which LLaVA lacks"):
        export_hf_llava(hearing, tmp_path / "out", tok)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value,message", [
    ("vision_feature_select_strategy", "patch", "vision_feature_select_strategy 'patch' is not supported"),
    ("projector_hidden_act", "relu", "projector_hidden_act 'relu' is not supported"),
    ("vision_feature_layer", [-2, -1], "vision_feature_layer [-2, -1] concatenates several layers"),
    ("image_token_index", 32000, "image_token_index 32000 is not kosmo's <|image_pad|> id 5"),
])
def test_import_refuses_what_kosmo_lacks(tmp_path, field, value, message):
    hf_llava().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {field: value}))
    with pytest.raises(KosmoError, match=re.escape(f"config.json: {message}")):
        import_hf_llava(tmp_path)


def test_cli_exports_an_mllm_run_as_llava_and_imports_it_back(tok, tmp_path, capsys):
    model = tiny_mllm()
    save_run(tmp_path / "run", model, tok, {"arch": "mllm", "model": model.cfg.to_dict()})
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava"
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, _, config = load_run(tmp_path / "back")
    assert config["arch"] == "mllm" and config["config"]["image_mode"] == "crop"
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--format", "llama"]) == 2
    assert "--format llama exports runs of arch lm, and this one is mllm" in capsys.readouterr().err
