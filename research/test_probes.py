"""The in-context probes' copy rows and symbol episodes: what docs/architectures.md's figures rest on."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("incontext_probes", ROOT / "research" / "incontext_probes.py")
probes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probes)


def test_symbol_copy_rows_target_only_what_the_first_half_predicts():
    episodes, targets = torch.zeros(3, 30, dtype=torch.long), torch.zeros(3, 30, dtype=torch.bool)
    ids, target = probes.with_copy_rows(episodes, targets, 2, torch.Generator().manual_seed(1))
    assert ids.shape == (5, 30) and target.shape == (5, 30)
    assert torch.equal(ids[:3], episodes) and not target[:3].any()
    for row, mask in zip(ids[3:], target[3:]):
        assert row[0] == 0  # "<s>"
        half = int(mask.sum()) + 1  # every repeated token but the first
        assert torch.equal(row[1:1 + half], row[1 + half:1 + 2 * half])
        assert mask.nonzero().flatten().tolist() == list(range(2 + half, 1 + 2 * half))
        assert (row[1 + 2 * half:] == 1).all()  # "." to the end, untargeted


def test_probe_arguments_out_of_range_get_a_one_line_error():
    for args, message in ((["--symbol-copy-mix", "1"], "--symbol-copy-mix must be at least 0 and below 1"),
                          (["--copy-half", "-1"], "--copy-half must be 0"),
                          (["--copy-half", "1"], "or a length from 2 to 128, got 1"),
                          (["--symbol-steps", "0"], "must be at least 1")):
        r = subprocess.run([sys.executable, str(ROOT / "research" / "incontext_probes.py"), "--probes", "symbols",
                            *args], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1]


def test_symbol_episodes_put_each_formats_lead_in_before_each_label():
    from kosmo.data.world import World
    ep = World(image_size=36).episode(3, "val", shots=4)
    lead_in = probes.LEAD_INS["world"]
    assert lead_in == ("this", "is", "a") and probes.LEAD_INS["marker"] == ("|",) and not probes.LEAD_INS["bare"]
    bare, bare_target = probes.episode_symbols(ep, ())
    words, target = probes.episode_symbols(ep, lead_in)
    assert len(words) == len(bare) + 5 * len(lead_in) and len(target) == len(words)
    for k, (scene, label) in enumerate([*ep.support, ep.query]):
        at = 1 + k * (5 + len(lead_in))
        o = scene.objects[0]
        assert words[at:at + 5 + len(lead_in)] == [o.size, o.colour, o.shape, *lead_in, label, "."]
        assert bare[1 + 5 * k:1 + 5 * (k + 1)] == [o.size, o.colour, o.shape, label, "."]
    # only labels the row already named are targets, in both formats
    named = [w for w, t in zip(words, target) if t]
    assert named == [w for w, t in zip(bare, bare_target) if t] and all(w in ep.labels for w in named)
    prompt, _ = probes.episode_symbols(ep, lead_in, with_answer=False)
    assert prompt == words[:-2] and prompt[-1] == lead_in[-1]  # the query stops where its label would come


def test_seeds_benchmark_arguments_that_cannot_run_get_a_one_line_error(tmp_path):
    def error(*args):
        r = subprocess.run([sys.executable, str(ROOT / "research" / "flamingo_seeds.py"), "--demo", str(tmp_path),
                            *args], capture_output=True, text=True)
        assert r.returncode == 2
        return r.stderr.strip().splitlines()[-1]

    assert "runs/lm/config.json not found: --demo must be the output folder" in error("--lm", "lm")
    for needed in ("runs/lm-icl/config.json", "runs/clip/config.json", "data/recall.jsonl"):
        (tmp_path / needed).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / needed).write_text("{}")
    assert "--seeds must be comma-separated integers, got 'one'" in error("--seeds", "one")
