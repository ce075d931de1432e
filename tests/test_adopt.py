"""`kosmo import` of checkpoints whose tokenizers lay their special tokens out as TinyLlama's, Llama 2's
(converted from SentencePiece), Llama 3's and llava-hf's do: kosmo adopts the tokenizer (its specials at
0-15, the checkpoint's ids + 16), and the run's logits, encodings and decodings are the checkpoint's; it
then trains and serves."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

transformers = pytest.importorskip("transformers")

from fastapi.testclient import TestClient  # noqa: E402

from kosmo.cli import main  # noqa: E402
from kosmo.interop.adopt import SHIFT, adopt_tokenizer  # noqa: E402
from kosmo.model.load import load_run  # noqa: E402
from kosmo.serve.api import create_app  # noqa: E402
from kosmo.serve.engine import Engine  # noqa: E402
from kosmo.tokenizer import BOS, END_OF_TURN, EOS, IMAGE, IMAGE_PAD, PAD  # noqa: E402

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today", "cats and dogs play"] * 8
TEXT = "the cat ran to the park. Über 🙂 done"  # characters unseen in training: bytes


def tinyllama_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """SentencePiece-style BPE as TinyLlama's: `<unk> <s> </s>` at 0-2, the 256 byte tokens, then merges."""
    trained = HFTokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + list(learned["vocab"])
    tok = HFTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [tuple(m) for m in learned["merges"]],
                                 unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def llama3_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE as Llama 3's, its special tokens after the vocabulary."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>")


CASES = {"tinyllama": (tinyllama_tokenizer, False), "llama3": (llama3_tokenizer, True)}


def hf_model(vocab: int, tied: bool, bos: int, eos: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=bos, eos_token_id=eos, attn_implementation="eager")).eval()
    with torch.no_grad():  # HF inits norms to 1; random norms make the parity check meaningful
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_checkpoint(case: str, out):
    make_tokenizer, tied = CASES[case]
    hf_tok = make_tokenizer()
    model = hf_model(len(hf_tok), tied, hf_tok.bos_token_id, hf_tok.eos_token_id)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return model, hf_tok


def assert_run_is_the_checkpoint(run, hf, hf_tok, text: str = TEXT):
    """The run encodes and decodes `text` as the checkpoint's tokenizer does (ids + 16), and its logits over
    them, after kosmo's BOS, are the checkpoint's after its BOS."""
    model, tok, _ = load_run(run)
    hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_tok.unk_token_id not in hf_ids
    ids = tok.encode(text)
    assert ids == [i + SHIFT for i in hf_ids]
    assert tok.decode(ids) == hf_tok.decode(hf_ids) == text
    with torch.no_grad():
        expected = hf(torch.tensor([[hf_tok.bos_token_id] + hf_ids])).logits
        got = model(torch.tensor([[BOS] + ids]))  # kosmo's BOS carries the checkpoint's BOS row
    torch.testing.assert_close(got[..., SHIFT:], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[..., EOS], expected[..., hf_tok.eos_token_id], atol=1e-4, rtol=1e-4)
    # kosmo's specials without a counterpart start at the mean head row: their logit is the mean logit
    torch.testing.assert_close(got[..., END_OF_TURN], expected.mean(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_adopted_import_has_the_checkpoints_logits_and_encodings(case, tmp_path, capsys):
    hf, hf_tok = hf_checkpoint(case, tmp_path / "hf")
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["shift"] == SHIFT
    model, tok, config = load_run(tmp_path / "run")
    adopted = config["adopted_tokenizer"]
    assert adopted["shift"] == SHIFT and adopted["source"] == str(tmp_path / "hf" / "tokenizer.json")
    assert adopted["rows"] == {str(BOS): hf_tok.bos_token_id, str(EOS): hf_tok.eos_token_id}
    assert model.cfg.vocab_size == tok.vocab_size == len(hf_tok) + SHIFT
    # the checkpoint's tokenizer opens a text with its BOS, as kosmo opens a document with its own
    assert hf_tok(TEXT)["input_ids"] == [hf_tok.bos_token_id] + hf_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert_run_is_the_checkpoint(tmp_path / "run", hf, hf_tok)


def test_a_sentencepiece_model_converted_by_transformers_is_adopted(tmp_path):
    """Llama 2's path to a tokenizer.json: a SentencePiece BPE model with byte fallback, converted."""
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "spm").mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "spm" / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
    (tmp_path / "spm" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "spm")
    assert hf_tok.is_fast and hf_tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<0x00>"]
    hf = hf_model(len(hf_tok), tied=False, bos=hf_tok.bos_token_id, eos=hf_tok.eos_token_id)
    hf.save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert_run_is_the_checkpoint(tmp_path / "run", hf, hf_tok)


def test_specials_keep_their_places_and_names(tmp_path):
    hf_checkpoint("tinyllama", tmp_path / "tinyllama")
    tok, adoption = adopt_tokenizer(tmp_path / "tinyllama")
    # the checkpoint's <s> and </s> are kosmo's; their shifted slots keep their rows under other names
    assert [tok.token(i) for i in (BOS, EOS, SHIFT, SHIFT + 1, SHIFT + 2)] == \
        ["<s>", "</s>", "<unk>", f"<|reserved_{SHIFT + 1}|>", f"<|reserved_{SHIFT + 2}|>"]
    assert tok.token(SHIFT + 3) == "<0x00>" and PAD not in adoption.rows
    assert BOS not in tok.encode("<s>") and tok.decode(tok.encode("a <s> b")) == "a <s> b"  # text, as kosmo's

    _, hf_tok = hf_checkpoint("llama3", tmp_path / "llama3")
    tok, _ = adopt_tokenizer(tmp_path / "llama3")
    eot = hf_tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.token(eot + SHIFT) == "<|eot_id|>" and eot + SHIFT not in tok.encode("<|eot_id|>")
    assert tok.decode([eot + SHIFT]) == "" and tok.decode([eot + SHIFT], skip_special=False) == "<|eot_id|>"


def test_adopted_run_trains_and_serves(tmp_path):
    hf_checkpoint("tinyllama", tmp_path / "hf")
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for q, a in zip(CORPUS[:8], CORPUS[1:9])))
    assert main(["train", "sft", "--init", str(tmp_path / "run"), "--data", str(chats), "--out", str(tmp_path / "sft"),
                 "seq_len=64", "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1",
                 "train.warmup_steps=0", "train.eval_every=0", "train.precision=fp32", "train.progress=false",
                 "train.tensorboard=false"]) == 0
    before, after = load_run(tmp_path / "run")[0], load_run(tmp_path / "sft")[0]
    assert not torch.equal(before.embed.weight, after.embed.weight)

    model, tok, _ = load_run(tmp_path / "sft")
    engine = Engine(model, tok, max_batch=2, precision="fp32").start()
    try:
        r = TestClient(create_app(engine, tok, "adopted")).post("/v1/chat/completions", json={
            "model": "adopted", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 5,
            "temperature": 0})
    finally:
        engine.stop()
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def hf_llava_with_own_tokenizer(out):
    """A tiny LLaVA whose image token is an added `<image>` after a TinyLlama-style vocabulary, as llava-hf's."""
    hf_tok = tinyllama_tokenizer()
    hf_tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image = hf_tok.convert_tokens_to_ids("<image>")
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=160,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image, image_seq_length=16)).eval()
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return model, hf_tok, image


def test_llava_import_adopts_the_tokenizer_and_its_image_token(tmp_path):
    hf, hf_tok, image = hf_llava_with_own_tokenizer(tmp_path / "hf")
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    model, tok, config = load_run(tmp_path / "run")
    assert config["adopted_tokenizer"]["rows"][str(IMAGE_PAD)] == image
    assert tok.token(IMAGE) == "<image>" and tok.token(image + SHIFT) == f"<|reserved_{image + SHIFT}|>"
    text = hf_tok("the cat sat")["input_ids"]
    n = model.tokens_per_image
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([text[:1] + [image] * n + text[1:]]), pixel_values=pixels).logits
        got = model(torch.tensor([[BOS] + [IMAGE_PAD] * n + [i + SHIFT for i in text[1:]]]), pixels)
    torch.testing.assert_close(got[..., SHIFT:], expected, atol=1e-4, rtol=1e-4)


def refusal(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_what_cannot_be_adopted_is_refused_in_one_line(tmp_path, capsys):
    hf_checkpoint("tinyllama", tmp_path / "hf")
    argv = ["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]
    capsys.readouterr()  # transformers' progress bars
    HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "hf" / "tokenizer.json"))
    assert refusal(argv, capsys).endswith("tokenizer.json: kosmo adopts BPE tokenizers (Llama 2, TinyLlama, Llama 3, "
                                          "Mistral), not WordPiece; pass --tokenizer with a kosmo tokenizer.json "
                                          "instead")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert "tokenizer.json: tokenizer file not found (a SentencePiece tokenizer.model alone" in refusal(argv, capsys)
