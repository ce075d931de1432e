"""The drawing section of `kosmo demo`: the vision section's chat model taught to draw.

A VQ-VAE image tokenizer trained on the world's pictures (runs/vqvae) -> the vision section's final model
(runs/sft) with the tokenizer's codes as new vocabulary rows, fine-tuned on prompts followed by their
pictures' codes beside the chat data it already knew, a share of the prompts dropped for classifier-free
guidance (runs/draw) -> evaluation: the tokenizer's reconstructions of held-out pictures, GenEval-style
accuracy of drawn pictures by a fixed detector with guidance off and on beside a shuffled-prompt baseline,
the Fréchet distance to real pictures, and VQA of the drawing model beside the model it came from.
"""

from __future__ import annotations

from pathlib import Path

from kosmo.data.world import write_drawing
from kosmo.demo import log
from kosmo.errors import KosmoError

# The recipe and its budget; docs/drawing.md gives the full budget's figures. The default's drawing stage
# needs its steps: at 800 its drawings were no better than the shuffled prompts, at 1,400 half as often
# right as at 1,700 (docs/performance.md). Its image tokenizer learns at twice the full budget's rate.
BUDGETS = {
    "default": dict(draw_n=3000, draw_eval_n=50, vq_steps=1400, vq_lr=2e-3, vq_codebook=256, vq_downsample=12,
                    draw_steps=1700, draw_batch=24, draw_lr=1e-3, draw_mix=4.0, draw_cfg=3.0, draw_temperature=1.0,
                    draw_top_k=0),
    "full": dict(draw_n=8000, draw_eval_n=50, vq_steps=5000, vq_lr=1e-3, vq_codebook=256, vq_downsample=12,
                 draw_steps=4000, draw_batch=48, draw_lr=1e-3, draw_mix=4.0, draw_cfg=3.0, draw_temperature=1.0,
                 draw_top_k=0),
    "quick": dict(draw_n=64, draw_eval_n=2, vq_steps=10, vq_lr=1e-3, vq_codebook=64, vq_downsample=12, draw_steps=10,
                  draw_batch=8, draw_lr=1e-3, draw_mix=2.0, draw_cfg=3.0, draw_temperature=1.0, draw_top_k=0),
}

# The grid of the report and the README: every row a prompt, drawn four times with guidance. Its colour-shape
# pairs are all seen in training in the demo's world (seed 0 holds out a red circle, a green circle, an orange
# square, a blue cross, a purple triangle and a yellow triangle, which codes of whole cells cannot compose).
GRID_PROMPTS = ["a large blue circle in the top left corner", "a small red square in the centre",
                "a large green triangle in the bottom right corner", "a yellow cross in the middle left",
                "a purple circle and an orange cross", "a blue triangle to the left of a red cross",
                "two circles", "three objects"]


def write_data(demo, b: dict) -> dict[str, Path]:
    if "vision" not in demo.report["sections"]:
        raise KosmoError("the drawing section teaches the vision section's model to draw: run it with --sections "
                         "vision,draw")
    return demo.timed("draw_data", lambda: write_drawing(demo.world, demo.data_dir, n=b["draw_n"],
                                                         val=b["draw_eval_n"]))


def prepare(demo, b: dict) -> dict:
    """runs/vqvae, the image tokenizer, which needs no other section's model."""
    demo.train("vqvae", "vqvae", [demo.data["draw"]],
               [f"train.max_steps={b['vq_steps']}", "train.batch_size=32", f"train.lr={b['vq_lr']}",
                "train.warmup_steps=50", "train.weight_decay=0", f"model.codebook_size={b['vq_codebook']}",
                f"model.image_size={b['image_size']}", f"model.downsample={b['vq_downsample']}",
                f"val_data={demo.data['val_draw']}"])
    return {}


def run(demo, b: dict) -> dict:
    from kosmo.eval.imagegen import evaluate_run
    from kosmo.eval.vision import evaluate
    from kosmo.eval.vqvae import reconstruction

    data, runs = demo.data, demo.runs
    demo.ahead("draw", b)
    demo.train("sft", "draw", [data["draw"], data["vqa_all"], data["chat"], data["captions"]],
               [f"train.max_steps={b['draw_steps']}", f"train.batch_size={b['draw_batch']}", "seq_len=128",
                f"train.lr={b['draw_lr']}", "train.warmup_steps=50", f"image_tokenizer={runs / 'vqvae'}",
                f"mix.draw={b['draw_mix']}"], init="sft")

    log("\n== drawing evaluation ==")
    model, tok = demo.load("draw")
    seeing, _ = demo.load("sft")
    with demo.evaluating():
        report = demo.timed("draw_eval", lambda: {
            "tokenizer": reconstruction(model.image_tokenizer, data["val_draw"]),
            "imagegen": evaluate_run(model, tok, data["val_draw"], scales=(1.0, b["draw_cfg"]),
                                     temperature=b["draw_temperature"], top_k=b["draw_top_k"]),
            "vqa_draw": evaluate("vqa", model, tok, data["val_vqa"], limit=b["eval_n"], with_blind=False),
            "vqa_sft": evaluate("vqa", seeing, tok, data["val_vqa"], limit=b["eval_n"], with_blind=False),
        })
        prompt_grid(model, tok, GRID_PROMPTS, demo.out / "draw_grid.png", cfg=b["draw_cfg"],
                    temperature=b["draw_temperature"], top_k=b["draw_top_k"])
    return report


def prompt_grid(model, tok, prompts: list[str], out: Path, n: int = 4, cfg: float = 3.0, temperature: float = 1.0,
                top_k: int = 0, scale: int = 3, seed: int = 0):
    """A PNG with a row per prompt: the prompt, then `n` pictures drawn from it, each `scale` times enlarged."""
    from PIL import Image, ImageDraw

    from kosmo.draw import DrawSampling, draw
    pictures = draw(model, tok, [p for p in prompts for _ in range(n)],
                    DrawSampling(cfg=cfg, temperature=temperature, top_k=top_k, seed=seed))
    side, pad, text_w = pictures[0].width * scale, 4, 300
    sheet = Image.new("RGB", (text_w + n * (side + pad) + pad, len(prompts) * (side + pad) + pad), "white")
    pen = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(prompts):
        top = pad + row * (side + pad)
        pen.text((pad, top + side // 2 - 6), prompt, fill="black")
        for k in range(n):
            picture = pictures[row * n + k].resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(picture, (text_w + pad + k * (side + pad), top))
    sheet.save(out)


def render(r: dict) -> list[str]:
    from kosmo.eval.imagegen import markdown
    t, g = r["tokenizer"], r["imagegen"]
    return [
        "## Drawing (held-out prompts)", "",
        "The vision section's model with an image tokenizer's codes in its vocabulary; the final model is "
        "`runs/draw`.", "",
        f"Image tokenizer on {t['n']} held-out pictures: PSNR {t['psnr']:.2f} dB, {100 * t['codes_used']:.1f}% "
        f"of the codes used, perplexity {t['perplexity']:.1f}.", "",
        f"Drawn pictures judged by the fixed detector ({g['n']} prompts; sampling temperature {g['temperature']}, "
        f"top-k {g['top_k']}); `shuffled` judges the same pictures against another prompt of their category, "
        "`frechet` is the Fréchet distance on the model's CLIP image features to held-out real pictures, "
        "the `real` row real against real:", "",
        markdown(g), "",
        f"VQA accuracy on val images, the drawing model beside the model it was taught from: "
        f"{r['vqa_draw']['vqa_accuracy']} vs {r['vqa_sft']['vqa_accuracy']}.", "",
        "![prompts and their drawings](draw_grid.png)",
    ]
