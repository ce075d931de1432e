"""`kosmo demo --quick`: the whole pipeline runs and its report holds real, consistent numbers."""

import json

from conftest import kosmo

from kosmo.data.world import World
from kosmo.demo.flamingo import write_recall


def test_quick_demo_writes_the_report(tmp_path):
    kosmo("demo", "--out", tmp_path, "--quick")
    report = json.loads((tmp_path / "report.json").read_text())
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
    # the architectures section: both arms trained from the same runs, measured the same way
    arms = report["flamingo"]["arms"]
    k, f = arms["kosmos"], arms["flamingo"]
    assert f["params_trainable"] < f["params_total"] and k["tokens_per_image"] > f["tokens_per_image"] == 0
    for arm in (k, f):
        episodes = arm["fewshot"]["episodes"]
        assert set(episodes["curve"]) == set(episodes["blind"]) == {"0", "2", "4"} and episodes["chance"] == 50.0
        assert "cider" in arm["caption_val"]["blind"] and arm["train_tok_per_s"] > 0
        assert set(arm["fewshot"]["recall"]["curve"]) == {"0", "4"} and arm["fewshot"]["recall"]["chance"] == 25.0
    assert f"| episodes, 4-shot accuracy (%) | {k['fewshot']['episodes']['curve']['4']} (blind" in md
    # both arms start from the section's LM with smeared keys, through a picture-recall phase
    lm_icl = json.loads((tmp_path / "runs" / "lm-icl" / "config.json").read_text())
    assert lm_icl["model"]["smear_keys"] and lm_icl["init"].endswith("lm-induction")
    for arm in ("kosmos", "flamingo"):
        assert json.loads((tmp_path / "runs" / arm / "config.json").read_text())["init"].endswith(f"{arm}-recall")
    assert (tmp_path / "fewshot.png").stat().st_size > 1000
    a = report["align"]
    for name in ("sft", "ppo", "dpo", "cai", "cai_sl"):
        assert {"helpful", "forbidden_compliance", "ordinary_refusal"} <= a["eval"][name].keys(), name
    for name in ("ppo", "dpo", "cai"):
        assert 0 <= a["eval"][name]["win_rate"] <= 100 and "kl" in a["eval"][name], name
    assert set(a["targets"]) >= {"ppo_win_rate_ge_70", "cai_halves_forbidden_compliance"}
    assert f"| PPO (reward model + KL penalty) | {a['eval']['ppo']['win_rate']:.1f} |" in md
    assert (tmp_path / "ppo.png").stat().st_size > 1000


def test_recall_documents_name_each_picture_twice_and_ask_for_one_of_them(tmp_path):
    (tmp_path / "images").mkdir()
    train, val = write_recall(World(image_size=36), tmp_path, n_train=5, n_val=5)
    for line in train.read_text().splitlines():
        content = json.loads(line)["content"]
        pairs = [(a["image"], b["text"]) for a, b in zip(content[::2], content[1::2])]
        assert len(pairs) == 8 and len({text for _, text in pairs[:4]}) == 4  # four pictures, four words
        assert sorted(pairs[4:]) == sorted(pairs[:4])  # all four again, shuffled
        assert all((tmp_path / image).is_file() for image, _ in pairs)
    for line in val.read_text().splitlines():
        doc = json.loads(line)
        content = doc["content"]
        named = {a["image"]: b["text"] for a, b in zip(content[:8:2], content[1:8:2])}
        assert len(content) == 10 and content[-1] == {"text": "This is a"}
        assert named[content[8]["image"]] == f"This is a {doc['answer']}."  # the query repeats a picture
        assert sorted(doc["labels"]) == sorted(text.split()[-1].rstrip(".") for text in named.values())
