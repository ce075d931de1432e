"""benchmarks/soak.py for 30 seconds (slow): normal, slow and hanging-up streaming clients get no error, every
engine slot is free at the end, and the server's memory stays about flat."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_short_soak_has_no_errors_no_leaked_slot_and_flat_memory(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.5", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert set(report["requests_completed"]) == {"normal", "slow reader", "disconnects"}
    assert min(report["requests_completed"].values()) > 0
    assert report["slots"]["free_at_end"] == report["slots"]["max_batch"]
    assert report["slots"]["waiting_at_end"] == 0
    # a 30 s run still holds some warm-up in its first quarter; the 10-minute run is the flatness check
    assert report["rss_mb"]["growth_pct"] < 20
