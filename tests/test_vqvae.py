"""The image tokenizer: a VQ-VAE's codes, its EMA codebook, and `kosmo train vqvae` / `kosmo eval vqvae`."""

import json

import pytest
import torch

from conftest import kosmo, read_metrics
from kosmo.errors import KosmoError
from kosmo.model.vqvae import VQVAE, EMACodebook, VQVAEConfig

TINY = {"image_size": 16, "downsample": 4, "channels": 16, "n_res_blocks": 1, "codebook_size": 16, "code_dim": 8}
QUIET = ["train.progress=false", "train.tensorboard=false"]
SMALL = ["model.channels=16", "model.n_res_blocks=1", "model.codebook_size=32", "model.code_dim=8",
         "train.batch_size=8", "train.warmup_steps=2", "vocab_size=272"]


def tiny(**kw) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{**TINY, **kw}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from kosmo.data.world.writer import write_world
    out = tmp_path_factory.mktemp("world36")
    write_world(out, 40, image_size=36)
    return out


def test_codes_are_a_grid_in_raster_order():
    model = tiny().eval()
    assert model.grid == 4 and model.codebook_size == 16
    codes = model.encode(torch.randn(2, 3, 16, 16))
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert torch.equal(model.decode(codes), model.decode(codes.flatten(1)))
    assert model.decode(codes).shape == (2, 3, 16, 16)
    # raster order: moving along a row of the sequence moves the painted spot right, a row further moves it down
    base = torch.zeros(1, 16, dtype=torch.long)
    ys = torch.arange(16.0).view(16, 1)
    centres = []
    with torch.no_grad():
        for i in range(16):
            changed = base.clone()
            changed[0, i] = 5
            delta = (model.decode(changed) - model.decode(base)).abs().sum(1)[0]  # (16, 16)
            centres.append([float((delta * ys).sum() / delta.sum()), float((delta * ys.T).sum() / delta.sum())])
    centres = torch.tensor(centres).view(4, 4, 2)  # (sequence row, sequence column, (y, x))
    assert (centres[1:, :, 0] > centres[:-1, :, 0]).all() and (centres[:, 1:, 1] > centres[:, :-1, 1]).all()


def test_decode_of_encode_is_the_forward_reconstruction_in_eval_mode():
    model = tiny().eval()
    x = torch.randn(3, 3, 16, 16)
    recon, stats = model(x)
    codes = model.encode(x)
    assert torch.equal(stats["codes"], codes)
    assert torch.equal(model.decode(codes), recon)
    assert int(stats["counts"].sum()) == 3 * 16
    assert torch.equal(model.quantizer.ema_count, torch.zeros(16)), "eval mode leaves the codebook alone"


def test_ema_update_moves_an_entry_towards_the_mean_of_its_vectors():
    q = EMACodebook(VQVAEConfig(**{**TINY, "codebook_size": 3, "code_dim": 2, "ema_decay": 0.5,
                                   "dead_threshold": 0.0, "eps": 1e-9}))
    q.ema_count.copy_(torch.tensor([2.0, 0.0, 4.0]))
    q.ema_sum.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 8.0]]))  # entry 2 sits at (1, 2)
    flat = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    q.update(flat, torch.tensor([0, 0, 1]))
    # entry 0: count 0.5*2 + 0.5*2 = 2, sum 0.5*(0,0) + 0.5*(4,0) = (2,0): halfway to the mean (2, 0)
    # entry 1: count 0.5, sum (0, 1): exactly its one vector; entry 2: nothing assigned, it stays at (1, 2)
    torch.testing.assert_close(q.ema_count, torch.tensor([2.0, 0.5, 2.0]))
    torch.testing.assert_close(q.embed, torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]]))
    q.cfg.ema_decay = 0.0  # no memory: every used entry becomes the plain mean of its vectors
    q.update(flat, torch.tensor([1, 1, 1]))
    torch.testing.assert_close(q.embed[1], torch.tensor([4 / 3, 2 / 3]))


def test_dead_entries_restart_at_encoder_outputs_deterministically():
    cfg = VQVAEConfig(**{**TINY, "codebook_size": 8, "dead_threshold": 1.0})
    torch.manual_seed(1)
    flat = torch.randn(50, 8)
    q = EMACodebook(cfg)
    q.ema_count.fill_(10.0)
    q.ema_count[[2, 5]] = 0.5  # rarely chosen entries
    q.ema_sum.copy_(q.embed * q.ema_count[:, None])
    q.update(flat, torch.zeros(50, dtype=torch.long))  # every vector goes to entry 0
    for k in range(1, 8):  # entries 1..7 drew nothing: 0.99 * 10 stays alive, 0.99 * 0.5 is dead
        is_fresh = (q.embed[k] == flat).all(1).any()
        assert bool(is_fresh) == (k in (2, 5)), k
    assert q.ema_count[2] == q.ema_count[5] == 1.0
    # the first training step seeds a fresh codebook from the encoder's outputs; the same seed, the same seeds
    seeded = []
    for _ in range(2):
        model = tiny(dead_threshold=1.0).train()
        torch.manual_seed(3)
        x = torch.randn(4, 3, 16, 16)
        z = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)
        model(x)
        assert all(bool((e == z).all(1).any()) for e in model.quantizer.embed)
        seeded.append(model.quantizer.embed.clone())
    assert torch.equal(*seeded)


@pytest.mark.parametrize("change, words", [({"image_size": 30}, ("image_size (30)", "downsample (4)")),
                                           ({"downsample": 5}, ("downsample", "2s and 3s")),
                                           ({"ema_decay": 1.0}, ("ema_decay",))])
def test_config_errors_are_one_line(change, words):
    with pytest.raises(ValueError) as e:
        VQVAEConfig(**{**TINY, **change})
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


@pytest.mark.parametrize("downsample, grid", [(1, 36), (3, 12), (6, 6), (12, 3)])
def test_a_third_is_a_down_sampling_stage_too(downsample, grid):
    """Cells of the world's 36-pixel pictures are 12 pixels: codes of 6 or 12 pixels tile them exactly."""
    model = VQVAE(VQVAEConfig(**{**TINY, "image_size": 36, "downsample": downsample})).eval()
    codes = model.encode(torch.randn(2, 3, 36, 36))
    assert model.grid == grid and codes.shape == (2, grid, grid)
    assert model.decode(codes).shape == (2, 3, 36, 36)


def test_config_round_trips():
    cfg = VQVAEConfig(**TINY)
    assert VQVAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(KosmoError, match="image_size"):
        VQVAEConfig.from_dict({**cfg.to_dict(), "image_size": 18})


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_load_and_evaluate_through_the_cli(world, tmp_path, capsys):
    from kosmo.model.load import load_run
    from kosmo.train.run import run_stage
    run = tmp_path / "vq"
    last = run_stage("vqvae", [world / "captions.jsonl"], run,
                     overrides=[*QUIET, *SMALL, "train.max_steps=3", f"val_data={world / 'val_captions.jsonl'}"])
    assert {"psnr", "perplexity", "codes_used", "commitment"} <= set(read_metrics(run)[-1])
    assert last["val_n"] == 20 and 0 < last["val_codes_used"] <= 1 and last["val_psnr"] > 0
    model, _, config = load_run(run)
    assert config["arch"] == "vqvae" and model.grid == 9
    out = last_json(kosmo("eval", "vqvae", "--model", run, "--data", world / "val_captions.jsonl",
                          "--precision", "fp32"))
    assert out == {k[4:]: v for k, v in last.items() if k.startswith("val_")}, "the stage reports what eval measures"
    from kosmo.cli import main
    assert main(["eval", "caption", "--model", str(run), "--data", str(world / "val_captions.jsonl")]) == 2
    assert "needs a language-model or CLIP run, this is a vqvae run" in capsys.readouterr().err
    assert main(["train", "vqvae", "--data", str(world / "captions.jsonl"), "--out", str(tmp_path / "bad"),
                 "model.image_size=30"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "image_size (30) must be a positive multiple of downsample" in err


def test_resume_continues_exactly(world, tmp_path, monkeypatch):
    from kosmo.train import trainer as T
    from kosmo.train.run import run_stage
    args = [*QUIET, *SMALL, "train.max_steps=6", "train.save_every=3", "train.eval_every=3", "val_fraction=0.1"]
    run_stage("vqvae", [world / "captions.jsonl"], tmp_path / "straight", overrides=args)

    class Stop(Exception):
        pass

    save = T.Trainer.save

    def save_then_stop(self):
        save(self)
        if self.step == 3:
            raise Stop

    monkeypatch.setattr(T.Trainer, "save", save_then_stop)
    with pytest.raises(Stop):
        run_stage("vqvae", [world / "captions.jsonl"], tmp_path / "stopped", overrides=args)
    monkeypatch.setattr(T.Trainer, "save", save)
    run_stage("vqvae", [world / "captions.jsonl"], tmp_path / "stopped", overrides=args)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(b) == 6
    from kosmo import checkpoint
    wa = checkpoint.load_tensors(tmp_path / "straight" / "model.safetensors")
    wb = checkpoint.load_tensors(tmp_path / "stopped" / "model.safetensors")
    assert {"quantizer.embed", "quantizer.ema_count", "quantizer.ema_sum"} <= set(wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
