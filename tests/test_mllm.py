"""The KOSMOS-1 path: image slots, label masks, the chat template, freezing, multimodal generation."""

import json

import pytest
import torch

from conftest import assert_cached_decoding_equals_uncached
from kosmo.data import chat
from kosmo.data.multimodal import ImageBank, MultimodalDataset, read_examples, truncate, Example
from kosmo.model.lm import LMConfig
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.tokenizer import ASSISTANT, BOS, END_OF_TURN, EOS, IMAGE, IMAGE_END, IMAGE_PAD, Tokenizer

K = 4  # tokens per image: a 16 px image in 8 px patches


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["a red circle is left of a blue square. what colour is it? red"] * 50, vocab_size=300)


def tiny_mllm(connector="mlp") -> MLLM:
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=3, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=128),
                     connector=connector, resampler_tokens=K)
    return MLLM(cfg)


@pytest.fixture()
def data(tmp_path):
    from PIL import Image
    for name, colour in [("r.png", "red"), ("b.png", "blue")]:
        Image.new("RGB", (40, 20), colour).save(tmp_path / name)
    lines = [
        {"text": "a red circle"},
        {"image": "r.png", "text": "a red picture"},
        {"content": [{"text": "first"}, {"image": "r.png"}, {"text": "then"}, {"image": "b.png"}, {"text": "end"}]},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"type": "image", "image": "b.png"},
                                                   {"type": "text", "text": "what colour is it?"}]},
                      {"role": "assistant", "content": "blue"}]},
        {"image": "b.png", "question": "what colour is it?", "answers": ["blue"]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_labels_are_text_only_and_images_sit_in_their_slots(tok, data):
    examples, dropped = read_examples([data], tok, K, 200)
    assert [e.kind for e in examples] == ["text", "captions", "interleaved", "chat", "vqa"] and dropped == 0
    cap = examples[1]
    assert cap.ids[:K + 3] == [BOS, IMAGE, *[IMAGE_PAD] * K, IMAGE_END]
    assert cap.target == [False] * (K + 3) + [True] * (len(cap.ids) - K - 3)
    inter = examples[2]
    assert len(inter.images) == 2 and inter.ids.count(IMAGE_PAD) == 2 * K
    ds = MultimodalDataset(examples, ImageBank([p for e in examples for p in e.images], 16))
    batch = ds.collate(list(range(5)))
    assert batch["images"].shape == (5, 3, 16, 16)  # 0 + 1 + 2 + 1 + 1 images, rows in order
    labels = batch["labels"]
    assert not torch.isin(labels, torch.tensor([IMAGE, IMAGE_PAD, IMAGE_END, 0])).any()
    assert batch["n_targets"] == int((labels != -100).sum())
    # the caption row: every target is the next input token, and only caption text + </s> is learned
    row = labels[1][labels[1] != -100].tolist()
    assert row == tok.encode("a red picture") + [EOS]


def test_chat_loss_is_on_assistant_tokens_and_end_of_turn_only(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what colour?"},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "and now?"},
                {"role": "assistant", "content": "blue"}]
    ids, target, _, _ = chat.render(messages, tok, K)
    learned = [t for t, on in zip(ids, target) if on]
    assert learned == tok.encode("red") + [END_OF_TURN] + tok.encode("blue") + [END_OF_TURN]
    prompt = chat.render(messages[:2], tok, K, add_generation_prompt=True).ids
    assert prompt[-1] == ASSISTANT and prompt == ids[:len(prompt)]


def test_image_count_must_match_the_slots():
    model = tiny_mllm()
    ids = torch.tensor([[BOS, IMAGE, *[IMAGE_PAD] * K, IMAGE_END, 20, 21]])
    assert model(ids, torch.randn(1, 3, 16, 16)).shape == (1, K + 5, 300)
    with pytest.raises(ValueError, match="4 image positions in the tokens but 2 images"):
        model(ids, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="but 0 images"):
        model(ids)


def test_image_embeddings_change_only_the_text_after_them():
    model = tiny_mllm()
    ids = torch.tensor([[BOS, 20, 21, IMAGE, *[IMAGE_PAD] * K, IMAGE_END, 22, 23]])
    a = model(ids, torch.randn(1, 3, 16, 16))
    b = model(ids, torch.randn(1, 3, 16, 16))
    torch.testing.assert_close(a[:, :4], b[:, :4])  # causal: text before the image cannot see it
    assert (a[:, -2:] - b[:, -2:]).abs().max() > 1e-4


@pytest.mark.parametrize("policy,trainable", [("connector", {"connector"}), ("connector+lm", {"connector", "lm"}),
                                              ("all", {"connector", "lm", "vision"})])
def test_freezing_policies(policy, trainable):
    model = tiny_mllm()
    model.freeze(policy)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_vision_last_block_trainable_is_the_last_block_used():
    model = tiny_mllm()
    model.freeze("connector", vision_last_block=True)
    names = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("blocks.1.") for n in names)  # 3 blocks, features from -2 = block 2


def test_truncation_never_splits_an_image():
    ex = Example([BOS, 20, IMAGE, *[IMAGE_PAD] * K, IMAGE_END, 21, 22], [False, True] + [False] * (K + 2) + [True, True],
                 ["x.png"], "interleaved")
    cut = truncate(ex, 5)
    assert cut.ids == [BOS, 20] and cut.images == []
    assert truncate(ex, len(ex.ids)).images == ["x.png"]


@pytest.mark.parametrize("connector", ["linear", "mlp", "resampler"])
def test_generation_with_images_cached_equals_uncached(connector):
    model = tiny_mllm(connector).eval()
    prompts = [[BOS, IMAGE, *[IMAGE_PAD] * K, IMAGE_END, 20], [BOS, 21, 22, IMAGE, *[IMAGE_PAD] * K, IMAGE_END, 23, 24]]
    images = torch.randn(2, 3, 16, 16)
    assert_cached_decoding_equals_uncached(model, prompts, images)


def test_a_bad_image_in_the_training_stream_is_skipped_and_counted(tok, tmp_path):
    from PIL import Image
    Image.new("RGB", (20, 20), "red").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("not a picture")
    path = tmp_path / "caps.jsonl"
    path.write_text(json.dumps({"image": "good.png", "text": "red"}) + "\n" +
                    json.dumps({"image": "bad.png", "text": "blue"}) + "\n")
    examples, _ = read_examples([path], tok, K, 100)
    bank = ImageBank([p for e in examples for p in e.images], 16)
    ds = MultimodalDataset(examples, bank)
    assert len(ds) == 1 and ds.skipped == 1
    assert len(bank.skipped) == 1 and "bad.png" in bank.skipped[0][1] and "\n" not in bank.skipped[0][1]


def test_packed_batches_give_the_same_loss_and_gradients_as_one_example_per_row(tok, data):
    from kosmo.train.mllm import mllm_loss
    examples, _ = read_examples([data], tok, K, 200)
    bank = ImageBank([p for e in examples for p in e.images], 16)
    plain = MultimodalDataset(examples, bank).collate(list(range(5)))
    packed = MultimodalDataset(examples, bank, pack_len=64).collate(list(range(5)))
    assert packed["input"].shape[0] < plain["input"].shape[0]  # fewer rows ...
    assert packed["n_targets"] == plain["n_targets"]            # ... the same targets
    model = tiny_mllm()
    grads = []
    for batch in (plain, packed):
        model.zero_grad()
        loss, _ = mllm_loss(model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("smear_keys", [False, True])
def test_a_packed_document_sees_only_itself_and_its_positions_restart(smear_keys):
    from kosmo.model.lm import LM, segment_positions
    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64,
                     smear_keys=smear_keys)).eval()
    a, b = torch.randint(10, 300, (1, 7)), torch.randint(10, 300, (1, 5))
    row = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)
    segments = torch.tensor([[1] * 7 + [2] * 5 + [0] * 3])
    assert segment_positions(segments).tolist() == [list(range(7)) + list(range(5)) + list(range(3))]
    packed = lm(row, segments=segments)
    torch.testing.assert_close(packed[:, :7], lm(a), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[:, 7:12], lm(b), rtol=0, atol=1e-5)
    at = segments > 0
    assert torch.equal(lm(row, segments=segments, logits_at=at), packed[at])


def test_sft_gives_a_text_only_lm_a_new_image_encoder(tmp_path, capsys):
    """new_vision.* builds an untrained encoder of that shape for pictures no pretrained one has seen (the
    mockups), and freeze=all trains it with the LM; naming an encoder twice, or a bad shape, is a one-line error."""
    from kosmo.cli import main
    from kosmo.data.jsonl import iter_texts
    from kosmo.data.world import write_mockups
    from kosmo.model.load import load_run

    data = write_mockups(tmp_path / "data", n=8, val=1, image_size=64)["mockups"]
    Tokenizer.train(iter_texts([data]), vocab_size=300).save(tmp_path / "tok.json")
    fast = ["train.max_steps=2", "train.batch_size=2", "train.warmup_steps=0", "train.eval_every=0",
            "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "seq_len=192"]
    assert main(["train", "lm", "--data", str(data), "--tokenizer", str(tmp_path / "tok.json"), "--out",
                 str(tmp_path / "lm"), "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
                 *fast]) == 0
    shape = ["new_vision.image_size=64", "new_vision.patch_size=16", "new_vision.dim=32", "new_vision.n_layers=2",
             "new_vision.n_heads=2", "new_vision.mlp_dim=64"]
    sft = ["train", "sft", "--init", str(tmp_path / "lm"), "--data", str(data), "freeze=all", *fast]
    assert main([*sft, "--out", str(tmp_path / "sft"), *shape]) == 0

    lm, seeing = load_run(tmp_path / "lm")[0], load_run(tmp_path / "sft")[0]
    assert seeing.vision.cfg == VisionConfig(image_size=64, patch_size=16, dim=32, n_layers=2, n_heads=2, mlp_dim=64)
    assert seeing.tokens_per_image == 16
    assert not torch.equal(seeing.lm.embed.weight, lm.embed.weight)  # freeze=all: the LM learns
    # the LM reads the encoder's layer -2, so its last block gets no gradient: it must not count as trained,
    # or the optimizer keeps no state for it and the run cannot resume
    seeing.freeze("all")
    assert not any(p.requires_grad for p in seeing.vision.blocks[-1].parameters())
    assert all(p.requires_grad for p in seeing.vision.blocks[0].parameters())
    assert main([*sft, "--out", str(tmp_path / "sft"), *shape]) == 0  # resumes the finished run

    capsys.readouterr()
    assert main([*sft, "--out", str(tmp_path / "both"), *shape, "vision=runs/clip"]) == 2
    assert "vision=runs/clip and new_vision.* both name the image encoder" in capsys.readouterr().err
    assert main([*sft, "--out", str(tmp_path / "bad"), "new_vision.patch_size=24"]) == 2
    assert "invalid config new_vision: vision.image_size=32 is not a multiple of vision.patch_size=24" \
        in capsys.readouterr().err
    assert main([*sft, "--out", str(tmp_path / "bad"), "new_vision.dim=wide"]) == 2
    assert "config key 'new_vision.dim' must be int, got 'wide'" in capsys.readouterr().err
