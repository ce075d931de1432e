"""Drawing: codes as targets after a prompt, the prompt dropped for guidance, guided sampling that writes
only codes, and the stage and command that make and use a model that draws."""

import json

import pytest
import torch
from conftest import kosmo
from PIL import Image

from kosmo.data.images import load_images
from kosmo.data.multimodal import ImageBank, MultimodalDataset, encode_drawings, read_examples
from kosmo.draw import UNCONDITIONAL, DrawSampling, draw, draw_codes, prompt_ids
from kosmo.errors import KosmoError
from kosmo.generate import Sampling, generate_ids
from kosmo.model.lm import LMConfig
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.vision import VisionConfig
from kosmo.model.vqvae import VQVAE, VQVAEConfig
from kosmo.tokenizer import BEGIN_OF_IMAGE, BOS, END_OF_IMAGE, EOS, Tokenizer
from kosmo.train.mllm import with_image_tokenizer

COLOURS = {"red": (220, 30, 30), "blue": (40, 70, 225), "green": (30, 160, 50)}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["draw a red square, a blue square and a green one. what colour is it? red"] * 50, 300)


def seeing_model(tok) -> MLLM:
    torch.manual_seed(0)
    return MLLM(MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=2, n_heads=2, mlp_dim=64),
                           lm=LMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                       max_seq_len=128)))


def drawing_model(tok) -> MLLM:
    torch.manual_seed(1)
    coder = VQVAE(VQVAEConfig(image_size=16, downsample=4, channels=16, n_res_blocks=1, codebook_size=32, code_dim=8))
    return with_image_tokenizer(seeing_model(tok), coder).eval()


@pytest.fixture()
def data(tmp_path):
    lines = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        img = Image.new("RGB", (16, 16), (220, 220, 220))
        img.paste(rgb, (2 + i, 2, 10 + i, 10))
        img.save(tmp_path / f"{name}.png")
        lines.append({"prompt": f"a {name} square", "image": f"{name}.png"})
    lines.append({"image": "red.png", "question": "what colour is it?", "answers": ["red"]})
    path = tmp_path / "draw.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_a_new_image_tokenizer_keeps_what_the_model_said_and_adds_a_row_per_code(tok):
    seeing = seeing_model(tok).eval()
    coder = VQVAE(VQVAEConfig(image_size=16, channels=16, n_res_blocks=1, codebook_size=32, code_dim=8))
    drawing = with_image_tokenizer(seeing, coder).eval()
    assert drawing.vocab_size == seeing.vocab_size + 32 and drawing.text_vocab == seeing.vocab_size
    ids = torch.tensor([[BOS, *tok.encode("a red square")]])
    torch.testing.assert_close(drawing(ids)[..., :drawing.text_vocab], seeing(ids), rtol=0, atol=0)
    codes = torch.tensor([[0, 31]])
    assert drawing.codes_to_ids(codes).tolist() == [[seeing.vocab_size, seeing.vocab_size + 31]]
    with pytest.raises(KosmoError, match="already draws"):
        with_image_tokenizer(drawing, coder)


def test_a_draw_line_learns_its_pictures_codes_after_its_prompt(tok, data):
    model = drawing_model(tok)
    n = model.image_tokenizer.grid ** 2
    examples, _ = read_examples([data], tok, model.tokens_per_image, 128, codes_per_image=n)
    examples, bad = encode_drawings(examples, model)
    assert [e.kind for e in examples] == ["draw"] * 3 + ["vqa"] and bad == []
    red = examples[0]
    prompt = tok.encode("a red square")
    assert red.ids[:len(prompt) + 2] == [BOS, *prompt, BEGIN_OF_IMAGE] and red.ids[-2:] == [END_OF_IMAGE, EOS]
    pixels = load_images([data.parent / "red.png"], 16).pixels
    want = model.codes_to_ids(model.image_tokenizer.encode(pixels)).flatten().tolist()
    assert red.ids[len(prompt) + 2:-2] == want and all(t >= model.text_vocab for t in want)
    # the codes, the closing marker and the end are learnt; the prompt is only read
    assert red.target == [False] * (len(prompt) + 2) + [True] * (n + 2)


def test_a_share_of_draw_examples_goes_without_its_prompt(tok, data):
    model = drawing_model(tok)
    examples, _ = read_examples([data] * 10, tok, model.tokens_per_image, 128,
                                codes_per_image=model.image_tokenizer.grid ** 2)
    examples, _ = encode_drawings(examples, model)
    bank = ImageBank([p for e in examples for p in e.images], 16)
    ds = MultimodalDataset(examples, bank, uncond=0.2)
    assert len(ds.unconditional) == 6  # a fifth of the 30 draw examples, and no VQA example
    assert all(ds.examples[ds.order[i]].kind == "draw" for i in ds.unconditional)
    i = min(ds.unconditional)
    row = ds.collate([i])["input"][0].tolist()
    assert row[:2] == UNCONDITIONAL and row.count(BEGIN_OF_IMAGE) == 1
    assert MultimodalDataset(examples, bank, uncond=0.2).unconditional == ds.unconditional  # seeded: resume is exact


def test_a_model_that_cannot_draw_refuses_draw_lines_by_line(tok, data):
    with pytest.raises(KosmoError, match=r"draw\.jsonl:1: a draw line, but the model has no image tokenizer"):
        read_examples([data], tok, 4, 128)


def test_guided_drawing_writes_only_codes_and_follows_the_guided_logits(tok):
    model = drawing_model(tok)
    prompts = [prompt_ids(tok, "a red square"), prompt_ids(tok, "a blue square and a green one")]
    s = DrawSampling(cfg=3.0, temperature=0)
    codes = draw_codes(model, prompts, s)
    g = model.image_tokenizer.grid
    assert codes.shape == (2, g, g) and 0 <= int(codes.min()) and int(codes.max()) < 32
    # Without a cache: every code is the argmax of uncond + 3 (cond - uncond) over the code rows alone.
    for p, row in zip(prompts, codes.flatten(1).tolist()):
        ids = [model.codes_to_ids(torch.tensor(c)).item() for c in row]
        cond = model(torch.tensor([p + ids]))[0, len(p) - 1:-1, model.text_vocab:]
        uncond = model(torch.tensor([UNCONDITIONAL + ids]))[0, 1:-1, model.text_vocab:]
        assert (uncond + 3 * (cond - uncond)).argmax(-1).tolist() == row
    unguided = draw_codes(model, prompts, DrawSampling(cfg=1.0, temperature=0))
    assert not torch.equal(unguided, codes)
    a, b = (draw_codes(model, prompts, DrawSampling(seed=7)) for _ in range(2))
    assert torch.equal(a, b)
    pictures = draw(model, tok, ["a red square"], DrawSampling(seed=1))
    assert pictures[0].size == (16, 16) and pictures[0].mode == "RGB"


def test_text_generation_never_writes_codes_or_opens_a_picture(tok):
    model = drawing_model(tok)
    with torch.no_grad():  # make the codes and the opening marker the likeliest tokens by far
        model.lm.embed.weight[model.text_vocab:] = 3 * model.lm.embed.weight[model.text_vocab:] + 1
    out, _, logits = generate_ids(model, [[BOS, *tok.encode("a red")]], Sampling(max_new_tokens=8), stop_ids=(),
                                  return_logits=True)
    assert logits[0].shape[-1] == model.text_vocab
    assert all(t < model.text_vocab and t not in (BEGIN_OF_IMAGE, END_OF_IMAGE) for t in out[0])


def test_bad_drawing_requests_get_one_line_errors(tok):
    with pytest.raises(ValueError, match="prompt is empty"):
        prompt_ids(tok, "  ")
    with pytest.raises(ValueError, match="at least 1"):
        DrawSampling(cfg=0.5)
    with pytest.raises(ValueError, match="cannot draw"):
        draw(seeing_model(tok), tok, ["a red square"], DrawSampling())


def test_the_stage_teaches_a_seeing_model_to_draw_and_generate_writes_the_pictures(tok, data, tmp_path):
    from kosmo.model.load import load_run, save_run
    from kosmo.train.run import run_stage
    seeing = seeing_model(tok)
    save_run(tmp_path / "seeing", seeing, tok, {"arch": "mllm", "model": seeing.cfg.to_dict()})
    coder = VQVAE(VQVAEConfig(image_size=16, channels=16, n_res_blocks=1, codebook_size=32, code_dim=8))
    save_run(tmp_path / "vq", coder, tok, {"arch": "vqvae", "model": coder.cfg.to_dict()})
    run_stage("sft", [data], tmp_path / "drawing", init=tmp_path / "seeing",
              overrides=[f"image_tokenizer={tmp_path / 'vq'}", "train.max_steps=3", "train.batch_size=4",
                         "seq_len=96", "train.progress=false", "train.tensorboard=false", "val_fraction=0"])
    model, _, config = load_run(tmp_path / "drawing")
    assert model.image_tokenizer is not None and config["model"]["image_tokenizer"]["codebook_size"] == 32
    torch.testing.assert_close(model.image_tokenizer.state_dict(), coder.state_dict())  # never trained with the LM
    out = tmp_path / "pics" / "square.png"
    proc = kosmo("generate", "--model", tmp_path / "drawing", "--prompt", "a red square", "--image-out", out,
                 "--n", "2", "--cfg", "2", "--seed", "1")
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["image"] for x in lines] == [str(out.with_name("square-1.png")), str(out.with_name("square-2.png"))]
    assert Image.open(lines[0]["image"]).size == (16, 16)
    proc = kosmo("generate", "--model", tmp_path / "seeing", "--prompt", "a red square", "--image-out", out,
                 check=False)
    assert proc.returncode == 2 and "cannot draw" in proc.stderr.strip().splitlines()[-1]

    # kosmo eval imagegen: every category with guidance off and on, beside the baselines
    from kosmo.data.world import World, write_drawing
    paths = write_drawing(World(image_size=32), tmp_path / "world", n=1, val=2)
    proc = kosmo("eval", "imagegen", "--model", tmp_path / "drawing", "--data", paths["val_draw"],
                 "--cfg-scales", "1,2")
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["n"] == 12 and [r["pictures"] for r in report["rows"]] == ["cfg 1", "cfg 2", "real"]
    real = report["rows"][-1]
    assert real["accuracy"] == 100.0 and real["frechet"] >= 0  # the prompts' own scenes satisfy them
    assert all(0 <= r["accuracy"] <= 100 and r["frechet"] >= 0 for r in report["rows"][:2])
    for args, message in [(["--cfg-scales", "0.5"], "--cfg-scales must be"),
                          (["--model", tmp_path / "seeing"], "cannot draw")]:
        proc = kosmo("eval", "imagegen", "--model", tmp_path / "drawing", "--data", paths["val_draw"], *args,
                     check=False)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
