"""`kosmo demo --quick`: the whole pipeline runs and its report holds real, consistent numbers."""

import json

import pytest
import torch

from conftest import kosmo
from kosmo import hardware
from kosmo.errors import KosmoError


def test_quick_demo_writes_the_report(tmp_path):
    kosmo("demo", "--out", tmp_path, "--quick")
    report = json.loads((tmp_path / "report.json").read_text())
    where = report["hardware"]  # every figure says which machine and precision measured it
    assert where["precision"] == where["eval_precision"] == hardware.resolve_precision("auto", torch.device("cpu"))
    assert f"training in {where['precision']}" in (tmp_path / "report.md").read_text()
    v = report["vision"]
    e = v["eval"]
    for key, metric in [("vqa_val", "vqa_accuracy"), ("vqa_heldout", "vqa_accuracy"), ("caption_val", "cider"),
                        ("chat_val", "compliance")]:
        assert metric in e[key] and metric in e[key]["blind"], key  # every vision figure has its blind twin
    assert e["vqa_val"]["n"] == 20 and set(e["vqa_val"]["by_type"]) >= {"colour", "count", "shape"}
    assert 1 < v["stages"]["lm"]["ppl_val"] < 100
    assert {"i2t_r1", "zeroshot_accuracy"} <= v["stages"]["clip"].keys()
    md = (tmp_path / "report.md").read_text()
    assert f"| VQA accuracy, val images (%) | {e['vqa_val']['vqa_accuracy']:.2f} |" in md
    assert (tmp_path / "losses.png").stat().st_size > 1000
    assert all((tmp_path / g["image"]).is_file() for g in v["gallery"])
    assert (tmp_path / "runs" / "sft" / "model.safetensors").is_file()
    if torch.get_num_threads() > 1:  # the stages that need no other section's model, beside the vision section
        beside = (tmp_path / "beside.log").read_text()
        assert all(f"== {run}: kosmo train" in beside for run in ("ctc", "vqvae", "lm-icl"))
    assert {"clip", "sft", "ctc", "vqvae", "lm-icl", "label"} <= report["timings_s"].keys()
    # the hearing section: every figure beside its deaf or blind twin, measured on held-out voices
    h = report["audio"]["eval"]
    assert {"wer", "cer"} <= h["asr"].keys() and {"wer", "cer"} <= h["asr"]["deaf"].keys() and h["asr"]["n"] == 8
    assert "accuracy" in h["sounds"]["deaf"] and "vqa_accuracy" in h["vqa_spoken"]["blind"]
    assert h["vqa_spoken"]["n"] == h["vqa_typed"]["n"] == 8  # the same pictures, asked aloud and typed
    assert {"train_cer", "val_cer", "val_wer"} <= report["audio"]["ctc"].keys()
    assert f"| word error rate (%) | {h['asr']['wer']:.2f} | {h['asr']['deaf']['wer']:.2f} |" in md
    assert (tmp_path / "log_mel.png").stat().st_size > 1000 and len(report["audio"]["transcripts"]) == 4
    # the drawing section: the tokenizer's reconstructions, every category with guidance off and on beside the
    # shuffled-prompt baseline, the Fréchet distances, and the drawing model still answering questions
    d = report["draw"]
    assert {"psnr", "codes_used", "perplexity"} <= d["tokenizer"].keys()
    rows = {r["pictures"]: r for r in d["imagegen"]["rows"]}
    assert set(rows) == {"cfg 1", "cfg 3", "real"} and d["imagegen"]["n"] == 12
    assert rows["real"]["accuracy"] == 100.0 and rows["real"]["frechet"] >= 0
    assert all({"single_object", "attribute_binding", "shuffled", "frechet"} <= r.keys() for r in rows.values())
    assert 0 <= d["vqa_draw"]["vqa_accuracy"] <= 100 and (tmp_path / "draw_grid.png").stat().st_size > 1000
    assert f"PSNR {d['tokenizer']['psnr']:.2f} dB" in md
    # the architectures section: both arms trained from the same runs, measured the same way
    arms = report["flamingo"]["arms"]
    k, f = arms["kosmos"], arms["flamingo"]
    assert f["params_trainable"] < f["params_total"] and k["tokens_per_image"] > f["tokens_per_image"] == 0
    for arm in (k, f):
        episodes = arm["fewshot"]["episodes"]
        assert set(episodes["curve"]) == set(episodes["blind"]) == {"0", "2", "4"} and episodes["chance"] == 50.0
        recall = arm["fewshot"]["recall"]
        assert set(recall["curve"]) == set(recall["blind"]) == {"0", "4"} and recall["chance"] == 25.0
        assert recall["task"] == episodes["task"] == "episodes"  # one format, hence the plot's own task key
        assert "cider" in arm["caption_val"]["blind"] and arm["train_tok_per_s"] > 0
    assert f"| episodes, 4-shot accuracy (%) | {k['fewshot']['episodes']['curve']['4']} (blind" in md
    lm = report["flamingo"]["lm"]  # the LM both arms start from, and how much of a repeat it copies
    assert set(lm["copy"]) == {"20", "48"} and 1 < lm["ppl_val"] < 100
    assert (tmp_path / "fewshot.png").stat().st_size > 1000
    a = report["align"]
    for name in ("sft", "ppo", "dpo", "cai", "cai_sl"):
        assert {"helpful", "forbidden_compliance", "ordinary_refusal"} <= a["eval"][name].keys(), name
    for name in ("ppo", "dpo", "cai"):
        assert 0 <= a["eval"][name]["win_rate"] <= 100 and "kl" in a["eval"][name], name
    assert 0 <= a["eval"]["vqa_sft"] <= 100 and 0 <= a["eval"]["vqa_cai"] <= 100  # what CAI costs the picture skills
    assert f"VQA accuracy (val): SFT {a['eval']['vqa_sft']:.2f}, Constitutional AI {a['eval']['vqa_cai']:.2f}." in md
    assert f"| PPO (reward model + KL penalty) | {a['eval']['ppo']['win_rate']:.1f} |" in md
    assert (tmp_path / "ppo.png").stat().st_size > 1000
    rm = a["stages"]["reward"]  # the reward model's pairs, labelled once and read by DPO too
    pairs = (tmp_path / "data" / "align_pairs.jsonl").read_text().splitlines()
    assert rm["train_pairs"] + rm.get("val_pairs", 0) == len(pairs) > 0


def test_every_budget_sets_every_knob():
    """A knob missing from one budget would stop that demo minutes in; the default trains no longer than full."""
    from kosmo.demo import BUDGET_NAMES, BUDGETS, SECTIONS, section
    for budgets in [BUDGETS, *(section(name).BUDGETS for name in SECTIONS)]:
        assert tuple(budgets) == BUDGET_NAMES
        assert all(budgets[name].keys() == budgets["full"].keys() for name in BUDGET_NAMES)
        steps = [k for k in budgets["full"] if k.endswith("_steps")]
        assert all(budgets["default"][k] <= budgets["full"][k] for k in steps)


def test_a_knob_on_the_command_line_changes_the_budget_or_is_refused_in_one_line(tmp_path, capsys):
    from kosmo.cli import main
    from kosmo.demo import checked_recipe
    knobs = {"draw_steps": 2000, "draw_lr": 1e-3, "eval_shots": (0, 2, 4), "gated_ffw": False}
    assert checked_recipe({"draw_steps": 800, "draw_lr": 2, "eval_shots": [0, 4]}, knobs) == \
        {"draw_steps": 800, "draw_lr": 2.0, "eval_shots": (0, 4)}
    with pytest.raises(KosmoError, match=r"demo knob 'draw_step' is not one of the sections' knobs \(draw_lr, "):
        checked_recipe({"draw_step": 800}, knobs)
    with pytest.raises(KosmoError, match=r"demo knob draw_steps=0.5: expected a whole number, like 2000"):
        checked_recipe({"draw_steps": 0.5}, knobs)
    with pytest.raises(KosmoError, match="demo knob gated_ffw=1: expected true or false"):
        checked_recipe({"gated_ffw": 1}, knobs)
    assert main(["demo", "--out", str(tmp_path / "out"), "--sections", "vision", "draw_steps=800"]) == 2
    assert "demo knob 'draw_steps' is not one of the sections' knobs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_error_beside_the_vision_section_stops_the_demo_in_one_line(tmp_path):
    """The image tokenizer's bad knob fails in the second lane (on 2+ threads); the demo says so and exits 2."""
    proc = kosmo("demo", "--out", tmp_path, "--quick", "vq_downsample=7", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "kosmo: error: invalid config: downsample must be a product of 2s and 3s (1, 2, 3, 4, 6, 8, 12, ...), got 7"
    assert not (tmp_path / "report.json").exists()
