"""The LLaVA-1.5 recipe (configs/llava15_stage*.yaml) as the README runs it, on random tiny Hugging Face
checkpoints of its architectures: a Llama imported with `kosmo import`, a CLIP vision tower at patch 14,
then stage 1, stage 2 and an export that transformers loads."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import ROOT  # noqa: E402

from kosmo.cli import main  # noqa: E402
from kosmo.data.jsonl import iter_texts  # noqa: E402
from kosmo.data.world import write_world  # noqa: E402
from kosmo.interop.hf_clip import import_hf_clip_vision  # noqa: E402
from kosmo.model.load import load_run  # noqa: E402
from kosmo.tokenizer import IMAGE_PAD, Tokenizer  # noqa: E402

# the recipe's YAMLs at test size: a few steps of a few examples, no warmup, no side outputs
TINY = ["seq_len=96", "train.max_steps=2", "train.batch_size=4", "train.grad_accum=1",
        "train.warmup_steps=0", "train.eval_every=0", "train.precision=fp32", "train.progress=false",
        "train.tensorboard=false"]


def hf_checkpoints(tmp_path, vocab: int):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False))
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=28,
        patch_size=14, hidden_act="quick_gelu"))  # ViT-L/14's patch and activation, at a 2 x 2 grid
    llama.save_pretrained(tmp_path / "hf-llama")
    clip.save_pretrained(tmp_path / "hf-clip")
    return tmp_path / "hf-llama", tmp_path / "hf-clip"


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_llava15_recipe_runs_on_imported_llama_and_clip(tmp_path):
    data = write_world(tmp_path / "data", n=24)
    tok = Tokenizer.train(iter_texts([data["text"], data["chat"], data["vqa"]]), vocab_size=300)
    tok.save(tmp_path / "tok.json")
    llama, clip = hf_checkpoints(tmp_path, tok.vocab_size)
    runs = tmp_path / "runs"
    assert main(["import", "--hf", str(llama), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(runs / "lm")]) == 0
    assert main(["train", "mllm", "--init", str(runs / "lm"), f"vision={clip}",
                 "--config", str(ROOT / "configs/llava15_stage1.yaml"), "--data", str(data["captions"]),
                 "--out", str(runs / "stage1"), *TINY]) == 0
    assert main(["train", "sft", "--init", str(runs / "stage1"), "--config", str(ROOT / "configs/llava15_stage2.yaml"),
                 "--data", str(data["chat"]), str(data["vqa"]), "--out", str(runs / "stage2"), *TINY]) == 0

    lm, vision = load_run(runs / "lm")[0], import_hf_clip_vision(clip)
    stage1, _, config1 = load_run(runs / "stage1")
    stage2, _, config2 = load_run(runs / "stage2")
    assert stage1.cfg.connector == "mlp" and stage1.cfg.feature_layer == -2 and stage1.tokens_per_image == 4
    assert config1["config"]["image_mode"] == config2["config"]["image_mode"] == "pad"
    assert same(stage1.lm, lm) and same(stage1.vision, vision)  # stage 1: the connector alone learns
    assert not same(stage2.lm, lm) and not same(stage2.connector, stage1.connector) and same(stage2.vision, vision)

    assert main(["export", "--model", str(runs / "stage2"), "--out", str(tmp_path / "hf-llava")]) == 0
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf-llava").eval()
    ids, pixels = torch.tensor([[1, 7, 3] + [IMAGE_PAD] * 4 + [4, 9, 8]]), torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, stage2(ids, pixels),
                                   atol=1e-4, rtol=1e-4)
