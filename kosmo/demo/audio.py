"""The audio section of `kosmo demo`: the vision section's chat model given ears, the KOSMOS path with a
Whisper-style encoder.

CTC pretraining of the audio encoder on the world's spoken sentences (runs/ctc) -> the vision section's
final model (runs/sft) with that encoder and a new frame stacker, which alone learns on transcripts and
sound names (stage 1, runs/hear-stage1) -> the stacker and the LM on transcripts, sound names, spoken and
typed questions about pictures (stage 2, runs/hear) -> evaluation on voices and speeds no training clip
has: word error rate, sound naming, and spoken-question VQA beside typed-question VQA on the same
pictures and questions, each beside its deaf or blind baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

from kosmo.data.world import write_audio
from kosmo.demo import log
from kosmo.errors import KosmoError

# The recipe and its budget; docs/performance.md gives the timings. The default hears about a quarter of the
# full budget's clips, in smaller batches.
BUDGETS = {
    "default": dict(audio_n=800, audio_questions=1500, audio_eval_n=100, ctc_steps=200, ctc_batch=16, ctc_dim=192,
                    ctc_layers=4, ctc_lr=2e-3, hear1_steps=40, hear2_steps=400, hear_batch=16, hear_lr=5e-4,
                    audio_stack=4),
    "full": dict(audio_n=3000, audio_questions=9000, audio_eval_n=200, ctc_steps=1000, ctc_batch=32, ctc_dim=192,
                 ctc_layers=4, ctc_lr=2e-3, hear1_steps=200, hear2_steps=2000, hear_batch=32, hear_lr=5e-4,
                 audio_stack=4),
    "quick": dict(audio_n=40, audio_questions=40, audio_eval_n=8, ctc_steps=10, ctc_batch=32, ctc_dim=64,
                  ctc_layers=2, ctc_lr=2e-3, hear1_steps=5, hear2_steps=10, hear_batch=8, hear_lr=1e-3,
                  audio_stack=4),
}


def write_data(demo, b: dict) -> dict[str, Path]:
    if "vision" not in demo.report["sections"]:  # checked before any clip is written
        raise KosmoError("the audio section gives ears to the vision section's model: run it with --sections "
                         "vision,audio")
    return demo.timed("audio_data", lambda: write_audio(demo.world, demo.data_dir, n=b["audio_n"],
                                                        val=b["audio_eval_n"], questions=b["audio_questions"]))


def prepare(demo, b: dict) -> dict:
    """runs/ctc, which needs no other section's model; returns its error rates."""
    data = demo.data
    ctc = demo.train("audio", "ctc", [data["speech"]],
                     [f"train.max_steps={b['ctc_steps']}", f"train.batch_size={b['ctc_batch']}",
                      f"train.lr={b['ctc_lr']}", "train.warmup_steps=50", f"audio.dim={b['ctc_dim']}",
                      f"audio.mlp_dim={4 * b['ctc_dim']}", f"audio.n_layers={b['ctc_layers']}",
                      f"val_data={data['val_speech']}"])
    return {k: ctc[k] for k in ("train_cer", "val_cer", "val_wer")}


def run(demo, b: dict) -> dict:
    from kosmo.eval import audio as A
    from kosmo.eval.vision import evaluate

    data, runs = demo.data, demo.runs
    ctc = demo.ahead("audio", b)
    # 160 positions hold the slowest-read caption of the world
    common = [f"train.batch_size={b['hear_batch']}", "seq_len=160", "train.warmup_steps=20"]
    demo.train("mllm", "hear-stage1", [data["speech"], data["sounds"]],
               [f"train.max_steps={b['hear1_steps']}", *common, "train.lr=2e-3", "freeze=connector",
                f"audio={runs / 'ctc'}", f"audio_stack={b['audio_stack']}"], init="sft")
    demo.train("sft", "hear", [data["speech"], data["sounds"], data["spoken_vqa"], data["vqa_all"]],
               [f"train.max_steps={b['hear2_steps']}", *common, f"train.lr={b['hear_lr']}", "freeze=connector+lm"],
               init="hear-stage1")

    log("\n== audio evaluation ==")
    model, tok = demo.load("hear")
    n = b["audio_eval_n"]
    with demo.evaluating():
        report = {"eval": demo.timed("audio_eval", lambda: {
            "asr": A.evaluate("asr", model, tok, data["val_speech"], limit=n),
            "sounds": A.evaluate("sounds", model, tok, data["val_sounds"], limit=n),
            "vqa_spoken": evaluate("vqa", model, tok, data["val_spoken_vqa"], limit=n),
            "vqa_typed": evaluate("vqa", model, tok, data["val_vqa"], limit=n),
        })}
        report["transcripts"] = transcripts(model, tok, data["val_speech"])
    # the encoder alone, greedy CTC on the same held-out clips: what the LM's reading of it adds
    report["ctc"] = ctc
    plot_log_mel(data["val_speech"], demo.out / "log_mel.png", model.n_mels)
    return report


def transcripts(model, tok, path: Path, n: int = 4) -> list[dict]:
    """The first n held-out clips: who read them, the truth and the model's transcript."""
    from kosmo.eval.audio import eval_asr
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()[:n]]
    samples = eval_asr(model, tok, path, limit=n)["samples"]
    return [{"voice": line["voice"], **s} for line, s in zip(lines, samples)]


def plot_log_mel(path: Path, out_png: Path, n_mels: int):
    """The first held-out clip's log-mel features, as the encoder sees them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kosmo.data.audio import clip_features, load_audio
    line = json.loads(Path(path).read_text().splitlines()[0])
    mel = clip_features(load_audio(Path(path).parent / line["audio"]), n_mels)
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.imshow(mel.numpy(), origin="lower", aspect="auto", cmap="magma",
              extent=(0, mel.shape[1] / 100, 0, n_mels))
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel bin")
    ax.set_title(f"“{line['text']}” ({line['voice']['language']}+{line['voice']['variant']}, "
                 f"{line['voice']['wpm']} wpm)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def render(r: dict) -> list[str]:
    e = r["eval"]
    asr, sounds, spoken, typed = e["asr"], e["sounds"], e["vqa_spoken"], e["vqa_typed"]
    lines = [
        "## Hearing (held-out voices and speeds)", "",
        "The vision section's model given a Whisper-style encoder; the final model is `runs/hear`.", "",
        f"The encoder alone (greedy CTC over characters, no LM): CER {100 * r['ctc']['val_cer']:.2f}%, "
        f"WER {100 * r['ctc']['val_wer']:.2f}% on the same clips (CER {100 * r['ctc']['train_cer']:.2f}% on "
        "training clips).", "",
        "| metric | with the audio | deaf (audio removed) |", "|---|---:|---:|",
        f"| word error rate (%) | {asr['wer']:.2f} | {asr['deaf']['wer']:.2f} |",
        f"| character error rate (%) | {asr['cer']:.2f} | {asr['deaf']['cer']:.2f} |",
        f"| sound naming accuracy (%) | {sounds['accuracy']:.2f} | {sounds['deaf']['accuracy']:.2f} |", "",
        "| VQA accuracy, the same pictures and questions (%) | with the image | blind (image removed) |",
        "|---|---:|---:|",
        f"| question typed | {typed['vqa_accuracy']:.2f} | {typed['blind']['vqa_accuracy']:.2f} |",
        f"| question spoken | {spoken['vqa_accuracy']:.2f} | {spoken['blind']['vqa_accuracy']:.2f} |", "",
        "Sound naming by class: " + ", ".join(f"{k} {v}" for k, v in sounds["by_class"].items()), "",
        "![log-mel](log_mel.png)", "",
        "| voice | truth | transcript |", "|---|---|---|",
    ]
    for t in r["transcripts"]:
        v = t["voice"]
        lines.append(f"| {v['language']}+{v['variant']}, {v['wpm']} wpm | {t['truth']} | {t['prediction']} |")
    return lines
