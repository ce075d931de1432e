"""Parity with transformers' Whisper encoder on random tiny configs; the audio config and shapes."""

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from kosmo.errors import KosmoError  # noqa: E402
from kosmo.interop.hf_whisper import import_hf_whisper_encoder  # noqa: E402
from kosmo.model.audio import AudioConfig, AudioEncoder, sinusoids  # noqa: E402

N_MELS = 80


def whisper_config(max_source_positions: int = 1500, **kw):
    return transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=N_MELS, d_model=64, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
        max_source_positions=max_source_positions, max_target_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=3, attn_implementation="eager", **kw)


def randomise(model):
    """HF inits biases to 0 and norms to 1, which would hide a swapped bias or norm; every encoder parameter
    is drawn at random instead, but for the position table, which keeps its sinusoids."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "encoder." in name and "embed_positions" not in name:
                p.normal_(1.0 if "layer_norm.weight" in name else 0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def hf_whisper():
    torch.manual_seed(0)
    return randomise(transformers.WhisperModel(whisper_config()))


def mels(frames: int, seed: int = 1):
    return torch.randn(2, N_MELS, frames, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_import_matches_transformers_on_30_seconds(hf_whisper):
    x = mels(3000)
    ours = import_hf_whisper_encoder(hf_whisper)(x)
    theirs = hf_whisper.encoder(x).last_hidden_state
    assert ours.shape == (2, 1500, 64)
    assert_close(ours, theirs, atol=1e-4, rtol=0)


@torch.no_grad()
def test_import_takes_a_bare_encoder(hf_whisper):
    x = mels(3000, seed=5)
    assert_close(import_hf_whisper_encoder(hf_whisper.encoder)(x), hf_whisper.encoder(x).last_hidden_state,
                 atol=1e-4, rtol=0)


@torch.no_grad()
def test_short_clip_matches_whisper_with_a_window_of_that_length(hf_whisper):
    """transformers runs only full windows, so the reference for a 4 s clip is the same Whisper with a 4 s window:
    the first 200 rows of the position table (a row does not depend on the table's length), other weights equal."""
    short = transformers.WhisperModel(whisper_config(max_source_positions=200)).eval()
    state = hf_whisper.state_dict()
    state["encoder.embed_positions.weight"] = state["encoder.embed_positions.weight"][:200]
    short.load_state_dict(state)
    x = mels(400, seed=2)
    ours = import_hf_whisper_encoder(hf_whisper)(x)
    assert ours.shape == (2, 200, 64)
    assert_close(ours, short.encoder(x).last_hidden_state, atol=1e-4, rtol=0)


@torch.no_grad()
def test_import_reads_a_saved_conditional_generation_directory(tmp_path):
    torch.manual_seed(3)
    hf = randomise(transformers.WhisperForConditionalGeneration(whisper_config(max_source_positions=50)))
    hf.save_pretrained(tmp_path)
    x = mels(100, seed=4)
    ours = import_hf_whisper_encoder(tmp_path)(x)
    assert_close(ours, hf.model.encoder(x).last_hidden_state, atol=1e-4, rtol=0)


def test_positions_are_whispers_sinusoids(hf_whisper):
    expected = hf_whisper.encoder.embed_positions.weight
    assert_close(sinusoids(1500, 64), expected, atol=1e-6, rtol=0)
    assert_close(AudioEncoder(AudioConfig(dim=64, n_heads=4, max_frames=3000)).positions, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("frames, out", [(3000, 1500), (2999, 1500), (7, 4), (1, 1)])
def test_output_length_is_the_stride_2_convolution_s(frames, out):
    enc = AudioEncoder(AudioConfig(dim=32, n_layers=1, n_heads=2, mlp_dim=64, n_mels=N_MELS)).eval()
    with torch.no_grad():
        assert enc(mels(frames)).shape == (2, out, 32)


def test_more_frames_than_the_window_are_refused():
    enc = AudioEncoder(AudioConfig(dim=32, n_layers=1, n_heads=2, mlp_dim=64, max_frames=100))
    with pytest.raises(ValueError, match="101 mel frames exceed audio.max_frames=100"):
        enc(mels(101))


def test_unknown_config_key_is_refused_by_name():
    with pytest.raises(KosmoError, match="unknown config key 'n_mel'"):
        AudioConfig.from_dict({"n_mel": 128})


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(KosmoError, match="model_type 'llama' is not whisper"):
        import_hf_whisper_encoder(tmp_path)


def test_unsupported_activation_is_refused_by_name():
    hf = transformers.WhisperModel(whisper_config(activation_function="relu"))
    with pytest.raises(KosmoError, match="activation_function 'relu' is not supported"):
        import_hf_whisper_encoder(hf)


@torch.no_grad()
def test_clips_of_different_lengths_get_what_they_get_alone():
    torch.manual_seed(0)
    enc = AudioEncoder(AudioConfig(dim=32, n_layers=2, n_heads=4, mlp_dim=64, max_frames=300)).eval()
    clips = [torch.randn(N_MELS, n) for n in (57, 200, 120)]  # an odd length too: the stride-2 edge case
    batch = torch.zeros(3, N_MELS, 200)
    for i, c in enumerate(clips):
        batch[i, :, :c.shape[1]] = c
    together = enc(batch, torch.tensor([c.shape[1] for c in clips]))
    for i, c in enumerate(clips):
        alone = enc(c[None])[0]
        assert_close(together[i, :alone.shape[0]], alone, atol=1e-5, rtol=0)
