"""benchmarks/gpu_check.sh: its MFU arithmetic, and (slow) the whole script with --dry-run on the CPU, every
step passing with its figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kosmo.model.lm import SIZES, LMConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_the_1b_model_counts_its_flops_and_finds_its_peak():
    cfg = LMConfig(**{**SIZES["1b"], "vocab_size": 32000})
    per_token, params = gpu_check.flops_per_token(cfg, 2048)
    assert 1.0e9 < params < 1.2e9  # TinyLlama-1.1B's shape
    embedding = 32000 * 2048  # a lookup, not a matmul: the head is a separate matrix here
    assert per_token == 6 * (params - embedding) + 12 * 22 * 2048 * 2048
    assert gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_check.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.datasheet_peak("NVIDIA H200") == 989.4e12
    assert gpu_check.datasheet_peak("Some Other GPU") is None


@pytest.mark.slow
def test_the_dry_run_passes_every_step_with_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["cuda_tests", "lm_vs_hf", "mfu_1b", "fsdp_plain", "fsdp", "serve_load"]
    assert report["ok"], [(s["step"], s["log_tail"]) for s in report["steps"] if s["status"] != "ok"]
    assert steps["cuda_tests"]["figures"]["tests"] > 0 and not steps["cuda_tests"]["figures"]["failures"]
    assert steps["lm_vs_hf"]["figures"][-1]["train_ratio"] > 0
    mfu = steps["mfu_1b"]["figures"]
    assert mfu["compile"] and mfu["tok_per_s"] > 0 and 0 < mfu["mfu_vs_measured_matmul"] < 1
    assert mfu["last_loss"] < mfu["first_loss"]
    assert steps["fsdp"]["figures"]["max_relative_loss_difference"] < 1e-4
    served = steps["serve_load"]["figures"]
    assert {r["engine"] for r in served if "engine" in r} >= {"continuous batching", "one at a time"}
    assert {r["prefix cache"] for r in served if r.get("workload") == "shared prefix"} == {"on", "off"}
