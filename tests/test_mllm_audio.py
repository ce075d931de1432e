"""Audio in the KOSMOS path: clips spliced between <audio> and </audio>, as many positions as they are long,
loss on text only, packing, clips of different lengths batched, cached decoding, and the stage that adds ears."""

import json

import numpy as np
import pytest
import soundfile
import torch
from conftest import assert_cached_decoding_equals_uncached
from torch.testing import assert_close

from kosmo.data import chat
from kosmo.data.audio import SAMPLE_RATE, AudioCache
from kosmo.data.multimodal import ClipLengths, ImageBank, MultimodalDataset, read_examples
from kosmo.errors import KosmoError
from kosmo.model.audio import AudioConfig
from kosmo.model.lm import LMConfig
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.tokenizer import AUDIO, AUDIO_END, AUDIO_PAD, BOS, IMAGE_PAD, Tokenizer
from kosmo.train.lm import token_loss

K = 4  # tokens per image
SECONDS = {"short.wav": 0.33, "mid.wav": 0.81, "long.wav": 1.6}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["a red circle is left of a blue square. what colour is it? red chirp"] * 50, 300)


def hearing_mllm(stack=2) -> MLLM:
    torch.manual_seed(0)
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=2, n_heads=2, mlp_dim=64),
                     lm=LMConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=256),
                     audio=AudioConfig(dim=32, n_layers=2, n_heads=2, mlp_dim=64, max_frames=300), audio_stack=stack)
    return MLLM(cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image
    d = tmp_path_factory.mktemp("audio_data")
    rng = np.random.default_rng(0)
    for name, seconds in SECONDS.items():
        soundfile.write(d / name, rng.uniform(-0.3, 0.3, int(seconds * SAMPLE_RATE)).astype(np.float32), SAMPLE_RATE)
    Image.new("RGB", (16, 16), "red").save(d / "r.png")
    lines = [
        {"audio": "short.wav", "text": "a red circle"},
        {"audio": "long.wav", "text": "a blue square"},
        {"content": [{"text": "first"}, {"audio": "mid.wav"}, {"text": "then"}, {"image": "r.png"},
                     {"audio": "short.wav"}, {"text": "end"}]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "mid.wav"},
                                                   {"type": "image", "image": "r.png"}]},
                      {"role": "assistant", "content": "red"}]},
        {"image": "r.png", "question_audio": "long.wav", "question": "what colour is it?", "answers": ["red"]},
    ]
    path = d / "mixed.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def examples_of(model, tok, data):
    audio = AudioCache(model.n_mels)
    examples, dropped = read_examples([data], tok, K, 512, audio_tokens=ClipLengths(audio, model.audio_tokens))
    assert dropped == 0
    return examples, audio


def test_a_clip_fills_the_positions_its_length_gives_and_only_text_is_learnt(tok, data):
    model = hearing_mllm()
    examples, _ = examples_of(model, tok, data)
    assert [e.kind for e in examples] == ["audio", "audio", "interleaved", "chat", "vqa"]
    # 0.33 s: 33 mel frames (one per 10 ms) -> 17 encoder frames (20 ms) -> 9 stacks of 2
    short = examples[0]
    assert short.ids[:12] == [BOS, AUDIO, *[AUDIO_PAD] * 9, AUDIO_END]
    assert short.target == [False] * 12 + [True] * (len(short.ids) - 12)
    assert examples[1].ids.count(AUDIO_PAD) == model.audio_tokens(160) == 40
    inter = examples[2]
    assert [p.rsplit("/", 1)[1] for p in inter.audio] == ["mid.wav", "short.wav"] and len(inter.images) == 1
    assert inter.ids.count(AUDIO) == 2 and inter.ids.count(IMAGE_PAD) == K
    for e in examples:  # no position learns to predict an audio or image token
        assert not any(t in (AUDIO, AUDIO_PAD, AUDIO_END, IMAGE_PAD) for t, learn in zip(e.ids, e.target) if learn)
    assert examples[4].audio[0].endswith("long.wav") and "what" not in tok.decode(examples[4].ids)


def test_clips_of_different_lengths_in_one_batch_give_the_loss_of_one_clip_per_row(tok, data):
    """Packed rows and a padded batch of clips, against each example alone: the same summed loss."""
    model = hearing_mllm().eval()
    examples, audio = examples_of(model, tok, data)
    bank = ImageBank([p for e in examples for p in e.images], 16)
    with torch.no_grad():
        for pack_len in (0, 200):
            ds = MultimodalDataset(examples, bank, pack_len=pack_len, audio=audio)
            batch = ds.collate(list(range(len(examples))))
            assert len(batch["audio"]) == 6 and batch["audio"].lengths.unique().numel() == 3
            together = token_loss(model, batch, images=batch["images"], audio=batch["audio"])
            alone = sum(token_loss(model, b, images=b["images"], audio=b["audio"])
                        for b in (ds.collate([i]) for i in range(len(examples))))
            assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_cached_decoding_with_clips_equals_uncached(tok, data):
    model = hearing_mllm().eval()
    cache = AudioCache(model.n_mels)
    clips, _, _ = cache.load([data.parent / "short.wav", data.parent / "long.wav"])
    prompts = [[BOS, *chat.audio_block(model.audio_tokens(int(n)))] for n in clips.lengths]
    assert_cached_decoding_equals_uncached(model, prompts, None, audio=clips)


def test_audio_positions_and_clips_must_agree(tok, data):
    model = hearing_mllm()
    clips, _, _ = AudioCache(model.n_mels).load([data.parent / "short.wav"])
    with pytest.raises(ValueError, match="8 audio positions in the tokens but 1 clips that fill 9"):
        model(torch.tensor([[BOS, AUDIO, *[AUDIO_PAD] * 8, AUDIO_END]]), audio=clips)
    with pytest.raises(ValueError, match="a clip of 3.01 s is longer than the model hears at once"):
        model.audio_tokens(301)


def test_a_model_without_ears_refuses_audio_data_by_line(tok, data):
    model = MLLM(MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2,
                                                mlp_dim=64), lm=LMConfig(vocab_size=300, dim=32, n_layers=1,
                                                                         n_heads=2)))
    with pytest.raises(KosmoError, match=r"mixed.jsonl:1: the data has audio but the model takes none"):
        read_examples([data], tok, K, 512)
    assert model.n_mels == 0


def test_an_unreadable_clip_leaves_its_examples_out(tok, tmp_path):
    model = hearing_mllm()
    soundfile.write(tmp_path / "ok.wav", np.zeros(8000, np.float32), SAMPLE_RATE)
    (tmp_path / "bad.wav").write_bytes(b"RIFF junk")
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"audio": "ok.wav", "text": "red"}) + "\n" + json.dumps({"audio": "bad.wav",
                                                                                       "text": "blue"}) + "\n")
    audio = AudioCache(model.n_mels)
    examples, _ = read_examples([path], tok, K, 512, audio_tokens=ClipLengths(audio, model.audio_tokens))
    ds = MultimodalDataset(examples, ImageBank([], 16), audio=audio)
    assert len(ds.examples) == 1 and ds.skipped == 1 and "bad.wav" in next(iter(audio.skipped.values()))


def test_the_stage_gives_a_seeing_model_ears_from_whisper_weights_and_it_transcribes(tok, data, tmp_path):
    """`kosmo train mllm --init SEEING_RUN audio=WHISPER_DIR`: the run keeps the vision weights, learns, and
    `kosmo eval asr` reads it back."""
    transformers = pytest.importorskip("transformers")
    from kosmo.eval.audio import evaluate
    from kosmo.model.load import load_run, save_run
    from kosmo.train.run import run_stage
    torch.manual_seed(0)
    whisper = transformers.WhisperModel(transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=150,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3))
    whisper.save_pretrained(tmp_path / "whisper")
    seeing = MLLM(MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2,
                                                 mlp_dim=64),
                             lm=LMConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, max_seq_len=256)))
    save_run(tmp_path / "seeing", seeing, tok, {"arch": "mllm", "model": seeing.cfg.to_dict()})
    speech = data.parent / "speech.jsonl"
    speech.write_text("".join(json.dumps({"audio": n, "text": t}) + "\n"
                              for n, t in zip(SECONDS, ["a red circle", "a blue square", "a red chirp"])))
    last = run_stage("mllm", [speech], tmp_path / "heard", init=tmp_path / "seeing",
                     overrides=["train.max_steps=3", "train.batch_size=3", "val_fraction=0",
                                f"audio={tmp_path}/whisper", "train.tensorboard=false", "train.precision=fp32"])
    assert np.isfinite(last["loss"])
    heard, _, config = load_run(tmp_path / "heard")
    assert config["model"]["audio"]["max_frames"] == 300 and heard.audio_tokens(300) == 38
    assert_close(heard.vision.state_dict(), seeing.vision.state_dict())  # frozen: only the connectors learnt
    result = evaluate("asr", heard, tok, speech, max_new_tokens=4)
    assert result["n"] == 3 and 0 <= result["wer"] and "deaf" in result
