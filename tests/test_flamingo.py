"""The Flamingo path: zero gates leave the frozen LM exact, only the new parts train, each token sees
the right image, cached decoding equals uncached, and the stage and evals run from the CLI."""

import json

import pytest
import torch
from conftest import assert_cached_decoding_equals_uncached, kosmo

from kosmo.generate import Sampling, generate_ids
from kosmo.model.flamingo import Flamingo, FlamingoConfig, PerceiverResampler
from kosmo.model.lm import LM, LMConfig
from kosmo.model.vision import VisionConfig
from kosmo.tokenizer import BOS, IMAGE, IMAGE_END

VISION = VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=2, n_heads=2, mlp_dim=64)


def tiny_lm(vocab=300) -> LM:
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=vocab, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256))


def flamingo(lm: LM, attend="latest", gates=0.0, cross_every=1) -> Flamingo:
    torch.manual_seed(1)
    cfg = FlamingoConfig(vision=VISION, lm=lm.cfg, latents=4, resampler_heads=2, xattn_heads=2, attend=attend,
                         cross_every=cross_every)
    model = Flamingo(cfg, lm=lm).eval()
    for block in model.xattn.values():
        torch.nn.init.constant_(block.attn_gate, gates)
        torch.nn.init.constant_(block.ffw_gate, gates)
    return model


def document(vocab: int) -> torch.Tensor:
    """Text, then three images each followed by its text: <s> t t <image></image> t t … (one row)."""
    torch.manual_seed(2)
    text = lambda n: torch.randint(10, vocab, (n,)).tolist()  # noqa: E731
    return torch.tensor([[BOS, *text(3), IMAGE, IMAGE_END, *text(4), IMAGE, IMAGE_END, *text(3),
                          IMAGE, IMAGE_END, *text(4)]])


def chunk_of_each_token(ids: torch.Tensor) -> torch.Tensor:
    return (ids[0] == IMAGE).cumsum(0) - 1  # -1 before the first image


@pytest.mark.parametrize("source", ["kosmo", "hf-llama"])
def test_zero_gates_give_the_frozen_lms_logits_bit_for_bit(source, tmp_path):
    if source == "kosmo":
        lm = tiny_lm()
    else:
        pytest.importorskip("transformers")
        from test_interop import hf_llama

        from kosmo.interop.hf_llama import import_hf
        hf_llama("gqa-tied").save_pretrained(tmp_path)
        lm = import_hf(tmp_path)
    model = flamingo(lm, cross_every=2)
    ids = document(lm.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids, torch.randn(3, 3, 16, 16)), lm(ids))
        # and so does a decoding step from the cache, where the images are remembered
        cache, lm_cache = model.new_cache(1, 32, max_images=3), lm.new_cache(1, 32)
        model(ids[:, :-1], torch.randn(3, 3, 16, 16), cache=cache)
        lm(ids[:, :-1], cache=lm_cache)
        assert torch.equal(model(ids[:, -1:], cache=cache), lm(ids[:, -1:], cache=lm_cache))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A shapes world of 16 px pictures, a tiny text LM run and CLIP run, and a Flamingo run trained
    from them for two steps."""
    from kosmo.data.jsonl import iter_texts
    from kosmo.data.world import write_world
    from kosmo.model.clip import CLIP, CLIPConfig
    from kosmo.model.load import save_run
    from kosmo.tokenizer import Tokenizer
    from kosmo.train.run import run_stage
    root = tmp_path_factory.mktemp("flamingo")
    data = write_world(root / "data", 20, image_size=16)
    tok = Tokenizer.train(iter_texts([data["text"], data["captions"], data["fewshot"]]), vocab_size=300)
    lm = tiny_lm()
    save_run(root / "lm", lm, tok, {"arch": "lm", "model": lm.cfg.to_dict()})
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vision=VISION))
    save_run(root / "clip", clip, tok, {"arch": "clip", "model": clip.cfg.to_dict()})
    run_stage("flamingo", [data["text"], data["captions"], data["interleaved"], data["fewshot"]], root / "fl",
              init=root / "lm", overrides=["train.max_steps=2", "train.batch_size=4", "train.warmup_steps=0",
                                           "train.progress=false", "train.tensorboard=false", "train.eval_every=0",
                                           "latents=4", "resampler_heads=2", "xattn_heads=2", "seq_len=128",
                                           f"vision={root / 'clip'}"])
    return root, data, lm, clip


def test_training_changes_only_the_resampler_cross_attention_and_marker_embeddings(runs):
    from kosmo.model.load import load_run
    root, _, lm, clip = runs
    start = flamingo(lm)
    start.vision.load_state_dict(clip.vision.state_dict())
    trained, _, config = load_run(root / "fl")
    assert config["arch"] == "flamingo" and isinstance(trained, Flamingo)
    before, after = start.state_dict(), trained.state_dict()
    new_parts = ("resampler.", "xattn.", "marker_embed")
    for name, value in after.items():
        if name.startswith(("lm.", "vision.")):
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    # the first step moves the gates and markers; with the gates open the second reaches everything behind them
    moved = {name for name in after if name.startswith(new_parts) and not torch.equal(after[name], before[name])}
    assert moved == {name for name in after if name.startswith(new_parts)}


def test_every_step_logs_the_gates_it_trained_with(runs):
    import json
    root, _, lm, _ = runs
    rows = [json.loads(line) for line in (root / "fl" / "metrics.jsonl").read_text().splitlines()]
    names = {f"{kind}_gate.{i}" for i in range(lm.cfg.n_layers) for kind in ("attn", "ffw")}
    assert all(names <= row.keys() for row in rows)
    assert all(rows[0][name] == 0.0 for name in names)  # the first step's forward saw the gates at 0
    assert all(rows[1][name] != 0.0 for name in names)  # the second, the gates the first step moved


def test_eval_commands_run_on_a_flamingo_run(runs, tmp_path):
    root, data, _, _ = runs
    out = kosmo("eval", "fewshot", "--model", root / "fl", "--data", data["val_fewshot"], data["val_vqa"],
                "--shots", "0,2", "--limit", "6", "--plot", tmp_path / "curve.png")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    episodes, vqa = result[str(data["val_fewshot"])], result[str(data["val_vqa"])]
    assert episodes["task"] == "episodes" and episodes["chance"] == 50.0
    assert set(episodes["curve"]) == set(episodes["blind"]) == {"0", "2"} and episodes["n"]["0"] == 6
    assert all(0 <= v <= 100 for v in [*episodes["curve"].values(), *vqa["curve"].values()])
    assert vqa["task"] == "vqa" and vqa["n"] == {"0": 6, "2": 6}
    assert (tmp_path / "curve.png").stat().st_size > 1000
    caption = json.loads(kosmo("eval", "caption", "--model", root / "fl", "--data", data["val_captions"],
                               "--limit", "2").stdout.strip().splitlines()[-1])
    assert "cider" in caption and "cider" in caption["blind"]
    bad = kosmo("eval", "fewshot", "--model", root / "fl", "--data", data["val_vqa"], "--shots", "two", check=False)
    assert bad.returncode == 2
    assert "--shots: expected comma-separated whole numbers of at least 0 like 0,2,4,8, got 'two'" in bad.stderr
    long = kosmo("eval", "fewshot", "--model", root / "fl", "--data", data["val_vqa"], "--shots", "19", check=False)
    assert long.returncode == 2 and "exceeds the context of 256 tokens" in long.stderr.splitlines()[-1]


@pytest.mark.parametrize("attend", ["latest", "previous"])
def test_each_token_cross_attends_to_the_images_the_rule_allows(attend):
    """Three images A, B, C; swapping one changes the first gated block's output exactly at the tokens
    allowed to see it (only the first block: deeper ones also hear the image through self-attention)."""
    lm = tiny_lm()
    model = flamingo(lm, attend=attend, gates=1.0)
    ids = document(300)
    chunk = chunk_of_each_token(ids)
    seen = {}
    model.xattn["0"].register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out))
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        logits = model(ids, images)
        first = seen["out"]
        for swapped in range(3):
            other = images.clone()
            other[swapped] = torch.randn(3, 16, 16)
            model(ids, other)
            changed = (seen["out"] - first).abs().amax(-1)[0] > 0
            allowed = chunk == swapped if attend == "latest" else chunk >= swapped
            assert torch.equal(changed, allowed), f"image {swapped}"
    before_first = int((chunk < 0).sum())
    assert before_first == 4 and torch.equal(logits[:, :before_first], lm(ids)[:, :before_first])


def test_cached_decoding_equals_uncached_and_keeps_looking_at_the_last_image():
    model = flamingo(tiny_lm(), gates=0.5)
    prompts = [[BOS, IMAGE, IMAGE_END, 20, IMAGE, IMAGE_END, 21], [BOS, 22, 23, 24, IMAGE, IMAGE_END, 25]]
    images = torch.randn(3, 3, 16, 16)
    la = assert_cached_decoding_equals_uncached(model, prompts, images)
    # the generated tokens see the row's last image: another last image changes what follows
    other = images.clone()
    other[1] = torch.randn(3, 16, 16)
    _, _, lc = generate_ids(model, prompts, Sampling(max_new_tokens=6), stop_ids=(), images=other, return_logits=True)
    assert (lc[-1][0] - la[-1][0]).abs().max() > 1e-4


def test_markers_and_images_must_agree():
    model = flamingo(tiny_lm())
    ids = torch.tensor([[BOS, IMAGE, IMAGE_END, 20]])
    with pytest.raises(ValueError, match="1 <image> markers in the tokens but 2 images"):
        model(ids, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="but no images"):
        model(ids)


def test_resampler_gives_a_fixed_number_of_tokens_and_tells_frames_apart():
    torch.manual_seed(0)
    r = PerceiverResampler(dim=32, n_latents=5, n_layers=2, n_heads=4, max_frames=3)
    assert r(torch.randn(2, 7, 32)).shape == r(torch.randn(2, 30, 32)).shape == (2, 5, 32)
    frame = torch.randn(1, 1, 6, 32)
    two = torch.cat([frame, frame], dim=1)  # the same picture twice: only the time embeddings differ
    assert r(two).shape == (1, 5, 32)
    assert not torch.allclose(r(two), r(torch.cat([frame, frame], dim=2).flatten(1, 2)))
    with pytest.raises(ValueError, match="4 frames per input but the resampler has media-time embeddings for 3"):
        r(torch.randn(1, 4, 6, 32))


@pytest.mark.parametrize("attend", ["latest", "previous"])
def test_packed_documents_see_only_their_own_images(attend):
    """Two documents with images packed in one row give each the logits it has alone."""
    lm = tiny_lm()
    model = flamingo(lm, attend=attend, gates=0.5)
    doc = document(lm.cfg.vocab_size)
    first, second = doc[:, :12], doc  # the first holds 2 images, the second 3
    images = torch.randn(5, 3, 16, 16)
    row = torch.cat([first, second], 1)
    segments = torch.tensor([[1] * first.shape[1] + [2] * second.shape[1]])
    with torch.no_grad():
        packed = model(row, images, segments=segments)
        torch.testing.assert_close(packed[:, :12], model(first, images[:2]), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed[:, 12:], model(second, images[2:]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["flamingo", "mllm"])
def test_generate_takes_pictures_for_either_architecture(runs, arch, tmp_path):
    """`kosmo generate --image` puts the pictures before each prompt's text, as the model was trained."""
    from kosmo.data.chat import image_block
    from kosmo.data.images import load_images
    from kosmo.generate import Sampling, generate
    from kosmo.model.load import load_run, save_run
    from kosmo.model.mllm import MLLM, MLLMConfig
    root, data, lm, _ = runs
    run = root / "fl"
    if arch == "mllm":
        torch.manual_seed(0)
        cfg = MLLMConfig(vision=VISION, lm=lm.cfg)
        run = tmp_path / "mm"
        save_run(run, MLLM(cfg), load_run(root / "fl")[1], {"arch": "mllm", "model": cfg.to_dict()})
    pictures = sorted((data["captions"].parent / "images").glob("*.png"))[:2]
    out = kosmo("generate", "--model", run, "--image", pictures[0], "--image", pictures[1], "--prompt", "a",
                "--prompt", "the", "--max-new-tokens", "5", "--precision", "fp32")
    got = [json.loads(line)["completion"] for line in out.stdout.splitlines()]
    model, tok, _ = load_run(run)
    pixels = load_images(pictures, 16).pixels
    markers = image_block(model.cfg.tokens_per_image) * 2
    want = generate(model, tok, [[BOS, *markers, *tok.encode(p)] for p in ("a", "the")], Sampling(max_new_tokens=5),
                    images=pixels.repeat(2, 1, 1, 1))
    assert got == [w.text for w in want]
    bad = kosmo("generate", "--model", root / "lm", "--image", pictures[0], "--prompt", "a", check=False)
    assert bad.returncode == 2 and "a text-only lm run takes no --image" in bad.stderr
    gone = kosmo("generate", "--model", run, "--image", tmp_path / "gone.png", "--prompt", "a", check=False)
    assert gone.returncode == 2 and f"{tmp_path / 'gone.png'}: image file not found" in gone.stderr
