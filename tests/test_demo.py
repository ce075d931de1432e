"""`kosmo demo --quick`: the whole pipeline runs and its report holds real, consistent numbers."""

import json

from conftest import kosmo


def test_quick_demo_writes_the_report(tmp_path):
    kosmo("demo", "--out", tmp_path, "--quick")
    report = json.loads((tmp_path / "report.json").read_text())
    lm = report["stages"]["lm"]
    assert lm["final_loss"] < lm["first_loss"] - 2  # it learned something
    assert 1 < lm["ppl_val"] < lm["ppl_uniform"] / 10
    assert (tmp_path / "lm_loss.png").stat().st_size > 1000
    md = (tmp_path / "report.md").read_text()
    assert f"| perplexity, val text | {lm['ppl_val']} |" in md
    assert len(report["samples"]) == 4 and all(s["completion"] for s in report["samples"])
    assert (tmp_path / "runs" / "lm" / "model.safetensors").is_file()
